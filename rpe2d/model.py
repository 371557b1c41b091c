"""Diffusion Transformer (Peebles & Xie 2023) in Flax Linen, with positions as inputs
(docs/methods.md#dit).

The model never assumes a grid size: it takes images of any height and width that the patch size
divides, token positions (batch, N, 2), and the flow time t (batch,). How positions become angles
(RoPE or sin-cos, extrapolation, DyPE) is `rope.Encoding`, a static argument, so one set of weights
serves every resolution and every method.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rpe2d import attention, prediction, rope

# name -> (width, depth, heads). The paper sizes plus small ones for tests and CPU training.
VARIANTS = {
    'micro': (32, 2, 2),
    'mini': (80, 2, 2),
    'tiny': (128, 6, 4),
    'small': (256, 8, 4),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
    'FiTv2-XL': (1152, 36, 16),
}
# 'rope+sincos': both, as LightningDiT (RoPE on q and k, and a sin-cos table added to the tokens).
POSITION_EMBEDDINGS = ('rope', 'sincos', 'rope+sincos')
# The sin-cos table's layout: 'yx' = [sin y, cos y, sin x, cos x] (rpe2d's own), 'xy' = the column
# coordinate first, as DiT's get_2d_sincos_pos_embed lays it out (imported DiT and SiT).
SINCOS_ORDERS = ('yx', 'xy')
PREDICTIONS = tuple(prediction.PREDICTIONS)
# What a rematerialised block keeps from its forward pass: nothing (recompute all), or the results
# of its matrix multiplies (recompute only the cheap elementwise work).
REMAT_POLICIES = {'nothing': jax.checkpoint_policies.nothing_saveable,
                  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
SCANNED_BLOCKS = 'blocks'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_variant(name: str) -> tuple[int, int, int, int]:
  """'XL/2' -> (width, depth, heads, patch)."""
  size, _, patch = name.partition('/')
  if size not in VARIANTS or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f'unknown model variant {name!r}; allowed: <size>/<patch> with size in '
                     f'{", ".join(VARIANTS)} and a positive integer patch, e.g. "B/2"')
  return (*VARIANTS[size], int(patch))


def timestep_embedding(t, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
  """Sinusoidal features [cos, sin] of scalars t (batch,) -> (batch, dim), of scale * t: the
  default 1000 stretches t in [0, 1] to [0, 1000] so the frequencies cover it as in DiT."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = scale * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dot(lhs, rhs, dimension_numbers):
  # Accumulate and return float32: XLA:CPU runs a bfloat16 dot on its fast (AMX / AVX-512 BF16)
  # path only when the dot itself returns float32 (bf16 -> bf16 takes a generic path: a sixth of
  # the speed with AMX, half on a Zen 4), and every platform accumulates in float32 anyway.
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul(x, kernel):
  return _dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, grad):
  x, kernel = residuals
  grad = grad.astype(x.dtype)  # the float32 output's gradient, rounded once for both dots
  d_x = _dot(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))             # dy W^T
  if x.dtype == jnp.float32:
    # x^T dy as one dot contracting the flattened rows, so XLA:CPU neither contracts two
    # dimensions at once (a slow path for float32) nor fuses the producer of x into a transposed
    # copy.
    x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
  # In bfloat16 the opposite holds: contracting (batch, tokens) at once takes the fast path, the
  # flattened rows a slow one.
  rows = tuple(range(x.ndim - 1))
  d_kernel = _dot(x, grad, ((rows, rows), ((), ())))                           # x^T dy
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _float32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A Dense layer's dot in its compute dtype, accumulated into and returned as float32; compiled
  for a CPU, with a backward whose weight gradient XLA:CPU computes at full speed."""
  del preferred_element_type  # always float32
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if (attention.target_platform() == 'cpu' and tuple(lhs_contract) == (lhs.ndim - 1,)
      and tuple(rhs_contract) == (0,) and rhs.ndim == 2 and not lhs_batch):
    return _matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                             preferred_element_type=jnp.float32)


def _float32_conv(*args, **kwargs):
  """lax.conv_general_dilated accumulated into and returned as float32, like `dense`."""
  return jax.lax.conv_general_dilated(*args, **kwargs, preferred_element_type=jnp.float32)


def dense(features: int, dtype=jnp.float32, **kwargs) -> nn.Dense:
  """nn.Dense whose inputs and kernel are cast to `dtype` for the product, and whose output (the
  bias added) is float32: only matmul operands are ever bfloat16, as under PyTorch's autocast."""
  return nn.Dense(features, dtype=dtype, dot_general=_float32_dot_general, **kwargs)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


