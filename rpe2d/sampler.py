"""Samplers from t = t_max (noise) to t = 0 (data) (docs/methods.md#sampler).

Four solvers of rpe2d's flow, chosen by name (SAMPLERS): the fixed-grid ODE solvers euler and
heun, each one `lax.scan`; dopri5, adaptive Dormand-Prince 5(4) in one `lax.while_loop`, its step
size per example or per batch (docs/methods.md#dopri5); and euler_maruyama, SiT's reverse-time SDE
with its last step (docs/methods.md#euler-maruyama). A model covers the times `model.time_range` =
(t_min, t_max), (0, 1) for rpe2d's own: every solver starts at t_max and ends with a step from
t_min to 0. And ddpm, DiT's ancestral sampler on its own respaced DDPM, for imported DiT models
(docs/methods.md#dits-ancestral-sampler).

The position rule is applied once per sample; the encoding (extrapolation, DyPE) is evaluated by the
model from the t of every velocity evaluation (every step, every Runge-Kutta stage), so DyPE costs
one small frequency computation per evaluation. Noise, SDE increments and random positions come
from per-example keys (fold_in of the example index), so an example's image does not depend on the
batch it was drawn in (dopri5 with per-batch steps excepted, as its name says).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import ddpm, flow, model as model_lib, positions as positions_lib, rope

SAMPLERS = ('euler', 'heun', 'dopri5', 'euler_maruyama', 'ddpm')
POSITION_RULES = ('grid',) + positions_lib.INFERENCE_RULES
ADAPTIVE_STEPS = ('per_example', 'per_batch')
# SiT's diffusion coefficients w (its --diffusion-form, named in SiT's time t_SiT = 1 - t, so
# 'decreasing' falls towards data) as functions of rpe2d's t and the magnitude `norm`: those SiT
# can run for a velocity model (docs/methods.md#euler-maruyama says why not SBDM and constant).
DIFFUSION_FORMS = {
    'sigma': lambda t, norm: norm * t,
    'linear': lambda t, norm: norm * t,
    'decreasing': lambda t, norm: 0.25 * (1.0 - norm * jnp.cos(jnp.pi * t)) ** 2,
    'increasing_decreasing': lambda t, norm: norm * jnp.sin(jnp.pi * t) ** 2,
}
# The SDE's last step to t = 0: SiT's Mean (an SDE drift step without noise), its Euler (an ODE
# step, which lands on x0_hat = x - t v; SiT's Tweedie is the same point for a velocity model on
# the linear path), or none (the SDE steps run down to t_min).
LAST_STEPS = ('mean', 'euler', 'none')

# Every sampler reads these settings of the plan ...
COMMON_SETTINGS = ('sampler', 'cfg_scale', 'cfg_interval', 'cfg_channels', 'positions',
                   'round_positions', 'encoding')
# ... and these are its own. Time shift and steps mean nothing to an adaptive solver.
SAMPLER_SETTINGS = {
    'euler': ('steps', 'time_shift', 'time_shift_by_resolution'),
    'heun': ('steps', 'time_shift', 'time_shift_by_resolution'),
    'dopri5': ('atol', 'rtol', 'max_steps', 'adaptive_step'),
    'euler_maruyama': ('steps', 'time_shift', 'time_shift_by_resolution', 'diffusion_form',
                       'diffusion_norm', 'last_step', 'last_step_size'),
    'ddpm': ('steps',),
}
# A sample key's stream for the SDE's Brownian increments (noise and positions split the key).
BROWNIAN_STREAM = 0x5DE


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Everything about sampling that is not an array. Static: one compile per (plan, H, W, batch)."""
  sampler: str = 'euler'
  steps: int = 32
  cfg_scale: float = 1.0
  cfg_interval: tuple[float, float] = (0.0, 1.0)
  cfg_channels: int = 0                # guide the first k channels only (0: all)
  time_shift: float = 1.0              # a in t' = a t / (1 + (a - 1) t)
  time_shift_by_resolution: bool = False  # multiply a by sqrt(N_test / N_train)
  positions: str = 'grid'              # 'grid' for grid-trained models; an RPE-2D inference rule
  round_positions: bool = False
  encoding: rope.Encoding = rope.Encoding()
  # dopri5
  atol: float = 1e-6
  rtol: float = 1e-3
  max_steps: int = 1000                # step attempts (accepted or rejected) before it gives up
  adaptive_step: str = 'per_example'
  # euler_maruyama (SiT's --diffusion-form, --diffusion-norm, --last-step, --last-step-size)
  diffusion_form: str = 'sigma'
  diffusion_norm: float = 1.0
  last_step: str = 'mean'
  last_step_size: float = 0.04

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f'unknown sampler {self.sampler!r}; allowed: {", ".join(SAMPLERS)}')
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f'steps must be a positive integer, got {self.steps!r}')
    if self.positions not in POSITION_RULES:
      raise ValueError(f'unknown position rule {self.positions!r}; allowed: '
                       f'{", ".join(POSITION_RULES)}')
    low, high = self.cfg_interval
    if not 0.0 <= low <= high <= 1.0:
      raise ValueError(f'cfg_interval must satisfy 0 <= low <= high <= 1, got {self.cfg_interval}')
    if not (isinstance(self.time_shift, (int, float)) and self.time_shift > 0):
      raise ValueError(f'time_shift must be a positive number, got {self.time_shift!r}')
    if isinstance(self.cfg_channels, bool) or not isinstance(self.cfg_channels, int) \
        or self.cfg_channels < 0:
      raise ValueError(f'cfg_channels must be an integer >= 0 (0: all), got {self.cfg_channels!r}')
    if self.sampler == 'ddpm':
      if self.steps > ddpm.STEPS:
        raise ValueError(f"sampler='ddpm' with steps={self.steps}: DiT's DDPM has {ddpm.STEPS} "
                         f'steps; allowed: 1 to {ddpm.STEPS}')
      if self.time_shift != 1.0 or self.time_shift_by_resolution:
        raise ValueError("sampler='ddpm' walks DiT's respaced DDPM indices, which a time shift "
                         'does not move; use time_shift=1 without time_shift_by_resolution')
    for name in ('atol', 'rtol'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f'{name} must be a number in (0, 1], got {value!r}')
    if not isinstance(self.max_steps, int) or self.max_steps < 1:
      raise ValueError(f'max_steps must be a positive integer, got {self.max_steps!r}')
    for name, allowed in (('adaptive_step', ADAPTIVE_STEPS), ('diffusion_form', DIFFUSION_FORMS),
                          ('last_step', LAST_STEPS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'unknown {name} {getattr(self, name)!r}; allowed: '
                         f'{", ".join(allowed)}')
    if not (isinstance(self.diffusion_norm, (int, float)) and 0 <= self.diffusion_norm <= 100):
      raise ValueError(f'diffusion_norm must be a number in [0, 100], got {self.diffusion_norm!r}')
    if not (isinstance(self.last_step_size, (int, float)) and 0 < self.last_step_size < 1):
      raise ValueError(f'last_step_size must be a number in (0, 1), got {self.last_step_size!r}')
    if self.sampler == 'euler_maruyama' and self.steps < 2:
      raise ValueError(f'euler_maruyama needs steps >= 2 (steps - 1 SDE steps, then the last '
                       f'step), got {self.steps}')


class Stats(NamedTuple):
  """What a solve did, per example (batch,): dopri5's work varies; the fixed solvers' does not."""
  evaluations: jax.Array  # velocity evaluations (a guided one is two network passes at once)
  accepted: jax.Array     # steps taken
  rejected: jax.Array     # dopri5's rejected step attempts
  finished: jax.Array     # reached t = 0 (dopri5: within max_steps, with a finite velocity)
  times: jax.Array        # (batch, n): the time each accepted step ended at, NaN after the last


def describe(plan: SamplingPlan) -> str:
  """The solver and its settings in a few words, for messages: 'heun x 32', 'dopri5 (atol 1e-06,
  rtol 0.001, per_example)', 'euler_maruyama x 250 (sigma, last step mean 0.04)'."""
  if plan.sampler == 'dopri5':
    return f'dopri5 (atol {plan.atol:g}, rtol {plan.rtol:g}, {plan.adaptive_step})'
  text = f'{plan.sampler} x {plan.steps}'
  if plan.sampler == 'euler_maruyama':
    last = plan.last_step + (f' {plan.last_step_size:g}' if plan.last_step != 'none' else '')
    text += f' ({plan.diffusion_form}, last step {last})'
  return text


def key_text(plan: SamplingPlan) -> str:
  """The plan as text holding what determines its samples: its repr without the settings its
  sampler does not read, nor dopri5's max_steps (a guard: a solve that needs more fails). For euler
  and heun this is the plan's repr from before the other solvers, so cached evaluations stay
  valid."""
  kept = set(COMMON_SETTINGS + SAMPLER_SETTINGS[plan.sampler]) - {'max_steps'}
  if not plan.cfg_channels:  # guidance on every channel: what a plan meant before the setting
    kept.discard('cfg_channels')
  fields = (f for f in dataclasses.fields(plan) if f.name in kept)
  return f'SamplingPlan({", ".join(f"{f.name}={getattr(plan, f.name)!r}" for f in fields)})'


def check_time_range(model) -> tuple[float, float]:
  """The model's (t_min, t_max), checked: 0 <= t_min < t_max <= 1."""
  t_min, t_max = (float(v) for v in model.time_range)
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f'model time_range {(t_min, t_max)} must satisfy 0 <= t_min < t_max <= 1')
  return t_min, t_max


