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

from rpe2d import attention, rope

# name -> (width, depth, heads). The paper sizes plus small ones for tests and CPU training.
VARIANTS = {
    'micro': (32, 2, 2),
    'tiny': (128, 6, 4),
    'small': (256, 8, 4),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
}
POSITION_EMBEDDINGS = ('rope', 'sincos')
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


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal features of scalars t (batch,) -> (batch, dim). t in [0, 1] is stretched to [0, 1000]
  so the frequencies cover it as in DiT."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
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


class ScalarEmbedder(nn.Module):
  """Sinusoidal features of one or more scalars per example, then an MLP (timestep, crop window)."""
  width: int
  frequency_dim: int = 256
  zero_output: bool = False

  @nn.compact
  def __call__(self, scalars):  # (batch, k)
    per_scalar = self.frequency_dim // scalars.shape[-1]
    features = jnp.concatenate(
        [timestep_embedding(scalars[:, i], per_scalar) for i in range(scalars.shape[-1])], -1)
    x = dense(self.width, kernel_init=nn.initializers.normal(0.02))(features)
    x = nn.silu(x)
    out_init = nn.initializers.zeros if self.zero_output else nn.initializers.normal(0.02)
    return dense(self.width, kernel_init=out_init)(x)


class Attention(nn.Module):
  heads: int
  qk_norm: bool = False
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
    if self.qk_norm:
      q = nn.RMSNorm(name='q_norm')(q)
      k = nn.RMSNorm(name='k_norm')(k)
    if rotation is not None:
      q, k = rope.apply_rope(q, rotation), rope.apply_rope(k, rotation)
    q, k, v = (part.astype(self.dtype) for part in (q, k, v))
    out = attention.attend(q, k, v, scale=logit_scale / math.sqrt(head_dim),
                           kernel=self.implementation)
    return linear(width, name='proj')(out.reshape(batch, tokens, width))


