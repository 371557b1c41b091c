"""Shared fixtures. Eight CPU devices so sharding tests run on real (CPU) devices."""

import gzip
import os
import pickle
import zipfile

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

# Tests run tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update('jax_disable_most_optimizations', True)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rpe2d import config as config_lib, model as model_lib, positions  # noqa: E402
from rpe2d.datasets import animal_mnist  # noqa: E402


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


@pytest.fixture(scope='session')
def synthetic_animals(tmp_path_factory):
  """animal_mnist (180 train / 20 test records) prepared by its builder from a synthetic wheel."""
  root = tmp_path_factory.mktemp('tfds')
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10, dtype=np.int64), 20)
  pictures = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
  wheel = root / 'synthetic.whl'
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr('animal_mnist/__init__.py', '')
    zf.writestr('animal_mnist/data/__init__.py', '')
    zf.writestr(animal_mnist.DATA_MEMBER, gzip.compress(pickle.dumps(pictures, protocol=4)))
    zf.writestr(animal_mnist.LABEL_MEMBER, gzip.compress(pickle.dumps(labels, protocol=4)))
  animal_mnist.AnimalMnist(data_dir=str(root), wheel_fetcher=lambda dest: wheel
                          ).download_and_prepare()
  return str(root)


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory):
  """A persistent compilation cache directory for the modules that train the tiny run: they
  compile the same programs (enabled per module by test_train.py's compilation_cache)."""
  return str(tmp_path_factory.mktemp('jax_cache'))


# The same tiny run as command-line overrides (subprocess tests) and as a ConfigDict.
TINY_OVERRIDES = {
    'model.variant': 'micro/4',
    'positions.train': 'rpe2d',           # exercise RPE-2D positions, crops and micro-conditioning
    'positions.max_grid': (8, 8),
    'data.augment': 'rpe2d_crop',
    'model.micro_conditioning': True,
    'sampling.cfg_scale': 1.0,
    'data.image_size': 16,
    'batch_size': 8,
    'log_every_steps': 1,
    'checkpoint_every_steps': 1000,
    'sample_every_steps': 1000,
    'keep_checkpoints': 100,
    'sampling.steps': 2,
    'sampling.resolutions': ((16, 16),),
    'sampling.num_per_class': 1,
    'optim.warmup_steps': 0,  # a non-zero learning rate from the first step
    'data.read_threads': 2,
    'data.prefetch_batches': 2,
}


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """A fresh config object: base() with TINY_OVERRIDES, then `overrides` ('a.b' keys as a__b)."""
  config = config_lib.base()
  config.data.data_dir = data_dir
  config.total_steps = 2
  config.update_from_flattened_dict(dict(TINY_OVERRIDES))
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in overrides.items()})
  return config
