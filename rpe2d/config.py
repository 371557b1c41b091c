"""The config schema shared by every file in configs/, its validation, and builders from it.

Sub-dicts follow the SPEC's words: data, model, positions, encoding, flow, sampling, optim. `base()`
is a complete grid-position run on the embedded animals sized for 2 CPU cores; configs in configs/
start from it and change what differs. `validate` runs before anything is compiled and names the bad
value and what is allowed.
"""

import os
import re

from absl import flags
import ml_collections
from ml_collections import config_dict, config_flags

from rpe2d import flow, model as model_lib, positions as positions_lib, rope, sampler


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 800
  c.batch_size = 64                     # global, over all devices and hosts
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.sample_every_steps = 400
  c.keep_checkpoints = 3                # the last N ...
  c.keep_every_steps = 0                # ... plus every K-th step (0: none)
  c.init_from = ''                      # a checkpoint dir to take weights from (fresh optimizer)
  c.log_example_indices = False         # append each step's example ids to examples.jsonl
  c.nonfinite = 'error'                 # NaN/Inf loss or gradient: error (stop) | skip (the step)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'animal_mnist'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.image_size = 32
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.augment = 'none'               # none | center_crop_flip | rpe2d_crop
  c.data.crop_prob = 0.5
  c.data.crop_max_scale = 1.5
  c.data.flip = False
  c.data.num_workers = 0                # grain worker processes (0: read in the main process)
  c.data.read_threads = 8
  c.data.prefetch_batches = 8
  c.data.bad_records = 'error'          # unreadable records: error | skip (counted, logged)

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'tiny/4'            # <size>/<patch>, see rpe2d.model.VARIANTS
  c.model.position_embedding = 'rope'   # rope | sincos
  c.model.rope_base = 10000.0
  c.model.qk_norm = False
  c.model.micro_conditioning = False
  c.model.mlp_ratio = 4.0
  c.model.attention_implementation = 'xla'  # xla | cudnn
  c.model.dtype = 'float32'             # float32 | bfloat16 (compute; params stay float32)
  c.model.remat = False

  c.positions = ml_collections.ConfigDict()
  c.positions.train = 'grid'            # grid | rpe2d
  c.positions.max_grid = (24, 24)       # (H_max, W_max) in tokens, RPE-2D only
  c.positions.mode = 'per_example'      # per_example | per_batch
  c.positions.continuous = False
  c.positions.inference = 'uniform'     # uniform | contiguous | random (RPE-2D models)
  c.positions.round = False

  c.encoding = ml_collections.ConfigDict()
  c.encoding.extrapolation = 'none'     # none | pi | ntk | yarn | tasr
  c.encoding.yarn_form = 'paper'        # paper | fit
  c.encoding.temperature = 'rope'       # rope | logits (legacy) | none (YaRN's tau)
  c.encoding.attention_scale = 'none'   # none | log_n
  c.encoding.dype = False
  c.encoding.dype_lambda_s = config_dict.placeholder(float)
  c.encoding.dype_lambda_t = config_dict.placeholder(float)
  c.encoding.dype_variant = 'scaled'    # scaled | power (YaRN thresholds x kappa or ^ kappa)
  c.encoding.tasr_form = 'continuous'   # continuous | switch (Lumina-Next TASR)

  c.flow = ml_collections.ConfigDict()
  c.flow.time_sampling = 'logit_normal'  # logit_normal | uniform
  c.flow.time_mean = 0.0
  c.flow.time_std = 1.0
  c.flow.time_shift = 1.0
  c.flow.class_dropout = 0.1

  c.sampling = ml_collections.ConfigDict()
  c.sampling.sampler = 'euler'          # euler | heun
  c.sampling.steps = 32
  c.sampling.cfg_scale = 3.0
  c.sampling.cfg_interval = (0.0, 1.0)
  c.sampling.time_shift = 1.0
  c.sampling.time_shift_by_resolution = False  # times sqrt(N_test / N_train)
  c.sampling.resolutions = ((32, 32), (64, 64), (16, 16))
  c.sampling.num_per_class = 2

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.995

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                       # the rest of the devices form the data axis
  return c


NONFINITE = ('error', 'skip')