# Interchangeable parts of a block, chosen by name (docs/methods.md#blocks). Each is a small
# function that creates its layers in the calling block, so the parameter names are the block's
# (DiT's MLP keeps the names Dense_0 and Dense_1 that every existing checkpoint holds).


def layer_norm(name=None):
  """LayerNorm without affine parameters (DiT, FiT)."""
  return nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, name=name)


def rms_norm(name=None):
  """RMSNorm with a learned scale, x / sqrt(mean(x^2) + 1e-6) * scale, in float32 (LightningDiT's
  and LLaMA's)."""
  return nn.RMSNorm(epsilon=1e-6, name=name)


# The norm before each branch and the final layer: DiT's, or LightningDiT's RMSNorm with a weight.
NORMS = {'layernorm': layer_norm, 'rmsnorm': rms_norm}
# The norm on queries and keys over head_dim, before RoPE.
QK_NORMS = {'none': None, 'rmsnorm': rms_norm, 'layernorm': layer_norm}
# Saved configs from before qk_norm was a name held a bool.
QK_NORM_LEGACY = {False: 'none', True: 'rmsnorm'}


def gelu_mlp(x, linear, width: int, ratio: float):
  """DiT's MLP: Linear(width -> ratio width), tanh-GELU, Linear(-> width)."""
  h = linear(int(width * ratio))(x)                                    # (batch, N, ratio width)
  return linear(width)(nn.gelu(h, approximate=True))                   # (batch, N, width)


def swiglu_mlp(x, linear, width: int, ratio: float):
  """SwiGLU as timm's `SwiGLU` (FiTv2): fc2(SiLU(fc1_g(x)) * fc1_x(x)), the hidden width 2/3 of
  the GELU MLP's so the parameter count stays (3072 at width 1152, ratio 4)."""
  hidden = int(width * ratio) * 2 // 3
  gate = linear(hidden, name='fc1_g')(x)                               # (batch, N, hidden)
  value = linear(hidden, name='fc1_x')(x)                              # (batch, N, hidden)
  return linear(width, name='fc2')(nn.silu(gate) * value)              # (batch, N, width)


MLPS = {'gelu': gelu_mlp, 'swiglu': swiglu_mlp}


def full_adaln(c, width: int, rank: int):
  """adaLN-Zero (DiT): one zero-initialised Linear(width -> 6 width) on SiLU(c) per block."""
  del rank
  return dense(6 * width, kernel_init=nn.initializers.zeros, name='adaLN')(nn.silu(c))


def lora_adaln(c, width: int, rank: int):
  """adaLN-LoRA (FiTv2): a rank-r bottleneck per block, SiLU -> Linear(width -> r) ->
  Linear(r -> 6 width), the second zero-initialised. The model adds one full-rank adaLN shared by
  every block (its `global_adaLN` layer) to it."""
  h = dense(rank, kernel_init=nn.initializers.xavier_uniform(), name='adaLN_down')(nn.silu(c))
  return dense(6 * width, kernel_init=nn.initializers.zeros, name='adaLN_up')(h)


# name -> (the per-block modulation, whether the model adds one shared adaLN to every block's).
ADALNS = {'full': (full_adaln, False), 'lora': (lora_adaln, True)}


