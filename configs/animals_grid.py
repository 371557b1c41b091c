"""The baseline for configs/default.py: the same model and budget with plain grid positions."""

from rpe2d import config as config_lib


def get_config():
  config = config_lib.base()
  config.data.augment = 'none'
  config.model.micro_conditioning = False
  config.positions.train = 'grid'
  return config
