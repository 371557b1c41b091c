"""Fine-tuning a run, e.g. an imported SiT (convert.py), with RPE-2D: its config as the base, its
weights as init_from.

  python train.py --config=configs/finetune.py:runs/sit_xl_256 --config.positions.train=rpe2d \
      --config.data.latent_dir=latents/imagenet256 --workdir=runs/sit_xl_256_rpe2d

The argument is the run directory. Its config.json gives every model field, so the weights load
(init_from checks them before anything compiles), and the data and published sampling settings;
this file adds the fine-tuning recipe (SiT's and DiT's: AdamW 1e-4 without weight decay or
warmup, global batch 256, EMA 0.9999, flips). RPE-2D is the usual switch,
--config.positions.train=rpe2d: it turns on the resize-and-crop and the micro-conditioning, whose
crop embedder is the one module the run lacks (initialised with a zero output layer, so training
starts from what the run computes), over a position range of twice its token grid. The latents
are an extraction of the images the model was trained on (extract.py, with the same VAE: checked
by sha256). Velocity models train; an imported DiT (epsilon on its DDPM) is refused.
"""

from rpe2d import config as config_lib, model as model_lib, rundir


def get_config(run_dir=None):
  if not run_dir:
    raise ValueError('configs/finetune.py:<run directory>: name the run to fine-tune, e.g. '
                     'configs/finetune.py:runs/sit_xl_256')
  saved = rundir.RunDir(run_dir).read_config()
  if saved is None:
    raise ValueError(f'configs/finetune.py:{run_dir}: {run_dir} has no config.json (make one with '
                     'convert.py or train.py)')
  config = config_lib.from_saved(saved)
  config.init_from = run_dir
  config.total_steps = 100_000
  config.batch_size = 256
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.sample_every_steps = 10_000
  config.keep_checkpoints = 2

  # RPE-2D's switch decides the crop and micro-conditioning (config_lib.resolve).
  config.data.augment = 'auto'
  config.model.micro_conditioning = None
  config.data.flip = True
  config.data.num_workers = 16
  patch = model_lib.parse_variant(config.model.variant)[3]
  grid = config.data.image_size // patch
  config.positions.max_grid = (2 * grid, 2 * grid)  # 256 -> 512 stays inside the trained range

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.schedule = 'constant'
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.9999
  return config
