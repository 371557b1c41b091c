import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from rpe2d import config as config_lib, rundir, training

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))


def test_there_are_configs():
  assert {'default.py', 'animals_grid.py', 'imagenet.py'} <= {p.name for p in CONFIGS}


def test_imagenet_config_argument_errors():
  with pytest.raises(ValueError, match='expected <size>,<resolution>,<positions>'):
    config_lib.load(str(CONFIGS[0].parent / 'imagenet.py:B,384,rpe2d'))


IMAGENET_ARGS = [f'{s},{r},{p}{space}' for s in ('B', 'XL') for r in (256, 512)
                 for p in ('rpe2d', 'grid') for space in ('', ',pixels')]
# configs/finetune.py takes a run directory: tests/test_families.py loads it on an import;
# configs/published.py a published model's name: tests/test_published_configs.py.
CONFIG_SPECS = [str(p) for p in CONFIGS if p.name not in ('finetune.py', 'published.py')] + [
    str(CONFIGS[0].parent / f'imagenet.py:{arg}') for arg in IMAGENET_ARGS]


def test_finetune_config_names_the_run_it_needs(tmp_path):
  with pytest.raises(ValueError, match='name the run to fine-tune'):
    config_lib.load(str(CONFIGS[0].parent / 'finetune.py'))
  with pytest.raises(ValueError, match='has no config.json'):
    config_lib.load(str(CONFIGS[0].parent / f'finetune.py:{tmp_path}'))


@pytest.mark.parametrize('path', CONFIG_SPECS, ids=lambda p: p.rsplit('/', 1)[-1])
def test_every_config_validates_and_builds(path):
  config = config_lib.load(path)
  if config.data.name == 'latents':  # the user's extraction; refused when missing
    with pytest.raises(ValueError, match="data.name='latents' needs data.latent_dir"):
      config_lib.validate(config)
    config.data.latent_dir = 'latents/imagenet'
    assert config.data.channels == 4 and config.data.image_size * 8 == config.data.source_image_size
  config_lib.validate(config)
  model = config_lib.build_model(config)
  assert model.train_grid == config_lib.train_grid(config)
  assert all(r >= g for r, g in zip(model.position_range, model.train_grid))


def test_overrides_from_the_command_line():
  config = config_lib.load(str(CONFIGS[0].parent / 'default.py'), [
      '--config.total_steps=7', '--config.encoding.extrapolation=yarn',
      '--config.encoding.dype_lambda_s=1.5', '--config.positions.max_grid=(64,32)'])
  assert config.total_steps == 7 and config.encoding.extrapolation == 'yarn'
  assert config.encoding.dype_lambda_s == 1.5 and tuple(config.positions.max_grid) == (64, 32)
  with pytest.raises(Exception, match='steps'):
    config_lib.load(str(CONFIGS[0].parent / 'default.py'), ['--config.total_stepz=7'])


def _base(**changes):
  config = config_lib.base()
  for dotted, value in changes.items():
    *parents, leaf = dotted.split('__')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.parametrize('changes,match', [
    (dict(encoding__extrapolation='linear'),
     "encoding.extrapolation='linear' is not allowed; choose one of: none, pi, ntk, yarn, tasr"),
    (dict(encoding__dype=True, encoding__extrapolation='ntk', encoding__dype_lambda_s=-2.0),
     'lambda_s=-2.0'),
    (dict(encoding__dype=True), "dype needs an extrapolation method"),
    (dict(data__image_size=34), 'data.image_size 34x34 is not divisible by the patch size 4'),
    (dict(sampling__resolutions=((32, 32), (30, 32))),
     r'sampling.resolutions\[1\] 30x32 is not divisible by the patch size 4'),
    (dict(sampling__resolutions=((0, 32),)), r'sampling.resolutions\[0\]=\(0, 32\) must be positive'),
    (dict(positions__train='rpe2d', positions__max_grid=(4, 48)),
     r'positions.max_grid=\(4, 48\) is smaller than the train grid \(8, 8\)'),
    (dict(positions__train='random'), "positions.train='random' is not allowed; choose one of: grid, rpe2d"),
    (dict(positions__mode='per_token'), "positions.mode='per_token'"),
    (dict(positions__inference='spiral'), "positions.inference='spiral'"),
    (dict(model__variant='huge/2'), "unknown model variant 'huge/2'"),
    (dict(model__position_embedding='alibi'), "model.position_embedding='alibi' is not allowed"),
    (dict(model__dtype='float16'), "model.dtype='float16'"),
    (dict(model__attention_implementation='flash'), "model.attention_implementation='flash'"),
    (dict(model__attention_implementation='cudnn'),
     "model.attention_implementation='cudnn' needs an NVIDIA GPU; the devices it would run on are "
     'cpu; choose one of: xla, chunked'),
    (dict(model__remat_policy='everything'), "model.remat_policy='everything' is not allowed"),
    (dict(model__mlp='geglu'), "model.mlp='geglu' is not allowed; choose one of: gelu, swiglu"),
    (dict(model__adaln='lora', model__adaln_rank=0), 'model.adaln_rank=0 must be a positive'),
    (dict(model__qk_norm='true'),
     "model.qk_norm='true' is not allowed; choose one of: none, rmsnorm, layernorm"),
    (dict(flow__time_sampling='beta'), "flow.time_sampling='beta' is not allowed"),
    (dict(flow__class_dropout=1.5), r'flow.class_dropout=1.5 must be a finite number in \[0.0, 1.0\)'),
    (dict(sampling__sampler='ddim'), "sampling.sampler='ddim' is not allowed; choose one of: euler"),
    (dict(sampling__steps=0), 'sampling.steps=0 must be a positive integer'),
    (dict(sampling__time_shift=-2.0), r'sampling.time_shift=-2.0 must be a finite number in \(0.0'),
    (dict(batch_size=0), 'batch_size=0 must be a positive integer'),
    (dict(optim__ema_decay=1.0), r'optim.ema_decay=1.0 must be a finite number in \[0.0, 1.0\)'),
])
def test_bad_configs_name_the_value_and_what_is_allowed(changes, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_base(**changes))


