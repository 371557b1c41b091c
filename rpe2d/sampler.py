"""ODE sampler from t = 1 (noise) to t = 0 (data) inside one `lax.scan`
(docs/methods.md#sampler); DiT's ancestral DDPM sampler for imported DiT models (`ddpm`).

The position rule is applied once per sample; the encoding (extrapolation, DyPE) is evaluated by the
model from t at every step inside the scan body, so DyPE costs one small frequency computation per
step. Noise and random positions come from per-example keys (fold_in of the example index), so an
example's image does not depend on the batch it was drawn in.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rpe2d import ddpm, flow, model as model_lib, positions as positions_lib, rope

SAMPLERS = ('euler', 'heun', 'ddpm')
POSITION_RULES = ('grid',) + positions_lib.INFERENCE_RULES


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


def check_model(model, plan: SamplingPlan) -> None:
  """Errors for a plan the model cannot be sampled with, before anything compiles."""
  if plan.sampler == 'ddpm' and (model.prediction != 'ddpm_epsilon' or not model.learned_variance):
    raise ValueError(f"sampler='ddpm' is DiT's ancestral sampler: it needs a model with "
                     f"prediction='ddpm_epsilon' and learned_variance=True (an imported DiT); "
                     f'this one has prediction={model.prediction!r}, learned_variance='
                     f'{model.learned_variance}: use euler or heun')
  if plan.cfg_channels > model.channels:
    raise ValueError(f'cfg_channels={plan.cfg_channels} exceeds the model\'s {model.channels} '
                     f'channels; allowed: 0 (all) to {model.channels}')


def check_resolution(model, plan: SamplingPlan, height: int, width: int) -> None:
  """Errors for a (plan, resolution) pair that cannot be sampled, before anything compiles."""
  check_model(model, plan)
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
  inside = (t >= cfg_interval[0]) & (t <= cfg_interval[1])
  scale = jnp.where(inside, cfg_scale, 1.0).reshape(-1, *([1] * (x.ndim - 1)))
  guided = v_uncond + scale * (v_cond - v_uncond)
  if cfg_channels:
    guided = jnp.concatenate([guided[..., :cfg_channels], v_cond[..., cfg_channels:]], axis=-1)
  return guided


def sample(model, params, key, labels, *, height: int, width: int, plan: SamplingPlan,
           indices=None, crop=None, channels: int | None = None, noise=None):
  """Draws images (batch, height, width, C) in roughly [-1, 1] for the given labels.

  indices: the global index of each example (defaults to 0..batch-1); keys derive from it.
  noise: the standard normal draw to start from (batch, height, width, C) instead of the keys'
  (for comparisons with other code).
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
  times = time_grid(plan.steps, shift)

  guide = functools.partial(
      guided_velocity, labels=labels, positions=positions, crop=crop,
      null_class=model.num_classes, cfg_scale=plan.cfg_scale, cfg_interval=plan.cfg_interval,
      cfg_channels=plan.cfg_channels)
  if plan.sampler == 'ddpm':
    def network(params, x, t, labels, positions, crop):
      # The VP state as it is, at the index of t: on the ancestral grid exactly the integer.
      return model.apply(params, x, ddpm.fractional_index(t), t, labels, positions, crop,
                         encoding=plan.encoding, method=model_lib.DiT.network)
    step_keys = example_keys(noise_key, indices)
    step_noise = lambda k: jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, k + 1), (height, width, channels)))(step_keys)
    return ddpm_ancestral(functools.partial(guide, network, params, cfg_channels=(
        plan.cfg_channels or channels)), noise, step_noise, plan.steps)

  apply_fn = functools.partial(model.apply, encoding=plan.encoding)
  velocity = functools.partial(guide, apply_fn, params)

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