def load(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads a config file with `--config.key=value` overrides, exactly as train.py's flags do.

  Any bad override or config file raises ValueError naming it.
  """
  file = str(path).split(':', 1)[0]
  if not os.path.isfile(file):
    raise ValueError(f'--config={path}: no such file {file!r}')
  argv = ['rpe2d', f'--config={path}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', path, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values.config
    if not isinstance(config, ml_collections.ConfigDict):  # a file that failed to load
      config.to_dict()  # raises its error
  except flags.Error as e:  # absl wraps the config file's own error; show it as what it is
    raise ValueError(str(e)) from e
  except (KeyError, AttributeError) as e:  # ml_collections' words for a field that does not exist
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    raise ValueError(f'{_unknown_field(path, overrides)}: the config has no such field'
                     + (f' (did you mean {hint.group(1)!r}?)' if hint else '')) from None
  except OSError as e:
    raise ValueError(f'--config={path}: {e}') from None
  return config


def _unknown_field(path, overrides) -> str:
  """The first override whose field the config file does not define."""
  config = load(path)
  for override in overrides:
    node = config
    for part in override.lstrip('-').removeprefix('no').split('=')[0].split('.')[1:]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return override.split('=')[0]
      node = node[part]
  return ' '.join(overrides)


def _choice(what, value, allowed):
  if value not in allowed:
    raise ValueError(f'{what}={value!r} is not allowed; choose one of: {", ".join(map(str, allowed))}')


def _resolution(value, what):
  try:
    height, width = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f'{what}={value!r} must be a pair (height, width) of integers') from None
  if height <= 0 or width <= 0:
    raise ValueError(f'{what}={value!r} must be positive')
  return height, width


def train_grid(config) -> tuple[int, int]:
  patch = model_lib.parse_variant(config.model.variant)[3]
  return config.data.image_size // patch, config.data.image_size // patch


def position_range(config) -> tuple[int, int]:
  """Reference length per axis: (H_max, W_max) for RPE-2D, else the train grid (SPEC §2.3)."""
  if config.positions.train == 'rpe2d':
    return tuple(int(v) for v in config.positions.max_grid)
  return train_grid(config)


def validate(config) -> None:
  """Raises ValueError naming the first bad value and what is allowed."""
  model_lib.validate_shape(config.model.variant, config.model.position_embedding)
  patch = model_lib.parse_variant(config.model.variant)[3]
  _choice('model.attention_implementation', config.model.attention_implementation,
          model_lib.ATTENTION_IMPLEMENTATIONS)
  _choice('model.dtype', config.model.dtype, tuple(model_lib.DTYPES))
  if config.model.rope_base <= 1:
    raise ValueError(f'model.rope_base={config.model.rope_base} must be > 1')
  size = config.data.image_size
  model_lib.check_resolution(size, size, patch, 'data.image_size')
  for name in ('total_steps', 'batch_size', 'log_every_steps', 'checkpoint_every_steps',
               'sample_every_steps'):
    if not isinstance(config[name], int) or config[name] <= 0:
      raise ValueError(f'{name}={config[name]!r} must be a positive integer')
  if config.data.num_classes < 1:
    raise ValueError(f'data.num_classes={config.data.num_classes} must be >= 1')

  _choice('positions.train', config.positions.train, positions_lib.TRAIN_RULES)
  _choice('positions.mode', config.positions.mode, positions_lib.SAMPLING_MODES)
  _choice('positions.inference', config.positions.inference, positions_lib.INFERENCE_RULES)
  if config.positions.train == 'rpe2d':
    max_h, max_w = _resolution(config.positions.max_grid, 'positions.max_grid')
    h0, w0 = train_grid(config)
    if max_h < h0 or max_w < w0:
      raise ValueError(f'positions.max_grid={(max_h, max_w)} is smaller than the train grid '
                       f'{(h0, w0)} (image_size {size} / patch {patch}); it must be >= it')

  _choice('flow.time_sampling', config.flow.time_sampling, flow.TIME_SAMPLINGS)
  if config.flow.time_shift <= 0:
    raise ValueError(f'flow.time_shift={config.flow.time_shift} must be > 0')
  if not 0.0 <= config.flow.class_dropout <= 1.0:
    raise ValueError(f'flow.class_dropout={config.flow.class_dropout} must be in [0, 1]')
  if config.flow.time_std <= 0:
    raise ValueError(f'flow.time_std={config.flow.time_std} must be > 0')

  encoding(config)  # validates the method names and DyPE lambdas
  sampling_plan(config)
  for i, resolution in enumerate(config.sampling.resolutions):
    model_lib.check_resolution(*_resolution(resolution, f'sampling.resolutions[{i}]'), patch,
                     f'sampling.resolutions[{i}]')
  _choice('nonfinite', config.get('nonfinite', 'error'), NONFINITE)
  if not isinstance(config.mesh.fsdp, int) or config.mesh.fsdp < 1:
    raise ValueError(f'mesh.fsdp={config.mesh.fsdp!r} must be a positive integer')
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f'optim.ema_decay={config.optim.ema_decay} must be in [0, 1)')


def encoding(config, **overrides) -> rope.Encoding:
  e = config.encoding
  values = dict(extrapolation=e.extrapolation, yarn_form=e.yarn_form, temperature=e.temperature,
                attention_scale=e.attention_scale, dype=bool(e.dype), dype_lambda_s=e.dype_lambda_s,
                dype_lambda_t=e.dype_lambda_t, dype_variant=e.dype_variant,
                tasr_form=e.get('tasr_form', 'continuous'))  # runs saved before it have none
  values.update(overrides)
  return rope.Encoding(**values)


def sampling_plan(config, **overrides) -> sampler.SamplingPlan:
  s = config.sampling
  position_rule = config.positions.inference if config.positions.train == 'rpe2d' else 'grid'
  values = dict(sampler=s.sampler, steps=int(s.steps), cfg_scale=float(s.cfg_scale),
                cfg_interval=tuple(float(v) for v in s.cfg_interval),
                time_shift=float(s.time_shift),
                time_shift_by_resolution=bool(s.time_shift_by_resolution),
                positions=position_rule, round_positions=bool(config.positions.round),
                encoding=encoding(config))
  values.update(overrides)
  return sampler.SamplingPlan(**values)


def build_model(config) -> model_lib.DiT:
  m = config.model
  return model_lib.DiT(
      variant=m.variant, channels=config.data.channels, num_classes=config.data.num_classes,
      train_grid=train_grid(config), position_range=position_range(config),
      position_embedding=m.position_embedding, rope_base=float(m.rope_base), qk_norm=m.qk_norm,
      micro_conditioning=m.micro_conditioning, mlp_ratio=m.mlp_ratio,
      attention_implementation=m.attention_implementation, dtype=m.dtype, remat=m.remat)