class ScalarEmbedder(nn.Module):
  """Sinusoidal features of one or more scalars per example, then an MLP (timestep, crop window)."""
  width: int
  frequency_dim: int = 256
  zero_output: bool = False
  scale: float = 1000.0  # multiplies the scalars before the sinusoids

  @nn.compact
  def __call__(self, scalars):  # (batch, k)
    per_scalar = self.frequency_dim // scalars.shape[-1]
    features = jnp.concatenate(
        [timestep_embedding(scalars[:, i], per_scalar, scale=self.scale)
         for i in range(scalars.shape[-1])], -1)
    x = dense(self.width, kernel_init=nn.initializers.normal(0.02))(features)
    x = nn.silu(x)
    out_init = nn.initializers.zeros if self.zero_output else nn.initializers.normal(0.02)
    return dense(self.width, kernel_init=out_init)(x)


class Attention(nn.Module):
  heads: int
  qk_norm: str = 'none'
  implementation: str = 'xla'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rotation, logit_scale):
    batch, tokens, width = x.shape
    head_dim = width // self.heads
    linear = functools.partial(dense, dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform())
    qkv = linear(3 * width, name='qkv')(x).reshape(batch, tokens, 3, self.heads, head_dim)
    # split, not indexing: its gradient is one concatenation, not three padded full-size sums
    q, k, v = (part[:, :, 0] for part in jnp.split(qkv, 3, axis=2))         # float32
    qk_norm = QK_NORMS[self.qk_norm]
    if qk_norm is not None:
      q, k = qk_norm(name='q_norm')(q), qk_norm(name='k_norm')(k)       # over head_dim
    if rotation is not None:
      q, k = rope.apply_rope(q, rotation), rope.apply_rope(k, rotation)
    q, k, v = (part.astype(self.dtype) for part in (q, k, v))
    out = attention.attend(q, k, v, scale=logit_scale / math.sqrt(head_dim),
                           kernel=self.implementation)
    return linear(width, name='proj')(out.reshape(batch, tokens, width))


