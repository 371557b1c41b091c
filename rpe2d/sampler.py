"""ODE sampler from t = 1 (noise) to t = 0 (data) inside one `lax.scan`
(docs/methods.md#sampler).

The position rule is applied once per sample; the encoding (extrapolation, DyPE) is evaluated by the
model from t at every step inside the scan body, so DyPE costs one small frequency computation per
step. Noise and random positions come from per-example keys (fold_in of the example index), so an
example's image does not depend on the batch it was drawn in.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rpe2d import flow, model as model_lib, positions as positions_lib, rope

SAMPLERS = ('euler', 'heun')
POSITION_RULES = ('grid',) + positions_lib.INFERENCE_RULES


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Everything about sampling that is not an array. Static: one compile per (plan, H, W, batch)."""
  sampler: str = 'euler'
  steps: int = 32
  cfg_scale: float = 1.0
  cfg_interval: tuple[float, float] = (0.0, 1.0)
  time_shift: float = 1.0              # a in t' = a t / (1 + (a - 1) t)
  time_shift_by_resolution: bool = False  # multiply a by sqrt(N_test / N_train)
  positions: str = 'grid'              # 'grid' for grid-trained models; an RPE-2D inference rule
  round_positions: bool = False
  encoding: rope.Encoding = rope.Encoding()

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


def check_resolution(model, plan: SamplingPlan, height: int, width: int) -> None:
  """Errors for a (plan, resolution) pair that cannot be sampled, before anything compiles."""
  patch = model.patch_size
  model_lib.check_resolution(height, width, patch)
  grid = (height // patch, width // patch)
  if plan.positions == 'random' and any(n > L for n, L in zip(grid, model.position_range)):
    raise ValueError(f"positions='random' draws distinct positions: {grid[0]}x{grid[1]} tokens "
                     f"do not fit the trained range {model.position_range[0]}x"
                     f"{model.position_range[1]}; use 'uniform' or 'contiguous' beyond it")


def canonical_plan(model, plan: SamplingPlan, height: int,
                   width: int) -> SamplingPlan:
  """The plan with what changes nothing at this size taken out: an encoding at scale 1, and the
  choice of RPE-2D rule when the tokens fill the trained range (every rule gives 0..L-1 then)."""
  geometry = model.geometry(height, width)
  if max(geometry.scales) == 1.0 and plan.encoding.attention_scale == 'none':
    plan = dataclasses.replace(plan, encoding=rope.Encoding())
  fills_range = geometry.grid == tuple(model.position_range)
  if plan.positions in positions_lib.INFERENCE_RULES and fills_range:
    plan = dataclasses.replace(plan, positions='contiguous')
  return plan


def time_grid(steps: int, shift: float) -> jax.Array:
  return flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


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
                    cfg_scale: float, cfg_interval=(0.0, 1.0)):
  """v_uncond + w (v_cond - v_uncond), with w = 1 outside the t-interval. Both branches share t."""
  if cfg_scale == 1.0:
    return apply_fn(params, x, t, labels, positions, crop)
  both = lambda a: jnp.concatenate([a, a], axis=0)
  null = jnp.full_like(labels, null_class)
  v = apply_fn(params, both(x), both(t), jnp.concatenate([labels, null]), both(positions),
               None if crop is None else both(crop))
  v_cond, v_uncond = jnp.split(v, 2, axis=0)
  inside = (t >= cfg_interval[0]) & (t <= cfg_interval[1])
  scale = jnp.where(inside, cfg_scale, 1.0).reshape(-1, *([1] * (x.ndim - 1)))
  return v_uncond + scale * (v_cond - v_uncond)


def sample(model, params, key, labels, *, height: int, width: int, plan: SamplingPlan,
           indices=None, crop=None, channels: int | None = None):
  """Draws images (batch, height, width, C) in roughly [-1, 1] for the given labels.

  indices: the global index of each example (defaults to 0..batch-1); keys derive from it.
  """
  batch = labels.shape[0]
  channels = channels or model.channels
  if indices is None:
    indices = jnp.arange(batch)
  noise_key, position_key = jax.random.split(key)
  noise = jax.vmap(lambda k: jax.random.normal(k, (height, width, channels)))(
      example_keys(noise_key, indices))
  positions = sampling_positions(model, plan, height, width, example_keys(position_key, indices))
  geometry = model.geometry(height, width)
  shift = plan.time_shift
  if plan.time_shift_by_resolution:
    shift *= flow.resolution_shift(geometry.grid[0] * geometry.grid[1], geometry.train_tokens)
  times = time_grid(plan.steps, shift)

  apply_fn = functools.partial(model.apply, encoding=plan.encoding)
  velocity = functools.partial(
      guided_velocity, apply_fn, params, labels=labels, positions=positions, crop=crop,
      null_class=model.num_classes, cfg_scale=plan.cfg_scale, cfg_interval=plan.cfg_interval)

  def step(x, t_pair):
    t_now, t_next = t_pair
    dt = t_next - t_now
    v = velocity(x, jnp.full((batch,), t_now))
    if plan.sampler == 'euler':
      return x + dt * v, None
    v_next = velocity(x + dt * v, jnp.full((batch,), t_next))
    return x + dt * 0.5 * (v + v_next), None

  images, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
  return images


# One compile per (model, plan, height, width, batch shape).
sample_jit = jax.jit(sample, static_argnames=('model', 'height', 'width', 'plan', 'channels'))
