"""The KL autoencoder of latent diffusion (LDM's `AutoencoderKL`, diffusers' `AutoencoderKL`) in
Flax Linen, NHWC: Stable Diffusion's VAE, and any other configuration of the same family, such as
LightningDiT's VA-VAE (docs/methods.md#autoencoders).

The architecture, top to bottom (`C = block_out_channels`, `L = layers_per_block`, level i of
`attention_levels` holding self-attention after each of its ResnetBlocks):

  Encoder   conv_in 3x3 -> for each C[i]: L ResnetBlocks (each followed by an attention block at
            an attention level), then (except the last) Downsample (pad right/bottom by 1, conv
            3x3 stride 2) -> mid block (resnet, single-head self-attention over H*W, resnet) ->
            GroupNorm, SiLU, conv_out 3x3 to 2 * latent_channels
  quant_conv 1x1 -> (mean, logvar), logvar clipped to [-30, 20]
  post_quant_conv 1x1
  Decoder   conv_in 3x3 -> mid block -> for each C[i] reversed: L + 1 ResnetBlocks (each followed
            by an attention block at an attention level: the same resolution as the encoder's),
            then (except the last) nearest 2x Upsample + conv 3x3 -> GroupNorm, SiLU, conv_out 3x3

Module and parameter names follow diffusers' state dict with each '.<index>' written '_<index>'
(module 'down_blocks_0_resnets_1', submodule 'conv1' is `down_blocks.0.resnets.1.conv1`; the
attention blocks of a level are 'down_blocks_<i>_attentions_<j>', as diffusers'
`AttnDownEncoderBlock2D` names them), so `autoencoder_weights` maps a checkpoint name by name; it
also reads LDM's own names (`encoder.down.0.block.1.conv1`).

Compute runs in float32 or bfloat16 (`dtype`); parameters stay float32, and GroupNorm statistics
and the attention softmax are computed in float32 whatever the compute dtype.

Usage::

  config = autoencoder.PRESETS['sd']                            # or 'vavae-f16d32'
  params = autoencoder.init_params(config, jax.random.key(0))   # or autoencoder_weights.load
  mean, logvar = autoencoder.encode(params, images, config=config)  # images in [-1, 1], NHWC
  z = autoencoder.latents_to_model(mean, config)                 # what the diffusion model sees
  # (a VAE with per-channel statistics: latents_to_model(mean, config, loaded.statistics))
  images = autoencoder.decode(params, autoencoder.latents_from_model(z, config), config=config)
  encode_sharded = autoencoder.sharded(functools.partial(autoencoder.encode, config=config))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """The architecture of an AutoencoderKL and the scale of its latent space.

  Attributes:
    block_out_channels: channels per resolution level; len - 1 downsamplings (4 levels: f8).
    layers_per_block: ResnetBlocks per encoder level (the decoder has one more).
    latent_channels: channels of z.
    in_channels: image channels into the encoder.
    out_channels: image channels out of the decoder.
    norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
    scaling_factor: the diffusion model sees scaling_factor * (z - shift_factor); a VAE with
      per-channel latent statistics (autoencoder_weights.Statistics) scaling_factor * (z - mean)
      / std instead (LightningDiT's latent_multiplier, 1 for the VA-VAE).
    shift_factor: None (no shift) for the SD and SDXL VAEs.
    attention_levels: the levels (indices into block_out_channels, 0 at full resolution) whose
      ResnetBlocks are each followed by a self-attention block, in the encoder and at the same
      resolution in the decoder; () for the SD VAE (attention in the mid blocks only), (4,) for
      the VA-VAE (LDM's attn_resolutions=(16,) at its nominal 256 x 256: the deepest level).
  """
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  attention_levels: tuple[int, ...] = ()

  def __post_init__(self):
    channels = tuple(self.block_out_channels)
    object.__setattr__(self, 'block_out_channels', channels)  # lists would make it unhashable
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
      raise ValueError(f'block_out_channels={channels!r}; allowed: a non-empty tuple of positive '
                       f'ints')
    levels = tuple(self.attention_levels)
    object.__setattr__(self, 'attention_levels', levels)
    if (any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(channels)
            for i in levels) or list(levels) != sorted(set(levels))):
      raise ValueError(f'attention_levels={levels!r}; allowed: increasing level indices in '
                       f'0..{len(channels) - 1} (one per entry of block_out_channels)')
    for name in ('layers_per_block', 'latent_channels', 'in_channels', 'out_channels',
                 'norm_num_groups'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}={value!r}; allowed: a positive int')
    if any(c % self.norm_num_groups for c in channels):
      raise ValueError(f'norm_num_groups={self.norm_num_groups} does not divide every entry of '
                       f'block_out_channels={channels}')
    if not self.scaling_factor > 0:
      raise ValueError(f'scaling_factor={self.scaling_factor!r}; allowed: a positive float')

  @property
  def downsampling(self) -> int:
    """Image pixels per latent pixel along each axis (8 for the SD VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)


PRESETS = {
    # stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (and the VAE inside SD 1.x / 2.x).
    'sd': Config(),
    # stabilityai/sdxl-vae: the same architecture, retrained; its latents are scaled differently.
    'sdxl': Config(scaling_factor=0.13025),
    # hustvl/vavae-imagenet256-f16d32-dinov2 (LightningDiT's VA-VAE): 5 levels (f16), 32 latent
    # channels, attention inside the deepest level; its latents are normalised per channel by
    # the statistics file published beside it (latents_stats.pt), not by a scalar factor.
    'vavae-f16d32': Config(block_out_channels=(128, 128, 256, 256, 512), latent_channels=32,
                           scaling_factor=1.0, attention_levels=(4,)),
}


# ------------------------------------------------------------------------------------------------
# Layers.

class GroupNorm(nn.Module):
  """GroupNorm over contiguous channel groups (torch's grouping), statistics in float32 whatever
  the compute dtype; parameters 'scale' and 'bias' as torch's weight and bias."""
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                               # (B, H, W, C)
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, channels // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)                       # (B, 1, 1, G, 1)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)     # (B, 1, 1, G, 1)
    y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)  # (B, H, W, C)
    return (y * scale + bias).astype(self.dtype)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding=None):
  """torch's Conv2d: by default padded by kernel // 2 on every side."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""
  out_channels: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                               # (B, H, W, Cin)
    h = nn.silu(GroupNorm(self.groups, self.dtype, name='norm1')(x))   # (B, H, W, Cin)
    h = conv(self.out_channels, 3, self.dtype, 'conv1')(h)             # (B, H, W, Cout)
    h = nn.silu(GroupNorm(self.groups, self.dtype, name='norm2')(h))   # (B, H, W, Cout)
    h = conv(self.out_channels, 3, self.dtype, 'conv2')(h)             # (B, H, W, Cout)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, 'conv_shortcut')(x)   # (B, H, W, Cout)
    return x + h                                                       # (B, H, W, Cout)


class Attention(nn.Module):
  """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual."""
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                               # (B, H, W, C)
    batch, height, width, channels = x.shape
    h = GroupNorm(self.groups, self.dtype, name='group_norm')(x)       # (B, H, W, C)
    h = h.reshape(batch, height * width, channels)                     # (B, N, C)
    dense = functools.partial(nn.Dense, channels, dtype=self.dtype)
    q = dense(name='to_q')(h)                                          # (B, N, C)
    k = dense(name='to_k')(h)                                          # (B, N, C)
    v = dense(name='to_v')(h)                                          # (B, N, C)
    logits = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=jnp.float32)  # (B, N, N)
    weights = jax.nn.softmax(logits / math.sqrt(channels), axis=-1)   # (B, N, N) float32
    out = jnp.einsum('bqk,bkc->bqc', weights.astype(self.dtype), v)   # (B, N, C)
    out = dense(name='to_out_0')(out)                                  # (B, N, C)
    return x + out.reshape(batch, height, width, channels)             # (B, H, W, C)


class MidBlock(nn.Module):
  channels: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                               # (B, h, w, C)
    x = ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_0')(x)  # (B, h, w, C)
    x = Attention(self.groups, self.dtype, name='attentions_0')(x)     # (B, h, w, C)
    return ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_1')(x)


class Encoder(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                               # (B, H, W, 3)
    cfg, dtype = self.config, self.dtype
    groups, channels = cfg.norm_num_groups, cfg.block_out_channels
    x = conv(channels[0], 3, dtype, 'conv_in')(x)                      # (B, H, W, C[0])
    for i, width in enumerate(channels):                               # at s = 2^i:
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(width, groups, dtype,
                        name=f'down_blocks_{i}_resnets_{j}')(x)        # (B, H/s, W/s, C[i])
        if i in cfg.attention_levels:
          x = Attention(groups, dtype, name=f'down_blocks_{i}_attentions_{j}')(x)  # same shape
      if i < len(channels) - 1:
        # diffusers pads right and bottom only, then convolves without padding.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))               # (B, H/s+1, W/s+1, C[i])
        x = conv(width, 3, dtype, f'down_blocks_{i}_downsamplers_0_conv', stride=2,
                 padding='VALID')(x)                                   # (B, H/2s, W/2s, C[i])
    x = MidBlock(channels[-1], groups, dtype, name='mid_block')(x)     # (B, H/f, W/f, C[-1])
    x = nn.silu(GroupNorm(groups, dtype, name='conv_norm_out')(x))     # (B, H/f, W/f, C[-1])
    return conv(2 * cfg.latent_channels, 3, dtype, 'conv_out')(x)      # (B, H/f, W/f, 2Z)


class Decoder(nn.Module):
  config: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):                                               # (B, h, w, Z)
    cfg, dtype = self.config, self.dtype
    groups, channels = cfg.norm_num_groups, tuple(reversed(cfg.block_out_channels))
    x = conv(channels[0], 3, dtype, 'conv_in')(z)                      # (B, h, w, C[-1])
    x = MidBlock(channels[0], groups, dtype, name='mid_block')(x)      # (B, h, w, C[-1])
    levels = len(channels)
    for i, width in enumerate(channels):                               # at s = 2^i:
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(width, groups, dtype,
                        name=f'up_blocks_{i}_resnets_{j}')(x)          # (B, h*s, w*s, C[-1-i])
        if levels - 1 - i in cfg.attention_levels:                     # the encoder's level
          x = Attention(groups, dtype, name=f'up_blocks_{i}_attentions_{j}')(x)  # same shape
      if i < len(channels) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)            # (B, 2hs, 2ws, C[-1-i])
        x = conv(width, 3, dtype, f'up_blocks_{i}_upsamplers_0_conv')(x)  # same shape
    x = nn.silu(GroupNorm(groups, dtype, name='conv_norm_out')(x))     # (B, h*f, w*f, C[0])
    return conv(cfg.out_channels, 3, dtype, 'conv_out')(x)             # (B, h*f, w*f, 3)


class AutoencoderKL(nn.Module):
  """encode: images -> (mean, logvar) of the posterior; decode: z -> images. __call__ does both
  (with z = mean) so that init creates every parameter."""
  config: Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    z = self.config.latent_channels
    self.encoder = Encoder(self.config, self.dtype)
    self.quant_conv = conv(2 * z, 1, self.dtype, 'quant_conv')
    self.post_quant_conv = conv(z, 1, self.dtype, 'post_quant_conv')
    self.decoder = Decoder(self.config, self.dtype)

  def encode(self, images):                                            # (B, H, W, 3) in [-1, 1]
    moments = self.quant_conv(self.encoder(images.astype(self.dtype)))  # (B, H/f, W/f, 2 * Z)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # (B, H/f, W/f, Z) twice
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):                                                 # (B, h, w, Z)
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)))       # (B, h*f, w*f, 3)
    return x.astype(jnp.float32)

  def __call__(self, images):
    mean, _ = self.encode(images)
    return self.decode(mean)


# ------------------------------------------------------------------------------------------------
# The posterior.

@flax.struct.dataclass
class DiagonalGaussian:
  """N(mean, exp(logvar)) per latent element, as diffusers' DiagonalGaussianDistribution."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, mean, logvar):
    return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, 1)) summed over each example's latent elements -> (B,)."""
    return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# Public functions.

