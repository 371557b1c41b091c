"""What every checkpoint family shares: torch module layouts in rpe2d's parameter tree, one error
for every mismatch between a file and a family, and the DiT architecture that DiT and SiT (and the
families built on them) spell the same way.

A torch state dict maps to a Flax tree by these rules (docs/methods.md#importing-checkpoints):
Linear weight (out, in) -> Dense kernel (in, out) = W^T; Conv2d weight (O, I, kh, kw) -> Conv
kernel (kh, kw, I, O); embedding tables as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from rpe2d import model as model_lib, rope

Shapes = Mapping[str, tuple]


def linear(weight, bias) -> dict:
  """A torch Linear -> a Dense layer's {'kernel', 'bias'} (float32)."""
  return {'kernel': np.ascontiguousarray(np.asarray(weight, np.float32).T),
          'bias': np.asarray(bias, np.float32)}


def conv(weight, bias) -> dict:
  """A torch Conv2d -> a Conv layer's {'kernel' (HWIO), 'bias'} (float32)."""
  return {'kernel': np.ascontiguousarray(np.asarray(weight, np.float32).transpose(2, 3, 1, 0)),
          'bias': np.asarray(bias, np.float32)}


def _listing(names, limit: int = 12) -> str:
  names = list(names)
  shown = ', '.join(names[:limit])
  return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def mismatches(found: Shapes, expected: Shapes) -> list[str]:
  """Every missing, unexpected and misshapen key of `found` against `expected`, as phrases."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshapen = [f'{k} {tuple(found[k])} (expected {tuple(expected[k])})'
               for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing: {_listing(missing)}')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected: {_listing(unexpected)}')
  if misshapen:
    parts.append(f'{len(misshapen)} misshapen: {_listing(misshapen, 6)}')
  return parts


def variant_name(width: int, depth: int, patch: int) -> str:
  """rpe2d's variant '<size>/<patch>' of a (width, depth) DiT; ValueError if rpe2d has none."""
  for size, (w, d, _) in model_lib.VARIANTS.items():
    if (w, d) == (width, depth):
      return f'{size}/{patch}'
  known = ', '.join(f'{size} ({w}x{d})' for size, (w, d, _) in model_lib.VARIANTS.items())
  raise ValueError(f'width {width} and depth {depth} match no rpe2d variant; allowed (width x '
                   f'depth): {known}')


# ------------------------------------------------------------------------------------------------
# DiT's module tree (facebookresearch/DiT models.py; SiT's is the same).

_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def block_count(shapes: Shapes) -> int:
  """How many `blocks.<i>.` a state dict holds."""
  return 1 + max((int(m[1]) for k in shapes if (m := _BLOCK.match(k))), default=-1)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """The hidden width of FiT's and LightningDiT's SwiGLU: two thirds of width x mlp_ratio."""
  return int(width * mlp_ratio) * 2 // 3


@dataclasses.dataclass(frozen=True)
class DiTArchitecture:
  """What a DiT-layout state dict says about its model, read from shapes alone."""
  width: int
  depth: int
  patch: int
  channels: int          # latent channels in
  out_channels: int      # channels out: 2 x channels with learned sigma
  grid: int              # tokens per side of the stored sin-cos table
  num_classes: int       # without the null class (the table has one more row)
  mlp_hidden: int

  @property
  def variant(self) -> str:
    return variant_name(self.width, self.depth, self.patch)

  @property
  def learned_sigma(self) -> bool:
    return self.out_channels == 2 * self.channels

  @property
  def latent_size(self) -> int:
    return self.grid * self.patch


# The shapes the architecture is read from; a file lacking one of them is not of this layout.
_DIT_ANCHORS = ('x_embedder.proj.weight', 'pos_embed', 'y_embedder.embedding_table.weight',
                'blocks.0.mlp.fc1.weight', 'final_layer.linear.weight')


