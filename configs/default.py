"""The embedded default: an RPE-2D DiT on the shipped 32x32 animal silhouettes, sized for 2 CPU cores.

  python train.py                                   # same as --config=configs/default.py
  python train.py --config.total_steps=5000         # resumes from the last checkpoint

tiny/4 (128 wide, 6 deep, 4x4 patches: an 8x8 token grid). The budget is 51,200 images (5.7
epochs); `recipe` spends it as 1,600 steps of 32, which beat 800 steps of 64 (the recipe before
0.3) and 1,600 steps of 32 with a cosine decay on FID and KID at 1x and 2x
(docs/default_recipe.md). About 15 minutes on 2 CPU cores.
"""

from rpe2d import config as config_lib


def recipe(config):
  """The training budget, shared with configs/animals_grid.py."""
  config.batch_size = 32
  config.total_steps = 1600
  config.optim.warmup_steps = 200
  return config


def get_config():
  config = recipe(config_lib.base())
  config.positions.train = 'rpe2d'       # also the resize-and-crop, with the crop as conditioning
  config.positions.max_grid = (24, 24)   # 3x the 8x8 train grid: up to 96x96 pixels in range
  config.positions.inference = 'uniform'
  return config