def model(config: Config, dtype: str = 'float32') -> AutoencoderKL:
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; allowed: {", ".join(DTYPES)}')
  return AutoencoderKL(config, DTYPES[dtype])


def init_params(config: Config, key) -> dict:
  """Random float32 parameters (diffusers-like scale: not trained, only for shapes and speed)."""
  size = config.downsampling
  images = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  return jax.jit(model(config).init)(key, images)['params']  # eager init is ~10x slower


@functools.cache  # tracing the model is most of the time a weights file takes to load
def param_shapes(config: Config) -> dict:
  """The parameter tree as jax.ShapeDtypeStruct leaves, without computing anything (shared: do
  not modify it)."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def _check_images(images, config: Config):
  if images.ndim != 4 or images.shape[-1] != config.in_channels:
    raise ValueError(f'images have shape {images.shape}; expected (batch, H, W, '
                     f'{config.in_channels}) NHWC')
  f = config.downsampling
  if images.shape[1] % f or images.shape[2] % f:
    raise ValueError(f'image size {images.shape[1]}x{images.shape[2]} is not divisible by the '
                     f'downsampling factor {f}')


@functools.partial(jax.jit, static_argnames=('config', 'dtype'))
def encode(params, images, config: Config = PRESETS['sd'], dtype: str = 'float32'):
  """Images (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, Z) float32."""
  _check_images(images, config)
  return model(config, dtype).apply({'params': params}, images, method='encode')


@functools.partial(jax.jit, static_argnames=('config', 'dtype'))
def decode(params, latents, config: Config = PRESETS['sd'], dtype: str = 'float32'):
  """Unscaled latents z (B, h, w, Z) -> images (B, h*f, w*f, C) float32, nominally in [-1, 1]."""
  if latents.ndim != 4 or latents.shape[-1] != config.latent_channels:
    raise ValueError(f'latents have shape {latents.shape}; expected (batch, h, w, '
                     f'{config.latent_channels})')
  return model(config, dtype).apply({'params': params}, latents, method='decode')


def latents_to_model(z, config: Config, statistics=None):
  """VAE latents -> the diffusion model's space: scaling * (z - shift), or with per-channel
  `statistics` (anything with `mean` and `std` sequences, autoencoder_weights.Statistics)
  scaling * (z - mean) / std."""
  if statistics is not None:
    mean, std = (jnp.asarray(v, jnp.float32) for v in (statistics.mean, statistics.std))
    return (z - mean) / std * config.scaling_factor
  if config.shift_factor is not None:
    z = z - config.shift_factor
  return z * config.scaling_factor


def latents_from_model(x, config: Config, statistics=None):
  """The diffusion model's space -> VAE latents, the inverse of latents_to_model."""
  if statistics is not None:
    mean, std = (jnp.asarray(v, jnp.float32) for v in (statistics.mean, statistics.std))
    return x / config.scaling_factor * std + mean
  z = x / config.scaling_factor
  if config.shift_factor is not None:
    z = z + config.shift_factor
  return z


