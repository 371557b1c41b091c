"""The baseline for configs/default.py: the same model and budget with plain grid positions."""

from rpe2d import config as config_lib


def get_config():
  return config_lib.base()  # base() is the grid-position run; default.py adds RPE-2D to it
