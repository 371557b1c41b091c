"""configs/published.py: the config of each published file, as convert.py would write it."""

import importlib.util
import math

import jax
import pytest

from conftest import REPO
from rpe2d import config as config_lib, families, training

_SPEC = importlib.util.spec_from_file_location('published', REPO / 'configs' / 'published.py')
published = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(published)

# name: (family, the parameters its paper gives, in millions)
PUBLISHED = {'dit-xl2': ('dit', 675), 'sit-xl2': ('sit', 675), 'fitv2-xl2': ('fitv2', 671),
             'lightningdit-xl1': ('lightningdit', 675)}


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_each_is_the_config_convert_writes_for_the_published_shapes(name):
  family, millions = PUBLISHED[name]
  config = published.get_config(name)
  module, published_arch = published.PUBLISHED[name]
  assert module is families.FAMILIES[family]
  arch = module.architecture(module.expected_shapes(published_arch))
  assert arch == published_arch
  assert config.to_dict() == families.match(family, module.expected_shapes(arch)).config.to_dict()
  model = config_lib.build_model(config)
  shapes = jax.eval_shape(lambda key: training.init_params(model, key), jax.random.key(0))
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert abs(count / 1e6 - millions) < 1, count  # the papers round to millions


def test_an_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match='allowed: dit-xl2, sit-xl2, fitv2-xl2, lightningdit-xl1'):
    published.get_config('dit-xl')
