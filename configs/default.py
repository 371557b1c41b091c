"""The embedded default: an RPE-2D DiT on the shipped 32x32 animal silhouettes, sized for 2 CPU cores.

  python train.py                                   # same as --config=configs/default.py
  python train.py --config.total_steps=5000

tiny/4 (128 wide, 6 deep, 4x4 patches: an 8x8 token grid) trains at 75-110 images/s on 2 cores,
so 800 steps of 64 images (5.7 epochs) take 8-12 minutes.
"""

from rpe2d import config as config_lib


def get_config():
  config = config_lib.base()
  config.positions.train = 'rpe2d'       # also the resize-and-crop, with the crop as conditioning
  config.positions.max_grid = (24, 24)   # 3x the 8x8 train grid: up to 96x96 pixels in range
  config.positions.inference = 'uniform'
  return config