def dit_architecture(shapes: Shapes) -> DiTArchitecture:
  """Reads a DiT-layout state dict's architecture from its shapes; ValueError naming what is
  missing or inconsistent."""
  missing = [k for k in _DIT_ANCHORS if k not in shapes]
  if missing:
    raise ValueError(f'it lacks the keys the DiT layout is read from ({", ".join(missing)})')
  width, channels, patch, patch_w = (tuple(shapes['x_embedder.proj.weight']) + (0,) * 4)[:4]
  tokens = tuple(shapes['pos_embed'])[1] if len(shapes['pos_embed']) == 3 else 0
  grid = math.isqrt(tokens)
  out_rows = tuple(shapes['final_layer.linear.weight'])[0]
  depth = block_count(shapes)
  problems = []
  if patch != patch_w or patch < 1:
    problems.append(f'x_embedder.proj.weight {tuple(shapes["x_embedder.proj.weight"])} is not a '
                    'square patch convolution')
  if grid * grid != tokens or tokens == 0:
    problems.append(f'pos_embed {tuple(shapes["pos_embed"])} is not a square grid of tokens')
  if patch and out_rows % (patch * patch):
    problems.append(f'final_layer.linear.weight has {out_rows} rows, not a multiple of the '
                    f'{patch}x{patch} patch')
  if problems:
    raise ValueError('; '.join(problems))
  return DiTArchitecture(
      width=width, depth=depth, patch=patch, channels=channels,
      out_channels=out_rows // (patch * patch), grid=grid,
      num_classes=tuple(shapes['y_embedder.embedding_table.weight'])[0] - 1,
      mlp_hidden=tuple(shapes['blocks.0.mlp.fc1.weight'])[0])


def dit_shapes(arch: DiTArchitecture) -> dict[str, tuple]:
  """Every key of a DiT-layout state dict and its shape."""
  d, p = arch.width, arch.patch
  shapes = {
      'x_embedder.proj.weight': (d, arch.channels, p, p), 'x_embedder.proj.bias': (d,),
      'pos_embed': (1, arch.grid * arch.grid, d),
      't_embedder.mlp.0.weight': (d, 256), 't_embedder.mlp.0.bias': (d,),
      't_embedder.mlp.2.weight': (d, d), 't_embedder.mlp.2.bias': (d,),
      'y_embedder.embedding_table.weight': (arch.num_classes + 1, d),
      'final_layer.linear.weight': (p * p * arch.out_channels, d),
      'final_layer.linear.bias': (p * p * arch.out_channels,),
      'final_layer.adaLN_modulation.1.weight': (2 * d, d),
      'final_layer.adaLN_modulation.1.bias': (2 * d,),
  }
  for i in range(arch.depth):
    shapes.update({
        f'blocks.{i}.attn.qkv.weight': (3 * d, d), f'blocks.{i}.attn.qkv.bias': (3 * d,),
        f'blocks.{i}.attn.proj.weight': (d, d), f'blocks.{i}.attn.proj.bias': (d,),
        f'blocks.{i}.mlp.fc1.weight': (arch.mlp_hidden, d),
        f'blocks.{i}.mlp.fc1.bias': (arch.mlp_hidden,),
        f'blocks.{i}.mlp.fc2.weight': (d, arch.mlp_hidden), f'blocks.{i}.mlp.fc2.bias': (d,),
        f'blocks.{i}.adaLN_modulation.1.weight': (6 * d, d),
        f'blocks.{i}.adaLN_modulation.1.bias': (6 * d,),
    })
  return shapes


def dit_params(tensors: Mapping[str, np.ndarray], arch: DiTArchitecture,
               keep_channels: int) -> dict:
  """A DiT-layout state dict -> rpe2d's {'params': ...} tree (per-block layout), keeping the
  first `keep_channels` output channels of each patch position (DiT's learned sigma is the
  second half: all 2C to keep it, C to drop it)."""
  t = tensors
  get = lambda prefix: (t[prefix + '.weight'], t[prefix + '.bias'])
  p, out = arch.patch, arch.out_channels
  weight, bias = get('final_layer.linear')
  # Rows are ordered (p1, p2, c), c fastest (DiT's unpatchify); keep the first channels.
  weight = np.asarray(weight).reshape(p, p, out, arch.width)[:, :, :keep_channels]
  bias = np.asarray(bias).reshape(p, p, out)[:, :, :keep_channels]
  params = {
      'patch_embed': conv(*get('x_embedder.proj')),
      'label_embed': {'embedding': np.asarray(t['y_embedder.embedding_table.weight'], np.float32)},
      't_embed': {'Dense_0': linear(*get('t_embedder.mlp.0')),
                  'Dense_1': linear(*get('t_embedder.mlp.2'))},
      'final_adaLN': linear(*get('final_layer.adaLN_modulation.1')),
      'final_proj': linear(weight.reshape(-1, arch.width), bias.reshape(-1)),
  }
  for i in range(arch.depth):
    block = f'blocks.{i}'
    params[f'block_{i}'] = {
        'Attention_0': {'qkv': linear(*get(f'{block}.attn.qkv')),
                        'proj': linear(*get(f'{block}.attn.proj'))},
        'Dense_0': linear(*get(f'{block}.mlp.fc1')),
        'Dense_1': linear(*get(f'{block}.mlp.fc2')),
        'adaLN': linear(*get(f'{block}.adaLN_modulation.1')),
    }
  return {'params': params}