def check_model(model, plan: SamplingPlan) -> None:
  """Errors for a plan the model cannot be sampled with, before anything compiles."""
  if plan.sampler == 'ddpm' and (model.prediction != 'ddpm_epsilon' or not model.learned_variance):
    raise ValueError(f"sampler='ddpm' is DiT's ancestral sampler: it needs a model with "
                     f"prediction='ddpm_epsilon' and learned_variance=True (an imported DiT); "
                     f'this one has prediction={model.prediction!r}, learned_variance='
                     f'{model.learned_variance}: use euler or heun')
  if plan.cfg_channels and plan.cfg_channels > model.channels:
    raise ValueError(f'cfg_channels={plan.cfg_channels} exceeds the model\'s {model.channels} '
                     f'channels; allowed: 0 (all) to {model.channels}')


def check_resolution(model, plan: SamplingPlan, height: int, width: int) -> None:
  """Errors for a (model, plan, resolution) that cannot be sampled, before anything compiles."""
  check_model(model, plan)
  patch = model.patch_size
  model_lib.check_resolution(height, width, patch)
  grid = (height // patch, width // patch)
  if plan.positions == 'random' and any(n > L for n, L in zip(grid, model.position_range)):
    raise ValueError(f"positions='random' draws distinct positions: {grid[0]}x{grid[1]} tokens "
                     f"do not fit the trained range {model.position_range[0]}x"
                     f"{model.position_range[1]}; use 'uniform' or 'contiguous' beyond it")
  t_min, t_max = check_time_range(model)
  if plan.sampler == 'euler_maruyama' and _last_step_time(plan, t_min) >= t_max:
    raise ValueError(f'last_step_size={plan.last_step_size} leaves no time for the SDE steps: '
                     f'this model covers t in [{t_min:g}, {t_max:g}]; use a smaller last step')


def canonical_plan(model, plan: SamplingPlan, height: int,
                   width: int) -> SamplingPlan:
  """The plan with what changes nothing taken out: settings its sampler does not read (at their
  defaults), an encoding at scale 1, and the choice of RPE-2D rule when the tokens fill the trained
  range (every rule gives 0..L-1 then)."""
  kept = COMMON_SETTINGS + SAMPLER_SETTINGS[plan.sampler]
  plan = dataclasses.replace(plan, **{f.name: f.default for f in dataclasses.fields(plan)
                                      if f.name not in kept})
  geometry = model.geometry(height, width)
  if max(geometry.scales) == 1.0 and plan.encoding.attention_scale == 'none':
    plan = dataclasses.replace(plan, encoding=rope.Encoding())
  fills_range = geometry.grid == tuple(model.position_range)
  if plan.positions in positions_lib.INFERENCE_RULES and fills_range:
    plan = dataclasses.replace(plan, positions='contiguous')
  return plan


def time_grid(steps: int, shift: float, t_min: float = 0.0, t_max: float = 1.0) -> jax.Array:
  """steps + 1 times from t_max down to t_min: linspace(1, 0) shifted, then mapped onto them."""
  return t_min + (t_max - t_min) * flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def example_keys(key, indices):
  return jax.vmap(jax.random.fold_in, (None, 0))(key, indices)


def sampling_positions(model, plan: SamplingPlan, height: int, width: int, keys):
  """Token positions for every example, (batch, N, 2), from the plan's rule."""
  h, w = height // model.patch_size, width // model.patch_size
  batch = keys.shape[0]
  if plan.positions == 'grid':
    return positions_lib.grid(h, w, batch)
  max_h, max_w = model.position_range
  one = functools.partial(positions_lib.inference, plan.positions, h, w, max_h, max_w, 1,
                          round_positions=plan.round_positions)
  if plan.positions == 'random':
    return jax.vmap(lambda k: one(key=k)[0])(keys)
  return jnp.broadcast_to(one()[0], (batch, h * w, 2))


def guided_velocity(apply_fn, params, x, t, labels, positions, crop, *, null_class: int,
                    cfg_scale: float, cfg_interval=(0.0, 1.0), cfg_channels: int = 0):
  """v_uncond + w (v_cond - v_uncond), with w = 1 outside the t-interval. Both branches share t.

  cfg_channels k > 0 guides the first k output channels only and gives the others the
  conditional prediction, as DiT's and SiT's forward_with_cfg do ("for exact reproducibility":
  k = 3 of 4 latent channels behind their published numbers; docs/methods.md#guidance-channels).
  """
  if cfg_scale == 1.0:
    return apply_fn(params, x, t, labels, positions, crop)
  both = lambda a: jnp.concatenate([a, a], axis=0)
  null = jnp.full_like(labels, null_class)
  v = apply_fn(params, both(x), both(t), jnp.concatenate([labels, null]), both(positions),
               None if crop is None else both(crop))
  v_cond, v_uncond = jnp.split(v, 2, axis=0)
  if tuple(cfg_interval) == (0.0, 1.0):  # everywhere, also where dopri5 steps past t = 0
    guided = v_uncond + cfg_scale * (v_cond - v_uncond)
  else:
    inside = (t >= cfg_interval[0]) & (t <= cfg_interval[1])
    scale = jnp.where(inside, cfg_scale, 1.0).reshape(-1, *([1] * (x.ndim - 1)))
    guided = v_uncond + scale * (v_cond - v_uncond)
  if cfg_channels:
    guided = jnp.concatenate([guided[..., :cfg_channels], v_cond[..., cfg_channels:]], axis=-1)
  return guided


def _per_example(a, x):
  """(batch,) -> broadcastable against x (batch, ...)."""
  return a.reshape(-1, *([1] * (x.ndim - 1)))


def _fixed_steps(batch: int, steps: int, evaluations: int, times) -> Stats:
  full = lambda value, dtype=jnp.int32: jnp.full((batch,), value, dtype)
  return Stats(evaluations=full(evaluations), accepted=full(steps), rejected=full(0),
               finished=full(True, bool), times=jnp.broadcast_to(times, (batch, times.shape[0])))


# ------------------------------------------------------------------------------------------------
# Fixed-grid ODE solvers: one lax.scan over the grid.


def fixed_grid(velocity, x, times, method: str):
  """Euler or Heun (Euler predictor, trapezoidal corrector) over `times` (decreasing)."""
  batch = x.shape[0]

  def step(x, t_pair):
    t_now, t_next = t_pair
    dt = t_next - t_now                                                   # < 0: towards data
    v = velocity(x, jnp.full((batch,), t_now))
    if method == 'euler':
      return x + dt * v, None
    v_next = velocity(x + dt * v, jnp.full((batch,), t_next))
    return x + dt * 0.5 * (v + v_next), None

  x, _ = jax.lax.scan(step, x, (times[:-1], times[1:]))
  steps = times.shape[0] - 1
  return x, _fixed_steps(batch, steps, steps * (1 if method == 'euler' else 2), times[1:])


# ------------------------------------------------------------------------------------------------
# Adaptive Dormand-Prince 5(4): one lax.while_loop of step attempts (docs/methods.md#dopri5).


class Tableau(NamedTuple):
  """An embedded Runge-Kutta pair: nodes c, stage matrix a (row i weighs the earlier stages'
  velocities in stage i's state), the weights of the error estimate (higher minus lower order),
  and those of the state at the step's middle (for the quartic through the step)."""
  c: np.ndarray
  a: np.ndarray
  error: np.ndarray
  middle: np.ndarray


# Dormand & Prince (1980) with the embedded 4th order of Shampine (1986), as torchdiffeq has them.
# The 5th order weights are a's last row: the step ends at the 7th stage's state, whose velocity is
# the next step's first (first same as last).
DORMAND_PRINCE = Tableau(
    c=np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]),
    a=np.array([
        [0, 0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    ]),
    error=np.array([35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085,
                    125 / 192 - 451 / 720, -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300,
                    -1 / 60]),
    middle=np.array([6025192743 / 30085553152, 0, 51252292925 / 65400821598,
                     -2691868925 / 45128329728, 187940372067 / 1594534317056,
                     -1776094331 / 19743644256, 11237099 / 235043384]) / 2)
