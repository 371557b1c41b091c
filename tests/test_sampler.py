import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturb
from rpe2d import flow, model as model_lib, rope, sampler
from rpe2d.sampler import SamplingPlan

LABELS = jnp.array([0, 1, 2, 3])


class RangedDiT(model_lib.DiT):
  """A DiT covering only t in [0.1, 0.9], as a model imported from a discrete schedule does."""

  @property
  def time_range(self):
    return (0.1, 0.9)


@pytest.fixture(scope='module')
def ranged_model():
  """conftest's micro_model (its parameters fit) with the time range [0.1, 0.9]."""
  return RangedDiT(variant='micro/2', channels=1, num_classes=4, train_grid=(4, 4),
                   position_range=(8, 8), micro_conditioning=True)


def draw(model, params, plan, key=0, height=8, width=8, labels=LABELS, **kwargs):
  return sampler.sample_jit(model, params, jax.random.key(key), labels, height=height,
                            width=width, plan=plan, **kwargs)


def test_deterministic_for_a_fixed_key(micro_model, micro_params):
  plan = SamplingPlan(steps=4)
  a, b = draw(micro_model, micro_params, plan), draw(micro_model, micro_params, plan)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - draw(micro_model, micro_params, plan, key=1)).max() > 1e-2
  assert a.shape == (4, 8, 8, 1)


def test_per_example_keys_make_images_independent_of_the_batch(micro_model, micro_params):
  plan = SamplingPlan(steps=3, positions='random')
  whole = draw(micro_model, micro_params, plan)
  second_half = draw(micro_model, micro_params, plan, labels=LABELS[2:], indices=jnp.arange(2, 4))
  np.testing.assert_allclose(second_half, whole[2:], atol=1e-5)


def test_compiles_once_per_resolution_and_batch(micro_model, micro_params):
  plan = SamplingPlan(steps=2, sampler='heun')
  before = sampler.sample_jit._cache_size()
  for key in range(3):
    draw(micro_model, micro_params, plan, key=key, height=8, width=12)
  assert sampler.sample_jit._cache_size() == before + 1
  draw(micro_model, micro_params, plan, height=12, width=8)
  assert sampler.sample_jit._cache_size() == before + 2


def test_cfg_formula_and_scale_one_is_conditional(micro_model, micro_params):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.array([0.1, 0.4, 0.6, 0.9])
  pos = sampler.sampling_positions(micro_model, SamplingPlan(), 8, 8, jnp.arange(4))
  apply = jax.jit(micro_model.apply)  # one program; eagerly, each op compiles on its own
  cond = apply(micro_params, x, t, LABELS, pos)
  uncond = apply(micro_params, x, t, jnp.full(4, 4), pos)
  guided = functools.partial(sampler.guided_velocity, apply, micro_params, x, t, LABELS, pos, None,
                             null_class=4)
  np.testing.assert_allclose(guided(cfg_scale=2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
  # Guidance only inside t in [0.3, 0.7]: examples 1 and 2.
  inside = guided(cfg_scale=2.5, cfg_interval=(0.3, 0.7))
  np.testing.assert_allclose(inside[np.array([0, 3])], cond[np.array([0, 3])], atol=1e-5)
  np.testing.assert_allclose(inside[np.array([1, 2])],
                             (uncond + 2.5 * (cond - uncond))[np.array([1, 2])], atol=1e-5)
  # Whole sampling runs: guidance with an interval no Euler step reaches equals scale 1 exactly.
  plan = SamplingPlan(steps=4)
  conditional = draw(micro_model, micro_params, plan)
  never = draw(micro_model, micro_params,
               SamplingPlan(steps=4, cfg_scale=3.0, cfg_interval=(0.0, 0.1)))
  np.testing.assert_allclose(never, conditional, atol=1e-5)
  guided_images = draw(micro_model, micro_params, SamplingPlan(steps=4, cfg_scale=3.0))
  assert np.abs(guided_images - conditional).max() > 1e-3


def test_heun_and_euler_converge_together(micro_model, micro_init):
  # Small random weights: large ones make v oscillate fast in t through the time embedding, and
  # then no step count is in the asymptotic regime.
  params = jax.jit(perturb, static_argnames='scale')(micro_init, jax.random.key(1), scale=0.02)
  reference = draw(micro_model, params, SamplingPlan(sampler='heun', steps=128))
  error = lambda plan: float(np.abs(draw(micro_model, params, plan) - reference).max())
  euler_8, euler_64 = error(SamplingPlan(steps=8)), error(SamplingPlan(steps=64))
  heun_8 = error(SamplingPlan(sampler='heun', steps=8))
  assert euler_64 < euler_8 / 4        # first order: 8x the steps, about 8x less error
  assert heun_8 < euler_8 / 4          # second order beats first at equal steps
  assert euler_64 < 0.01


def test_dype_in_scan_matches_a_python_loop(micro_model, micro_params):
  # 32x24 pixels = 16x12 tokens against a reference range of 8x8: scales 2 and 1.5.
  encoding = rope.Encoding('yarn', dype=True)
  plan = SamplingPlan(steps=5, encoding=encoding, time_shift=2.0, positions='uniform')
  key = jax.random.key(7)
  scanned = sampler.sample_jit(micro_model, micro_params, key, LABELS, height=32, width=24,
                               plan=plan)

  noise_key, position_key = jax.random.split(key)
  keys = sampler.example_keys(noise_key, jnp.arange(4))
  x = jax.vmap(lambda k: jax.random.normal(k, (32, 24, 1)))(keys)
  pos = sampler.sampling_positions(micro_model, plan, 32, 24, jnp.arange(4))
  times = np.asarray(flow.shift_time(np.linspace(1.0, 0.0, 6), 2.0))
  velocity = jax.jit(functools.partial(micro_model.apply, encoding=encoding))  # not op by op
  for t_now, t_next in zip(times[:-1], times[1:]):
    t = jnp.full((4,), t_now)
    v = velocity(micro_params, x, t, LABELS, pos)
    x = x + (t_next - t_now) * v
  np.testing.assert_allclose(scanned, x, atol=1e-4)
  # DyPE matters: the static method gives other images.
  static = sampler.sample_jit(micro_model, micro_params, key, LABELS, height=32, width=24,
                              plan=SamplingPlan(steps=5, encoding=rope.Encoding('yarn'),
                                                time_shift=2.0, positions='uniform'))
  assert np.abs(static - scanned).max() > 1e-4


def test_time_grid_and_shift():
  grid = np.asarray(sampler.time_grid(4, 1.0))
  np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])
  shifted = np.asarray(sampler.time_grid(4, 3.0))
  assert shifted[0] == 1.0 and shifted[-1] == 0.0 and np.all(shifted[1:-1] > grid[1:-1])
  assert flow.resolution_shift(1024, 256) == 2.0
  # On a model's time range the shifted grid is mapped onto [t_min, t_max].
  np.testing.assert_allclose(sampler.time_grid(4, 3.0, 0.1, 0.9), 0.1 + 0.8 * shifted, atol=1e-6)


