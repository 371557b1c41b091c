"""LightningDiT (Yao et al. 2025, github.com/hustvl/LightningDiT): a velocity model on VA-VAE
latents (f16, 32 channels) with RMSNorm, SwiGLU, 2D RoPE and DiT's sin-cos table together
(docs/methods.md#lightningdit).

rpe2d runs it with its own blocks (model.norm = 'rmsnorm', model.mlp = 'swiglu',
model.position_embedding = 'rope+sincos'); the weights carry what differs:

* SwiGLU: LightningDiT's fused first projection w12 gives the gate as its first half and the
  value as its second (x1, x2 = chunk(w12 x); SiLU(x1) * x2, then w3): the same operation as
  FiTv2's SwiGLU, whose fc1_g, fc1_x and fc2 are those halves and w3;
* RoPE layout: EVA's VisionRotaryEmbeddingFast rotates interleaved pairs (2i, 2i + 1) of each head
  half (rows first), as FiT's: the q and k rows of qkv are permuted as for FiTv2
  (fitv2.qkv_rows), which q . k does not see;
* the sin-cos table: DiT's get_2d_sincos_pos_embed (the column first, model.sincos_order 'xy'),
  recomputed by rpe2d at every size after checking the stored one (and the stored RoPE tables)
  at the native grid;
* time and sign as SiT's (sit.fold_time_direction, the output negated): its t = 1 is data and it
  predicts x - eps.

Its latents are the VA-VAE's normalised per channel by the statistics file published with it:
(z - mean) / std (latent_multiplier 1). Published sampling (configs/reproductions/
lightningdit_xl_vavae_f16d32_800ep_cfg.yaml): Euler on 250 time points, timestep_shift 0.3 and
guidance from LightningDiT's t = 0.125 on, in rpe2d's time a shift of 1 / 0.3 and guidance for
t <= 0.875 (docs/methods.md#lightningdits-sampler), cfg 6.7 on the first 3 of 32 channels
(10.0 for the 64-epoch file).
"""

import dataclasses
import math

import numpy as np

from rpe2d import model as model_lib
from rpe2d.families import common, fitv2, sit

NAME = 'lightningdit'
DESCRIPTION = ('LightningDiT (hustvl/LightningDiT): RMSNorm, SwiGLU, RoPE with a sin-cos table, '
               'a velocity model on VA-VAE latents, t = 1 is data')
# The published files (MIT). No sha256 of them is recorded (their Hugging Face pages could not be
# read when this was written), so none is recognised as known.
SOURCES = {
    'lightningdit-xl-imagenet256-800ep.pt':
        'https://huggingface.co/hustvl/lightningdit-xl-imagenet256-800ep/resolve/main/'
        'lightningdit-xl-imagenet256-800ep.pt',
    'lightningdit-xl-imagenet256-64ep.pt':
        'https://huggingface.co/hustvl/lightningdit-xl-imagenet256-64ep/resolve/main/'
        'lightningdit-xl-imagenet256-64ep.pt',
}
# Its VAE and the statistics its latents are normalised by.
VAE_SOURCES = {
    'vavae-imagenet256-f16d32-dinov2.pt':
        'https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/'
        'vavae-imagenet256-f16d32-dinov2.pt',
    'latents_stats.pt':
        'https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/'
        'latents_stats.pt',
}
KNOWN_FILES: dict[str, str] = {}
VAE = 'the VA-VAE f16d32, vavae-imagenet256-f16d32-dinov2.pt, with its latents_stats.pt'
VAE_SCALING_FACTOR = 1.0  # latent_multiplier
VAE_STATISTICS = True     # (z - mean) / std per channel, from the statistics file
ROPE_BASE = 10000.0
MLP_RATIO = 4.0
FREQUENCY_DIM = 256       # its timestep embedder's sinusoids
# The published sampler, in LightningDiT's time (t = 1 is data) and in rpe2d's.
EULER_POINTS = 250
TIMESTEP_SHIFT = 0.3
CFG_INTERVAL_START = 0.125
CFG_SCALE = 6.7           # 800 epochs; the 64-epoch file: 10.0
CFG_CHANNELS = 3