# torchdiffeq's step control (rk_common.py, misc.py), which SiT's and FiT's published ODE numbers
# used: the next step is the last one times safety / ratio^(1/5), within [0.2, 10], and never
# smaller after an accepted step.
_SAFETY, _GROW, _SHRINK, _ORDER = 0.9, 10.0, 0.2, 5


class _Dopri5State(NamedTuple):
  x: jax.Array          # (batch, ...) the state at t
  v: jax.Array          # the velocity at (x, t): the next step's first stage
  t: jax.Array          # (batch,) time reached
  size: jax.Array       # (batch,) the next step's size (> 0; time runs towards 0)
  accepted: jax.Array
  rejected: jax.Array
  evaluations: jax.Array
  times: jax.Array      # (batch, max_steps)
  attempts: jax.Array   # () loop iterations
  # when steps may pass the end: the last accepted step's start (x, v, t) and middle state
  last: tuple | None = None


def _rms(a, per_batch: bool):
  """Root mean square per example (batch,), or over the whole batch, broadcast to (batch,)."""
  squares = jnp.square(a)
  if per_batch:
    return jnp.full((a.shape[0],), jnp.sqrt(jnp.mean(squares)))
  return jnp.sqrt(jnp.mean(squares.reshape(a.shape[0], -1), axis=1))


