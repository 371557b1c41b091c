"""Positional encodings, static extrapolation and DyPE.

Formulas and the references each form reproduces: docs/methods.md#encodings and docs/methods.md#dype.

Everything here is a pure function of arrays: positions m (batch, n) on one axis, flow time t (batch,),
and static numbers (per-axis dimension d, base, scale s, reference length L). A method returns the
positions and the per-example frequencies theta (batch, d/2) it wants; angles are m * theta.

Time convention: t = 1 is pure noise, t = 0 is data. DyPE's kappa(t) = lambda_s * t**lambda_t makes
extrapolation strong early and native at t = 0.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

EXTRAPOLATIONS = ('none', 'pi', 'ntk', 'yarn', 'tasr')
YARN_FORMS = ('paper', 'index', 'fit')
# Where YaRN's tau goes. 'rope' (the default): on cos and sin of q and k, so the logits see tau^2
# per axis, as the reference code does. 'rope_max': the same with tau of the larger axis scale on
# both axes (FiT's code, decoupled or not). 'logits': tau once on the logits, the legacy default.
TEMPERATURE_PLACES = ('logits', 'rope', 'rope_max', 'none')
TASR_FORMS = ('continuous', 'switch')
# Factors on the attention logits for more tokens (docs/methods.md#attention-scales): Lumina-Next's
# log_n, and FiT's two "attention scale" forms, by side length (ntk-aware-pro1) and by token count
# (ntk-aware-pro2).
ATTENTION_SCALES = ('none', 'log_n', 'fit_side', 'fit_tokens')
# One extrapolation scale per axis (FiT's --decouple, the default), or the larger for both.
AXIS_SCALES = ('per_axis', 'shared')
# How an absolute sin-cos table extrapolates (docs/methods.md#rope-and-sin-cos-together): it follows
# the method (its positions and frequencies, as RoPE does), stays native (the table of the given
# positions, no method), or is the native table resized bilinearly to the grid ("EI").
SINCOS_RULES = ('method', 'native', 'interpolate')

# FiT's RoPE options (its sampler's --interpolation) as encodings, docs/methods.md#fits-options.
# Each entry sets every field it depends on, so none is inherited from a run's own encoding.
_FIT_NONE = dict(extrapolation='none', yarn_form='paper', temperature='rope',
                 attention_scale='none', dype=False)
FIT_INTERPOLATIONS = {
    'linear': dict(_FIT_NONE, extrapolation='pi'),
    'dynntk': dict(_FIT_NONE, extrapolation='ntk'),
    'partntk': dict(_FIT_NONE, extrapolation='yarn', yarn_form='fit', temperature='none'),
    'yarn': dict(_FIT_NONE, extrapolation='yarn', yarn_form='index', temperature='rope_max'),
    'ntkpro1': dict(_FIT_NONE, extrapolation='ntk', attention_scale='fit_side'),
    'ntkpro2': dict(_FIT_NONE, extrapolation='ntk', attention_scale='fit_tokens'),
}


def fit_interpolation(name: str, decouple: bool) -> dict:
  """The Encoding fields of FiT's `--interpolation <name> [--decouple]`."""
  _check_choice('FiT interpolation', name, tuple(FIT_INTERPOLATIONS))
  return dict(FIT_INTERPOLATIONS[name], axis_scale='per_axis' if decouple else 'shared')
DYPE_VARIANTS = ('scaled', 'power')
DYPE_EXTRAPOLATIONS = ('pi', 'ntk', 'yarn')

# YaRN constants (docs/methods.md#yarn). Paper form: ramp over rotations r in [alpha, beta]. Index
# form: ramp over the frequency index between the indices where r = beta_fast and r = beta_slow.
# FiT form: two stages of rotation thresholds (beta0, beta1) between PI and NTK, (gamma0, gamma1)
# back to native.
YARN_ALPHA, YARN_BETA = 1.0, 32.0
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
FIT_BETA0, FIT_BETA1, FIT_GAMMA0, FIT_GAMMA1 = 1.25, 0.75, 16.0, 2.0