def sincos_table(grid: int, width: int, order: str) -> np.ndarray:
  """rpe2d's sin-cos table (grid * grid, width) for integer positions on a grid x grid, as the
  model computes it (rope.sincos_embedding)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rpe2d import positions  # pylint: disable=g-import-not-at-top
  geometry = rope.Geometry(grid=(grid, grid), reference=(grid, grid), train_tokens=grid * grid)
  table = rope.sincos_embedding(positions.grid(grid, grid, 1), jnp.zeros((1,)), width=width,
                                geometry=geometry, encoding=rope.Encoding(), order=order)
  return np.asarray(table[0])


# A table of float32 sines and cosines recomputed in float32 is within a few float32 roundings of
# one computed in float64 and stored as float32 (angles up to ~2 x grid rad).
TABLE_TOLERANCE = 1e-5


def check_table(stored, grid: int, width: int, order: str) -> float:
  """The max abs difference between a stored (1, grid^2, width) table and rpe2d's recomputed
  one; ValueError when they differ beyond float32 rounding (then the model would not reproduce
  the file at its native size)."""
  difference = float(np.max(np.abs(np.asarray(stored, np.float32)[0]
                                   - sincos_table(grid, width, order))))
  if not difference <= TABLE_TOLERANCE:
    raise ValueError(f'its pos_embed differs from the 2D sin-cos table (layout {order!r}, integer '
                     f'positions on {grid}x{grid}) by up to {difference:.3g} (allowed: '
                     f'{TABLE_TOLERANCE}): it is not the fixed table this family uses, and '
                     'recomputing it for other grids would change the model')
  return difference


def check_dit_table(tensors: Mapping[str, np.ndarray], arch: DiTArchitecture) -> None:
  """A DiT-layout file's stored pos_embed must be the table rpe2d recomputes (check_table)."""
  check_table(tensors['pos_embed'], arch.grid, arch.width, 'xy')


def imported_config(arch):
  """What every imported family's config shares: its variant, the raw time into the embedder, no
  micro-conditioning, its latents at the size it was trained on (no augmentation, grid
  positions; ImageNet as the source of a 1000-class model, as the published ones are), one
  sample per class in the training grids. `arch`: a family's architecture (variant, latent_size,
  channels, num_classes)."""
  from rpe2d import config as config_lib  # pylint: disable=g-import-not-at-top  # it imports model
  config = config_lib.base()
  m = config.model
  m.variant = arch.variant
  m.time_scale = 1.0
  m.micro_conditioning = False
  d = config.data
  d.name = 'latents'
  d.image_size = arch.latent_size
  d.channels = arch.channels
  d.num_classes = arch.num_classes
  d.augment = 'none'
  d.source_name = 'imagenet2012' if arch.num_classes == 1000 else None
  config.positions.train = 'grid'
  config.sampling.num_per_class = 1
  return config


def dit_config(arch: DiTArchitecture):
  """rpe2d's config for a DiT-layout model trained on 16x16-token grids of SD-VAE latents: the
  model fields every such family shares (sin-cos in DiT's layout on integer grid positions), and
  DiT's and SiT's guidance (1.5 on the first 3 channels). The family sets the parameterisation
  and the sampler; the import adds the VAE."""
  config = imported_config(arch)
  m = config.model
  m.position_embedding = 'sincos'
  m.sincos_order = 'xy'
  m.mlp_ratio = arch.mlp_hidden / arch.width
  m.qk_norm = 'none'
  s = config.sampling
  s.cfg_scale = 1.5
  s.cfg_channels = min(3, arch.channels)
  return config