def _start(velocity, x, t, plan, per_batch: bool):
  """The velocity at the start and Hairer, Norsett & Wanner's first step size (Solving ODEs I,
  II.4), as torchdiffeq computes it: v0, then v1 a small Euler step h0 on. The two evaluations
  share one call site (a scan of two), since the network is most of what compiles."""
  scale = plan.atol + plan.rtol * jnp.abs(x)
  d0 = _rms(x / scale, per_batch)

  def euler_step(v):  # h0 from v0, and d1 = |v0|
    d1 = _rms(v / scale, per_batch)
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    return jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1.0, d1)), d1

  def evaluate(point, _):
    y, s = point
    v = velocity(y, s)
    h0, _ = euler_step(v)  # used after the first evaluation only: the second's point
    return (x - _per_example(h0, x) * v, t - h0), v

  _, (v0, v1) = jax.lax.scan(evaluate, (x, t), None, length=2)
  h0, d1 = euler_step(v0)
  d2 = _rms((v1 - v0) / scale, per_batch) / h0
  d = jnp.maximum(d1, d2)
  h1 = jnp.where(d <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(d, 1e-15)) ** (1.0 / _ORDER))
  return v0, jnp.minimum(100.0 * h0, h1)


def _interpolate(start, middle, end, t):
  """The state at t inside a step, from the quartic through its start (x0, v0, t0), middle state
  and end (x1, v1, t1), as torchdiffeq's dense output fits it."""
  (x0, v0, t0), (x1, v1, t1) = start, end
  dt = _per_example(t1 - t0, x0)
  a = 2 * dt * (v1 - v0) - 8 * (x1 + x0) + 16 * middle
  b = dt * (5 * v0 - 3 * v1) + 18 * x0 + 14 * x1 - 32 * middle
  c = dt * (v1 - 4 * v0) - 11 * x0 - 5 * x1 + 16 * middle
  s = _per_example((t - t0) / (t1 - t0), x0)                             # 0 at t0, 1 at t1
  return x0 + s * (dt * v0 + s * (c + s * (b + s * a)))


