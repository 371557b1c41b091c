"""sample.py and rpe2d.inference on a tiny checkpoint trained in the test."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, edit_run_config, subprocess_env
from rpe2d import config as config_lib, inference, rope


@pytest.fixture(scope='module')
def run_dir(tiny_run, tmp_path_factory):
  """A copy of conftest's tiny_run (a 2-step micro/4 RPE-2D run at 16x16 with max_grid 8x8, train
  grid 4x4): sample.py without --output writes into it."""
  workdir = tmp_path_factory.mktemp('run') / 'run'
  shutil.copytree(tiny_run, workdir)
  return workdir


@pytest.fixture(scope='module')
def run(run_dir):
  return inference.load_run(run_dir)


def cli(*args, cwd=REPO, scripts=None, cache=None):
  """`python sample.py args` in subprocess_env(cache) (the shared compilation cache, as the
  in-process tests compile); with `scripts` (conftest's warm_scripts) forked from its warm
  interpreter instead, for the refusals (still a process each, without the re-imports)."""
  if scripts is not None:
    return scripts.run([REPO / 'sample.py', *args], cwd=cwd, timeout=300)
  env = subprocess_env(cache) if cache is not None else None
  return subprocess.run([sys.executable, str(REPO / 'sample.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('height,width', [(16, 16), (32, 24), (8, 8), (12, 40)])
def test_output_sizes(run, height, width):
  images = inference.generate(run, height=height, width=width, labels=[0, 3, 9], seed=0,
                              plan=config_lib.sampling_plan(run.config, steps=2))
  assert images.shape == (3, height, width, 1) and images.dtype == np.uint8


def test_seeds_and_batch_size(run):
  plan = config_lib.sampling_plan(run.config, steps=2, positions='random')
  labels = np.arange(20) % 10
  one = lambda seed, batch: inference.generate(run, height=16, width=16, labels=labels,
                                               seed=seed, plan=plan, batch_size=batch)
  a = one(0, 8)
  np.testing.assert_array_equal(a, one(0, 8))
  assert np.abs(a.astype(int) - one(1, 8)).mean() > 5
  # Per-example keys: batch 8 (three padded batches) and batch 24 (one) give the same images, up
  # to a rounding flip where float sums are ordered differently.
  diff = np.abs(a.astype(int) - one(0, 24))
  assert diff.max() <= 1 and diff.mean() < 0.01


METHODS = [dict(extrapolation=m) for m in rope.EXTRAPOLATIONS] + [
    dict(extrapolation=m, dype=True) for m in rope.DYPE_EXTRAPOLATIONS] + [
    dict(extrapolation='yarn', yarn_form='fit', dype=True, dype_variant='power'),
    dict(extrapolation='yarn', temperature='rope', attention_scale='log_n')]


CASES = [(m, 'uniform') for m in METHODS] + [
    (dict(extrapolation='yarn', dype=True), 'contiguous'), (dict(extrapolation='none'), 'random')]


@pytest.mark.parametrize('method,positions', CASES,
                         ids=lambda c: '-'.join(map(str, c.values())) if isinstance(c, dict) else c)
def test_every_method_runs(run, method, positions):
  fields = dict(method)
  encoding = config_lib.encoding(run.config, **fields)
  plan = config_lib.sampling_plan(run.config, steps=2, encoding=encoding, positions=positions)
  # 40x24 pixels = 10x6 tokens over a range of 8x8: extrapolates along y only. Random positions
  # are distinct draws from the range, so they stay inside it (32x24 = 8x6 tokens).
  height = 32 if positions == 'random' else 40
  images = inference.generate(run, height=height, width=24, labels=[1, 2], plan=plan)
  assert images.shape == (2, height, 24, 1)
  assert images.std() > 0


def test_dopri5_through_generate_and_a_solve_out_of_steps(run):
  stats = {}
  plan = config_lib.sampling_plan(run.config, sampler='dopri5', atol=1e-3, rtol=1e-2)
  images = inference.generate(run, height=16, width=16, labels=[0, 3], plan=plan, stats=stats)
  assert images.shape == (2, 16, 16, 1) and images.std() > 0
  assert stats['evaluations_per_image'] >= 8 and stats['evaluations_max'] % 6 == 2
  # A solve that runs out of steps is refused, never returned as images.
  plan = config_lib.sampling_plan(run.config, sampler='dopri5', max_steps=1)
  with pytest.raises(inference.UnfinishedSamplesError,
                     match=r'2 of samples 0..1 at 16x16 did not reach t = 0 with dopri5 \(atol '
                           r'1e-06, rtol 0.001, per_example\): sample 0 stopped after 1 step '
                           r'attempts at t = 0.\d+; sampling.max_steps=1 step attempts were not '
                           'enough'):
    inference.generate(run, height=16, width=16, labels=[0, 3], plan=plan)


def test_cli_png_and_npz(run_dir, jax_cache_dir, tmp_path):
  result = cli(f'--workdir={run_dir}', '--resolution=16x16,24x40', '--steps=2',
               f'--output={tmp_path / "grid.png"}', '--extrapolation=yarn', '--dype',
               '--positions=contiguous', '--attention_scale=log_n', '--sampler=heun',
               '--cfg_scale=2', '--cfg_interval=0.1,0.9', '--time_shift=2', '--labels=1,2,7',
               cache=jax_cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'compile' in result.stdout and 'images/s' in result.stdout
  for name, size in (('grid_16x16.png', (16, 16)), ('grid_24x40.png', (24, 40))):
    picture = Image.open(tmp_path / name)
    # Three titled rows of two images each (2 per label by default), 2 px padding, 64 px titles.
    assert picture.size == (64 + 2 + 2 * (size[1] + 2), 2 + 3 * (size[0] + 2))

  result = cli(f'--workdir={run_dir}', '--resolution=8x12', '--steps=2', '--num_samples=5',
               '--labels=random', f'--output={tmp_path / "batch.npz"}', '--noema',
               cache=jax_cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / 'batch.npz') as batch:
    assert sorted(batch.files) == ['arr_0', 'checkpoint', 'labels']
    assert str(batch['checkpoint']) == str(run_dir / 'checkpoints' / '2')
    assert batch['arr_0'].dtype == np.uint8 and batch['arr_0'].shape == (5, 8, 12, 1)
    assert batch['labels'].shape == (5,) and batch['labels'].max() < 10


def test_cli_writes_into_the_run_and_names_a_method_that_changes_nothing(run_dir, jax_cache_dir,
                                                                          tmp_path):
  """No --output: the grids go to <workdir>/samples (never the cwd), and the command says where.
  A method whose tokens lie inside the trained range (16x16: 4x4 tokens of 8x8) is named as a
  no-op there, and not at a size it changes (40x40: 10x10 tokens)."""
  result = cli(f'--workdir={run_dir}', '--resolution=16x16,40x40', '--steps=1',
               '--extrapolation=yarn', '--dype', cwd=tmp_path, cache=jax_cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert list(tmp_path.iterdir()) == []
  for size in ('16x16', '40x40'):
    path = run_dir / 'samples' / f'sample_0000002_{size}.png'
    assert path.is_file() and f'-> {path}' in result.stdout, result.stdout
  notes = [line for line in result.stdout.splitlines() if 'changes nothing' in line]
  assert notes == ['note: at 16x16 the 4x4 tokens lie inside the trained range 8x8: '
                   'extrapolation=yarn with dype changes nothing at this size'], result.stdout


@pytest.fixture(scope='module')
def grid_run_dir(run_dir, tmp_path_factory):
  """The same weights presented as a grid-trained run (positions do not change weight shapes)."""
  workdir = tmp_path_factory.mktemp('grid_run') / 'run'
  shutil.copytree(run_dir, workdir)
  edit_run_config(workdir, lambda config: config['positions'].update(train='grid'))
  return workdir


@pytest.mark.parametrize('args,message', [
    (['--resolution=18x16'], 'not divisible by the patch size 4'),
    (['--resolution=0x16'], 'must be positive'),
    (['--resolution=-16x16'], 'must be positive'),
    (['--resolution=big'], 'must look like <height>x<width>'),
    (['--extrapolation=linear'], "value should be one of"),
    (['--labels=3,99'], r'labels [99] are outside 0..9'),
    (['--num_samples=0'], '--num_samples=0 must be positive'),
    (['--output=out.jpg'], 'must end in .png'),
    (['--cfg_interval=0.9,0.1'], 'cfg_interval must satisfy'),
    (['--sampler=dopri5', '--atol=0'], '--atol=0.0 must be a finite number in (0.0, 1.0]'),
    (['--last_step_size=1'], '--last_step_size=1.0 must be a finite number in (0.0, 1.0)'),
    (['--sampler=euler_maruyama', '--steps=1'], 'euler_maruyama needs steps >= 2'),
    (['--positions=random', '--resolution=40x16'],
     "10x4 tokens do not fit the trained range 8x8; use 'uniform' or 'contiguous' beyond it"),
])
def test_cli_bad_input_exits_nonzero_and_writes_nothing(run_dir, warm_scripts, tmp_path, args,
                                                        message):
  result = cli(f'--workdir={run_dir}', *args, f'--output={tmp_path / "out.png"}'
               if not any(a.startswith('--output') for a in args) else '--steps=1', cwd=tmp_path,
               scripts=warm_scripts)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


def test_cli_refuses_workdirs_without_checkpoints_and_positions_on_grid_models(
    grid_run_dir, warm_scripts, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = cli(f'--workdir={empty}', f'--output={tmp_path / "a.png"}', scripts=warm_scripts)
  assert result.returncode != 0 and 'no config.json' in result.stderr
  (empty / 'config.json').write_text((grid_run_dir / 'config.json').read_text())
  result = cli(f'--workdir={empty}', f'--output={tmp_path / "a.png"}', scripts=warm_scripts)
  assert result.returncode != 0 and 'holds no checkpoints' in result.stderr
  result = cli(f'--workdir={grid_run_dir}', '--positions=uniform',
               f'--output={tmp_path / "a.png"}', scripts=warm_scripts)
  assert result.returncode != 0 and "needs an RPE-2D model" in result.stderr
  assert not (tmp_path / 'a.png').exists()


V0_1_RUN = REPO / 'tests' / 'fixtures' / 'run_v0_1'


def test_a_run_saved_by_version_0_1_loads_and_samples_as_it_did():
  """tests/fixtures/run_v0_1: a 2-step micro/4 RPE-2D run saved by rpe2d 0.1 (before the config
  schema, tasr_form and the temperature change), with the images 0.1 drew from it."""
  run = inference.load_run(V0_1_RUN)
  assert run.step == 2 and run.model.micro_conditioning
  # Fields the run predates take their defaults; what it saved is kept: YaRN's tau on the logits.
  plan = config_lib.sampling_plan(run.config, steps=2)
  assert plan.encoding.temperature == 'logits' and plan.encoding.tasr_form == 'continuous'
  notes = inference.notes(run, plan, 48, 48)
  assert len(notes) == 1 and "temperature='logits'" in notes[0]
  assert inference.notes(run, plan, 16, 16)[-1].endswith('changes nothing at this size')
  with np.load(V0_1_RUN / 'samples_v0_1.npz') as saved:
    for size in (16, 48):  # 48x48 is 12x12 tokens over a range of 8x8: YaRN at scale 1.5
      images = inference.generate(run, height=size, width=size, labels=[0, 3, 9], seed=0,
                                  plan=plan)
      diff = np.abs(images.astype(int) - saved[f'images_{size}x{size}'])
      assert diff.max() <= 1 and diff.mean() < 0.01, (size, diff.max())