class DiTBlock(nn.Module):
  """adaLN-Zero block: the conditioning sets shift, scale and gate of attention and MLP; the gates
  start at zero so every block is the identity at initialisation. The norm, MLP and adaLN are
  chosen by name (NORMS, MLPS, ADALNS)."""
  heads: int
  mlp_ratio: float = 4.0
  qk_norm: str = 'none'
  attention_implementation: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  logit_scale: float = 1.0
  mlp: str = 'gelu'
  norm: str = 'layernorm'
  adaln: str = 'full'
  adaln_rank: int = 0

  @nn.compact
  def __call__(self, x, c, rotation, shared_modulation=None):
    width = x.shape[-1]
    # Only the token matmuls and attention compute in self.dtype: the residual stream, norms,
    # modulation and conditioning stay float32, as PyTorch's autocast does. In bfloat16 that also
    # keeps the backward's sums over tokens (shift, scale, gate) in float32, where XLA:CPU fuses
    # them; bf16 products summed in float32 became unfused tree reductions (a sixth of the step).
    modulation = ADALNS[self.adaln][0](c, width, self.adaln_rank)         # (batch, 6 width)
    if shared_modulation is not None:
      modulation = modulation + shared_modulation                          # FiTv2's global adaLN
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(modulation, 6, axis=-1)
    norm = NORMS[self.norm]
    h = modulate(norm(name='norm1')(x), shift_a, scale_a)                  # (batch, N, width)
    h = Attention(self.heads, self.qk_norm, self.attention_implementation, self.dtype)(
        h, rotation, self.logit_scale)                                     # (batch, N, width)
    x = x + gate_a[:, None] * h                                            # float32
    h = modulate(norm(name='norm2')(x), shift_m, scale_m)                 # (batch, N, width)
    linear = functools.partial(dense, dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform())
    h = MLPS[self.mlp](h, linear, width, self.mlp_ratio)                   # (batch, N, width)
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """Velocity network v(x_t, t, label, positions, crop): the network (`network`) inside the
  parameterisation `prediction` names (rpe2d.prediction).

  Attributes:
    variant: '<size>/<patch>', see VARIANTS.
    channels: image channels in and out.
    num_classes: label ids 0..num_classes-1; id num_classes is the null class used for CFG.
    train_grid: (h0, w0) tokens at the training resolution (for the log_n attention scale).
    position_range: reference length L per axis for the extrapolation scale: the train grid for
      grid-trained models, (H_max, W_max) for RPE-2D models.
    position_embedding: 'rope' (2D axial, on q and k), 'sincos' (absolute, added to tokens), or
      'rope+sincos' (both, LightningDiT's; how the table extrapolates: `rope.Encoding.sincos`).
    qk_norm: the norm on queries and keys, QK_NORMS.
    micro_conditioning: embed the crop window (top, left, height, width) into the conditioning.
    mlp, norm, adaln: the block's parts by name (MLPS, NORMS, ADALNS); adaln_rank: the rank of
      adaLN-LoRA (None: width / 4, FiTv2's).
    remat, remat_policy: recompute each block in the backward pass, saving what the policy names
      (REMAT_POLICIES).
    scan_layers: run the blocks under nn.scan (parameters stacked under 'blocks'): compile time and
      program size stop growing with depth. Checkpoints always hold the per-block layout
      (unstack_blocks), so either setting loads any run.
    time_scale: the time the parameterisation hands the network is multiplied by this before its
      sinusoidal features: 1000 for rpe2d's own models (flow time in [0, 1000]), 1 for SiT (raw
      t) and DiT (its DDPM index).
    sincos_order: the sin-cos table's layout, SINCOS_ORDERS.
    prediction: what the network predicts, PREDICTIONS: 'velocity', or DiT's 'ddpm_epsilon'.
    learned_variance: the network also outputs `channels` variance channels (DiT's learned
      sigma), which only the DDPM sampler reads (`network`); the velocity never includes them.
  """
  variant: str = 'S/2'
  channels: int = 3
  num_classes: int = 1000
  train_grid: tuple[int, int] = (16, 16)
  position_range: tuple[int, int] = (16, 16)
  position_embedding: str = 'rope'
  rope_base: float = 10000.0
  qk_norm: str = 'none'
  micro_conditioning: bool = False
  mlp_ratio: float = 4.0
  mlp: str = 'gelu'
  norm: str = 'layernorm'
  adaln: str = 'full'
  adaln_rank: int | None = None
  attention_implementation: str = 'xla'
  dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan_layers: bool = False
  time_scale: float = 1000.0
  sincos_order: str = 'yx'
  prediction: str = 'velocity'
  learned_variance: bool = False

  @property
  def patch_size(self) -> int:
    return parse_variant(self.variant)[3]

  @property
  def time_range(self) -> tuple[float, float]:
    """(t_min, t_max): the flow times the model covers, its parameterisation's: rpe2d's own and
    SiT cover [0, 1]; DiT's discrete DDPM less. Samplers start at t_max and step from t_min to 0
    (docs/methods.md#time-range)."""
    return prediction.PREDICTIONS[self.prediction].time_range

  def geometry(self, height: int, width: int) -> rope.Geometry:
    p = self.patch_size
    return rope.Geometry(grid=(height // p, width // p), reference=tuple(self.position_range),
                         train_tokens=self.train_grid[0] * self.train_grid[1], base=self.rope_base)

  def __call__(self, x, t, labels, positions, crop=None, encoding: rope.Encoding = rope.Encoding()):
    """x (batch, H, W, C), t (batch,), labels (batch,) int, positions (batch, N, 2) -> v like x."""
    parameterisation = prediction.PREDICTIONS[self.prediction]
    inputs, time = parameterisation.inputs(x, t)
    out = self.network(inputs, time, t, labels, positions, crop, encoding)
    return parameterisation.velocity(out[..., :x.shape[-1]], x, t)

  @nn.compact
  def network(self, x, time, t, labels, positions, crop=None,
              encoding: rope.Encoding = rope.Encoding()):
    """The transformer alone: x (batch, H, W, C) as the network was trained to see it, its time
    (batch,) (times time_scale into the time embedding), the flow time t (batch,) for the
    encoding (DyPE), labels, positions -> (batch, H, W, C), or 2C with learned_variance."""
    width, depth, heads, patch = parse_variant(self.variant)
    dtype = DTYPES[self.dtype]
    batch, height, img_width, channels = x.shape
    if height % patch or img_width % patch:
      raise ValueError(f'image size {height}x{img_width} is not divisible by the patch size {patch}')
    h, w = height // patch, img_width // patch
    if positions.shape != (batch, h * w, 2):
      raise ValueError(f'positions have shape {positions.shape}, expected {(batch, h * w, 2)}')
    geometry = self.geometry(height, img_width)

    tokens = nn.Conv(width, (patch, patch), strides=(patch, patch), dtype=dtype,
                     kernel_init=nn.initializers.xavier_uniform(), name='patch_embed',
                     conv_general_dilated=_float32_conv)(x)
    tokens = tokens.reshape(batch, h * w, width).astype(jnp.float32)     # the residual stream
    rotation = None
    if self.position_embedding in ('sincos', 'rope+sincos'):
      tokens = tokens + rope.sincos_embedding(
          positions, t, width=width, geometry=geometry, encoding=encoding,
          order=self.sincos_order)                                         # (batch, N, width)
    if self.position_embedding in ('rope', 'rope+sincos'):
      angles = rope.angles_2d(positions, t, dim=width // heads // 2, geometry=geometry,
                              encoding=encoding)                           # (batch, N, 2, hd/4)
      rotation = rope.rotation(angles, rope.rope_temperatures(geometry, encoding))
    logit_scale = rope.logit_multiplier(geometry, encoding, rotary=rotation is not None)

    c = ScalarEmbedder(width, scale=self.time_scale, name='t_embed')(time[:, None])  # (batch, D)
    c = c + nn.Embed(self.num_classes + 1, width, embedding_init=nn.initializers.normal(0.02),
                     name='label_embed')(labels)
    if self.micro_conditioning:
      if crop is None:
        crop = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32), (batch, 4))
      c = c + ScalarEmbedder(width, zero_output=True, name='crop_embed')(crop)

    shared = None
    if ADALNS[self.adaln][1]:
      shared = dense(6 * width, kernel_init=nn.initializers.zeros,
                     name='global_adaLN')(nn.silu(c))                      # (batch, 6 width)

    block = DiTBlock
    if self.remat:
      # Inside a scan, common-subexpression elimination cannot merge the recomputation away.
      block = nn.remat(DiTBlock, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan_layers)
    block = functools.partial(block, heads, self.mlp_ratio, self.qk_norm,
                              self.attention_implementation, dtype, logit_scale, self.mlp,
                              self.norm, self.adaln, self.adaln_rank or width // 4)
    if self.scan_layers:
      # One block traced and compiled once, its parameters stacked along a leading depth axis.
      scan = nn.scan(lambda module, x, c, rotation, shared: (module(x, c, rotation, shared), None),
                     variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(nn.broadcast,) * 3, length=depth)
      tokens, _ = scan(block(name=SCANNED_BLOCKS), tokens, c, rotation, shared)  # (batch, N, width)
    else:
      for i in range(depth):
        tokens = block(name=f'block_{i}')(tokens, c, rotation, shared)      # (batch, N, width)

    # The final layer has its own adaLN, without the shared one (as FiTv2).
    modulation = dense(2 * width, kernel_init=nn.initializers.zeros,
                       name='final_adaLN')(nn.silu(c))                      # (batch, 2 width)
    shift, scale = jnp.split(modulation, 2, axis=-1)
    tokens = NORMS[self.norm](name='final_norm')(tokens)                 # (batch, N, width)
    tokens = modulate(tokens, shift, scale)                                # (batch, N, width)
    outputs = 2 * channels if self.learned_variance else channels
    out = dense(patch * patch * outputs, dtype=dtype, kernel_init=nn.initializers.zeros,
                name='final_proj')(tokens)                               # float32 (batch, N, p p C')
    out = out.reshape(batch, h, w, patch, patch, outputs).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, height, img_width, outputs)