def dopri5(velocity, x, t_start: float, t_end: float, plan: SamplingPlan):
  """Integrates dx/dt = v from t_start down to t_end with adaptive steps; returns (x, Stats).

  plan.adaptive_step 'per_example': each example has its own time and step size, so an image does
  not depend on its batch, and its last step is shortened to land on t_end, so the velocity is
  never evaluated past it. 'per_batch': torchdiffeq's dopri5 exactly, with which SiT and FiT
  sampled: the batch is one state, its error the root mean square over the whole batch, and the
  last step passes t_end = 0 (the velocity is evaluated beyond it) and the state at 0 is
  interpolated; above a t_end > 0 (a model's t_min, below which it may not be defined) it lands
  on t_end instead. An example stops unfinished when its step size stops being finite (a velocity
  that is NaN/Inf) or after plan.max_steps attempts.
  """
  batch, per_batch = x.shape[0], plan.adaptive_step == 'per_batch'
  passes_end = per_batch and t_end == 0.0
  c, a, error_weights, mid = (jnp.asarray(w, x.dtype) for w in DORMAND_PRINCE)
  t0 = jnp.full((batch,), t_start, x.dtype)  # times in the state's dtype (float64 under x64)
  v0, size = _start(velocity, x, t0, plan, per_batch)
  def combine(weights, k):  # sum_j weights_j k_j: elementwise (a dot here would be tiny)
    return jnp.sum(weights.reshape((-1,) + (1,) * x.ndim) * k, axis=0)

  def active(state):
    return (state.t > t_end) & jnp.isfinite(state.size)

  def attempt(state):
    going = active(state)
    size = state.size if passes_end else jnp.minimum(state.size, state.t - t_end)
    dt = _per_example(-size, x)                                           # < 0: towards data

    def stage(i, k):
      return k.at[i].set(velocity(state.x + dt * combine(a[i], k), state.t - c[i] * size))

    k = jax.lax.fori_loop(1, 7, stage, jnp.zeros((7,) + x.shape, x.dtype).at[0].set(state.v))
    x_new, error = state.x + dt * combine(a[6], k), dt * combine(error_weights, k)
    tolerance = plan.atol + plan.rtol * jnp.maximum(jnp.abs(state.x), jnp.abs(x_new))
    ratio = _rms(error / tolerance, per_batch)
    ok = going & (ratio <= 1.0)
    factor = jnp.clip(_SAFETY * ratio ** (-1.0 / _ORDER), jnp.where(ratio < 1.0, 1.0, _SHRINK),
                      _GROW)
    factor = jnp.where(ratio == 0.0, _GROW, factor)
    # The last step lands on t_end exactly, or passes it.
    t_new = state.t - size if passes_end else jnp.where(size >= state.t - t_end, t_end,
                                                         state.t - size)
    keep = _per_example(ok, x)
    last = state.last
    if passes_end:
      last = jax.tree.map(lambda new, old: jnp.where(_per_example(ok, new), new, old),
                          (state.x, state.v, state.t, state.x + dt * combine(mid, k)), last)
    rows = jnp.arange(batch)
    return _Dopri5State(
        x=jnp.where(keep, x_new, state.x), v=jnp.where(keep, k[6], state.v),
        t=jnp.where(ok, t_new, state.t), size=jnp.where(going, size * factor, state.size),
        accepted=state.accepted + ok, rejected=state.rejected + (going & ~ok),
        evaluations=state.evaluations + 6 * going,
        times=state.times.at[rows, state.accepted].set(
            jnp.where(ok, t_new, state.times[rows, state.accepted])),
        attempts=state.attempts + 1, last=last)

  zeros = jnp.zeros((batch,), jnp.int32)
  state = _Dopri5State(
      x=x, v=v0, t=t0, size=size,
      accepted=zeros, rejected=zeros, evaluations=zeros + 2,
      times=jnp.full((batch, plan.max_steps), jnp.nan, x.dtype), attempts=jnp.int32(0),
      last=(x, v0, t0, x) if passes_end else None)
  state = jax.lax.while_loop(
      lambda s: jnp.any(active(s)) & (s.attempts < plan.max_steps), attempt, state)
  finished = state.t <= t_end
  x = state.x
  if passes_end:  # the state at t_end inside the last step, which may have passed it
    x_last, v_last, t_last, middle = state.last
    passed = _per_example(finished & (state.t < t_end), x)
    inside = _interpolate((x_last, v_last, t_last), middle, (state.x, state.v, state.t), t_end)
    x = jnp.where(passed, inside, x)
  return x, Stats(evaluations=state.evaluations, accepted=state.accepted,
                  rejected=state.rejected, finished=finished, times=state.times)


