"""The config schema: every field with its default, what it allows and what it means, in one place.

`base()` builds the config every file in configs/ starts from (a grid-position run on the
embedded animals sized for 2 CPU cores); `help_text()` prints the schema for `train.py --help`;
`validate()` checks a config and builds every typed object once: the model, the data options, the
training plan and the sampling plan, so a bad value fails before anything compiles, with one
message style: `<key>=<value> ...; choose one of: ...` or `<key>=<value> must be ...`.

Option names come from the modules that implement them (rope.EXTRAPOLATIONS, data.AUGMENTS, ...).
RPE-2D is one switch: `positions.train='rpe2d'` turns on the resize-and-crop augmentation and the
micro-conditioning that tells the model about the crop
(docs/methods.md#random-resize-and-crop), unless they are set explicitly; a crop the model is not told about is refused.
"""

import dataclasses
import importlib.util
import json
import os
import re

from absl import flags
import ml_collections
from ml_collections import config_dict, config_flags

from rpe2d import attention, checks, data, flow, model as model_lib, positions, rope, sampler, training
from rpe2d.checks import Field, non_negative_int, number, positive_int

AUTO = data.AUTO


SCHEMA = (
    Field('seed', 0, 'seeds the parameters, the data order, positions and noise (64 bits)',
          check=checks.seed),
    Field('total_steps', 800, 'optimizer steps', check=positive_int),
    Field('batch_size', 64, 'global batch, over all devices and hosts', check=positive_int),
    Field('log_every_steps', 50, 'metrics.jsonl and the progress bar', check=positive_int),
    Field('checkpoint_every_steps', 200, 'save a checkpoint every N steps (and at the end)',
          check=positive_int),
    Field('sample_every_steps', 400, 'EMA sample grids every N steps (and at the end)',
          check=positive_int),
    Field('keep_checkpoints', 3, 'keep the last N >= 1 checkpoints (the newest is never '
          'deleted) ...', check=positive_int),
    Field('keep_every_steps', 0, '... plus every K-th step, a multiple of '
          'checkpoint_every_steps (0: none)', check=non_negative_int),
    Field('init_from', '', 'a run or checkpoint to take the weights from (fresh optimizer, '
          'step 0)'),
    Field('log_example_indices', False, "append each step's example ids to examples.jsonl"),
    Field('nonfinite', 'error', 'a NaN/Inf loss or gradient: stop, or skip the step',
          allowed=training.NONFINITE_POLICIES),

    *data.FIELDS,

    Field('model.variant', 'tiny/4',
          '<size>/<patch>, size one of: ' + ', '.join(model_lib.VARIANTS)),
    Field('model.position_embedding', 'rope', 'how positions enter the model: RoPE, a sin-cos '
          'table, or both (LightningDiT)', allowed=model_lib.POSITION_EMBEDDINGS),
    Field('model.rope_base', 10000.0, 'the RoPE base', check=number(1.0, low_open=True)),
    Field('model.qk_norm', 'none', 'the norm on queries and keys, before RoPE (a saved false / '
          'true reads as none / rmsnorm)', allowed=tuple(model_lib.QK_NORMS)),
    Field('model.micro_conditioning', None, 'embed the crop window into the conditioning '
          '(unset: on exactly when data.augment is rpe2d_crop)', value_type=bool),
    Field('model.mlp_ratio', 4.0, 'MLP width / model width (swiglu: 2/3 of it)',
          check=number(0.0, low_open=True)),
    Field('model.mlp', 'gelu', "the block's MLP: DiT's tanh-GELU, or SwiGLU (FiTv2)",
          allowed=tuple(model_lib.MLPS)),
    Field('model.norm', 'layernorm', 'the norm before each branch and the final layer: '
          "LayerNorm without affine (DiT), or RMSNorm with a weight (LightningDiT)",
          allowed=tuple(model_lib.NORMS)),
    Field('model.adaln', 'full', 'adaLN-Zero: one Linear per block (full), or a rank-r '
          'bottleneck per block plus one shared Linear (lora, FiTv2)',
          allowed=tuple(model_lib.ADALNS)),
    Field('model.adaln_rank', None, 'adaln=lora: the rank r (unset: width / 4)',
          value_type=int, check=checks.optional(positive_int)),
    Field('model.attention_implementation', 'xla', 'attention kernel',
          allowed=tuple(attention.KERNELS)),
    Field('model.dtype', 'float32',
          'dtype of matmul and attention operands (all else float32; docs/methods.md)',
          allowed=tuple(model_lib.DTYPES)),
    Field('model.remat', False, 'recompute each block in the backward pass (saves memory)'),
    Field('model.remat_policy', 'nothing', 'with remat: what a block keeps from its forward pass',
          allowed=tuple(model_lib.REMAT_POLICIES)),
    Field('model.scan_layers', False, 'run the blocks under nn.scan: compile time independent of '
          'depth (checkpoints load either way)'),
    Field('model.prediction', 'velocity', "what the network predicts: velocity, or DiT's "
          'ddpm_epsilon (eps on its 1000-step DDPM, reached through a change of variables)',
          allowed=model_lib.PREDICTIONS),
    Field('model.time_scale', 1000.0, 'the time the network sees (flow time; the DDPM index for '
          'ddpm_epsilon) times this enters its sinusoids (imported SiT and DiT: 1)',
          check=number(0.0, low_open=True)),
    Field('model.sincos_order', 'yx', 'sin-cos layout: yx = [sin y, cos y, sin x, cos x]; xy = '
          "DiT's, the column coordinate first", allowed=model_lib.SINCOS_ORDERS),
    Field('model.learned_variance', False, "the network also outputs DiT's learned-variance "
          'channels (read only by sampling.sampler=ddpm)'),

    Field('positions.train', 'grid', 'training positions; rpe2d also turns on the crop',
          allowed=positions.TRAIN_RULES),
    Field('positions.max_grid', (24, 24), 'RPE-2D: the range (H_max, W_max) in tokens',
          check=checks.resolution),
    Field('positions.mode', 'per_example', 'RPE-2D: one subset per example or per batch',
          allowed=positions.SAMPLING_MODES),
    Field('positions.continuous', False, 'RPE-2D: sorted uniform floats instead of integers'),
    Field('positions.inference', 'uniform', 'RPE-2D models: the sampling position rule',
          allowed=positions.INFERENCE_RULES),
    Field('positions.round', False, 'round uniform inference positions to integers'),

    Field('encoding.extrapolation', 'none', 'sampling beyond the trained range',
          allowed=rope.EXTRAPOLATIONS),
    Field('encoding.yarn_form', 'paper', 'YaRN variant', allowed=rope.YARN_FORMS),
    Field('encoding.temperature', 'rope', "where YaRN's temperature goes: rope = on q and k "
          '(the logits get tau^2, as in the reference code); rope_max = the same with the larger '
          "axis's tau on both (FiT's code); logits = tau once (before 0.2)",
          allowed=rope.TEMPERATURE_PLACES),
    Field('encoding.attention_scale', 'none', 'attention logit scale for more tokens: '
          "Lumina-Next's log_n, FiT's by side (ntkpro1) or by tokens (ntkpro2)",
          allowed=rope.ATTENTION_SCALES),
    Field('encoding.axis_scale', 'per_axis', 'the extrapolation scale: each axis its own (as '
          "FiT's --decouple), or the larger one for both axes (shared)",
          allowed=rope.AXIS_SCALES),
    Field('encoding.sincos', 'method', 'how a sin-cos table (sincos, rope+sincos) extrapolates: '
          'with the method, at the native positions, or the native table resized bilinearly (EI)',
          allowed=rope.SINCOS_RULES),
    Field('encoding.dype', False, 'make the extrapolation follow the diffusion time (DyPE)'),
    Field('encoding.dype_lambda_s', None, 'DyPE kappa(t) = lambda_s t^lambda_t (unset: the '
          "method's default)", value_type=float, check=checks.optional(number(0.0))),
    Field('encoding.dype_lambda_t', None, 'DyPE exponent lambda_t (unset: the default)',
          value_type=float, check=checks.optional(number(0.0))),
    Field('encoding.dype_variant', 'scaled', 'DY-YaRN thresholds x kappa (scaled) or ^ kappa',
          allowed=rope.DYPE_VARIANTS),
    Field('encoding.tasr_form', 'continuous', "Lumina-Next's TASR: continuous in t, or a switch",
          allowed=rope.TASR_FORMS),

    Field('flow.time_sampling', 'logit_normal', 'training times t',
          allowed=flow.TIME_SAMPLINGS),
    Field('flow.time_mean', 0.0, 'logit-normal mean (beyond +-10 every t is 0 or 1)',
          check=number(-10.0, 10.0)),
    Field('flow.time_std', 1.0, 'logit-normal std', check=number(0.0, low_open=True)),
    Field('flow.time_shift', 1.0, 'training time shift a', check=number(0.0, low_open=True)),
    Field('flow.class_dropout', 0.1, 'label dropout for classifier-free guidance',
          check=number(0.0, 1.0, high_open=True)),

    Field('sampling.sampler', 'euler', 'euler, heun: ODE, fixed steps; dopri5: ODE, adaptive; '
          "euler_maruyama: SiT's SDE (docs/methods.md#sampler)", allowed=sampler.SAMPLERS),
    Field('sampling.steps', 32, "solver steps (dopri5: unused; euler_maruyama: SiT's num_steps, "
          'steps - 1 SDE steps then the last step)', check=checks.steps),
    Field('sampling.cfg_scale', 3.0, 'classifier-free guidance scale (1: none, 0: unconditional)',
          check=number(0.0, 100.0)),
    Field('sampling.cfg_interval', (0.0, 1.0), 'guide only for t inside [low, high]',
          check=checks.unit_interval),
    Field('sampling.cfg_channels', 0, 'guide only the first k channels, the rest take the '
          'conditional prediction (0: all; 3: the published DiT/SiT numbers)',
          check=non_negative_int),
    Field('sampling.time_shift', 1.0, 'sampling time shift a (1: none)',
          check=number(0.0, low_open=True)),
    Field('sampling.time_shift_by_resolution', False, 'multiply the shift by sqrt(N_test/N_train)'),
    Field('sampling.atol', 1e-6, 'dopri5: absolute tolerance',
          check=number(0.0, 1.0, low_open=True)),
    Field('sampling.rtol', 1e-3, 'dopri5: relative tolerance',
          check=number(0.0, 1.0, low_open=True)),
    Field('sampling.max_steps', 1000, 'dopri5: step attempts before sampling stops with an error',
          check=positive_int),
    Field('sampling.adaptive_step', 'per_example', 'dopri5: a step size per example (an image '
          'independent of its batch), or per batch (torchdiffeq exactly, as SiT and FiT sampled)',
          allowed=sampler.ADAPTIVE_STEPS),
    Field('sampling.diffusion_form', 'sigma', "euler_maruyama: the diffusion coefficient (SiT's "
          '--diffusion-form)', allowed=tuple(sampler.DIFFUSION_FORMS)),
    Field('sampling.diffusion_norm', 1.0, "euler_maruyama: its magnitude (SiT's --diffusion-norm)",
          check=number(0.0, 100.0)),
    Field('sampling.last_step', 'mean', "euler_maruyama: the last step to t = 0 (SiT's "
          '--last-step; its Tweedie is euler here)', allowed=sampler.LAST_STEPS),
    Field('sampling.last_step_size', 0.04, "euler_maruyama: its size (SiT's --last-step-size)",
          check=number(0.0, 1.0, low_open=True, high_open=True)),
    Field('sampling.resolutions', ((32, 32), (64, 64), (16, 16)),
          'the sizes of the sample grids written during training', check=checks.resolutions),
    Field('sampling.num_per_class', 2, 'images per class in those grids', check=positive_int),

    Field('optim.learning_rate', 1e-3, 'AdamW peak learning rate',
          check=number(0.0, low_open=True)),
    Field('optim.warmup_steps', 100, 'linear warmup from 0', check=non_negative_int),
    Field('optim.schedule', 'constant', 'the learning rate after warmup: constant, or cosine '
          'decay to 0 at total_steps (resuming with more total_steps stretches the decay)',
          allowed=tuple(training.SCHEDULES)),
    Field('optim.weight_decay', 0.0, 'AdamW weight decay', check=number(0.0)),
    Field('optim.b1', 0.9, 'Adam beta1', check=number(0.0, 1.0, high_open=True)),
    Field('optim.b2', 0.999, 'Adam beta2', check=number(0.0, 1.0, high_open=True)),
    Field('optim.grad_clip', 1.0, 'clip the global gradient norm',
          check=number(0.0, low_open=True)),
    Field('optim.ema_decay', 0.995, 'EMA of the parameters',
          check=number(0.0, 1.0, high_open=True)),

    Field('mesh.fsdp', 1, 'devices on the fsdp axis (the rest form the data axis); 0: the '
          'fewest whose share of the train state fits the device memory (docs/methods.md#memory)',
          check=non_negative_int),

    # Written by convert.py (rpe2d.importing): where an imported run's weights came from.
    Field('imported.family', '', 'the checkpoint family the weights were imported as (empty: '
          'trained by rpe2d)'),
    Field('imported.weights', '', 'the file they were read from'),
    Field('imported.sha256', '', "that file's sha256"),
    Field('imported.known', '', 'which public file that is, by sha256 (empty: not a known one)'),
    Field('imported.unwrapped', '', "the entry of a wrapped checkpoint that was taken ('ema', "
          "'model', 'state_dict'; empty: a plain state dict)"),
)
FIELDS = {f.key: f for f in SCHEMA}


