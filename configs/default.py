"""The embedded default: RPE-2D DiT on the shipped 32x32 animal silhouettes, sized for 2 CPU cores.

  python train.py                                   # same as --config=configs/default.py
  python train.py --config=configs/default.py --config.total_steps=5000
"""

from rpe2d import config as config_lib


def get_config():
  config = config_lib.base()
  config.data.name = 'animal_mnist'
  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.augment = 'rpe2d_crop'
  config.model.variant = 'tiny/2'
  config.positions.train = 'rpe2d'
  config.positions.max_grid = (48, 48)   # 3x the 16x16 train grid: samples up to 96x96 in range
  return config