# ------------------------------------------------------------------------------------------------
# SiT's Euler-Maruyama SDE (docs/methods.md#euler-maruyama): one lax.scan, its last step included.


def _last_step_time(plan: SamplingPlan, t_min: float) -> float:
  """Where the SDE steps end and the last step to t = 0 begins."""
  return max(t_min, 0.0 if plan.last_step == 'none' else plan.last_step_size)


def euler_maruyama(velocity, x, plan: SamplingPlan, t_min: float, t_max: float, shift: float,
                   increment):
  """SDE steps on plan.steps times from t_max down to t_last (a grid laid like the ODE's), then
  the last step from t_last to 0: an SDE step without its noise (mean) or the ODE's step (euler),
  so all are one lax.scan over one velocity call. Returns (x, Stats). increment(i) is step i's
  standard normal draw, shaped like x."""
  batch = x.shape[0]
  diffusion = DIFFUSION_FORMS[plan.diffusion_form]
  t_last = _last_step_time(plan, t_min)
  times = time_grid(plan.steps - 1, shift, t_last, t_max)
  sde_steps = plan.steps - 1
  noisy, scored = np.ones(sde_steps, bool), np.ones(sde_steps, bool)
  if t_last > 0:  # the last step, to 0
    times = jnp.concatenate([times, jnp.zeros((1,), times.dtype)])
    noisy, scored = np.append(noisy, False), np.append(scored, plan.last_step == 'mean')

  def step(x, inputs):
    i, t_now, t_next, noisy, scored = inputs
    dt = t_next - t_now                                                   # < 0: towards data
    t = jnp.full((batch,), t_now)
    v = velocity(x, t)
    # v - w score, with the linear path's score from the velocity: -(x + (1 - t) v) / t
    drift = v + jnp.where(scored, diffusion(t_now, plan.diffusion_norm) / t_now, 0.0) * (
        x + (1.0 - t_now) * v)
    noise = jnp.where(noisy, jnp.sqrt(2.0 * diffusion(t_now, plan.diffusion_norm) * -dt), 0.0)
    return x + dt * drift + noise * increment(jnp.minimum(i, sde_steps - 1)), None

  steps = times.shape[0] - 1
  x, _ = jax.lax.scan(step, x, (jnp.arange(steps), times[:-1], times[1:], noisy, scored))
  return x, _fixed_steps(batch, steps, steps, times[1:])