# The shapes the architecture is read from; a file lacking one of them is not of this layout.
_ANCHORS = ('x_embedder.proj.weight', 'pos_embed', 'feat_rope.freqs_cos',
            'y_embedder.embedding_table.weight', 'blocks.0.mlp.w12.weight',
            'blocks.0.norm1.weight', 'final_layer.linear.weight')


@dataclasses.dataclass(frozen=True)
class LightningArchitecture:
  """What a LightningDiT state dict says about its model, read from shapes alone."""
  width: int
  depth: int
  patch: int
  channels: int          # latent channels in
  out_channels: int      # channels out: 2 x channels with learned sigma (dropped)
  grid: int              # tokens per side of the stored tables: the trained grid
  head_dim: int          # the RoPE tables' width: every channel of a head rotates
  num_classes: int       # without the null class (the table has one more row)
  mlp_hidden: int

  @property
  def variant(self) -> str:
    return common.variant_name(self.width, self.depth, self.patch)

  @property
  def heads(self) -> int:
    return self.width // self.head_dim

  @property
  def latent_size(self) -> int:
    return self.grid * self.patch


def architecture(shapes) -> LightningArchitecture:
  """Reads a LightningDiT state dict's architecture from its shapes; ValueError naming what is
  missing or inconsistent."""
  missing = [k for k in _ANCHORS if k not in shapes]
  if missing:
    raise ValueError(f'it lacks the keys the LightningDiT layout is read from '
                     f'({", ".join(missing)})')
  width, channels, patch, patch_w = (tuple(shapes['x_embedder.proj.weight']) + (0,) * 4)[:4]
  tokens = tuple(shapes['pos_embed'])[1] if len(shapes['pos_embed']) == 3 else 0
  grid = math.isqrt(tokens)
  rope_tokens, head_dim = (tuple(shapes['feat_rope.freqs_cos']) + (0, 0))[:2]
  out_rows = tuple(shapes['final_layer.linear.weight'])[0]
  mlp_hidden = tuple(shapes['blocks.0.mlp.w12.weight'])[0] // 2
  problems = []
  if patch != patch_w or patch < 1:
    problems.append(f'x_embedder.proj.weight {tuple(shapes["x_embedder.proj.weight"])} is not a '
                    'square patch convolution')
  if grid * grid != tokens or tokens == 0:
    problems.append(f'pos_embed {tuple(shapes["pos_embed"])} is not a square grid of tokens')
  if rope_tokens != tokens or not head_dim or width % head_dim or head_dim % 4:
    problems.append(f'feat_rope.freqs_cos {tuple(shapes["feat_rope.freqs_cos"])} is not a 2D '
                    f'RoPE table over the {tokens} tokens and whole heads of width {width}')
  if patch and out_rows % (patch * patch):
    problems.append(f'final_layer.linear.weight has {out_rows} rows, not a multiple of the '
                    f'{patch}x{patch} patch')
  if mlp_hidden != common.swiglu_hidden(width, MLP_RATIO):
    problems.append(f"blocks.0.mlp.w12.weight has {2 * mlp_hidden} rows; LightningDiT's SwiGLU at "
                    f'width {width} has 2 x {common.swiglu_hidden(width, MLP_RATIO)}')
  if problems:
    raise ValueError('; '.join(problems))
  arch = LightningArchitecture(
      width=width, depth=common.block_count(shapes),
      patch=patch, channels=channels, out_channels=out_rows // (patch * patch), grid=grid,
      head_dim=head_dim, num_classes=tuple(shapes['y_embedder.embedding_table.weight'])[0] - 1,
      mlp_hidden=mlp_hidden)
  heads = model_lib.parse_variant(arch.variant)[2]
  if heads != arch.heads:
    raise ValueError(f'its RoPE tables give {arch.heads} heads of {head_dim}; rpe2d\'s variant '
                     f'{arch.variant} has {heads}')
  if arch.out_channels not in (channels, 2 * channels):
    raise ValueError(f'final_layer.linear.weight gives {arch.out_channels} output channels for '
                     f'{channels} input channels; allowed: {channels} (or {2 * channels} with '
                     'learned sigma)')
  return arch


