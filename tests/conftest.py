"""Shared fixtures. Eight CPU devices so sharding tests run on real (CPU) devices."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

# Tests run tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update('jax_disable_most_optimizations', True)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from rpe2d import model as model_lib, positions  # noqa: E402


def perturb(params, key, scale=0.05):
  """Random non-zero weights everywhere, so zero-initialised outputs become informative."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@pytest.fixture(scope='session')
def micro_model():
  return model_lib.DiT(variant='micro/2', channels=1, num_classes=4, train_grid=(4, 4),
                       position_range=(8, 8), micro_conditioning=True)


@pytest.fixture(scope='session')
def micro_params(micro_model):
  x = jnp.zeros((1, 8, 8, 1))
  params = micro_model.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32),
                            positions.grid(4, 4, 1))
  return perturb(params, jax.random.key(1))
