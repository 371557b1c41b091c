"""DiT (Peebles & Xie 2023, github.com/facebookresearch/DiT): epsilon prediction with learned
variance on the linear-beta 1000-step DDPM (docs/methods.md#dit-in-flow-time).

The weights map as they are (common.dit_params), learned variance included; the model is
`model.prediction = 'ddpm_epsilon'` (rpe2d.ddpm's change of variables drives it with rpe2d's flow
samplers) with `model.time_scale = 1` (its embedder takes the DDPM index) and
`model.learned_variance` (the variance channels DiT's ancestral sampler, `sampling.sampler =
'ddpm'`, reads).
"""

from rpe2d.families import common

NAME = 'dit'
DESCRIPTION = 'DiT (facebookresearch/DiT): epsilon and learned variance on a 1000-step DDPM'
# No sha256 of these files is published (DiT's download.py fetches them without a hash), so none
# is recognised as known: KNOWN_FILES is empty.
SOURCES = {
    'DiT-XL-2-256x256.pt': 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt',
    'DiT-XL-2-512x512.pt': 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt',
}
KNOWN_FILES: dict[str, str] = {}
VAE_SCALING_FACTOR = 0.18215

architecture = common.dit_architecture
expected_shapes = common.dit_shapes
check = common.check_dit_table


def params(tensors, arch: common.DiTArchitecture) -> dict:
  return common.dit_params(tensors, arch, keep_channels=arch.out_channels)


def config(arch: common.DiTArchitecture):
  """The rpe2d config of an imported DiT: the model fields and the published sampling settings
  (DiT-XL/2: FID 2.27 at 256x256, 3.04 at 512x512, 250 ancestral DDPM steps, cfg 1.5 on 3
  channels)."""
  c = common.dit_config(arch)
  c.model.prediction = 'ddpm_epsilon'
  c.model.learned_variance = arch.learned_sigma
  c.sampling.sampler = 'ddpm' if arch.learned_sigma else 'euler'
  c.sampling.steps = 250
  return c
