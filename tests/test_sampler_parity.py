"""rpe2d's samplers against SiT's own (its transport package, torchdiffeq) on an analytic field.

tests/fixtures/sampler_reference.npz holds what tests/fixtures/make_sampler_fixtures.py got from
SiT's code: the noise, the SDE's Brownian draws, and the states its Euler and Heun ODE, its dopri5
(with torchdiffeq's accepted and rejected steps) and its Euler-Maruyama SDE reached. Here the same
field, written in rpe2d's convention as a flax module, goes through rpe2d's sampler entry points
with the same noise and guidance: the conventions (time direction, velocity sign, score, grids)
are what is tested, not a copy of the reference's formulas.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpe2d import rope, sampler
from rpe2d.sampler import SamplingPlan

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'sampler_reference.npz'
# SiT's --last-step names -> rpe2d's (SiT's Tweedie lands where its Euler does, on x0_hat).
LAST_STEPS = {'Mean': 'mean', 'Euler': 'euler', 'Tweedie': 'euler', None: 'none'}
SDES = {  # as make_sampler_fixtures.SDES: (form, norm, last step, its size, steps)
    'default': ('sigma', 1.0, 'Mean', 0.04, 250),
    'decreasing_euler': ('decreasing', 0.5, 'Euler', 0.06, 20),
    'increasing_decreasing_tweedie': ('increasing_decreasing', 1.0, 'Tweedie', 0.1, 12),
    'linear_none': ('linear', 2.0, None, 0.04, 16),
}


class MixtureVelocity(nn.Module):
  """The exact velocity of a Gaussian mixture in rpe2d's convention, x_t = (1 - t) x0 + t eps and
  v = E[eps - x0 | x_t]: component k (mean mu_k, standard deviation s_k) has x_t ~ N((1 - t) mu_k,
  ((1 - t)^2 s_k^2 + t^2) I) and E[eps - x0 | x_t, k] = -mu_k + (t - (1 - t) s_k^2) /
  ((1 - t)^2 s_k^2 + t^2) (x_t - (1 - t) mu_k). Label c weighs the components by
  softmax(log_weights[c]); label num_classes is the null class. Takes a DiT's arguments."""
  components: int
  num_classes: int
  channels: int = 4
  position_range: tuple[int, int] = (4, 4)
  patch_size: int = 1

  @property
  def time_range(self):
    return (0.0, 1.0)

  def geometry(self, height, width):
    return rope.Geometry(grid=(height, width), reference=self.position_range,
                         train_tokens=height * width)

  @nn.compact
  def __call__(self, x, t, labels, positions, crop=None, encoding=rope.Encoding()):
    batch, dim = x.shape[0], x[0].size
    means = self.param('means', nn.initializers.zeros, (self.components, dim))
    stds = self.param('stds', nn.initializers.ones, (self.components,))
    log_weights = self.param('log_weights', nn.initializers.zeros,
                             (self.num_classes + 1, self.components))
    flat = x.reshape(batch, 1, dim)
    t = t.reshape(batch, 1, 1)
    data = 1.0 - t                                                      # the data's coefficient
    variance = data ** 2 * stds[None, :, None] ** 2 + t ** 2            # (batch, K, 1)
    offset = flat - data * means[None]                                  # (batch, K, dim)
    log_density = (log_weights[labels] - 0.5 * dim * jnp.log(variance[..., 0])
                   - 0.5 * jnp.sum(offset ** 2, axis=-1) / variance[..., 0])
    weights = jax.nn.softmax(log_density, axis=-1)
    velocities = -means[None] + (t - data * stds[None, :, None] ** 2) / variance * offset
    return jnp.sum(weights[..., None] * velocities, axis=1).reshape(x.shape)


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE) as f:
    return dict(f)


@pytest.fixture(scope='module')
def field(reference):
  model = MixtureVelocity(components=reference['means'].shape[0],
                          num_classes=reference['log_weights'].shape[0] - 1)
  params = {'params': {k: jnp.asarray(reference[k]) for k in ('means', 'stds', 'log_weights')}}
  return model, params


def solve(field, reference, brownian=None, **plan):
  model, params = field
  plan = SamplingPlan(cfg_scale=float(reference['cfg_scale']), **plan)
  return sampler.sample_with_stats_jit(
      model, params, jax.random.key(0), jnp.asarray(reference['labels'], jnp.int32), height=4,
      width=4, plan=plan, noise=jnp.asarray(reference['noise']),
      brownian=None if brownian is None else jnp.asarray(brownian))


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_fixed_step_ode_matches_sit(field, reference, method):
  # SiT's num_steps=9 is 9 grid points: 8 steps.
  images, stats = solve(field, reference, sampler=method, steps=8)
  np.testing.assert_allclose(images, reference[f'{method}_path'][-1], atol=1e-5, rtol=0)
  assert int(stats.evaluations[0]) == 8 * (1 if method == 'euler' else 2)


