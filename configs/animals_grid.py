"""The baseline for configs/default.py: the same model, data and recipe with plain grid positions."""

import importlib.util
import pathlib

from rpe2d import config as config_lib


def _default_config_module():
  path = pathlib.Path(__file__).with_name('default.py')
  spec = importlib.util.spec_from_file_location('rpe2d_default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  return _default_config_module().recipe(config_lib.base())  # base() has grid positions
