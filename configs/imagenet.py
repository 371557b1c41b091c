"""ImageNet 2012 as the papers train it: DiT-B/2 and DiT-XL/2 on Stable Diffusion VAE latents.

  python extract.py --config=configs/imagenet.py:XL,256,rpe2d --vae=sd-vae-ft-ema \
      --output=latents/imagenet256 --flip --batch_size=256
  python train.py --config=configs/imagenet.py:XL,256,rpe2d \
      --config.data.latent_dir=latents/imagenet256 --workdir=runs/in256_xl_rpe2d
  python sample.py --workdir=runs/in256_xl_rpe2d --resolution=256x256,384x384,512x512

The argument is <size>,<resolution>,<positions>[,pixels]: size B or XL (a /2 patch), resolution 256
(32x32x4 latents, 16x16 tokens) or 512 (64x64x4, 32x32 tokens), positions rpe2d (trained on
positions drawn from a range of 2x the train grid, so 256 -> 512 stays inside it) or grid.
`extract.py` encodes the images this config names (data.source_name at data.source_image_size)
once; the latent grid and the extraction must agree (checked when training starts). With
`,pixels`: the same token grid on pixels with /16 patches, the setting of rpe2d 0.1.

Settings of DiT/SiT and the papers: AdamW 1e-4 without weight decay, global batch 256, EMA
0.9999, horizontal flips, CFG 1.5 at sampling. Needs the manual download: see the README. To fit a
TPU chip's memory the blocks are rematerialised under nn.scan and mesh.fsdp is 0 (sized from the
chip's memory at start); benchmarks/tpu_compile.py measures any setting for any slice.
"""

from rpe2d import config as config_lib

SIZES = ('B', 'XL')
RESOLUTIONS = (256, 512)
POSITIONS = ('rpe2d', 'grid')
VAE_FACTOR = 8  # the SD VAEs downsample by 8


def parse(arg: str) -> tuple[str, int, str, bool]:
  """'XL,256,rpe2d[,pixels]' -> (size, resolution, positions, pixels); a missing, extra or wrong
  part is refused in one line naming it and what is allowed (case and spaces do not matter)."""
  usage = (f'configs/imagenet.py:{arg}: expected <size>,<resolution>,<positions>[,pixels] with '
           f'size in {"|".join(SIZES)}, resolution in {"|".join(map(str, RESOLUTIONS))}, '
           f'positions in {"|".join(POSITIONS)}')
  parts = [part.strip() for part in str(arg).split(',')]
  if not 3 <= len(parts) <= 4:
    raise ValueError(f'{usage}; got {len(parts)} part{"s" if len(parts) != 1 else ""}')
  size, resolution, positions = parts[0].upper(), parts[1].lower().removesuffix('px'), \
      parts[2].lower()
  space = [part.lower() for part in parts[3:]]
  bad = [what for what, ok in (
      (f'size {parts[0]!r}', size in SIZES),
      (f'resolution {parts[1]!r}', resolution.isdigit() and int(resolution) in RESOLUTIONS),
      (f'positions {parts[2]!r}', positions in POSITIONS),
      (f'{",".join(parts[3:])!r} (only pixels may follow)', space in ([], ['pixels']))) if not ok]
  if bad:
    raise ValueError(f'{usage}; not allowed: {", ".join(bad)}')
  canonical = ','.join([size, resolution, positions] + space)
  if canonical != str(arg):
    print(f'note: configs/imagenet.py:{arg} read as configs/imagenet.py:{canonical}', flush=True)
  return size, int(resolution), positions, space == ['pixels']


def get_config(arg='B,256,rpe2d'):
  size, resolution, positions, pixels = parse(arg)
  config = config_lib.base()
  config.total_steps = 400_000
  config.batch_size = 256
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 10_000
  config.keep_checkpoints = 2
  config.keep_every_steps = 100_000

  config.data.num_classes = 1000
  config.data.flip = True
  config.data.num_workers = 16
  config.data.crop_prob = 0.5
  config.data.crop_max_scale = 1.5
  if pixels:
    config.data.name = 'imagenet2012'
    config.data.image_size = resolution
    config.data.channels = 3
    config.model.variant = f'{size}/16'
    patch = 16
  else:
    config.data.name = 'latents'          # data.latent_dir: the directory extract.py wrote
    config.data.source_name = 'imagenet2012'
    config.data.source_image_size = resolution
    config.data.image_size = resolution // VAE_FACTOR
    config.data.channels = 4
    config.model.variant = f'{size}/2'
    patch = 2 * VAE_FACTOR
  config.data.augment = 'auto' if positions == 'rpe2d' else 'center_crop_flip'  # auto: the crop

  config.model.dtype = 'bfloat16'
  config.model.qk_norm = 'rmsnorm'
  config.model.attention_implementation = 'xla'   # 'cudnn' on NVIDIA GPUs, 'splash' on TPUs
  if size == 'XL' and resolution == 512:
    # 1,024 tokens: the full attention scores of the XL/2 step do not fit a v5e or v4 chip at this
    # batch (18.6 and 35.6 GiB needed); the chunked kernel fits every slice the README names
    # (14.1 GiB on v5e, 28.2 on v4). splash on TPUs and cudnn on GPUs are faster where they run.
    config.model.attention_implementation = 'chunked'
  # Global batch 256 fits the TPU slices the README names (v4-8, v5e-8, v5p-8; its table "Compiling
  # for a TPU"): blocks recomputed in the backward under nn.scan, and the fsdp axis sized at start
  # from the chip's memory. Without remat the XL/2 step keeps every block's activations: 98.5 GiB
  # per chip at 64 images per v5p chip, so model.remat=False needs a far smaller batch per chip.
  config.model.remat = True
  config.model.scan_layers = True
  config.mesh.fsdp = 0

  grid = resolution // patch
  config.positions.train = positions
  config.positions.max_grid = (2 * grid, 2 * grid)  # sample up to 2x the train resolution in range

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.9999
  config.sampling.cfg_scale = 1.5
  config.sampling.steps = 50
  config.sampling.sampler = 'heun'
  # Pixels for both spaces: a latent run samples latents and decodes them.
  config.sampling.resolutions = ((resolution, resolution), (2 * resolution, 2 * resolution),
                                 (resolution // 2, resolution // 2))
  config.sampling.num_per_class = 1
  return config