def test_dopri5_per_batch_takes_torchdiffeqs_steps_in_float64(field, reference):
  # In float64 the error estimates decide alike; in float32 the first, tiny step's estimate is at
  # rounding level in any implementation, so the steps after it differ a little (next test).
  model, params = field
  with jax.enable_x64(True):
    images, stats = jax.device_get(sampler.sample_with_stats_jit(
        model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params), jax.random.key(0),
        jnp.asarray(reference['labels'], jnp.int32), height=4, width=4,
        plan=SamplingPlan(sampler='dopri5', adaptive_step='per_batch', cfg_scale=1.5),
        noise=jnp.asarray(reference['noise'], jnp.float64)))
  assert images.dtype == np.float64
  accepted, rejected = reference['dopri5_f64_accepted'], reference['dopri5_f64_rejected']
  assert stats.accepted.tolist() == [len(accepted)] * 4
  assert stats.rejected.tolist() == [len(rejected)] * 4
  assert stats.evaluations.tolist() == [int(reference['dopri5_f64_evaluations'])] * 4
  # Every step ends where torchdiffeq's did (SiT's t is 1 - t), the last past t = 0, and the state
  # at 0 is interpolated inside it as torchdiffeq does.
  np.testing.assert_allclose(stats.times[0, :len(accepted)], 1.0 - accepted.sum(axis=1),
                             atol=1e-9, rtol=0)
  np.testing.assert_allclose(images, reference['dopri5_f64'], atol=1e-8, rtol=0)


def near_the_exact_solution(images, reference):
  """Within ten times the tolerance at the solution's scale of the float64 solve at atol 1e-10,
  rtol 1e-8. (dopri5 controls each step's error; the error at the end is their sum carried by the
  ODE: SiT's own float32 solve is 0.0034 from it, rpe2d's per batch 0.023, per example 0.004.)"""
  exact = reference['dopri5_exact']
  return np.abs(images - exact).max() < 10 * (1e-6 + 1e-3 * np.abs(exact).max())


def test_dopri5_in_float32(field, reference):
  # Per batch the first step is torchdiffeq's; after it the float32 rounding of that tiny step's
  # error estimate moves the step sizes a little, in any two implementations.
  images, stats = solve(field, reference, sampler='dopri5', adaptive_step='per_batch')
  assert bool(stats.finished.all()) and near_the_exact_solution(images, reference)
  np.testing.assert_allclose(stats.times[:, 0], 1.0 - reference['dopri5_f64_accepted'][0].sum(),
                             atol=1e-6, rtol=0)
  images, stats = solve(field, reference, sampler='dopri5', adaptive_step='per_example')
  assert bool(stats.finished.all()) and near_the_exact_solution(images, reference)
  assert near_the_exact_solution(reference['dopri5'], reference)  # SiT's own, for scale


def test_dopri5_per_example_is_independent_of_the_batch(field, reference):
  images, stats = solve(field, reference, sampler='dopri5')
  assert len(set(stats.evaluations.tolist())) > 1  # each example took its own steps
  model, params = field
  alone, alone_stats = sampler.sample_with_stats_jit(
      model, params, jax.random.key(0), jnp.asarray(reference['labels'][2:], jnp.int32),
      height=4, width=4, plan=SamplingPlan(sampler='dopri5', cfg_scale=1.5),
      noise=jnp.asarray(reference['noise'][2:]))
  np.testing.assert_allclose(alone, images[2:], atol=1e-4, rtol=0)  # float sums ordered otherwise
  assert alone_stats.evaluations.tolist() == stats.evaluations[2:].tolist()


@pytest.mark.parametrize('name', list(SDES))
def test_euler_maruyama_matches_sit(field, reference, name):
  form, norm, last_step, size, steps = SDES[name]
  images, stats = solve(field, reference, reference[f'sde_{name}_brownian'],
                        sampler='euler_maruyama', steps=steps, diffusion_form=form,
                        diffusion_norm=norm, last_step=LAST_STEPS[last_step], last_step_size=size)
  np.testing.assert_allclose(images, reference[f'sde_{name}_path'][-1], atol=1e-5, rtol=0)
  # SiT's num_steps counts the last step, when there is one.
  assert int(stats.evaluations[0]) == steps - (last_step is None)


def test_a_solve_out_of_steps_is_nan_never_an_image(field, reference):
  # Per example the solves take 8, 6, 8 and 10 attempts: after 7 only the second has finished.
  model, params = field
  images = sampler.sample_jit(model, params, jax.random.key(0),
                              jnp.asarray(reference['labels'], jnp.int32), height=4, width=4,
                              plan=SamplingPlan(sampler='dopri5', max_steps=7, cfg_scale=1.5),
                              noise=jnp.asarray(reference['noise']))
  images = np.asarray(images)
  assert np.isfinite(images[1]).all() and np.isnan(images[[0, 2, 3]]).all()