class DiTBlock(nn.Module):
  """adaLN-Zero block: the conditioning sets shift, scale and gate of attention and MLP; the gates
  start at zero so every block is the identity at initialisation."""
  heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention_implementation: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  logit_scale: float = 1.0

  @nn.compact
  def __call__(self, x, c, rotation):
    width = x.shape[-1]
    # Only the token matmuls and attention compute in self.dtype: the residual stream, norms,
    # modulation and conditioning stay float32, as PyTorch's autocast does. In bfloat16 that also
    # keeps the backward's sums over tokens (shift, scale, gate) in float32, where XLA:CPU fuses
    # them; bf16 products summed in float32 became unfused tree reductions (a sixth of the step).
    modulation = dense(6 * width, kernel_init=nn.initializers.zeros, name='adaLN')(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(modulation, 6, axis=-1)
    norm = functools.partial(nn.LayerNorm, use_bias=False, use_scale=False, epsilon=1e-6)
    h = modulate(norm()(x), shift_a, scale_a)
    h = Attention(self.heads, self.qk_norm, self.attention_implementation, self.dtype)(
        h, rotation, self.logit_scale)
    x = x + gate_a[:, None] * h                                            # float32
    h = modulate(norm()(x), shift_m, scale_m)
    linear = functools.partial(dense, dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform())
    h = linear(int(width * self.mlp_ratio))(h)
    h = linear(width)(nn.gelu(h, approximate=True))
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """Velocity network v(x_t, t, label, positions, crop).

  Attributes:
    variant: '<size>/<patch>', see VARIANTS.
    channels: image channels in and out.
    num_classes: label ids 0..num_classes-1; id num_classes is the null class used for CFG.
    train_grid: (h0, w0) tokens at the training resolution (for the log_n attention scale).
    position_range: reference length L per axis for the extrapolation scale: the train grid for
      grid-trained models, (H_max, W_max) for RPE-2D models.
    position_embedding: 'rope' (2D axial, on q and k) or 'sincos' (absolute, added to tokens).
    micro_conditioning: embed the crop window (top, left, height, width) into the conditioning.
    remat, remat_policy: recompute each block in the backward pass, saving what the policy names
      (REMAT_POLICIES).
    scan_layers: run the blocks under nn.scan (parameters stacked under 'blocks'): compile time and
      program size stop growing with depth. Checkpoints always hold the per-block layout
      (unstack_blocks), so either setting loads any run.
  """
  variant: str = 'S/2'
  channels: int = 3
  num_classes: int = 1000
  train_grid: tuple[int, int] = (16, 16)
  position_range: tuple[int, int] = (16, 16)
  position_embedding: str = 'rope'
  rope_base: float = 10000.0
  qk_norm: bool = False
  micro_conditioning: bool = False
  mlp_ratio: float = 4.0
  attention_implementation: str = 'xla'
  dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan_layers: bool = False

  @property
  def patch_size(self) -> int:
    return parse_variant(self.variant)[3]

  @property
  def time_range(self) -> tuple[float, float]:
    """(t_min, t_max): the flow times the model covers. rpe2d's own cover [0, 1]; a model imported
    from a discrete schedule covers less, and the samplers start at t_max and step from t_min to 0
    (docs/methods.md#time-range)."""
    return (0.0, 1.0)

  def geometry(self, height: int, width: int) -> rope.Geometry:
    p = self.patch_size
    return rope.Geometry(grid=(height // p, width // p), reference=tuple(self.position_range),
                         train_tokens=self.train_grid[0] * self.train_grid[1], base=self.rope_base)

  @nn.compact
  def __call__(self, x, t, labels, positions, crop=None, encoding: rope.Encoding = rope.Encoding()):
    """x (batch, H, W, C), t (batch,), labels (batch,) int, positions (batch, N, 2) -> v like x."""
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
    if self.position_embedding == 'sincos':
      tokens = tokens + rope.sincos_embedding(
          positions, t, width=width, geometry=geometry, encoding=encoding)
    else:
      angles = rope.angles_2d(positions, t, dim=width // heads // 2, geometry=geometry,
                              encoding=encoding)
      rotation = rope.rotation(angles, rope.rope_temperatures(geometry, encoding))
    logit_scale = rope.logit_multiplier(geometry, encoding, rotary=rotation is not None)

    c = ScalarEmbedder(width, name='t_embed')(t[:, None])                 # float32 (batch, width)
    c = c + nn.Embed(self.num_classes + 1, width, embedding_init=nn.initializers.normal(0.02),
                     name='label_embed')(labels)
    if self.micro_conditioning:
      if crop is None:
        crop = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32), (batch, 4))
      c = c + ScalarEmbedder(width, zero_output=True, name='crop_embed')(crop)

    block = DiTBlock
    if self.remat:
      # Inside a scan, common-subexpression elimination cannot merge the recomputation away.
      block = nn.remat(DiTBlock, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan_layers)
    block = functools.partial(block, heads, self.mlp_ratio, self.qk_norm,
                              self.attention_implementation, dtype, logit_scale)
    if self.scan_layers:
      # One block traced and compiled once, its parameters stacked along a leading depth axis.
      scan = nn.scan(lambda module, x, c, rotation: (module(x, c, rotation), None),
                     variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(nn.broadcast, nn.broadcast), length=depth)
      tokens, _ = scan(block(name=SCANNED_BLOCKS), tokens, c, rotation)     # (batch, N, width)
    else:
      for i in range(depth):
        tokens = block(name=f'block_{i}')(tokens, c, rotation)              # (batch, N, width)

    modulation = dense(2 * width, kernel_init=nn.initializers.zeros,
                       name='final_adaLN')(nn.silu(c))                      # (batch, 2 width)
    shift, scale = jnp.split(modulation, 2, axis=-1)
    tokens = modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6)(tokens), shift,
                      scale)
    out = dense(patch * patch * channels, dtype=dtype, kernel_init=nn.initializers.zeros,
                name='final_proj')(tokens)                                 # float32 (batch, N, p p C)
    out = out.reshape(batch, h, w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, height, img_width, channels)


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