def local_mesh() -> Mesh:
  """A 1-D mesh, axis 'batch', over this process's devices."""
  return Mesh(np.array(jax.local_devices()), ('batch',))


def sharded(fn: Callable, mesh: Mesh | None = None) -> Callable:
  """fn(params, batch) jit-compiled with params replicated and the batch split over `mesh`.

  `fn` is encode or decode with its static arguments bound (functools.partial); every output is
  split over the batch too. The batch must be a multiple of the mesh size; each (batch, H, W)
  compiles once.
  """
  mesh = local_mesh() if mesh is None else mesh
  if len(mesh.axis_names) != 1:
    raise ValueError(f'mesh has axes {mesh.axis_names}; expected a 1-D mesh')
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  compiled = jax.jit(fn, in_shardings=(replicated, split), out_shardings=split)

  @functools.wraps(fn)
  def call(params, batch):
    if batch.shape[0] % mesh.size:
      raise ValueError(f'batch of {batch.shape[0]} does not split over {mesh.size} devices; '
                       f'allowed: a multiple of {mesh.size}')
    return compiled(params, batch)

  call.lower = compiled.lower  # ahead-of-time compilation (rpe2d/aot.py)
  return call


# ------------------------------------------------------------------------------------------------
# Tiled decoding, for sizes whose whole decode does not fit in memory.