def expected_shapes(arch: LightningArchitecture) -> dict[str, tuple]:
  """Every key of a LightningDiT state dict and its shape: 15 + 12 per block (351 for XL/1),
  the stored tables included."""
  d, p, h, n = arch.width, arch.patch, arch.mlp_hidden, arch.grid * arch.grid
  out = p * p * arch.out_channels
  shapes = {
      'x_embedder.proj.weight': (d, arch.channels, p, p), 'x_embedder.proj.bias': (d,),
      'pos_embed': (1, n, d),
      'feat_rope.freqs_cos': (n, arch.head_dim), 'feat_rope.freqs_sin': (n, arch.head_dim),
      't_embedder.mlp.0.weight': (d, FREQUENCY_DIM), 't_embedder.mlp.0.bias': (d,),
      't_embedder.mlp.2.weight': (d, d), 't_embedder.mlp.2.bias': (d,),
      'y_embedder.embedding_table.weight': (arch.num_classes + 1, d),
      'final_layer.norm_final.weight': (d,),
      'final_layer.linear.weight': (out, d), 'final_layer.linear.bias': (out,),
      'final_layer.adaLN_modulation.1.weight': (2 * d, d),
      'final_layer.adaLN_modulation.1.bias': (2 * d,),
  }
  for i in range(arch.depth):
    b = f'blocks.{i}.'
    shapes.update({
        b + 'norm1.weight': (d,), b + 'norm2.weight': (d,),
        b + 'attn.qkv.weight': (3 * d, d), b + 'attn.qkv.bias': (3 * d,),
        b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
        b + 'mlp.w12.weight': (2 * h, d), b + 'mlp.w12.bias': (2 * h,),
        b + 'mlp.w3.weight': (d, h), b + 'mlp.w3.bias': (d,),
        b + 'adaLN_modulation.1.weight': (6 * d, d), b + 'adaLN_modulation.1.bias': (6 * d,),
    })
  return shapes


def rope_tables(grid: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, ...]:
  """The (cos, sin) tables (grid^2, head_dim) LightningDiT stores (EVA's
  VisionRotaryEmbeddingFast(head_dim / 2, pt_seq_len=grid)): per head half (rows, then columns)
  the frequencies base^(-2i/(head_dim/2)) each repeated for a pair, at integer positions."""
  half = head_dim // 2
  theta = (1.0 / base ** (np.arange(0, half, 2, dtype=np.float32) / half)).astype(np.float32)
  angles = np.repeat(np.arange(grid, dtype=np.float32)[:, None] * theta, 2, axis=-1)  # (g, half)
  both = np.concatenate([np.broadcast_to(angles[:, None], (grid, grid, half)),
                         np.broadcast_to(angles[None, :], (grid, grid, half))], axis=-1)
  both = both.reshape(grid * grid, head_dim)
  return np.cos(both), np.sin(both)


def check(tensors, arch: LightningArchitecture) -> None:
  """The stored sin-cos table and RoPE tables must be the ones rpe2d recomputes at the native
  grid (else recomputing them at other sizes would change the model)."""
  common.check_table(tensors['pos_embed'], arch.grid, arch.width, 'xy')
  for name, table in zip(('freqs_cos', 'freqs_sin'), rope_tables(arch.grid, arch.head_dim)):
    difference = float(np.max(np.abs(np.asarray(tensors[f'feat_rope.{name}'], np.float32)
                                      - table)))
    if not difference <= common.TABLE_TOLERANCE:
      raise ValueError(f'its feat_rope.{name} differs from the 2D RoPE table (base '
                       f'{ROPE_BASE:g}, integer positions on {arch.grid}x{arch.grid}) by up to '
                       f'{difference:.3g} (allowed: {common.TABLE_TOLERANCE})')