def base() -> ml_collections.ConfigDict:
  """A config holding every field of the schema at its default."""
  return complete(ml_collections.ConfigDict())


def help_text() -> str:
  """Every config field with its default, what it allows and what it means."""
  lines = []
  for f in SCHEMA:
    allowed = f'  [{" | ".join(map(str, f.allowed))}]' if f.allowed else ''
    lines.append(f'  --config.{f.key}={f.default!r}{allowed}\n      {f.help}')
  return '\n'.join(lines)


# --config.<key>=<value> and --noconfig.<key> on a command line: left to `load`, which names a bad
# one (inside absl's flag parsing an unknown key is a traceback at import time).
OVERRIDE = re.compile(r'^--?(no)?config\.')


def split_overrides(argv) -> tuple[list[str], list[str]]:
  """(the other arguments, the --config.<key>=<value> overrides) of a command line."""
  return ([a for a in argv if not OVERRIDE.match(a)], [a for a in argv if OVERRIDE.match(a)])


def parse_flags(argv):
  """An absl `flags_parser` for commands that take a config: absl parses the plain flags and the
  overrides pass through to main; --help also lists every config field (SCHEMA)."""
  if any(a in ('-h', '--help', '-?') for a in argv[1:]):
    flags.FLAGS(argv[:1])
    print(f'{flags.FLAGS.main_module_help()}\n\nConfig fields (--config.<key>=<value>):\n'
          f'{help_text()}')
    raise SystemExit(0)
  plain, overrides = split_overrides(argv[1:])
  from absl import app  # pylint: disable=g-import-not-at-top
  return app.parse_flags_with_usage(argv[:1] + plain) + overrides