def tile_windows(height: int, width: int, tile: int,
                 overlap: int) -> list[tuple[int, int, int, int]]:
  """The latent windows (top, left, tile_height, tile_width) that `decode_tiled` decodes.

  Every window has the same shape, min(tile, side) per axis, so the decoder compiles once: the
  last window of a row or column is moved back to end at the edge rather than padded, since
  padding latents would feed made-up values into the GroupNorm statistics and the attention.
  Neighbours share at least `overlap` latent pixels.
  """
  if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
    raise ValueError(f'tile={tile!r}; allowed: a positive int (latent pixels)')
  if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
    raise ValueError(f'overlap={overlap!r}; allowed: an int in [0, tile={tile})')

  def starts(size):
    if size <= tile:
      return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]

  th, tw = min(tile, height), min(tile, width)
  return [(top, left, th, tw) for top in starts(height) for left in starts(width)]


def _ramp_weights(starts: list[int], extent: int, factor: int) -> list[np.ndarray]:
  """Per window along one axis, pixel weights that rise linearly over the overlap with the window
  before and fall over the overlap with the window after (1 elsewhere, > 0 everywhere)."""
  weights = []
  for i, start in enumerate(starts):
    w = np.ones(extent * factor, np.float32)
    if i > 0:
      n = (starts[i - 1] + extent - start) * factor
      w[:n] = np.minimum(w[:n], (np.arange(n, dtype=np.float32) + 0.5) / n)
    if i + 1 < len(starts):
      n = (start + extent - starts[i + 1]) * factor
      w[len(w) - n:] = np.minimum(w[len(w) - n:], (np.arange(n, 0, -1, dtype=np.float32) - 0.5) / n)
    weights.append(w)
  return weights