def _holds_blocks(x) -> bool:
  """Whether x is the dict that holds the blocks (params['params'], and its copies in EMA and
  optimizer moments)."""
  return isinstance(x, dict) and (SCANNED_BLOCKS in x or 'block_0' in x)


def stack_blocks(tree):
  """Per-block parameters ('block_0', 'block_1', ...) -> the scanned layout ('blocks', stacked on a
  leading depth axis), wherever they occur in tree (params, EMA, optimizer state)."""
  def stack(holder):
    if SCANNED_BLOCKS in holder:
      return holder
    names = sorted((k for k in holder if k.startswith('block_')), key=lambda k: int(k[6:]))
    rest = {k: v for k, v in holder.items() if not k.startswith('block_')}
    return {**rest, SCANNED_BLOCKS: jax.tree.map(lambda *xs: jnp.stack(xs),
                                                 *(holder[k] for k in names))}
  return jax.tree.map(lambda x: stack(x) if _holds_blocks(x) else x, tree, is_leaf=_holds_blocks)


def unstack_blocks(tree):
  """The inverse of stack_blocks; per-block trees pass unchanged."""
  def unstack(holder):
    if SCANNED_BLOCKS not in holder:
      return holder
    stacked = holder[SCANNED_BLOCKS]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in holder.items() if k != SCANNED_BLOCKS}
    return {**rest, **{f'block_{i}': jax.tree.map(lambda a, i=i: a[i], stacked)
                       for i in range(depth)}}
  return jax.tree.map(lambda x: unstack(x) if _holds_blocks(x) else x, tree,
                      is_leaf=_holds_blocks)