def load(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads a config file with `--config.key=value` overrides, exactly as train.py's flags do.

  Any bad override or config file raises ValueError naming it.
  """
  file = str(path).split(':', 1)[0]
  if not os.path.isfile(file):
    raise ValueError(f'--config={path}: no such file {file!r}')
  _check_config_module(file)
  argv = ['rpe2d', f'--config={path}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', path, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values.config
  except flags.Error as e:  # absl wraps the config file's own error; show it as what it is
    text = str(e)
    if 'Traceback' in text:  # get_config itself failed: its last line says how
      raise ValueError(f'get_config() in {file} raised {_one_line(text.strip().splitlines()[-1])}'
                       ) from None
    raise ValueError(_one_line(text)) from e
  except (KeyError, AttributeError) as e:  # ml_collections' words for a field that does not exist
    if not overrides:  # then the file itself raised it
      raise ValueError(f'get_config() in {file} raised {type(e).__name__}: {_one_line(e)}'
                       ) from None
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    raise ValueError(f'{_unknown_field(path, overrides)}: the config has no such field'
                     + (f' (did you mean {hint.group(1)!r}?)' if hint else '')) from None
  except OSError as e:
    raise ValueError(f'--config={path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  # get_config's own error, in one line
    raise ValueError(f'get_config() in {file} raised {type(e).__name__}: {_one_line(e)}'
                       ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'get_config() in {file} returned {type(config).__name__}; it must return an '
                     'ml_collections.ConfigDict (start from rpe2d.config.base())')
  resolve(config)
  return config


def _one_line(error, limit: int = 300) -> str:
  """An error's message as one line of at most `limit` characters."""
  lines = str(error).strip().splitlines() or ['']
  text = lines[0] + (' ...' if len(lines) > 1 else '')
  return text if len(text) <= limit else text[:limit] + ' ...'


def _check_config_module(file: str) -> None:
  """Refuses, in one line, a config file that does not import or has no get_config()."""
  spec = importlib.util.spec_from_file_location('rpe2d_config_check', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # the file's own error, named
    raise ValueError(f'{file} could not be loaded: {type(e).__name__}: {_one_line(e)}'
                     ) from None
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'{file} has no get_config(); a config file defines get_config() returning '
                     'an ml_collections.ConfigDict (e.g. configs/default.py)')


# Values older configs saved that a field no longer takes: key -> {old value: its name now}.
LEGACY_VALUES = {'model.qk_norm': model_lib.QK_NORM_LEGACY}


def complete(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds, in place, the fields a saved config predates, at their defaults, and renames the values
  it saved that have a new name (LEGACY_VALUES). A field added to the schema must default to the
  behaviour from before it existed."""
  for f in SCHEMA:
    *sections, name = f.key.split('.')
    node = saved
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if name not in node:
      node[name] = config_dict.placeholder(f.value_type) if f.default is None else f.default
    renamed = LEGACY_VALUES.get(f.key, {})
    if isinstance(node[name], bool) and node[name] in renamed:
      value = renamed[node[name]]
      del node[name]  # a ConfigDict keeps a field's type: a bool cannot become a name in place
      node[name] = value
  return saved


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_saved(saved) -> ml_collections.ConfigDict:
  """base() holding a saved config's values (a run's config.json, rundir.read_config), each in its
  field's type: JSON's lists become tuples again. What a config file built on a run starts from
  (configs/finetune.py); fields the saved config predates keep their defaults."""
  config = base()
  flat = json.loads(saved.to_json_best_effort()) if hasattr(saved, 'to_json_best_effort') else saved
  for f in SCHEMA:
    *sections, name = f.key.split('.')
    source, target = flat, config
    for section in sections:
      source, target = source.get(section, {}), target[section]
    if name in source:
      value = source[name]
      target[name] = _as_tuples(value) if isinstance(f.default, tuple) or \
          f.value_type is tuple else value
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


def resolve(config) -> ml_collections.ConfigDict:
  """Fills the fields that follow positions.train (RPE-2D's one switch), in place; idempotent.

  A saved config always holds the resolved values.
  """
  if config.data.augment == AUTO:
    config.data.augment = 'rpe2d_crop' if config.positions.train == 'rpe2d' else 'none'
  if config.model.micro_conditioning is None:
    config.model.micro_conditioning = config.data.augment == 'rpe2d_crop'
  return config


def train_grid(config) -> tuple[int, int]:
  patch = model_lib.parse_variant(config.model.variant)[3]
  return config.data.image_size // patch, config.data.image_size // patch


def position_range(config) -> tuple[int, int]:
  """Reference length per axis: (H_max, W_max) for RPE-2D, else the train grid
  (docs/methods.md#scale)."""
  if config.positions.train == 'rpe2d':
    return tuple(int(v) for v in config.positions.max_grid)
  return train_grid(config)


@dataclasses.dataclass(frozen=True)
class Built:
  """The typed objects of one validated config."""
  model: model_lib.DiT
  data: data.DataOptions
  training: training.TrainingPlan
  sampling: sampler.SamplingPlan


def validate(config, platform: str | None = None) -> Built:
  """Resolves `config`, checks every field and builds the typed objects; raises ValueError naming
  the first bad value and what is allowed. `platform`: where the programs will run, as
  `attention.current_platform` names it (default: this process's devices)."""
  resolve(config)
  checks.check(SCHEMA, config)
  model_lib.validate_shape(config.model.variant, config.model.position_embedding)
  attention.check_kernel(config.model.attention_implementation, platform)  # the platform has it
  if config.data.augment == 'rpe2d_crop' and not config.model.micro_conditioning:
    raise ValueError("data.augment='rpe2d_crop' with model.micro_conditioning=False: the model "
                     'would see crops without being told the window; set '
                     'model.micro_conditioning=True (or leave it unset)')
  size = config.data.image_size
  patch = model_lib.parse_variant(config.model.variant)[3]
  model_lib.check_resolution(size, size, patch, 'data.image_size')
  if config.positions.train == 'rpe2d':
    (max_h, max_w), (h0, w0) = position_range(config), train_grid(config)
    if max_h < h0 or max_w < w0:
      raise ValueError(f'positions.max_grid={(max_h, max_w)} is smaller than the train grid '
                       f'{(h0, w0)} (image_size {size} / patch {patch}); it must be >= it')
  for i, (height, width) in enumerate(config.sampling.resolutions):
    model_lib.check_resolution(height, width, patch, f'sampling.resolutions[{i}]')
  return Built(model=build_model(config), data=data.parse_config(config.data),
               training=training_plan(config), sampling=sampling_plan(config))


def encoding(config, **overrides) -> rope.Encoding:
  e = config.encoding
  values = dict(extrapolation=e.extrapolation, yarn_form=e.yarn_form, temperature=e.temperature,
                attention_scale=e.attention_scale, dype=bool(e.dype),
                dype_lambda_s=e.dype_lambda_s, dype_lambda_t=e.dype_lambda_t,
                dype_variant=e.dype_variant, tasr_form=e.tasr_form, axis_scale=e.axis_scale,
                sincos=e.sincos)
  values.update(overrides)
  return rope.Encoding(**values)


def sampling_plan(config, **overrides) -> sampler.SamplingPlan:
  s = config.sampling
  position_rule = config.positions.inference if config.positions.train == 'rpe2d' else 'grid'
  values = dict(sampler=s.sampler, steps=int(s.steps), cfg_scale=float(s.cfg_scale),
                cfg_interval=tuple(float(v) for v in s.cfg_interval),
                time_shift=float(s.time_shift),
                time_shift_by_resolution=bool(s.time_shift_by_resolution),
                cfg_channels=int(s.cfg_channels), positions=position_rule,
                round_positions=bool(config.positions.round),
                encoding=encoding(config), atol=float(s.atol), rtol=float(s.rtol),
                max_steps=int(s.max_steps), adaptive_step=s.adaptive_step,
                diffusion_form=s.diffusion_form, diffusion_norm=float(s.diffusion_norm),
                last_step=s.last_step, last_step_size=float(s.last_step_size))
  values.update(overrides)
  return sampler.SamplingPlan(**values)


def training_plan(config) -> training.TrainingPlan:
  f, o = config.flow, config.optim
  return training.TrainingPlan(
      seed=int(config.seed), positions=config.positions.train,
      per_example=config.positions.mode == 'per_example',
      continuous=bool(config.positions.continuous), time_sampling=f.time_sampling,
      time_mean=float(f.time_mean), time_std=float(f.time_std), time_shift=float(f.time_shift),
      class_dropout=float(f.class_dropout), learning_rate=float(o.learning_rate),
      warmup_steps=int(o.warmup_steps), schedule=o.schedule, total_steps=int(config.total_steps),
      weight_decay=float(o.weight_decay), b1=float(o.b1), b2=float(o.b2),
      grad_clip=float(o.grad_clip), ema_decay=float(o.ema_decay))


def build_model(config) -> model_lib.DiT:
  m = config.model
  return model_lib.DiT(
      variant=m.variant, channels=config.data.channels, num_classes=config.data.num_classes,
      train_grid=train_grid(config), position_range=position_range(config),
      position_embedding=m.position_embedding, rope_base=float(m.rope_base), qk_norm=m.qk_norm,
      micro_conditioning=bool(m.micro_conditioning), mlp_ratio=m.mlp_ratio, mlp=m.mlp,
      norm=m.norm, adaln=m.adaln, adaln_rank=m.adaln_rank,
      attention_implementation=m.attention_implementation, dtype=m.dtype, remat=m.remat,
      remat_policy=m.remat_policy, scan_layers=m.scan_layers, time_scale=float(m.time_scale),
      sincos_order=m.sincos_order, prediction=m.prediction,
      learned_variance=bool(m.learned_variance))