def tile_blend_weights(height: int, width: int, tile: int, overlap: int, factor: int
                       ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
  """[(latent window, (tile_height * factor, tile_width * factor) pixel weights)]: the linear
  ramps `decode_tiled` blends the overlaps with (the weights are normalised by their sum)."""
  windows = tile_windows(height, width, tile, overlap)
  tops = sorted({w[0] for w in windows})
  lefts = sorted({w[1] for w in windows})
  th, tw = windows[0][2], windows[0][3]
  wy = dict(zip(tops, _ramp_weights(tops, th, factor)))
  wx = dict(zip(lefts, _ramp_weights(lefts, tw, factor)))
  return [(window, wy[window[0]][:, None] * wx[window[1]][None, :]) for window in windows]


def decode_tiled(params, latents, config: Config = PRESETS['sd'], dtype: str = 'float32', *,
                 tile: int = 64, overlap: int = 16, decode_fn: Callable | None = None
                 ) -> np.ndarray:
  """`decode` in overlapping tiles of `tile` x `tile` latent pixels, blended by linear ramps
  over the overlaps in pixel space: unscaled latents (B, h, w, Z) -> images (B, h*f, w*f, C)
  float32 numpy, on the host.

  Peak device memory is that of one tile's decode (times the batch), whatever the size. The
  decoder's GroupNorm statistics and mid-block attention are per tile, so the result only
  approximates the whole decode; more overlap brings it closer (tests/test_decode.py states the
  tolerance). The latents are sliced on the host (they are small) so that slicing compiles
  nothing. `decode_fn(params, z)` replaces `decode`, e.g. `sharded(...)` to split the batch over
  devices; it must map (B, th, tw, Z) to (B, th*f, tw*f, C).
  """
  if latents.ndim != 4 or latents.shape[-1] != config.latent_channels:
    raise ValueError(f'latents have shape {latents.shape}; expected (batch, h, w, '
                     f'{config.latent_channels})')
  latents = np.asarray(latents, np.float32)
  batch, height, width, _ = latents.shape
  f = config.downsampling
  out = np.zeros((batch, height * f, width * f, config.out_channels), np.float32)
  total = np.zeros((height * f, width * f, 1), np.float32)
  for (top, left, th, tw), weight in tile_blend_weights(height, width, tile, overlap, f):
    window = latents[:, top:top + th, left:left + tw]
    pixels = np.asarray(decode(params, window, config=config, dtype=dtype) if decode_fn is None
                        else decode_fn(params, window))
    rows, cols = slice(top * f, (top + th) * f), slice(left * f, (left + tw) * f)
    out[:, rows, cols] += pixels * weight[:, :, None]
    total[rows, cols] += weight[:, :, None]
  return out / total
