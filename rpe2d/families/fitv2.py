"""FiTv2 (Wang, Lu et al. 2024, github.com/whlzy/FiT): a velocity model with SwiGLU, adaLN-LoRA
plus a global adaLN, LayerNorm on queries and keys, and 2D RoPE, trained on grids of up to 16x16
tokens (docs/methods.md#fitv2).

rpe2d runs it with its own blocks (model.mlp = 'swiglu', model.adaln = 'lora', model.qk_norm =
'layernorm') and RoPE; the weights carry what differs:

* patch embedding: FiT's Linear on patch tokens ordered (c, p1, p2) is a p x p stride-p
  convolution whose weight is the Linear's, reshaped to (width, c, p, p);
* RoPE layout: FiT rotates interleaved pairs (2i, 2i + 1) of each head half (the row half first,
  as rpe2d), rpe2d pairs channel j with j + head_dim/4. The q and k rows of qkv are permuted in
  each head (pair (2i, 2i + 1) -> (i, i + head_dim/4)), which is exact: q . k is unchanged by one
  permutation of both, and the LayerNorm over head_dim before RoPE commutes with it;
* output: FiT's final Linear rows (c, p1, p2) are reordered to rpe2d's (p1, p2, c);
* time and sign as SiT's (sit.fold_time_direction, the output negated): FiT's t = 1 is data and
  it predicts x - eps.

Positions are FiT's integer grid 0..n-1 (rpe2d's grid rule) with the extrapolation reference 16
tokens per axis (FiT's ori_max_pe_len: the model's train grid). Published sampling: cfg 1.5 on the
first 3 latent channels, dopri5 (atol 1e-6, rtol 1e-3).
"""

import dataclasses

import numpy as np

from rpe2d import model as model_lib
from rpe2d.families import common, sit

NAME = 'fitv2'
DESCRIPTION = ('FiTv2 (whlzy/FiT): SwiGLU, adaLN-LoRA and QK-LayerNorm with 2D RoPE, a velocity '
               'model, t = 1 is data')
# The published files (Apache-2.0). Their sha256 is shown on the Hugging Face file pages, which
# could not be read when this was written: none is recorded, so none is recognised as known.
SOURCES = {
    'FiTv2_XL/model_ema.safetensors':
        'https://huggingface.co/InfImagine/FiTv2/resolve/main/FiTv2_XL/model_ema.safetensors',
    'FiTv2_XL_HRFT/model_ema.safetensors':
        'https://huggingface.co/InfImagine/FiTv2/resolve/main/FiTv2_XL_HRFT/model_ema.safetensors',
}
KNOWN_FILES: dict[str, str] = {}
# FiT's latents: sd-vae-ft-ema's, scaled by 0.18215 (its sampler divides by the VAE's factor).
VAE_SCALING_FACTOR = 0.18215
# FiT's configs: 4 latent channels, mlp_ratio 4 with SwiGLU at 2/3 of it, RoPE base 10000, and
# the extrapolation reference (ori_max_pe_len) of every published sampling command.
CHANNELS = 4
MLP_RATIO = 4.0
ROPE_BASE = 10000.0
REFERENCE_TOKENS = 16
CFG_CHANNELS = 3

# The shapes the architecture is read from; a file lacking one of them is not of this layout.
_ANCHORS = ('x_embedder.proj.weight', 'y_embedder.embedding_table.weight',
            'global_adaLN_modulation.1.weight', 'blocks.0.mlp.fc1_g.weight',
            'blocks.0.adaLN_modulation.1.weight', 'final_layer.linear.weight')


@dataclasses.dataclass(frozen=True)
class FiTArchitecture:
  """What a FiTv2 state dict says about its model, read from shapes alone."""
  width: int
  depth: int
  patch: int
  num_classes: int       # without the null class (the table has one more row)
  mlp_hidden: int
  adaln_rank: int
  channels: int = CHANNELS

  @property
  def variant(self) -> str:
    return common.variant_name(self.width, self.depth, self.patch)

  @property
  def heads(self) -> int:
    return model_lib.parse_variant(self.variant)[2]

  @property
  def latent_size(self) -> int:
    return REFERENCE_TOKENS * self.patch