def start(model, key=7, height=8, width=8):
  """The standard normal draws the sampler starts from (before scaling to t_max), per example."""
  noise_key, _ = jax.random.split(jax.random.key(key))
  return jax.vmap(lambda k: jax.random.normal(k, (height, width, 1)))(
      sampler.example_keys(noise_key, jnp.arange(4)))


def test_a_time_range_starts_at_t_max_and_ends_with_the_step_to_x0_hat(ranged_model, micro_params):
  images, stats = sampler.sample_with_stats_jit(ranged_model, micro_params, jax.random.key(7),
                                                LABELS, height=8, width=8,
                                                plan=SamplingPlan(steps=3))
  velocity = jax.jit(ranged_model.apply)
  pos = sampler.sampling_positions(ranged_model, SamplingPlan(), 8, 8, jnp.arange(4))
  v = lambda x, t: np.asarray(velocity(micro_params, x, jnp.full((4,), t), LABELS, pos))
  # The noise at t = 0.9 has the variance 0.1^2 + 0.9^2; Euler on 0.9 .. 0.1, then from 0.1 to 0.
  x = np.asarray(start(ranged_model)) * np.sqrt(0.1 ** 2 + 0.9 ** 2)
  times = np.linspace(0.9, 0.1, 4)
  for t_now, t_next in zip(times[:-1], times[1:]):
    x = x + (t_next - t_now) * v(x, t_now)
  x = x - 0.1 * v(x, 0.1)                                  # = x0_hat = x - t v at t = 0.1
  np.testing.assert_allclose(images, x, atol=1e-5)
  assert stats.evaluations.tolist() == [4] * 4 and bool(stats.finished.all())
  # dopri5, even per batch (which passes t = 0 on a model covering it), lands on t_min, then the
  # same step to 0: one evaluation more than its attempts' 2 + 6 n.
  plan = SamplingPlan(sampler='dopri5', adaptive_step='per_batch', rtol=1e-2)
  images, stats = sampler.sample_with_stats_jit(ranged_model, micro_params, jax.random.key(7),
                                                LABELS, height=8, width=8, plan=plan)
  assert bool(stats.finished.all()) and np.isfinite(images).all()
  last = int(stats.accepted[0]) - 1
  assert stats.times[0, last] == np.float32(0.1) and 0.1 < stats.times[0, last - 1] < 0.9
  attempts = stats.accepted + stats.rejected
  assert (stats.evaluations == 2 + 6 * attempts + 1).all()