def check_resolution(height: int, width: int, patch: int, what='resolution'):
  """Errors for an image size the model cannot take, naming it and what is allowed."""
  if height <= 0 or width <= 0:
    raise ValueError(f'{what} {height}x{width} must be positive')
  if height % patch or width % patch:
    raise ValueError(f'{what} {height}x{width} is not divisible by the patch size {patch}; '
                     f'use multiples of {patch}')


def validate_shape(variant: str, position_embedding: str):
  """Errors for a model that cannot be built, before anything is compiled."""
  width, _, heads, _ = parse_variant(variant)
  if position_embedding not in POSITION_EMBEDDINGS:
    raise ValueError(f'unknown position_embedding {position_embedding!r}; allowed: '
                     f'{", ".join(POSITION_EMBEDDINGS)}')
  head_dim = width // heads
  if width % heads or head_dim % 4 or head_dim < 8:
    raise ValueError(f'variant {variant!r}: head dimension {width}/{heads} must be an integer '
                     f'multiple of 4 and at least 8 for 2D RoPE')
  if width % 4:
    raise ValueError(f'variant {variant!r}: width {width} must be a multiple of 4 for 2D sin-cos')


def forward_flops(variant: str, height: int, width: int, channels: int = 3) -> float:
  """Analytic forward FLOPs (2 x MACs) of one image (docs/methods.md#flop-accounting):
  per block 12 N D^2 + 2 N^2 D MACs, plus
  the patch embedding and final layer."""
  dim, depth, _, patch = parse_variant(variant)
  n = (height // patch) * (width // patch)
  block_macs = 12 * n * dim**2 + 2 * n**2 * dim
  io_macs = 2 * n * patch * patch * channels * dim
  return 2.0 * (depth * block_macs + io_macs)
