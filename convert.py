"""Imports a public checkpoint (DiT, SiT, FiTv2, LightningDiT) as an rpe2d run directory, without
torch.

  python convert.py --family=sit --weights=SiT-XL-2-256x256.pt --vae=sd-vae-ft-ema \
      --workdir=runs/sit_xl_256
  python convert.py --family=dit --weights=DiT-XL-2-512x512.pt --vae=sd-vae-ft-ema \
      --workdir=runs/dit_xl_512
  python convert.py --family=lightningdit --weights=lightningdit-xl-imagenet256-800ep.pt \
      --vae=vavae-imagenet256-f16d32-dinov2.pt --vae_statistics=latents_stats.pt \
      --workdir=runs/lightningdit_xl

Writes <workdir>/config.json and checkpoints/0/ (the weights as rpe2d's params and EMA params), so
sample.py, evaluate.py and train.py --config.init_from= use it like any run (rpe2d/importing.py).
--vae names the VAE the latents come from (the SD VAE: a diffusers folder or its safetensors file;
LightningDiT's VA-VAE: its .pt, read through the allow-listed unpickler, with --vae_statistics its
latents_stats.pt); it is recorded by path and sha256 for decoding. A checkpoint that wraps its
state dicts ({'model': ...,
'ema': ...}, as train.py of DiT and SiT saves them) needs --unwrap=<key>. Bad input (an unknown
family, a file that is not such a checkpoint, a pickle naming a global outside the allow-list, a
VAE of other latents, a workdir that holds a run) exits 2 before anything is written.
"""

import pickle

from absl import app, flags, logging

from rpe2d import checkpoints, cli, families, importing

_FAMILY = flags.DEFINE_enum('family', None, list(families.FAMILIES), 'The checkpoint family.',
                            required=True)
_WEIGHTS = flags.DEFINE_string('weights', None, 'The checkpoint file (.pt, .pth, .bin or '
                               '.safetensors).', required=True)
_VAE = flags.DEFINE_string('vae', None, "The VAE of the model's latents: a diffusers folder "
                           '(e.g. sd-vae-ft-ema) or its diffusion_pytorch_model.safetensors, or '
                           "an LDM-layout file (the VA-VAE's .pt).", required=True)
_VAE_STATISTICS = flags.DEFINE_string(
    'vae_statistics', None, "The VAE's per-channel latent statistics file, for a family trained "
    "on latents normalised by one (lightningdit: the VA-VAE's latents_stats.pt).")
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory to create.', required=True)
_UNWRAP = flags.DEFINE_string('unwrap', None, 'For a wrapped checkpoint: the entry to take '
                              '(ema, model, state_dict).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  # Bad input is found before anything is written; a failure while writing keeps nothing.
  with cli.exit_on(cli.FAILED, checkpoints.CheckpointError, OSError, MemoryError):
    with cli.exit_on(cli.BAD_INPUT, ValueError, FileNotFoundError, pickle.UnpicklingError):
      importing.convert(_FAMILY.value, _WEIGHTS.value, vae=_VAE.value, workdir=_WORKDIR.value,
                        unwrap=_UNWRAP.value, vae_statistics=_VAE_STATISTICS.value)


if __name__ == '__main__':
  app.run(main)
