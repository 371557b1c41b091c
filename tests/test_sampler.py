import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturb
from rpe2d import flow, rope, sampler
from rpe2d.sampler import SamplingPlan

LABELS = jnp.array([0, 1, 2, 3])


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


@pytest.mark.parametrize('bad,match', [
    (dict(sampler='dpm'), "unknown sampler 'dpm'"),
    (dict(steps=0), 'steps must be a positive integer, got 0'),
    (dict(positions='diagonal'), "unknown position rule 'diagonal'"),
    (dict(cfg_interval=(0.8, 0.2)), r'cfg_interval must satisfy 0 <= low <= high <= 1'),
    (dict(time_shift=-1.0), 'time_shift must be a positive number, got -1.0'),
])
def test_bad_plans(bad, match):
  with pytest.raises(ValueError, match=match):
    SamplingPlan(**bad)
