"""SiT (Ma et al. 2024, github.com/willisma/SiT): DiT's transformer trained as a velocity model on
the linear interpolant, with time running the other way (docs/methods.md#sit).

The weight mapping is DiT's (common.dit_params); two conventions are folded into the weights, so
that an imported SiT is a plain rpe2d velocity model (rpe2d's time, loss, samplers and DyPE's t):

* time: SiT's t_SiT = 1 - t (1 is data) enters its embedder raw. The sinusoid of 1 - t is a fixed
  linear map of the sinusoid of t, [cos f(1 - t), sin f(1 - t)] = R_f [cos ft, sin ft] with
  R_f = [[cos f, sin f], [sin f, -cos f]] per frequency f, so the embedder's first layer W becomes
  W R (model.time_scale = 1: the raw t);
* velocity: SiT predicts d x_t / d t_SiT = x - eps; rpe2d's target is eps - x, so the output layer
  is negated.

Its learned-sigma channels (the 256 x 256 file has 8 output channels; SiT's forward drops the last
4) are dropped.
"""

import math

import numpy as np

from rpe2d.families import common

NAME = 'sit'
DESCRIPTION = 'SiT (willisma/SiT): a velocity model on the linear interpolant, t = 1 is data'
# Where the published files are. No sha256 of them is published (SiT's download.py fetches the
# file from Dropbox without a hash), so none is recognised as known: KNOWN_FILES is empty.
SOURCES = {
    'SiT-XL-2-256x256.pt': 'https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/'
                           'SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0',
}
KNOWN_FILES: dict[str, str] = {}
# The VAE its latents come from: an SD VAE, latents scaled by 0.18215 (SiT's train.py).
VAE_SCALING_FACTOR = 0.18215

architecture = common.dit_architecture
expected_shapes = common.dit_shapes
check = common.check_dit_table


def fold_time_direction(kernel: np.ndarray, frequency_dim: int = 256) -> np.ndarray:
  """The time embedder's first kernel (frequency_dim, width) for features of 1 - t -> the kernel
  for features of t: rows [cos f t; sin f t] -> R_f times the rows of [cos f(1-t); sin f(1-t)]."""
  half = frequency_dim // 2
  # The frequencies as rpe2d.model.timestep_embedding computes them (float32).
  f = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half).astype(np.float64)
  cos, sin = np.diag(np.cos(f)), np.diag(np.sin(f))
  rotation = np.block([[cos, sin], [sin, -cos]])  # features(1 - t) = rotation @ features(t)
  return (rotation.T @ np.asarray(kernel, np.float64)).astype(np.float32)


def params(tensors, arch: common.DiTArchitecture) -> dict:
  tree = common.dit_params(tensors, arch, keep_channels=arch.channels)
  p = tree['params']
  p['t_embed']['Dense_0']['kernel'] = fold_time_direction(p['t_embed']['Dense_0']['kernel'])
  p['final_proj'] = {k: -v for k, v in p['final_proj'].items()}
  return tree


def config(arch: common.DiTArchitecture):
  """The rpe2d config of an imported SiT: the model fields and the published sampling settings
  (SiT-XL/2 256x256: FID 2.15 with dopri5 at cfg 1.5 on 3 channels, 2.06 with its SDE)."""
  c = common.dit_config(arch)
  c.model.prediction = 'velocity'
  c.model.learned_variance = False
  c.flow.time_sampling = 'uniform'  # SiT's training times (transport.sample), for fine-tuning
  c.sampling.sampler = 'dopri5'  # atol 1e-6, rtol 1e-3 (the sampling.* defaults): SiT's ODE
  c.sampling.steps = 250         # for --sampler=euler_maruyama: SiT's SDE steps
  return c