def architecture(shapes) -> FiTArchitecture:
  """Reads a FiTv2 state dict's architecture from its shapes; ValueError naming what is missing
  or inconsistent."""
  missing = [k for k in _ANCHORS if k not in shapes]
  if missing:
    raise ValueError(f'it lacks the keys the FiTv2 layout is read from ({", ".join(missing)})')
  width, patch_inputs = (tuple(shapes['x_embedder.proj.weight']) + (0, 0))[:2]
  patch = int(round((patch_inputs / CHANNELS) ** 0.5))
  mlp_hidden = tuple(shapes['blocks.0.mlp.fc1_g.weight'])[0]
  problems = []
  if len(shapes['x_embedder.proj.weight']) != 2 or patch * patch * CHANNELS != patch_inputs:
    problems.append(f'x_embedder.proj.weight {tuple(shapes["x_embedder.proj.weight"])} is not a '
                    f'Linear on p x p patches of {CHANNELS} latent channels')
  if mlp_hidden != common.swiglu_hidden(width, MLP_RATIO):
    problems.append(f'blocks.0.mlp.fc1_g.weight has {mlp_hidden} rows; FiTv2\'s SwiGLU at width '
                    f'{width} has {common.swiglu_hidden(width, MLP_RATIO)}')
  if problems:
    raise ValueError('; '.join(problems))
  return FiTArchitecture(
      width=width, depth=common.block_count(shapes),
      patch=patch, num_classes=tuple(shapes['y_embedder.embedding_table.weight'])[0] - 1,
      mlp_hidden=mlp_hidden, adaln_rank=tuple(shapes['blocks.0.adaLN_modulation.1.weight'])[0])


def expected_shapes(arch: FiTArchitecture) -> dict[str, tuple]:
  """Every key of a FiTv2 state dict and its shape: 13 + 14 per block (517 for XL)."""
  d, r, h, out = arch.width, arch.adaln_rank, arch.mlp_hidden, arch.patch ** 2 * arch.channels
  shapes = {
      'x_embedder.proj.weight': (d, out), 'x_embedder.proj.bias': (d,),
      't_embedder.mlp.0.weight': (d, 256), 't_embedder.mlp.0.bias': (d,),
      't_embedder.mlp.2.weight': (d, d), 't_embedder.mlp.2.bias': (d,),
      'y_embedder.embedding_table.weight': (arch.num_classes + 1, d),
      'global_adaLN_modulation.1.weight': (6 * d, d), 'global_adaLN_modulation.1.bias': (6 * d,),
      'final_layer.linear.weight': (out, d), 'final_layer.linear.bias': (out,),
      'final_layer.adaLN_modulation.1.weight': (2 * d, d),
      'final_layer.adaLN_modulation.1.bias': (2 * d,),
  }
  for i in range(arch.depth):
    b = f'blocks.{i}.'
    shapes.update({
        b + 'attn.qkv.weight': (3 * d, d), b + 'attn.qkv.bias': (3 * d,),
        b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
        b + 'mlp.fc1_g.weight': (h, d), b + 'mlp.fc1_g.bias': (h,),
        b + 'mlp.fc1_x.weight': (h, d), b + 'mlp.fc1_x.bias': (h,),
        b + 'mlp.fc2.weight': (d, h), b + 'mlp.fc2.bias': (d,),
        b + 'adaLN_modulation.1.weight': (r, d), b + 'adaLN_modulation.1.bias': (r,),
        b + 'adaLN_modulation.2.weight': (6 * d, r), b + 'adaLN_modulation.2.bias': (6 * d,),
    })
  return shapes


def check(tensors, arch: FiTArchitecture) -> None:
  """Nothing beyond the shapes: FiT's RoPE tables are not in its state dict (non-persistent
  buffers), rpe2d computes them."""
  del tensors, arch


