"""ImageNet 2012 in pixel space, at the paper's settings.

  python train.py --config=configs/imagenet.py:B,256,rpe2d --workdir=runs/in256_b_rpe2d
  python train.py --config=configs/imagenet.py:XL,256,grid --workdir=runs/in256_xl_grid
  python train.py --config=configs/imagenet.py:B,512,rpe2d --workdir=runs/in512_b_rpe2d

The argument is <size>,<resolution>,<positions> with size B or XL, resolution 256 or 512, positions
rpe2d or grid. The papers' DiT-B/2 and DiT-XL/2 run on 32x32 (64x64) latents of 256 (512) images;
pixel patches of 16 give the same 16x16 (32x32) token grid, so FLOPs per image match. Latent
ImageNet comes later. Needs the manual download: see the README.
"""

from rpe2d import config as config_lib

SIZES = ('B', 'XL')
RESOLUTIONS = (256, 512)
POSITIONS = ('rpe2d', 'grid')


def get_config(arg='B,256,rpe2d'):
  size, resolution, positions = arg.split(',')
  resolution = int(resolution)
  if size not in SIZES or resolution not in RESOLUTIONS or positions not in POSITIONS:
    raise ValueError(f'configs/imagenet.py:{arg}: expected <size>,<resolution>,<positions> with '
                     f'size in {SIZES}, resolution in {RESOLUTIONS}, positions in {POSITIONS}')
  config = config_lib.base()
  config.total_steps = 400_000
  config.batch_size = 256
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 10_000
  config.keep_checkpoints = 2
  config.keep_every_steps = 100_000

  config.data.name = 'imagenet2012'
  config.data.image_size = resolution
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.flip = True
  config.data.num_workers = 16
  config.data.augment = 'auto' if positions == 'rpe2d' else 'center_crop_flip'  # auto: the crop
  config.data.crop_prob = 0.5
  config.data.crop_max_scale = 1.5

  config.model.variant = f'{size}/16'
  config.model.dtype = 'bfloat16'
  config.model.qk_norm = True
  config.model.attention_implementation = 'xla'   # 'cudnn' on NVIDIA GPUs

  grid = resolution // 16
  config.positions.train = positions
  config.positions.max_grid = (2 * grid, 2 * grid)  # sample up to 2x the train resolution in range

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.9999
  config.sampling.cfg_scale = 1.5
  config.sampling.steps = 50
  config.sampling.sampler = 'heun'
  config.sampling.resolutions = ((resolution, resolution), (2 * resolution, 2 * resolution),
                                 (resolution // 2, resolution // 2))
  config.sampling.num_per_class = 1
  return config