# TASR switch form (docs/methods.md#tasr): PI while t_data = 1 - t is below this, then NTK.
TASR_SWITCH_T_DATA = 0.3

# DyPE's published defaults (docs/methods.md#dype-defaults): DY-NTK uses lambda_s = lambda_t = 2
# (NTK with s^2 at t = 1); DY-YaRN uses lambda_s = 1, lambda_t = 2 so t = 1 is exactly static YaRN.
# DY-PI follows YaRN (our choice). The 'power' DY-YaRN variant raises the thresholds to
# kappa = 2 t^2, as the official code did before Feb 2026, so its default is lambda_s = 2.
DYPE_DEFAULT_LAMBDAS = {'pi': (1.0, 2.0), 'ntk': (2.0, 2.0), 'yarn': (1.0, 2.0)}
DYPE_POWER_DEFAULT_LAMBDAS = (2.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How positions become rotation angles. Static and hashable: a jit cache key, never traced."""
  extrapolation: str = 'none'
  yarn_form: str = 'paper'
  temperature: str = 'rope'
  attention_scale: str = 'none'
  dype: bool = False
  dype_lambda_s: float | None = None
  dype_lambda_t: float | None = None
  dype_variant: str = 'scaled'
  tasr_form: str = 'continuous'
  axis_scale: str = 'per_axis'
  sincos: str = 'method'

  def __post_init__(self):
    _check_choice('extrapolation method', self.extrapolation, EXTRAPOLATIONS)
    _check_choice('axis_scale', self.axis_scale, AXIS_SCALES)
    _check_choice('sincos rule', self.sincos, SINCOS_RULES)
    _check_choice('yarn_form', self.yarn_form, YARN_FORMS)
    _check_choice('temperature', self.temperature, TEMPERATURE_PLACES)
    _check_choice('tasr_form', self.tasr_form, TASR_FORMS)
    _check_choice('attention_scale', self.attention_scale, ATTENTION_SCALES)
    _check_choice('dype_variant', self.dype_variant, DYPE_VARIANTS)
    if self.dype and self.extrapolation not in DYPE_EXTRAPOLATIONS:
      raise ValueError(f'dype needs an extrapolation method in {DYPE_EXTRAPOLATIONS}, got '
                       f'{self.extrapolation!r}')
    lambda_s, lambda_t = self.lambdas
    if self.dype and not (lambda_s > 0 and lambda_t > 0):
      raise ValueError(f'dype lambdas must be > 0, got lambda_s={lambda_s}, lambda_t={lambda_t}')

  @property
  def lambdas(self) -> tuple[float, float]:
    if self.extrapolation == 'yarn' and self.dype_variant == 'power':
      default_s, default_t = DYPE_POWER_DEFAULT_LAMBDAS
    else:
      default_s, default_t = DYPE_DEFAULT_LAMBDAS.get(self.extrapolation, (1.0, 2.0))
    return (default_s if self.dype_lambda_s is None else float(self.dype_lambda_s),
            default_t if self.dype_lambda_t is None else float(self.dype_lambda_t))


def _check_choice(what, value, allowed):
  if value not in allowed:
    raise ValueError(f'unknown {what} {value!r}; allowed: {", ".join(allowed)}')


def legacy_notes(encoding: Encoding) -> list[str]:
  """One-line notices for an encoding that asks for a legacy behaviour (empty when none does)."""
  notes = []
  if encoding.extrapolation == 'yarn' and encoding.temperature == 'logits':
    notes.append("note: temperature='logits' (the default before the reference-matching change) "
                 "puts YaRN's tau on the attention logits once; --temperature=rope puts it on q "
                 "and k (tau^2 on the logits), as the reference YaRN code does")
  return notes


def axis_frequencies(dim: int, base: float) -> jax.Array:
  """theta_i = base^(-2i/dim), i = 0..dim/2-1; i = 0 is the highest frequency."""
  return base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def scale_factor(n: int, reference_length: int) -> float:
  """Per-axis extrapolation scale s = max(n / L, 1) (docs/methods.md#scale)."""
  return max(n / reference_length, 1.0)


def kappa(t: jax.Array, lambda_s: float, lambda_t: float) -> jax.Array:
  """DyPE's schedule: lambda_s * t^lambda_t; exactly 0 at t = 0 for every lambda_t > 0."""
  return lambda_s * jnp.power(jnp.clip(t, 0.0, 1.0), lambda_t)


def yarn_temperature(scale: float) -> float:
  """tau(s) = 0.1 ln s + 1; tau(1) = 1."""
  return 0.1 * math.log(scale) + 1.0


def ntk_frequencies(theta: jax.Array, scale: jax.Array, dim: int) -> jax.Array:
  """theta_i / s^(2i/(d-2)): the same as base -> base * s^(d/(d-2)). scale broadcasts as (batch, 1)."""
  exponent = jnp.arange(theta.shape[-1], dtype=jnp.float32) * 2.0 / (dim - 2)
  return theta / jnp.power(scale, exponent)


def yarn_paper_frequencies(theta, scale, reference_length, alpha, beta):
  """YaRN's NTK-by-parts: bands with few rotations in L interpolate (PI), many stay native.

  alpha and beta broadcast as (batch, 1) so DyPE can shrink them per example; when both reach 0
  every band has r > beta and is native.
  """
  rotations = reference_length * theta / (2 * math.pi)
  width = jnp.maximum(beta - alpha, 1e-20)
  ramp = jnp.where(rotations >= beta, 1.0, jnp.clip((rotations - alpha) / width, 0.0, 1.0))
  return (1.0 - ramp) * theta / scale + ramp * theta


def _correction_index(rotations, dim, base, reference_length):
  """The (fractional) index i at which band i makes `rotations` turns in the reference length."""
  rotations = jnp.maximum(rotations, 1e-20)  # 0 rotations -> index +inf -> clamped to dim - 1
  return dim * jnp.log(reference_length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def _index_ramp(fast_rotations, slow_rotations, n, dim, base, reference_length):
  """0 up to floor(c(fast)), 1 from ceil(c(slow)), linear in the index between.

  The references clamp the low end only from below and the high end only from above; we clamp both
  ends into [0, dim - 1], so the ramp never inverts: at tiny reference lengths (c(slow) < 0) it
  stays interpolating, and at tiny DyPE thresholds (c(fast) > dim - 1) it goes native instead of
  flipping to PI.
  """
  low = jnp.clip(jnp.floor(_correction_index(fast_rotations, dim, base, reference_length)),
                 0, dim - 1)
  high = jnp.clip(jnp.ceil(_correction_index(slow_rotations, dim, base, reference_length)),
                  0, dim - 1)
  high = jnp.where(high == low, high + 0.001, high)
  return jnp.clip((jnp.arange(n, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)


def yarn_index_frequencies(theta, scale, reference_length, dim, base, fast, slow):
  """YaRN as the reference code writes it (HF transformers, FiT's VisionYaRN): a ramp in the index.

  ramp_i = clip((i - low) / (high - low), 0, 1) with low = floor(c(fast)), high = ceil(c(slow));
  theta'_i = theta_i / s * ramp_i + theta_i * (1 - ramp_i). fast and slow (rotations, 32 and 1)
  broadcast as (batch, 1) so DyPE can shrink them per example.
  """
  ramp = _index_ramp(fast, slow, theta.shape[-1], dim, base, reference_length)
  return theta / scale * ramp + theta * (1.0 - ramp)


def yarn_fit_frequencies(theta, scale, reference_length, dim, base, thresholds):
  """The FiT / DyPE-code "NTK-by-parts": PI->NTK over (beta0, beta1), then ->native over (gamma0, gamma1)."""
  beta0, beta1, gamma0, gamma1 = thresholds
  n = theta.shape[-1]
  theta_pi = theta / scale
  theta_ntk = ntk_frequencies(theta, scale, dim)
  mask = 1.0 - _index_ramp(beta0, beta1, n, dim, base, reference_length)
  mixed = theta_pi * (1.0 - mask) + theta_ntk * mask
  mask = 1.0 - _index_ramp(gamma0, gamma1, n, dim, base, reference_length)
  return mixed * (1.0 - mask) + theta * mask


def _rebased(base, dim):
  """theta_i = base^(-2i/dim) for a base of shape (batch, 1)."""
  return jnp.power(base, -jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def tasr_frequencies(theta, scale, t, dim, base, form='continuous'):
  """Lumina-Next time-aware scaled RoPE (docs/methods.md#tasr); t_data = 1 - t (1 at data).

  'continuous' (Lumina's released ntk_v3): max(PI, theta with base * s^(D / (t_data (D - 1) + 1))),
  D = 2 dim the full head dimension: PI at noise, NTK with base * s at data.
  'switch' (Lumina's text-to-image code): PI while t_data < 0.3, then theta with base * s.
  """
  t_data = 1.0 - jnp.clip(t, 0.0, 1.0)
  if form == 'switch':
    theta_ntk = _rebased(jnp.full_like(t_data, base * scale), dim)
    return jnp.where(t_data < TASR_SWITCH_T_DATA, theta / scale, theta_ntk)
  head_dim = 2 * dim
  exponent = head_dim / (t_data * (head_dim - 1) + 1.0)
  theta_ntk = _rebased(base * jnp.power(scale, exponent), dim)
  return jnp.maximum(theta / scale, theta_ntk)


def axis_positions_and_frequencies(positions, t, *, dim: int, base: float, scale: float,
                                   reference_length: float, encoding: Encoding):
  """One axis: positions (batch, n), t (batch,) -> (positions, theta (batch, dim/2)).

  Static methods are DyPE with kappa = 1. With s = 1 every method returns the inputs unchanged.
  """
  batch = positions.shape[0]
  theta = jnp.broadcast_to(axis_frequencies(dim, base), (batch, dim // 2))
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  if encoding.dype:
    k = kappa(t, *encoding.lambdas)[:, None]
  else:
    k = jnp.ones((batch, 1), jnp.float32)
  method = encoding.extrapolation
  if method == 'none' or scale == 1.0:
    return positions, theta
  if method == 'pi':
    return positions / jnp.power(scale, k), theta
  if method == 'ntk':
    return positions, ntk_frequencies(theta, jnp.power(scale, k), dim)
  if method == 'yarn':
    if encoding.dype_variant == 'power':
      # thresholds ** kappa, the official code before Feb 2026 (docs/methods.md#dype-variants). Not
      # native at t = 0: every threshold becomes 1, not 0, as in that code.
      stretch = lambda c: jnp.power(c, k)
    else:
      stretch = lambda c: c * k
    if encoding.yarn_form == 'paper':
      return positions, yarn_paper_frequencies(
          theta, scale, reference_length, stretch(YARN_ALPHA), stretch(YARN_BETA))
    if encoding.yarn_form == 'index':
      return positions, yarn_index_frequencies(
          theta, scale, reference_length, dim, base, stretch(YARN_BETA_FAST),
          stretch(YARN_BETA_SLOW))
    thresholds = tuple(stretch(c) for c in (FIT_BETA0, FIT_BETA1, FIT_GAMMA0, FIT_GAMMA1))
    return positions, yarn_fit_frequencies(theta, scale, reference_length, dim, base, thresholds)
  if method == 'tasr':
    return positions, tasr_frequencies(theta, scale, t[:, None], dim, base, encoding.tasr_form)
  raise ValueError(f'unknown extrapolation method {method!r}; allowed: {EXTRAPOLATIONS}')


def axis_angles(positions, t, *, dim, base, scale, reference_length, encoding):
  """(batch, n) positions -> (batch, n, dim/2) rotation angles."""
  positions, theta = axis_positions_and_frequencies(
      positions, t, dim=dim, base=base, scale=scale, reference_length=reference_length,
      encoding=encoding)
  return positions[..., None] * theta[:, None, :]


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the encoding needs to know about the model at one resolution: static per (height, width)."""
  grid: tuple[int, int]              # tokens (h, w) being sampled
  reference: tuple[int, int]         # L per axis: train grid, or (H_max, W_max) for RPE-2D
  train_tokens: int                  # N_train for the log_n attention scale
  base: float = 10000.0              # the RoPE base the model was trained with

  @property
  def scales(self) -> tuple[float, float]:
    return tuple(scale_factor(n, length) for n, length in zip(self.grid, self.reference))


def axis_scales(geometry: Geometry, encoding: Encoding) -> tuple[float, float]:
  """The extrapolation scale (s_y, s_x) a method uses (docs/methods.md#scale): each axis its own
  ('per_axis'), or the larger of the two on both ('shared', FiT without --decouple)."""
  if encoding.axis_scale == 'shared':
    return (max(geometry.scales),) * 2
  return geometry.scales


def angles_2d(positions, t, *, dim: int, geometry: Geometry, encoding: Encoding):
  """(batch, N, 2) positions -> (batch, N, 2, dim/2) angles: axis 0 rotates with y, axis 1 with x."""
  scales = axis_scales(geometry, encoding)
  per_axis = [
      axis_angles(positions[..., axis], t, dim=dim, base=geometry.base, scale=scales[axis],
                  reference_length=geometry.reference[axis], encoding=encoding)
      for axis in (0, 1)
  ]
  return jnp.stack(per_axis, axis=-2)


def rope_temperatures(geometry: Geometry, encoding: Encoding) -> tuple[float, float]:
  """YaRN's tau per axis when it is placed on the rotary embedding (both q and k: logits see tau^2).

  'rope' is the default placement and the reference code's, each axis with its own scale;
  'rope_max' puts tau of the larger scale on both axes, as FiT's code does
  (docs/methods.md#yarn-temperature). It only reaches models with RoPE: a sin-cos model has no
  rotation table to carry it.
  """
  if encoding.extrapolation != 'yarn' or encoding.temperature not in ('rope', 'rope_max'):
    return (1.0, 1.0)
  scales = axis_scales(geometry, encoding)
  if encoding.temperature == 'rope_max':
    scales = (max(scales),) * 2
  return tuple(yarn_temperature(s) for s in scales)


def fit_attention_scale(tokens: float, reference_tokens: float) -> float:
  """FiT's logit factor ln(2 L_test) / ln(L_train), 1 while 2 L_test <= L_train: the square of the
  factor FiT's code puts on cos and sin of q and k (docs/methods.md#attention-scales)."""
  if 2 * tokens <= reference_tokens or reference_tokens <= 1:
    return 1.0
  return math.log(2 * tokens) / math.log(reference_tokens)


def logit_multiplier(geometry: Geometry, encoding: Encoding, *, rotary: bool = True) -> float:
  """Static factor on attention logits: YaRN's tau (legacy placement 'logits') times the attention
  scale's.

  For 2D the YaRN tau uses the geometric-mean scale sqrt(s_y * s_x), which is the 1D rule when the
  two axes stretch equally. A model without a rotation table (rotary=False: sin-cos) takes the
  placements on q and k ('rope', 'rope_max') as tau^2 on the logits. See
  docs/methods.md#yarn-temperature and docs/methods.md#attention-scales.
  """
  multiplier = 1.0
  scales = axis_scales(geometry, encoding)
  if encoding.extrapolation == 'yarn' and encoding.temperature != 'none':
    tau = yarn_temperature(math.sqrt(scales[0] * scales[1]))
    if encoding.temperature == 'logits':
      multiplier *= tau
    elif not rotary:
      if encoding.temperature == 'rope_max':
        tau = yarn_temperature(max(scales))
      multiplier *= tau * tau
  (h, w), (length_h, length_w) = geometry.grid, geometry.reference
  if encoding.attention_scale == 'log_n':
    if geometry.train_tokens > 1:
      multiplier *= math.sqrt(max(1.0, math.log(h * w) / math.log(geometry.train_tokens)))
  elif encoding.attention_scale == 'fit_side':
    multiplier *= fit_attention_scale(max(h, w), max(length_h, length_w))
  elif encoding.attention_scale == 'fit_tokens':
    multiplier *= fit_attention_scale(h * w, length_h * length_w)
  return multiplier


def rotation(angles, temperatures=(1.0, 1.0)):
  """(cos, sin) of angles (batch, N, 2, head_dim/4), times each axis's temperature.

  Computed once per forward pass and shared by every layer: with DyPE the angles change with t at
  every sampling step, and the transcendental functions must not be repeated per layer.
  """
  temps = jnp.asarray(temperatures, jnp.float32)[:, None]
  return jnp.cos(angles) * temps, jnp.sin(angles) * temps


def apply_rope(x, rotation_table):
  """Rotates queries or keys x (batch, N, heads, head_dim) by a `rotation(...)` table.

  The first half of each head rotates with y, the second with x; inside a half, channel j pairs with
  j + head_dim/4. Computed in float32 and cast back.
  """
  batch, tokens, heads, head_dim = x.shape
  parts = x.astype(jnp.float32).reshape(batch, tokens, heads, 2, 2, head_dim // 4)
  cos, sin = (r[:, :, None] for r in rotation_table)
  first, second = parts[..., 0, :], parts[..., 1, :]
  rotated = jnp.stack([first * cos - second * sin, first * sin + second * cos], axis=-2)
  return rotated.reshape(x.shape).astype(x.dtype)


def _interpolated_sincos(positions, *, dim: int, base: float, tokens: int, length: int):
  """One axis of the native table (integer positions 0..L-1) resized linearly from L to n entries
  at the tokens' positions: source coordinate clip((m + 0.5) L / n - 0.5, 0, L - 1), as torch's
  bilinear interpolation with align_corners=False places it; the native table when n <= L (like
  every method, only beyond the trained range: docs/methods.md#scale). positions (batch, N) ->
  ([sin, cos] features (batch, N, dim/2) each)."""
  ratio = length / max(tokens, length)
  source = jnp.clip((positions + 0.5) * ratio - 0.5, 0.0, length - 1.0)
  low = jnp.floor(source)
  high = jnp.minimum(low + 1.0, length - 1.0)
  weight = (source - low)[..., None]                                    # (batch, N, 1)
  theta = axis_frequencies(dim, base)
  low_angles, high_angles = low[..., None] * theta, high[..., None] * theta
  return ((1.0 - weight) * jnp.sin(low_angles) + weight * jnp.sin(high_angles),
          (1.0 - weight) * jnp.cos(low_angles) + weight * jnp.cos(high_angles))


def sincos_embedding(positions, t, *, width: int, geometry: Geometry, encoding: Encoding,
                     order: str = 'yx'):
  """2D sin-cos absolute embedding (batch, N, width): [sin y, cos y, sin x, cos x], a quarter each
  (order 'yx'), or the column coordinate first, [sin x, cos x, sin y, cos y] (order 'xy', DiT's
  get_2d_sincos_pos_embed).

  `encoding.sincos` says how the table extrapolates: 'method' (the positions and frequencies of
  the encoding's method, DyPE included), 'native' (the given positions, no method), or
  'interpolate' (the native table of the reference grid resized bilinearly to the sampled grid,
  "EI": on a table whose halves each depend on one axis, bilinear is linear along that axis).
  """
  dim = width // 2
  if encoding.sincos == 'interpolate':
    (sin_y, cos_y), (sin_x, cos_x) = (
        _interpolated_sincos(positions[..., axis], dim=dim, base=geometry.base,
                             tokens=geometry.grid[axis], length=geometry.reference[axis])
        for axis in (0, 1))
  else:
    rule = encoding if encoding.sincos == 'method' else Encoding()
    angles = angles_2d(positions, t, dim=dim, geometry=geometry, encoding=rule)
    y, x = angles[..., 0, :], angles[..., 1, :]
    (sin_y, cos_y), (sin_x, cos_x) = (jnp.sin(y), jnp.cos(y)), (jnp.sin(x), jnp.cos(x))
  if order == 'yx':
    return jnp.concatenate([sin_y, cos_y, sin_x, cos_x], axis=-1)
  return jnp.concatenate([sin_x, cos_x, sin_y, cos_y], axis=-1)