def test_position_range_and_sampling_plan():
  config = config_lib.base()
  config.positions.train = 'rpe2d'
  assert config_lib.position_range(config) == (24, 24)
  assert config_lib.sampling_plan(config).positions == 'uniform'
  config.positions.train = 'grid'
  assert config_lib.position_range(config) == (8, 8)
  assert config_lib.sampling_plan(config).positions == 'grid'
  config.encoding.extrapolation = 'ntk'
  config.encoding.dype = True
  plan = config_lib.sampling_plan(config, steps=3)
  assert plan.steps == 3 and plan.encoding.dype and plan.encoding.lambdas == (2.0, 2.0)


def test_encoding_defaults_and_runs_saved_before_tasr_form():
  config = config_lib.base()
  enc = config_lib.encoding(config)
  assert enc.temperature == 'rope' and enc.tasr_form == 'continuous'
  config.encoding.tasr_form = 'switch'
  assert config_lib.encoding(config).tasr_form == 'switch'
  # A config.json written before the field existed still builds, with the default form.
  saved = config_lib.base()
  del saved.encoding['tasr_form']
  assert config_lib.encoding(config_lib.complete(saved)).tasr_form == 'continuous'
  config.encoding.tasr_form = 'ntk_v2'
  with pytest.raises(ValueError, match="encoding.tasr_form='ntk_v2' is not allowed"):
    config_lib.validate(config)


def test_runs_saved_with_qk_norm_as_a_bool_read_it_as_a_name():
  for saved_value, name in ((False, 'none'), (True, 'rmsnorm')):
    saved = ml_collections.ConfigDict(json.loads(config_lib.base().to_json()))
    del saved.model['qk_norm'], saved.model['mlp']
    saved.model.qk_norm = saved_value
    config = config_lib.complete(saved)
    assert config.model.qk_norm == name and config.model.mlp == 'gelu'
    assert config_lib.build_model(config).qk_norm == name
    now = config_lib.base()
    now.model.qk_norm = name
    assert rundir.differing_keys(config, now, rundir.MODEL_KEYS) == []


def test_rpe2d_is_one_switch():
  config = config_lib.base()
  config.positions.train = 'rpe2d'
  built = config_lib.validate(config)
  assert config.data.augment == 'rpe2d_crop' and config.model.micro_conditioning is True
  assert built.model.micro_conditioning and built.data.augment == 'rpe2d_crop'
  assert built.training.positions == 'rpe2d'
  # Grid positions: no crop, no micro-conditioning, unless asked for.
  grid = config_lib.base()
  assert config_lib.validate(grid).data.augment == 'none' and not grid.model.micro_conditioning
  # Explicit values win: RPE-2D positions without the crop is a valid ablation.
  ablation = config_lib.base()
  ablation.positions.train, ablation.data.augment = 'rpe2d', 'none'
  assert config_lib.validate(ablation).model.micro_conditioning is False
  # A crop the model is not told about is refused.
  blind = config_lib.base()
  blind.positions.train, blind.model.micro_conditioning = 'rpe2d', False
  with pytest.raises(ValueError, match=r"data.augment='rpe2d_crop' with "
                                       r"model.micro_conditioning=False: the model would see crops"):
    config_lib.validate(blind)


def test_every_schema_field_is_in_base_and_in_the_help():
  flat = config_lib.base().to_dict()
  for field in config_lib.SCHEMA:
    node = flat
    for part in field.key.split('.'):
      node = node[part]
    assert node == field.default
  text = config_lib.help_text()
  assert all(f'--config.{f.key}=' in text for f in config_lib.SCHEMA)
  assert "--config.encoding.extrapolation='none'  [none | pi | ntk | yarn | tasr]" in text


def test_train_py_help_lists_the_config_fields():
  result = subprocess.run([sys.executable, str(CONFIGS[0].parent.parent / 'train.py'), '--help'],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '--workdir' in result.stdout and '--config.data.augment=' in result.stdout
  assert "--config.positions.train='grid'  [grid | rpe2d]" in result.stdout


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_learning_rate_schedules(schedule):
  config = config_lib.base()
  config.optim.update(schedule=schedule, learning_rate=1e-3, warmup_steps=10)
  config.total_steps = 110
  rate = training.learning_rate_schedule(config_lib.validate(config).training)
  assert float(rate(0)) == 0.0 and float(rate(5)) == pytest.approx(5e-4)
  assert float(rate(10)) == pytest.approx(1e-3)
  middle, end = (1e-3, 1e-3) if schedule == 'constant' else (5e-4, 0.0)
  assert float(rate(60)) == pytest.approx(middle) and float(rate(110)) == pytest.approx(end)