def rope_permutation(head_dim: int) -> np.ndarray:
  """rpe2d's channel j of a head <- FiT's channel rope_permutation(head_dim)[j]: in each half
  (rows, then columns) FiT's pair (2i, 2i + 1) becomes rpe2d's (i, i + head_dim/4)."""
  quarter = head_dim // 4
  pairs = 2 * np.arange(quarter)
  return np.concatenate([np.concatenate([half + pairs, half + pairs + 1])
                         for half in (0, head_dim // 2)])


def qkv_rows(width: int, heads: int) -> np.ndarray:
  """FiT's qkv rows in rpe2d's order: q and k of every head permuted for RoPE, v as it is."""
  rows = np.arange(3 * width).reshape(3, heads, width // heads)
  rows[:2] = rows[:2][..., rope_permutation(width // heads)]
  return rows.reshape(-1)


def params(tensors, arch: FiTArchitecture) -> dict:
  """A FiTv2 state dict -> rpe2d's {'params': ...} tree (per-block layout)."""
  t = tensors
  get = lambda prefix: (t[prefix + '.weight'], t[prefix + '.bias'])
  d, p, c = arch.width, arch.patch, arch.channels
  weight, bias = get('x_embedder.proj')
  patch_embed = common.conv(np.asarray(weight).reshape(d, c, p, p), bias)
  # The output rows (c, p1, p2) -> (p1, p2, c), and the sign: rpe2d predicts eps - x.
  weight, bias = get('final_layer.linear')
  weight = np.asarray(weight).reshape(c, p, p, d).transpose(1, 2, 0, 3).reshape(-1, d)
  bias = np.asarray(bias).reshape(c, p, p).transpose(1, 2, 0).reshape(-1)
  final = common.linear(-weight, -bias)
  t_first = common.linear(*get('t_embedder.mlp.0'))
  t_first['kernel'] = sit.fold_time_direction(t_first['kernel'])
  tree = {
      'patch_embed': patch_embed,
      'label_embed': {'embedding': np.asarray(t['y_embedder.embedding_table.weight'], np.float32)},
      't_embed': {'Dense_0': t_first, 'Dense_1': common.linear(*get('t_embedder.mlp.2'))},
      'global_adaLN': common.linear(*get('global_adaLN_modulation.1')),
      'final_adaLN': common.linear(*get('final_layer.adaLN_modulation.1')),
      'final_proj': final,
  }
  rows = qkv_rows(d, arch.heads)
  for i in range(arch.depth):
    b = f'blocks.{i}.'
    weight, bias = get(b + 'attn.qkv')
    tree[f'block_{i}'] = {
        'Attention_0': {'qkv': common.linear(np.asarray(weight)[rows], np.asarray(bias)[rows]),
                        'proj': common.linear(*get(b + 'attn.proj'))},
        'fc1_g': common.linear(*get(b + 'mlp.fc1_g')),
        'fc1_x': common.linear(*get(b + 'mlp.fc1_x')),
        'fc2': common.linear(*get(b + 'mlp.fc2')),
        'adaLN_down': common.linear(*get(b + 'adaLN_modulation.1')),
        'adaLN_up': common.linear(*get(b + 'adaLN_modulation.2')),
    }
  return {'params': tree}


def latents_from_tokens(tokens, height: int, width: int, patch: int = 2):
  """FiT's token layout (batch, h w, (c p1 p2)), raster order, -> latents (batch, H, W, c)."""
  tokens = np.asarray(tokens)
  batch, h, w = tokens.shape[0], height // patch, width // patch
  grid = tokens.reshape(batch, h, w, -1, patch, patch)                  # (b, h, w, c, p1, p2)
  return grid.transpose(0, 1, 4, 2, 5, 3).reshape(batch, height, width, -1)


def tokens_from_latents(latents, patch: int = 2):
  """latents (batch, H, W, c) -> FiT's token layout (batch, h w, (c p1 p2))."""
  latents = np.asarray(latents)
  batch, height, width, channels = latents.shape
  grid = latents.reshape(batch, height // patch, patch, width // patch, patch, channels)
  return grid.transpose(0, 1, 3, 5, 2, 4).reshape(batch, -1, channels * patch * patch)


def config(arch: FiTArchitecture):
  """The rpe2d config of an imported FiTv2: its blocks and RoPE, the grid it was trained on, FiT's
  conventions for the encodings that name them (YaRN's index form with tau from the longer side),
  and the published sampling settings (FiTv2-XL/2 256x256: FID 2.26 with dopri5, atol 1e-6, rtol
  1e-3, at cfg 1.5 on 3 channels)."""
  c = common.imported_config(arch)
  m = c.model
  m.position_embedding = 'rope'
  m.rope_base = ROPE_BASE
  m.prediction = 'velocity'
  m.mlp, m.mlp_ratio, m.norm = 'swiglu', MLP_RATIO, 'layernorm'
  m.adaln, m.adaln_rank = 'lora', arch.adaln_rank
  m.qk_norm = 'layernorm'
  e = c.encoding
  e.yarn_form, e.temperature = 'index', 'rope_max'
  s = c.sampling
  s.sampler, s.atol, s.rtol = 'dopri5', 1e-6, 1e-3
  s.cfg_scale = 1.5
  s.cfg_channels = min(CFG_CHANNELS, arch.channels)
  c.flow.time_sampling = 'logit_normal'  # FiTv2's training times (snr_type lognorm)
  return c