def sample_with_stats(model, params, key, labels, *, height: int, width: int, plan: SamplingPlan,
                      indices=None, crop=None, channels: int | None = None, noise=None,
                      brownian=None):
  """Draws (images, Stats): images (batch, height, width, C) in roughly [-1, 1] for the labels.

  indices: the global index of each example (defaults to 0..batch-1); keys derive from it.
  noise: the standard normal draw to start from (batch, height, width, C) instead of the keys';
  the sampler scales it to the model's t_max. brownian: euler_maruyama's standard normal draws
  (steps - 1, batch, height, width, C) instead of the keys'. Both for comparisons with other code.
  """
  batch = labels.shape[0]
  channels = channels or model.channels
  if indices is None:
    indices = jnp.arange(batch)
  noise_key, position_key = jax.random.split(key)
  if noise is None:
    noise = jax.vmap(lambda k: jax.random.normal(k, (height, width, channels)))(
        example_keys(noise_key, indices))
  positions = sampling_positions(model, plan, height, width, example_keys(position_key, indices))
  geometry = model.geometry(height, width)
  shift = plan.time_shift
  if plan.time_shift_by_resolution:
    shift *= flow.resolution_shift(geometry.grid[0] * geometry.grid[1], geometry.train_tokens)
  t_min, t_max = check_time_range(model)
  # The noise at t_max: x_t = (1 - t) x0 + t eps has the variance (1 - t)^2 + t^2 for unit data
  # (DiT's x_T ~ N(0, I) mapped to rpe2d's state); exactly the noise at t_max = 1.
  x = noise * math.sqrt((1.0 - t_max) ** 2 + t_max ** 2)

  guide = functools.partial(
      guided_velocity, labels=labels, positions=positions, crop=crop,
      null_class=model.num_classes, cfg_scale=plan.cfg_scale, cfg_interval=plan.cfg_interval,
      cfg_channels=plan.cfg_channels)
  if plan.sampler == 'ddpm':
    def network(params, x, t, labels, positions, crop):
      # The VP state as it is, at the index of t: on the ancestral grid exactly the integer.
      return model.apply(params, x, ddpm.fractional_index(t), t, labels, positions, crop,
                         encoding=plan.encoding, method=model_lib.DiT.network)
    # DiT's x_T is the noise itself, its VP state; each step's noise from the example's key.
    step_keys = example_keys(noise_key, indices)
    step_noise = lambda k: jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, k + 1), (height, width, channels)))(step_keys)
    x = ddpm_ancestral(functools.partial(guide, network, params, cfg_channels=(
        plan.cfg_channels or channels)), noise, step_noise, plan.steps)
    ends = np.append(ddpm.ancestral(plan.steps).times[::-1][1:], 0.0)
    return x, _fixed_steps(batch, plan.steps, plan.steps, jnp.asarray(ends, jnp.float32))

  apply_fn = functools.partial(model.apply, encoding=plan.encoding)
  velocity = functools.partial(guide, apply_fn, params)

  if plan.sampler == 'euler_maruyama':
    if brownian is None:
      keys = example_keys(jax.random.fold_in(key, BROWNIAN_STREAM), indices)
      increment = lambda i: jax.vmap(
          lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(keys)
    else:
      increment = lambda i: brownian[i]
    return euler_maruyama(velocity, x, plan, t_min, t_max, shift, increment)
  if plan.sampler == 'dopri5':
    x, stats = dopri5(velocity, x, t_max, t_min, plan)
  else:
    x, stats = fixed_grid(velocity, x, time_grid(plan.steps, shift, t_min, t_max), plan.sampler)
  if t_min > 0:  # the step from t_min to 0 is Euler's: it lands on x0_hat = x - t_min v exactly
    done = stats.finished  # an unfinished dopri5 solve keeps its state
    x0_hat = x - t_min * velocity(x, jnp.full((batch,), t_min, x.dtype))
    x = jnp.where(_per_example(done, x), x0_hat, x)
    stats = stats._replace(evaluations=stats.evaluations + done)
  return x, stats


def sample(model, params, key, labels, *, height: int, width: int, plan: SamplingPlan,
           indices=None, crop=None, channels: int | None = None, noise=None, brownian=None):
  """Draws images (batch, height, width, C) in roughly [-1, 1] for the given labels; an example
  that did not reach t = 0 (dopri5 out of max_steps, or a velocity that is not finite) is NaN, so
  it is never taken for a sample. `sample_with_stats` has the arguments and says why."""
  images, stats = sample_with_stats(model, params, key, labels, height=height, width=width,
                                    plan=plan, indices=indices, crop=crop, channels=channels,
                                    noise=noise, brownian=brownian)
  return jnp.where(_per_example(stats.finished, images), images, jnp.nan)


def ddpm_ancestral(network, x, step_noise, steps: int):
  """DiT's ancestral sampler with learned variance, respaced to `steps` of its 1000 indices
  (rpe2d.ddpm.ancestral; DiT's p_sample_loop with clip_denoised off), in one `lax.scan`.

  network(x, t) -> (batch, H, W, 2C): epsilon and the variance channels at the VP state x and the
  flow time t of a DDPM index (guided); step_noise(k) -> the noise added at step k (none at the
  last, k = 0). x starts as DiT's x_T ~ N(0, I) and ends as its sample, the latent.
  """
  schedule = ddpm.ancestral(steps)
  tables = {f.name: jnp.asarray(getattr(schedule, f.name), jnp.float32)
            for f in dataclasses.fields(schedule)}
  channels = x.shape[-1]

  def step(x, k):
    entries = {name: table[k] for name, table in tables.items()}
    out = network(x, jnp.full((x.shape[0],), entries['times']))
    x = ddpm.ancestral_step(entries, x, out[..., :channels], out[..., channels:2 * channels],
                            step_noise(k), k == 0)
    return x, None

  x, _ = jax.lax.scan(step, x, jnp.arange(steps - 1, -1, -1))
  return x


# One compile per (model, plan, height, width, batch shape).
sample_jit = jax.jit(sample, static_argnames=('model', 'height', 'width', 'plan', 'channels'))
sample_with_stats_jit = jax.jit(sample_with_stats,
                                static_argnames=('model', 'height', 'width', 'plan', 'channels'))