def test_dopri5_evaluates_dype_at_every_stages_own_t(ranged_model, micro_params):
  # 32x24 pixels = 16x12 tokens against a reference range of 8x8: DyPE's frequencies depend on t.
  encoding = rope.Encoding('yarn', dype=True)
  plan = SamplingPlan(sampler='dopri5', max_steps=1, encoding=encoding, positions='uniform')
  noise = start(ranged_model, height=32, width=24)
  x1, stats = sampler.sample_with_stats_jit(ranged_model, micro_params, jax.random.key(7), LABELS,
                                            height=32, width=24, plan=plan, noise=noise)
  assert stats.accepted.tolist() == [1] * 4 and not stats.finished.any()  # one step, from 0.9

  # The same first step in numpy, per example, each velocity at its own t.
  pos = sampler.sampling_positions(ranged_model, plan, 32, 24, jnp.arange(4))

  def first_step(encoding, fixed_t=False):
    apply = jax.jit(functools.partial(ranged_model.apply, encoding=encoding))
    v = lambda x, t: np.asarray(apply(micro_params, jnp.asarray(x, jnp.float32),
                                      jnp.asarray(t, jnp.float32), LABELS, pos), np.float64)
    rms = lambda a: np.sqrt(np.mean(a.reshape(4, -1) ** 2, axis=1))
    each = lambda a: a.reshape(4, 1, 1, 1)
    x, t = np.asarray(noise, np.float64) * np.sqrt(0.1 ** 2 + 0.9 ** 2), np.full(4, 0.9)
    k0, scale = v(x, t), 1e-6 + 1e-3 * np.abs(x)
    h0 = 0.01 * rms(x / scale) / rms(k0 / scale)
    d2 = rms((v(x - each(h0) * k0, t - h0) - k0) / scale) / h0
    h = np.minimum(100 * h0, (0.01 / np.maximum(rms(k0 / scale), d2)) ** 0.2)
    tableau, k = sampler.DORMAND_PRINCE, [k0]
    for i in range(1, 7):
      state = x - each(h) * sum(tableau.a[i, j] * k[j] for j in range(i))
      k.append(v(state, t if fixed_t else t - tableau.c[i] * h))
    return x - each(h) * sum(tableau.a[6, j] * k[j] for j in range(7)), t - h, k0

  x_ref, t_ref, v_dype = first_step(encoding)
  np.testing.assert_allclose(x1, x_ref, atol=2e-5)
  np.testing.assert_allclose(stats.times[:, 0], t_ref, atol=1e-6)
  # A solver handing every stage the step's start t lands elsewhere; and DyPE is at work here: the
  # static method's velocity is another.
  assert np.abs(first_step(encoding, fixed_t=True)[0] - x1).max() > 1e-3
  assert np.abs(first_step(rope.Encoding('yarn'))[2] - v_dype).max() > 1e-4


def test_euler_maruyama_evaluates_dype_at_every_steps_own_t(ranged_model, micro_params):
  encoding = rope.Encoding('yarn', dype=True)
  plan = SamplingPlan(sampler='euler_maruyama', steps=3, encoding=encoding, positions='uniform')
  noise = start(ranged_model, height=32, width=24)
  brownian = jax.random.normal(jax.random.key(3), (2,) + noise.shape)
  images, stats = sampler.sample_with_stats_jit(ranged_model, micro_params, jax.random.key(7),
                                                LABELS, height=32, width=24, plan=plan,
                                                noise=noise, brownian=brownian)
  assert stats.evaluations.tolist() == [3] * 4
  pos = sampler.sampling_positions(ranged_model, plan, 32, 24, jnp.arange(4))

  def solve(encoding, fixed_t=None):
    apply = jax.jit(functools.partial(ranged_model.apply, encoding=encoding))
    v = lambda x, t: np.asarray(apply(micro_params, jnp.asarray(x, jnp.float32),
                                      jnp.full((4,), fixed_t or t, jnp.float32), LABELS, pos))
    # w = t (sigma): the drift v - w score = v + x + (1 - t) v, in t from 0.9 to 0.1.
    drift = lambda x, t: v(x, t) + x + (1 - t) * v(x, t)
    x = np.asarray(noise) * np.sqrt(0.1 ** 2 + 0.9 ** 2)
    for i, (t_now, t_next) in enumerate(((0.9, 0.5), (0.5, 0.1))):
      x = x + (t_next - t_now) * drift(x, t_now) + np.sqrt(2 * t_now * 0.4) * brownian[i]
    return x - 0.1 * drift(x, 0.1)                         # SiT's last step, Mean, from 0.1

  np.testing.assert_allclose(images, solve(encoding), atol=2e-5)
  assert np.abs(solve(encoding, fixed_t=0.9) - images).max() > 1e-3
  assert np.abs(solve(rope.Encoding('yarn')) - images).max() > 1e-3