def params(tensors, arch: LightningArchitecture) -> dict:
  """A LightningDiT state dict -> rpe2d's {'params': ...} tree (per-block layout)."""
  t = tensors
  get = lambda prefix: (t[prefix + '.weight'], t[prefix + '.bias'])
  d, p, c, h = arch.width, arch.patch, arch.channels, arch.mlp_hidden
  # Rows (p1, p2, c), c fastest; learned sigma (its second half of c) dropped; the sign: rpe2d
  # predicts eps - x.
  weight, bias = get('final_layer.linear')
  weight = np.asarray(weight).reshape(p, p, arch.out_channels, d)[:, :, :c].reshape(-1, d)
  bias = np.asarray(bias).reshape(p, p, arch.out_channels)[:, :, :c].reshape(-1)
  t_first = common.linear(*get('t_embedder.mlp.0'))
  t_first['kernel'] = sit.fold_time_direction(t_first['kernel'], FREQUENCY_DIM)
  scale = lambda name: {'scale': np.asarray(t[name], np.float32)}
  tree = {
      'patch_embed': common.conv(*get('x_embedder.proj')),
      'label_embed': {'embedding': np.asarray(t['y_embedder.embedding_table.weight'], np.float32)},
      't_embed': {'Dense_0': t_first, 'Dense_1': common.linear(*get('t_embedder.mlp.2'))},
      'final_adaLN': common.linear(*get('final_layer.adaLN_modulation.1')),
      'final_norm': scale('final_layer.norm_final.weight'),
      'final_proj': common.linear(-weight, -bias),
  }
  rows = fitv2.qkv_rows(d, arch.heads)
  for i in range(arch.depth):
    b = f'blocks.{i}.'
    weight, bias = get(b + 'attn.qkv')
    w12, b12 = (np.asarray(v) for v in get(b + 'mlp.w12'))
    tree[f'block_{i}'] = {
        'norm1': scale(b + 'norm1.weight'), 'norm2': scale(b + 'norm2.weight'),
        'Attention_0': {'qkv': common.linear(np.asarray(weight)[rows], np.asarray(bias)[rows]),
                        'proj': common.linear(*get(b + 'attn.proj'))},
        'fc1_g': common.linear(w12[:h], b12[:h]),      # x1: through SiLU
        'fc1_x': common.linear(w12[h:], b12[h:]),      # x2
        'fc2': common.linear(*get(b + 'mlp.w3')),
        'adaLN': common.linear(*get(b + 'adaLN_modulation.1')),
    }
  return {'params': tree}


def config(arch: LightningArchitecture):
  """The rpe2d config of an imported LightningDiT: its blocks, RoPE with the sin-cos table, the
  grid it was trained on, and the published sampling (LightningDiT-XL/1, 800 epochs: FID 1.35 with
  Euler on 250 points, shift 0.3, cfg 6.7 from t_LightningDiT = 0.125 on 3 of 32 channels)."""
  c = common.imported_config(arch)
  m = c.model
  m.position_embedding = 'rope+sincos'
  m.sincos_order = 'xy'
  m.rope_base = ROPE_BASE
  m.prediction = 'velocity'
  m.learned_variance = False
  m.mlp, m.mlp_ratio, m.norm, m.adaln, m.qk_norm = 'swiglu', MLP_RATIO, 'rmsnorm', 'full', 'none'
  s = c.sampling
  s.sampler, s.steps = 'euler', EULER_POINTS - 1
  s.time_shift = 1.0 / TIMESTEP_SHIFT
  s.cfg_scale = CFG_SCALE
  s.cfg_interval = (0.0, 1.0 - CFG_INTERVAL_START)
  s.cfg_channels = min(CFG_CHANNELS, arch.channels)
  c.flow.time_sampling = 'logit_normal'  # its training times (use_lognorm), for fine-tuning
  return c