def test_plans_drop_what_their_sampler_does_not_read(micro_model):
  euler = SamplingPlan(steps=16, cfg_scale=2.0, atol=1e-4, diffusion_form='decreasing')
  # The key of an euler or heun plan is its repr from before the other samplers existed, so
  # evaluation cells cached then are found again.
  assert sampler.key_text(euler) == (
      "SamplingPlan(sampler='euler', steps=16, cfg_scale=2.0, cfg_interval=(0.0, 1.0), "
      "time_shift=1.0, time_shift_by_resolution=False, positions='grid', round_positions=False, "
      f'encoding={rope.Encoding()!r})')
  assert sampler.canonical_plan(micro_model, euler, 8, 8) == SamplingPlan(steps=16, cfg_scale=2.0)
  # dopri5 reads neither steps nor the time shift; max_steps is a guard, not part of the key.
  a = SamplingPlan(sampler='dopri5', steps=8, time_shift=3.0, rtol=1e-4, max_steps=50)
  b = SamplingPlan(sampler='dopri5', rtol=1e-4)
  assert sampler.canonical_plan(micro_model, a, 8, 8) == dataclasses.replace(b, max_steps=50)
  assert sampler.key_text(a) == sampler.key_text(b) and 'rtol=0.0001' in sampler.key_text(a)
  assert 'max_steps' not in sampler.key_text(a) and 'steps=' not in sampler.key_text(a)
  sde = SamplingPlan(sampler='euler_maruyama', steps=250, last_step_size=0.05)
  assert 'last_step_size=0.05' in sampler.key_text(sde) and 'atol' not in sampler.key_text(sde)
  assert sampler.describe(sde) == 'euler_maruyama x 250 (sigma, last step mean 0.05)'
  assert sampler.describe(b) == 'dopri5 (atol 1e-06, rtol 0.0001, per_example)'


@pytest.mark.parametrize('time_range,plan,match', [
    ((0.5, 0.2), SamplingPlan(), r'time_range \(0.5, 0.2\) must satisfy 0 <= t_min < t_max <= 1'),
    ((0.0, 1.2), SamplingPlan(), 'must satisfy 0 <= t_min < t_max <= 1'),
    ((0.0, 0.5), SamplingPlan(sampler='euler_maruyama', last_step_size=0.6),
     r'last_step_size=0.6 leaves no time for the SDE steps: this model covers t in \[0, 0.5\]'),
])
def test_model_time_ranges_are_checked(time_range, plan, match):
  model = types.SimpleNamespace(patch_size=2, position_range=(8, 8), time_range=time_range)
  with pytest.raises(ValueError, match=match):
    sampler.check_resolution(model, plan, 8, 8)


@pytest.mark.parametrize('bad,match', [
    (dict(sampler='dpm'), "unknown sampler 'dpm'"),
    (dict(steps=0), 'steps must be a positive integer, got 0'),
    (dict(positions='diagonal'), "unknown position rule 'diagonal'"),
    (dict(cfg_interval=(0.8, 0.2)), r'cfg_interval must satisfy 0 <= low <= high <= 1'),
    (dict(time_shift=-1.0), 'time_shift must be a positive number, got -1.0'),
    (dict(atol=0.0), r'atol must be a number in \(0, 1\], got 0.0'),
    (dict(rtol=2), r'rtol must be a number in \(0, 1\], got 2'),
    (dict(max_steps=0), 'max_steps must be a positive integer, got 0'),
    (dict(adaptive_step='per_pixel'), "unknown adaptive_step 'per_pixel'; allowed: per_example, "
                                      'per_batch'),
    (dict(diffusion_form='SBDM'), "unknown diffusion_form 'SBDM'; allowed: sigma, linear"),
    (dict(last_step='tweedie'), "unknown last_step 'tweedie'; allowed: mean, euler, none"),
    (dict(diffusion_norm=-1.0), r'diffusion_norm must be a number in \[0, 100\], got -1.0'),
    (dict(last_step_size=0.0), r'last_step_size must be a number in \(0, 1\), got 0.0'),
    (dict(sampler='euler_maruyama', steps=1), r'euler_maruyama needs steps >= 2 \(steps - 1 SDE '
                                              r'steps, then the last step\), got 1'),
])
def test_bad_plans(bad, match):
  with pytest.raises(ValueError, match=match):
    SamplingPlan(**bad)
