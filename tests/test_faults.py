"""Faults a careless user meets: retention that would delete the run, two trainers on one workdir,
config files that are not configs, out-of-range hyper-parameters, non-finite sampling settings and
samples, evaluation inputs that cannot give a metric, a missing config.json, Ctrl-C, failures after
work started, and grain workers left behind by a killed run.

As in test_reliability.py, everything a user would meet is real: train.py, sample.py and
evaluate.py in subprocesses with tiny configs, real orbax checkpoints, real signals.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (REPO, TRAIN_PY, flag_args, host, read_jsonl, step_dirs, subprocess_env,
                      tiny_config)
from rpe2d import checkpoints, config as config_lib, rundir, train_loop

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')

SAMPLE_PY, EVALUATE_PY = REPO / 'sample.py', REPO / 'evaluate.py'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A tiny run of 4 steps with checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  train_loop.train(tiny_config(data_dir, total_steps=4, checkpoint_every_steps=2), workdir)
  assert step_dirs(workdir) == [2, 4]
  return workdir


def copy_run(run, tmp_path, name='run') -> pathlib.Path:
  workdir = tmp_path / name
  shutil.copytree(run, workdir)
  return workdir


def command(script, *args, scripts, timeout=180) -> subprocess.CompletedProcess:
  """`python script args` in REPO, as a child forked by conftest's warm_scripts (tests/forked.py),
  with subprocess_env's environment."""
  return scripts.run([script, *args], cwd=REPO, timeout=timeout)


def one_error_line(result, status=None) -> str:
  """The single `error: ...` line of a failed command (no traceback)."""
  assert result.returncode != 0, result.stdout[-2000:]
  if status is not None:
    assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def snapshot(workdir) -> dict[str, bytes]:
  """Every file of a workdir but the lock (rewritten by each train.py that takes it)."""
  workdir = pathlib.Path(workdir)
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in workdir.rglob('*')
          if p.is_file() and p.name != 'train.lock'}


# ------------------------------------------------------------------------------------------------
# 1. Retention never deletes the newest checkpoint.


@pytest.mark.parametrize('overrides, match', [
    (dict(keep_checkpoints=0), r'keep_checkpoints=0 must be a positive integer'),
    (dict(keep_checkpoints=-1), r'keep_checkpoints=-1 must be a positive integer'),
    (dict(keep_every_steps=-2), r'keep_every_steps=-2 must be an integer >= 0'),
    (dict(checkpoint_every_steps=0), r'checkpoint_every_steps=0 must be a positive integer'),
    (dict(keep_every_steps=3), r'keep_every_steps=3 is not a multiple of checkpoint_every_steps=2'),
])
def test_retention_that_would_delete_checkpoints_is_refused(trained, data_dir, tmp_path,
                                                            warm_scripts, overrides, match):
  workdir = copy_run(trained, tmp_path)
  before = snapshot(workdir)
  result = command(TRAIN_PY, f'--workdir={workdir}',
                   *flag_args(data_dir,
                              **{'total_steps': 6, 'checkpoint_every_steps': 2, **overrides}),
                   scripts=warm_scripts, timeout=120)
  assert re.search(match, one_error_line(result, 1))
  assert snapshot(workdir) == before  # nothing deleted, nothing written


def test_keep_one_checkpoint_on_resume_keeps_the_newest(trained, data_dir, tmp_path, capsys):
  workdir = copy_run(trained, tmp_path)
  train_loop.train(tiny_config(data_dir, total_steps=6, checkpoint_every_steps=2,
                               keep_checkpoints=1), workdir)
  assert step_dirs(workdir) == [6]
  capsys.readouterr()
  state = train_loop.train(tiny_config(data_dir, total_steps=7, checkpoint_every_steps=2,
                                       keep_checkpoints=1, keep_every_steps=4), workdir)
  assert 'Resuming from step 6' in capsys.readouterr().out
  assert int(state.step) == 7 and step_dirs(workdir) == [7]


# ------------------------------------------------------------------------------------------------
# 2. One train.py per workdir; readers are welcome; a killed holder leaves no stuck lock.


def start_training(workdir, data_dir, cache, tmp_path, name='a', **overrides):
  """train.py in the background; returns (process, stdout path, stderr path)."""
  out, err = tmp_path / f'{name}.out', tmp_path / f'{name}.err'
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), f'--workdir={workdir}', *flag_args(data_dir, **overrides)],
        cwd=REPO, env=subprocess_env(cache), stdout=stdout, stderr=stderr)
  return process, out, err


def wait_for(condition, process, err, what, timeout=180):
  """Polls condition() while train.py runs; a failure kills the process (no stray trainers)."""
  deadline = time.monotonic() + timeout
  try:
    while not condition():
      assert process.poll() is None, f'train.py exited early:\n{err.read_text()[-3000:]}'
      assert time.monotonic() < deadline, f'no {what} after {timeout} s'
      time.sleep(0.1)
  except BaseException:
    process.kill()
    process.wait()
    raise


def test_a_second_trainer_on_a_live_workdir_is_refused(data_dir, tmp_path, compilation_cache,
                                                       warm_scripts):
  workdir = tmp_path / 'run'
  # A checkpoint every step and retention keeping one: sample.py below reads a checkpoint that
  # retention would delete mid-read without the reader's lease (issue 24, class 7).
  process, _, err = start_training(workdir, data_dir, compilation_cache, tmp_path,
                                   total_steps=100_000, checkpoint_every_steps=1,
                                   keep_checkpoints=1)
  try:
    wait_for(lambda: checkpoints.steps(workdir / 'checkpoints'), process, err, 'checkpoint')
    second = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=3),
                     scripts=warm_scripts, timeout=120)
    line = one_error_line(second, 1)
    assert str(workdir) in line and f'pid {process.pid}' in line, line
    assert process.poll() is None  # the first one trains on

    # Readers only read: sampling the live run works while its retention deletes (the lease:
    # test_class7_one_writer_per_directory_leases_and_a_bounded_start).
    sampled = command(SAMPLE_PY, f'--workdir={workdir}', '--resolution=16x16', '--num_samples=2',
                      f'--output={tmp_path / "live.png"}', scripts=warm_scripts)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / 'live.png').is_file()
    assert len(checkpoints.steps(workdir / 'checkpoints')) <= 2  # retention ran meanwhile
  finally:
    process.kill()  # SIGKILL: the kernel releases the lock
    process.wait()
  newest = checkpoints.recover(workdir)
  resumed = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=newest + 1),
                    scripts=warm_scripts)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from step {newest}' in resumed.stdout
  logged = [r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')]
  assert logged == sorted(set(logged)), 'a step was logged twice'


# ------------------------------------------------------------------------------------------------
# 9. Config files that are not configs: one line, no recursion.

BAD_CONFIG_FILES = {
    'no_get_config.py': ('x = 1\n', r'no_get_config.py has no get_config\(\)'),
    'not_callable.py': ('get_config = 3\n', r'not_callable.py has no get_config\(\)'),
    'returns_dict.py': ('def get_config():\n  return {"seed": 1}\n',
                        r'get_config\(\) in .*returns_dict.py returned dict; it must return an '
                        r'ml_collections.ConfigDict'),
    'returns_none.py': ('def get_config():\n  pass\n', r'returned NoneType'),
    'raises.py': ('def get_config():\n  raise RuntimeError("no data here")\n',
                  r'get_config\(\) in .*raises.py raised RuntimeError: no data here'),
    'locked.py': ('from rpe2d import config\ndef get_config():\n  c = config.base()\n  c.lock()\n'
                  '  c.nosuch = 1\n  return c\n', r'raised AttributeError: .*nosuch'),
    'syntax.py': ('def get_config(:\n', r'syntax.py could not be loaded: SyntaxError'),
    'takes_no_args.py:XL': ('def get_config():\n  return None\n',
                            r'raised TypeError: get_config\(\) takes 0 positional arguments'),
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIG_FILES))
def test_config_files_that_are_not_configs_fail_in_one_line(tmp_path, name):
  text, match = BAD_CONFIG_FILES[name]
  (tmp_path / name.split(':')[0]).write_text(text)
  with pytest.raises(ValueError, match=match) as raised:
    config_lib.load(str(tmp_path / name))
  assert '\n' not in str(raised.value) and len(str(raised.value)) < 600


def test_command_line_config_file_without_get_config(tmp_path, warm_scripts):
  for name in ('no_get_config.py', 'returns_dict.py'):
    text, match = BAD_CONFIG_FILES[name]
    (tmp_path / name).write_text(text)
    result = command(TRAIN_PY, f'--config={tmp_path / name}', f'--workdir={tmp_path / "run"}',
                     '--config.seed=1', scripts=warm_scripts, timeout=120)
    assert re.search(match, one_error_line(result, 1))
    assert len(result.stderr.splitlines()) < 5, result.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------------------------
# 3. Every numeric field of the schema has a range; NaN and Inf are refused everywhere.


def _numeric(field) -> bool:
  return _kind(field) in (int, float)


def _kind(field):
  return type(field.default) if field.default is not None else field.value_type


# data.source_image_size is recorded from the latent extraction's manifest, never read from a user.
NUMERIC_FIELDS = [f for f in config_lib.SCHEMA if _numeric(f) and f.key != 'data.source_image_size']
TUPLE_KEYS = {'positions.max_grid': (math.nan, 8), 'sampling.cfg_interval': (0.0, math.inf),
              'sampling.resolutions': ((16, math.nan),)}


def _refused(data_dir, key, value):
  config = tiny_config(data_dir)
  config.unlock()
  *sections, name = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(ValueError) as raised:
    config_lib.validate(config)
  message = str(raised.value)
  assert message.startswith(key) and '\n' not in message, message
  return message


def test_every_numeric_field_has_a_range(data_dir):
  assert len(NUMERIC_FIELDS) > 25  # the schema's numbers, data.* included
  for field in NUMERIC_FIELDS:
    # An int field takes only ints (ml_collections refuses a float, as train.py's flags do).
    values = (-1,) if _kind(field) is int else (math.nan, math.inf, -math.inf, -1e300)
    for value in values:
      _refused(data_dir, field.key, value)
  for key, value in TUPLE_KEYS.items():
    _refused(data_dir, key, value)


@pytest.mark.parametrize('key, value, allowed', [
    ('optim.learning_rate', 0.0, '(0.0, inf)'),
    ('optim.b1', 1.0, '[0.0, 1.0)'),
    ('optim.b2', -0.1, '[0.0, 1.0)'),
    ('optim.weight_decay', -1e-4, '[0.0, inf)'),
    ('optim.grad_clip', 0.0, '(0.0, inf)'),
    ('optim.warmup_steps', -1, 'integer >= 0'),
    ('optim.ema_decay', 1.5, '[0.0, 1.0)'),
    ('flow.class_dropout', 1.0, '[0.0, 1.0)'),
    ('flow.time_std', 0.0, '(0.0, inf)'),
    ('flow.time_shift', -2.0, '(0.0, inf)'),
    ('sampling.time_shift', 0.0, '(0.0, inf)'),
    ('encoding.dype_lambda_t', -1.0, '[0.0, inf)'),
    ('sampling.cfg_interval', (0.8, 0.2), 'low <= high'),
    ('data.crop_prob', 1.5, '[0.0, 1.0]'),
])
def test_hyper_parameters_out_of_range_are_named(data_dir, key, value, allowed):
  assert allowed in _refused(data_dir, key, value)


def test_command_line_nan_learning_rate_fails_before_compiling(data_dir, tmp_path,
                                                               warm_scripts):
  began = time.monotonic()
  result = command(TRAIN_PY, f'--workdir={tmp_path / "run"}',
                   *flag_args(data_dir, **{'optim.learning_rate': 'nan'}),
                   scripts=warm_scripts, timeout=120)
  line = one_error_line(result, 1)
  assert 'optim.learning_rate=nan must be a finite number in (0.0, inf)' in line
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  assert time.monotonic() - began < 60


# ------------------------------------------------------------------------------------------------
# 5. Non-finite sampling settings are refused; non-finite samples are never written or measured.


def test_sample_refuses_non_finite_flags_before_loading(trained, tmp_path, warm_scripts):
  for flag, allowed in (('--cfg_scale=nan', 'must be a finite number in [0.0, 100.0]'),
                        ('--time_shift=inf', 'must be a finite number in (0.0, inf)'),
                        ('--dype_lambda_t=-inf', 'must be a finite number in [0.0, inf)')):
    result = command(SAMPLE_PY, f'--workdir={trained}', '--resolution=16x16', flag,
                     f'--output={tmp_path / "out" / "s.png"}', scripts=warm_scripts)
    line = one_error_line(result, 2)
    assert line == f'error: {flag} {allowed}', line
  assert not (tmp_path / 'out').exists()


def nan_run(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  run = inference.load_run(workdir)
  run.params = jax.tree.map(lambda p: p * np.nan, run.params)
  return run


def test_non_finite_samples_are_never_written(trained, tmp_path):
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  run = nan_run(trained)
  plan = config_lib.sampling_plan(run.config, steps=2)
  paths = [tmp_path / 's_16x16.npz', tmp_path / 's_32x32.npz']
  with pytest.raises(inference.NonFiniteSamplesError) as raised:
    inference.write_samples(run, plan, [(16, 16), (32, 32)], paths, np.arange(3), batch_size=8)
  message = str(raised.value)
  assert message.startswith('3 of samples 0..2 at 16x16 are not finite'), message
  assert 'none of the 2 files was written' in message
  assert list(tmp_path.iterdir()) == []


def test_evaluation_caches_no_metric_of_non_finite_samples(trained, tmp_path):
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  from rpe2d.evaluation import sweep  # pylint: disable=g-import-not-at-top
  run = nan_run(trained)
  dim = 8
  reference = sweep.Reference(dict(kind='test'), np.zeros(dim), np.eye(dim))
  features = lambda images: np.asarray(images, np.float64).reshape(len(images), -1)[:, :dim]
  cells = sweep.plan_cells([run], ['nan'], [(16, 16)], ['none'], dict(steps=2))
  with pytest.raises(inference.SamplingError, match=r'nan none at 16x16: 4 of samples 0..3 at '
                     r'16x16 are not finite.*no number is kept for it. The 0 cells computed'):
    sweep.run([run], ['nan'], [(16, 16)], cells, outdir=tmp_path, feature_fn=features,
              num_samples=4, real_split='', npz_references={(16, 16): reference})
  assert not list((tmp_path / 'cells').glob('*.json')) if (tmp_path / 'cells').exists() else True
  # Non-finite features never give a cached number either.
  record_dir = tmp_path / 'cells2'
  good = inference.load_run(trained)
  plan = cells[0][3]
  with pytest.raises(inference.SamplingError, match='Inception features of 4 samples'):
    sweep.evaluate_cell(good, plan, 16, 16, num_samples=4, seed=0, reference=reference,
                        cell_dir=record_dir, feature_fn=lambda images: features(images) * np.inf)
  assert not record_dir.exists() or not list(record_dir.iterdir())


# A command under a file size limit: writing past it fails with EFBIG, as a full disk fails with
# ENOSPC (Python ignores SIGXFSZ), and it needs no root.
_LIMITED = ('import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); '
            'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')


def test_sample_write_failure_names_what_was_kept(trained, tmp_path, compilation_cache):
  env = {k: v for k, v in subprocess_env(compilation_cache).items()
         if not k.startswith('JAX_COMPILATION_CACHE') and not k.startswith('JAX_PERSISTENT')}
  output = tmp_path / 'out' / 's.npz'
  result = subprocess.run(
      [sys.executable, '-c', _LIMITED.format(30_000), str(SAMPLE_PY), f'--workdir={trained}',
       '--resolution=16x16,64x64', '--num_samples=20', '--steps=1', f'--output={output}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  line = one_error_line(result, 1)
  small, large = tmp_path / 'out' / 's_16x16.npz', tmp_path / 'out' / 's_64x64.npz'
  assert re.fullmatch(rf'error: writing {re.escape(str(large))} failed \(File too large.*\); '
                      rf'1 of 2 files were written \({re.escape(str(small))}\)', line), line
  with np.load(small) as kept:
    assert kept['arr_0'].shape == (20, 16, 16, 1)
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['s_16x16.npz']


def test_sample_refuses_an_unwritable_output_and_more_memory_than_there_is(trained, tmp_path,
                                                                           warm_scripts):
  (tmp_path / 'a_file').write_text('')
  result = command(SAMPLE_PY, f'--workdir={trained}', '--resolution=16x16',
                   f'--output={tmp_path / "a_file" / "s.png"}', scripts=warm_scripts)
  assert 'error: --output directory' in one_error_line(result, 2)
  result = command(SAMPLE_PY, f'--workdir={trained}', '--resolution=2048x2048',
                   '--num_samples=100000', f'--output={tmp_path / "big.npz"}',
                   scripts=warm_scripts)
  assert re.search(r'100000 images at 2048x2048 need at least [\d.]+ GiB of memory and [\d.]+ GiB '
                   r'is available', one_error_line(result, 2))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


# ------------------------------------------------------------------------------------------------
# 4. A workdir without config.json is checked against its newest checkpoint's config.


def test_resume_without_config_json_checks_the_checkpoint_config(trained, data_dir, tmp_path,
                                                                 warm_scripts):
  workdir = copy_run(trained, tmp_path)
  (workdir / 'config.json').unlink()
  before = snapshot(workdir)
  other_model = command(TRAIN_PY, f'--workdir={workdir}',
                        *flag_args(data_dir, total_steps=6, **{'model.variant': 'micro/2'}),
                        scripts=warm_scripts, timeout=120)
  assert 'holds a run of an incompatible model' in other_model.stderr
  assert "model.variant: saved 'micro/4', now 'micro/2'" in other_model.stderr
  assert ('has no config.json: checking the config against the one saved in its newest '
          'checkpoint, step 4') in other_model.stdout
  assert snapshot(workdir) == before

  resumed = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=5),
                    scripts=warm_scripts)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from step 4' in resumed.stdout
  assert rundir.RunDir(workdir).read_config().total_steps == 5  # config.json written again


# ------------------------------------------------------------------------------------------------
# 6. Ctrl-C: like SIGTERM (save where there is something to save), exit 1 with one error line.


def _interrupt(process, err, timeout=30):
  """SIGINT to a running train.py -> (its one error line, seconds to exit); it must exit 1 with
  exactly one error line and no traceback."""
  try:
    process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    returncode = process.wait(timeout=timeout)
    seconds, stderr_text = time.monotonic() - signalled, err.read_text()
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  errors = [line for line in stderr_text.splitlines() if line.startswith('error: ')]
  assert returncode == 1 and len(errors) == 1, stderr_text[-3000:]
  assert 'Traceback' not in stderr_text, stderr_text[-3000:]
  return errors[0], seconds


def test_sigint_during_the_first_compile_exits_at_once(data_dir, tmp_path, compilation_cache):
  # No compilation cache: the first step compiles for seconds, and the signal lands inside.
  env = {k: v for k, v in subprocess_env(compilation_cache).items()
         if not k.startswith('JAX_COMPILATION_CACHE') and not k.startswith('JAX_PERSISTENT')}
  workdir, err = tmp_path / 'run', tmp_path / 'err.txt'
  with open(err, 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), f'--workdir={workdir}',
         *flag_args(data_dir, total_steps=100_000)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
  # In the loop (the bar is drawn) and nothing logged yet: no step has finished.
  wait_for(lambda: 'train:' in err.read_text(), process, err, 'progress bar')
  wait_for(lambda: not (workdir / 'metrics.jsonl').is_file()
           or not read_jsonl(workdir / 'metrics.jsonl'), process, err, 'empty log', timeout=0)
  error, seconds = _interrupt(process, err)
  if error == 'error: SIGINT before the first step: nothing to save':
    assert seconds < 5, f'{seconds:.1f} s from SIGINT to exit: it waited for the compile'
    assert step_dirs(workdir) == []
  else:  # the compile ended before the signal: the first step was saved
    found = re.fullmatch(r'error: interrupted \(SIGINT\) at step (\d+): saved the checkpoint .*',
                         error)
    assert found, error
    assert step_dirs(workdir) == [int(found.group(1))]


def test_sigint_after_a_checkpoint_saves_the_current_step(data_dir, tmp_path, compilation_cache):
  workdir = tmp_path / 'run'
  process, _, err = start_training(workdir, data_dir, compilation_cache, tmp_path,
                                   total_steps=100_000, checkpoint_every_steps=2)
  wait_for(lambda: checkpoints.steps(workdir / 'checkpoints'), process, err, 'checkpoint')
  error, seconds = _interrupt(process, err)
  found = re.fullmatch(rf'error: interrupted \(SIGINT\) at step (\d+): saved the checkpoint '
                       rf'{re.escape(str(workdir))}/checkpoints/(\d+); run the same command to '
                       r'resume', error)
  assert found and found.group(1) == found.group(2), error
  step = int(found.group(1))
  assert step == step_dirs(workdir)[-1]
  assert checkpoints.damage(workdir / 'checkpoints' / str(step)) is None
  assert max(r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')) == step
  assert seconds < 30


# ------------------------------------------------------------------------------------------------
# 10. A failure after work started: one error line naming what failed and what was kept.


def test_train_failure_after_work_started_names_the_kept_checkpoint(trained, data_dir, tmp_path,
                                                                    warm_scripts):
  """A side task (here the sample grid of step 5, whose file name is taken by a directory) fails
  at a step that is not a checkpoint step: the step is saved first, the error names it, and the
  same command resumes from it once the cause is gone (issue 24, class 1)."""
  workdir = copy_run(trained, tmp_path)
  (workdir / 'samples' / 'step_0000005_16x16.png').mkdir(parents=True)
  args = flag_args(data_dir, total_steps=6, checkpoint_every_steps=2, sample_every_steps=5)
  result = command(TRAIN_PY, f'--workdir={workdir}', *args, scripts=warm_scripts)
  line = one_error_line(result, 1)
  assert re.fullmatch(r'error: step 5: drawing the sample grids failed \(Is a directory: .*'
                      r'step_0000005_16x16.png.*\); the step was saved first: the newest checkpoint, '
                      rf'step 5, is in {re.escape(str(workdir))}/checkpoints: fix the cause and run '
                      r'the same command to resume', line), line
  assert step_dirs(workdir) == [2, 4, 5]
  assert checkpoints.damage(workdir / 'checkpoints' / '5') is None
  (workdir / 'samples' / 'step_0000005_16x16.png').rmdir()
  resumed = command(TRAIN_PY, f'--workdir={workdir}', *args, scripts=warm_scripts)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from step 5' in resumed.stdout
  assert [r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------
# 8. grain's worker processes die with a killed train.py.


def descendants(pid) -> set[int]:
  found, todo = set(), [pid]
  while todo:
    for task in pathlib.Path(f'/proc/{todo.pop()}/task').glob('*'):
      try:
        children = {int(c) for c in (task / 'children').read_text().split()}
      except OSError:
        continue
      todo.extend(children - found)
      found |= children
  return found


def alive(pid) -> bool:
  try:
    state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except OSError:
    return False
  return state != 'Z'  # a zombie has exited; only its parent's wait() is missing


def test_sigkill_leaves_no_data_worker_running(data_dir, tmp_path, compilation_cache):
  workdir = tmp_path / 'run'
  process, _, err = start_training(workdir, data_dir, compilation_cache, tmp_path,
                                   total_steps=100_000, **{'data.num_workers': 2})
  try:
    wait_for(lambda: (workdir / 'metrics.jsonl').is_file()
             and read_jsonl(workdir / 'metrics.jsonl'), process, err, 'metrics')
    children = descendants(process.pid)
    workers = {c for c in children if b'spawn_main' in pathlib.Path(f'/proc/{c}/cmdline')
               .read_bytes()}
    assert len(workers) >= 2, children
  finally:
    process.kill()
    process.wait()
  deadline = time.monotonic() + 10
  while any(alive(c) for c in children) and time.monotonic() < deadline:
    time.sleep(0.2)
  survivors = [c for c in children if alive(c)]
  for pid in survivors:  # do not leave them to the next test
    os.kill(pid, signal.SIGKILL)
  assert not survivors, f'{len(survivors)} processes outlived the killed train.py'


# ------------------------------------------------------------------------------------------------
# Issue 24: the eight classes of a held-out fault probe, one test per class (the first is
# test_train_failure_after_work_started_names_the_kept_checkpoint above, the seventh also
# test_a_second_trainer_on_a_live_workdir_is_refused, which samples a run whose retention keeps one
# checkpoint).


def test_class1_every_training_grid_is_checked_before_compiling(data_dir, tmp_path, capsys):
  """A grid the run could not draw during training is refused before anything compiles (its
  position rule, its memory), and repeated sizes are drawn once."""
  from conftest import CompileCounter  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  cases = [
      (dict(positions__inference='random', sampling__resolutions=((16, 16), (40, 40))),
       r"sampling.resolutions\[1\]=40x40: the sample grid drawn there during training cannot be "
       r"drawn: positions='random' draws distinct positions: 10x10 tokens do not fit the trained "
       r'range 8x8'),
      (dict(sampling__resolutions=((4096, 4096),), model__variant='tiny/4'),
       r'sampling.resolutions\[0\]=4096x4096: .* need at least .* of memory .*one image\'s '
       r'attention scores alone .* use --config.model.attention_implementation=chunked'),
  ]
  with CompileCounter() as compiles:
    for overrides, message in cases:
      with pytest.raises(ValueError, match=message):
        train_loop.train(tiny_config(data_dir, **overrides), workdir)
      assert not workdir.exists()
  assert compiles.count == 0
  config = tiny_config(data_dir, sampling__resolutions=((16, 16), (8, 8), (16, 16)))
  train_loop.normalise_resolutions(config)
  assert config.sampling.resolutions == ((16, 16), (8, 8))
  assert 'note: sampling.resolutions lists 16x16, 8x8, 16x16; each size is drawn once: 16x16, 8x8' \
      in capsys.readouterr().out


def test_class2_run_directories_inside_run_directories(trained, data_dir, tmp_path, caplog):
  """A workdir inside another run's managed directories, or holding another run in its own, is
  refused; retention deletes only checkpoint directories it can prove it wrote; '' is refused."""
  outer = copy_run(trained, tmp_path, 'outer')
  for inner in (outer / 'checkpoints' / '2' / 'inner', outer / 'checkpoints' / 'inner',
                outer / 'samples' / 'x'):
    with pytest.raises(ValueError, match=rf'workdir {re.escape(str(inner))} lies inside '
                                         rf'{inner.relative_to(outer).parts[0]}/ of the run '
                                         rf'{re.escape(str(outer))}'):
      train_loop.train(tiny_config(data_dir), inner)
    assert not inner.exists()
  with pytest.raises(ValueError, match=r"workdir '' is empty"):
    train_loop.train(tiny_config(data_dir), '')
  for what in ('--output', '--outdir'):
    with pytest.raises(ValueError, match=rf'{what} .* lies inside checkpoints/ of the run'):
      rundir.check_not_managed(outer / 'checkpoints' / '4' / 'eval.npz', what)
  rundir.check_not_managed(outer / 'samples' / 'eval.npz', '--output')  # samples/ is fine

  # A run already living inside another's checkpoints (from before this check): the outer run
  # refuses to train, and its retention leaves that step alone, naming what it holds.
  (outer / 'checkpoints' / '2' / 'inner').mkdir()
  (outer / 'checkpoints' / '2' / 'inner' / 'train.lock').write_text('')
  with pytest.raises(ValueError, match=r'holds another run in checkpoints/'):
    train_loop.train(tiny_config(data_dir, total_steps=6), outer)
  no_manifest = outer / 'checkpoints' / '3'
  shutil.copytree(outer / 'checkpoints' / '4', no_manifest)
  (no_manifest / checkpoints.MANIFEST).unlink()
  config = tiny_config(data_dir, keep_checkpoints=1)
  with caplog.at_level('WARNING'):
    assert checkpoints.prune(outer, config) == []
  assert step_dirs(outer) == [2, 3, 4]
  assert re.search(r'Retention leaves .*checkpoints/2: it holds 1 files no checkpoint save wrote '
                   r'\(inner/train.lock\)', caplog.text)
  assert re.search(r'Retention leaves .*checkpoints/3: it has no rpe2d_manifest.json', caplog.text)
  shutil.rmtree(outer / 'checkpoints' / '2' / 'inner')
  shutil.rmtree(no_manifest)
  assert checkpoints.prune(outer, config) == [2] and step_dirs(outer) == [4]


def _saved_config(step_dir) -> dict:
  return json.loads((step_dir / 'config' / 'metadata').read_text())


def test_class3_a_checkpoint_is_read_with_its_own_config(trained, data_dir, tmp_path, capsys):
  """A checkpoint's saved config is the truth: --checkpoint of another run whose model, positions
  or data differ is refused listing the keys; one that agrees is sampled with its own config, with
  a note; init_from checks the checkpoint's config, not its run's config.json."""
  from conftest import edit_run_config  # pylint: disable=g-import-not-at-top
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  mine, other = copy_run(trained, tmp_path, 'mine'), copy_run(trained, tmp_path, 'other')
  edit_run_config(other, lambda c: (c['positions'].update(max_grid=[6, 6]),
                                    c['encoding'].update(extrapolation='yarn')))
  step = other / 'checkpoints' / '4'
  with pytest.raises(ValueError, match=r'belongs to the run .*other, whose model, positions or '
                     r'data differ .*positions.max_grid: saved \[6, 6\], now \[8, 8\]\. Sample it '
                     r'with --workdir=.*other'):
    inference.load_run(mine, step)
  capsys.readouterr()
  agreeing = copy_run(trained, tmp_path, 'agreeing')
  edit_run_config(agreeing, lambda c: c['encoding'].update(extrapolation='yarn'))
  run = inference.load_run(mine, agreeing / 'checkpoints' / '2')
  assert run.config.encoding.extrapolation == 'yarn' and run.checkpoint.parent.parent == agreeing
  assert 'is a checkpoint of another run' in capsys.readouterr().out
  # The run's own checkpoint wins over a config.json edited afterwards.
  config = json.loads((mine / 'config.json').read_text())
  config['positions']['max_grid'] = [6, 6]
  (mine / 'config.json').write_text(json.dumps(config))
  assert tuple(inference.load_run(mine).config.positions.max_grid) == (8, 8)
  assert 'it is sampled with the config saved in it' in capsys.readouterr().out
  # init_from: the checkpoint's own config decides, whatever its run's config.json says.
  config['model']['variant'] = 'micro/2'
  (mine / 'config.json').write_text(json.dumps(config))
  assert checkpoints.check_init_from(str(mine), tiny_config(data_dir)) == \
      mine / 'checkpoints' / '4'
  with pytest.raises(ValueError, match=r"(?s)holds weights of another model.*model.variant: saved "
                                       r"'micro/4', now 'micro/2'"):
    checkpoints.check_init_from(str(mine), tiny_config(data_dir, model__variant='micro/2'))


def test_class4_every_flag_and_path_is_checked_before_loading(trained, data_dir, tmp_path,
                                                              warm_scripts):
  """Seeds beyond 64 bits, absurd sample counts, outputs that are directories or whose names the
  file system refuses, a reference split too small, a workdir too long for its checkpoints: each
  is refused before anything is loaded or compiled, naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  from rpe2d import training  # pylint: disable=g-import-not-at-top
  from rpe2d.evaluation import sweep  # pylint: disable=g-import-not-at-top
  (tmp_path / 'taken.png').mkdir()
  long_name = 'x' * 300 + '.png'
  cases = [
      (['--seed=18446744073709551616'], '--seed=18446744073709551616 must be an integer in '
       '[0, 2**64)'),
      (['--num_samples=100000000000'], '--num_samples=100000000000 must be positive and at most'),
      (['--num_samples=2000000000', '--resolution=64x64'],
       '2000000000 images at 64x64 need at least'),
      ([f'--output={tmp_path / "taken.png"}'], 'is a directory; name a .png or .npz file'),
      ([f'--output={tmp_path / long_name}'], 'bytes long; this file system allows 255'),
      (['--checkpoint='], '--checkpoint= is empty'),
  ]
  for args, message in cases:
    if not any(a.startswith('--output') for a in args):
      args = args + [f'--output={tmp_path / "out" / "s.png"}']
    result = command(SAMPLE_PY, f'--workdir={trained}', '--resolution=16x16', *args,
                     scripts=warm_scripts)
    assert message in one_error_line(result, 2), (args, result.stderr[-2000:])
  assert not (tmp_path / 'out').exists()
  # Seeds keep all 64 bits: 2**32 is not seed 0 (jax.random.key alone would truncate it).
  keys = [np.asarray(jax.random.key_data(training.seed_key(s))).tolist()
          for s in (0, 2**32, 2**64 - 1)]
  assert keys == [[0, 0], [1, 0], [2**32 - 1, 2**32 - 1]]
  # A reference split of 2 images fails before any sampling, not after it and Inception.
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  run = inference.load_run(trained)
  with pytest.raises(ValueError, match=r"--split=test\[:2\]: animal_mnist\[test\[:2\]\] holds 2 "
                                       r'images; the metrics need at least 4'):
    sweep.check_inputs([run], [(16, 16)], num_samples=8, num_reference=None, split='test[:2]',
                       real_split='', npz_references={})
  # A workdir too long for the checkpoint files it would write: refused before it is created.
  deep = tmp_path.joinpath(*['d' * 250] * 16)
  with pytest.raises(ValueError, match=r'is too long for the files written in it: checkpoints/'):
    train_loop.train(tiny_config(data_dir), deep)
  assert not (tmp_path / ('d' * 250)).exists()


def _projection(dim=8, seed=0):
  """Stand-in features for the Inception network: a fixed random projection of the pixels."""
  weights = {}

  def features(images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    if flat.shape[1] not in weights:
      weights[flat.shape[1]] = np.random.default_rng(seed).normal(size=(flat.shape[1], dim))
    return flat @ weights[flat.shape[1]]
  return features


def test_class5_damaged_files_the_project_wrote_never_block_a_rerun(trained, data_dir, tmp_path,
                                                                   caplog, capsys):
  """Every log, config and cache the project writes, damaged one at a time, and the run again:
  a damaged log line is set aside in <log>.damaged (never dropped silently) and the run resumes;
  a cut-short config.json is set aside and written again; a damaged evaluation cell or reference
  cache is named, set aside and computed again, to the same numbers. A damaged user file (VAE
  weights or config, a prepared data shard) is named with what to do."""
  from rpe2d import autoencoder_weights, data, inference  # pylint: disable=g-import-not-at-top
  from rpe2d.evaluation import sweep  # pylint: disable=g-import-not-at-top
  workdir = copy_run(trained, tmp_path)
  metrics, examples = workdir / 'metrics.jsonl', workdir / 'examples.jsonl'
  lines = metrics.read_bytes().splitlines(keepends=True)
  invalid, cut = b'{"step": 3, "loss": \xff}\n', b'{"step": 4, "lo'
  metrics.write_bytes(lines[0] + invalid + b''.join(lines[1:]) + cut)
  examples.write_bytes(b'{"step": 1, "index": [1, 2\n')
  config_json = (workdir / 'config.json').read_bytes()
  (workdir / 'config.json').write_bytes(config_json[:100])
  with caplog.at_level('WARNING'):
    train_loop.train(tiny_config(data_dir, total_steps=5, log_example_indices=True), workdir)
  assert (workdir / 'metrics.jsonl.damaged').read_bytes() == invalid + cut + b'\n'
  assert (workdir / 'examples.jsonl.damaged').read_bytes() == b'{"step": 1, "index": [1, 2\n'
  assert [r['step'] for r in read_jsonl(metrics)] == [1, 2, 3, 4, 5]
  assert [r['step'] for r in read_jsonl(examples)] == [5]
  assert re.search(r'metrics.jsonl: 2 lines that could not be read .* set aside in '
                   r'.*metrics.jsonl.damaged; the run resumes', caplog.text)
  assert (workdir / 'config.json.damaged').read_bytes() == config_json[:100]
  assert rundir.RunDir(workdir).read_config().total_steps == 5

  # Evaluation: the cell and the reference feature cache.
  run = inference.load_run(trained)
  cells = sweep.plan_cells([run], ['run'], [(16, 16)], ['none'], dict(steps=1))
  outdir = tmp_path / 'eval'

  def evaluate():
    return sweep.run([run], ['run'], [(16, 16)], cells, outdir=outdir, feature_fn=_projection(),
                     num_samples=8, real_split='')[0]
  first = evaluate()
  cached = sorted((outdir / 'cells').glob('*.json')) + sorted((outdir / 'cells').glob('*.png')) \
      + sorted((outdir / 'reference').glob('*.npz'))
  assert len(cached) == 3
  for path in cached:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    capsys.readouterr()
    again = evaluate()
    err = capsys.readouterr().err
    assert again['fid'] == first['fid'], path
    damaged = path if path.suffix != '.png' else path.with_suffix('.json')
    assert f'warning: the cache file {damaged} is damaged' in err, err
    assert damaged.with_name(damaged.name + '.damaged').is_file()

  # User files: named, with what to do.
  vae = tmp_path / 'vae'
  shutil.copytree(REPO / 'tests' / 'fixtures' / 'sd_vae_tiny', vae)
  weights = vae / autoencoder_weights.WEIGHTS_NAME
  weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
  with pytest.raises(ValueError, match=rf'{re.escape(str(weights))} is damaged: safetensors cannot '
                                       r'read it .*; download diffusion_pytorch_model.safetensors '
                                       r'again'):
    autoencoder_weights.load(weights)
  (vae / 'config.json').write_text('{"in_channels": 3,')
  with pytest.raises(ValueError, match=r'config.json is damaged: not JSON .* download the '
                                       r"config.json of the VAE's repository again"):
    autoencoder_weights.read_config(vae / 'config.json')
  tfds_dir = tmp_path / 'tfds'
  shutil.copytree(data_dir, tfds_dir)
  shard = next((tfds_dir / 'animal_mnist').glob('*/animal_mnist-train.array_record*'))
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) * 2 // 3])
  with pytest.raises(ValueError, match=rf'the prepared data file {re.escape(str(shard))} is '
                                       rf'damaged: .*; delete the directory '
                                       rf'{re.escape(str(shard.parent))} and run again'):
    data.prepare(tiny_config(str(tfds_dir)).data)


def test_class6_advice_that_works_and_no_noise(data_dir, tmp_path, caplog):
  """Each refusal's advice is what fixes that case; a damaged shard read with bad_records=skip
  warns once, not once per record; extract.py's errors name its flags; library errors and their
  tracebacks go to a log file and the console keeps one line."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from rpe2d import data, inference, latents  # pylint: disable=g-import-not-at-top
  gib = 2**30
  flags = {'num_samples': '--num_samples', 'batch_size': '--batch_size',
           'attention': '--attention'}
  model = config_lib.build_model(tiny_config(data_dir, data__image_size=32))  # micro/4, 4 heads
  check = lambda m, size, n, b: inference.check_memory(m, size, size, num_samples=n, batch_size=b,
                                                       channels=1, available=8 * gib, flags=flags)
  with pytest.raises(ValueError, match=r"1 images at 1024x1024 need at least 32.0 GiB of memory and "
                     r"8.0 GiB is available; one image's attention scores alone \(65536 tokens\) "
                     r'do not fit: use --attention=chunked'):
    check(model, 1024, 1, 1)
  check(model.clone(attention_implementation='chunked'), 1024, 1, 1)  # fits
  with pytest.raises(ValueError, match='are kept in memory until written: use a smaller '
                                       '--num_samples'):
    check(model, 256, 200_000, 1)
  with pytest.raises(ValueError, match='use a smaller --batch_size'):
    check(model.clone(attention_implementation='chunked'), 64, 2000, 2000)

  # A shard cut short: every record unreadable, one warning for them all (and the pipeline's
  # own check names the file before any record is read: test_class5).
  tfds_dir = tmp_path / 'tfds'
  shutil.copytree(data_dir, tfds_dir)
  shard = next((tfds_dir / 'animal_mnist').glob('*/animal_mnist-train.array_record*'))
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) * 2 // 3])
  opts = data.parse_config(tiny_config(str(tfds_dir), data__bad_records='skip').data)
  records = data.Records(tfds.data_source('animal_mnist', split='train', data_dir=str(tfds_dir)),
                         opts, 'animal_mnist[train]')
  with caplog.at_level('WARNING'), pytest.raises(data.BadRecordError, match='no record is usable'):
    records[0]
  skipping = [r for r in caplog.records if r.getMessage().startswith('Skipping')]
  assert len(skipping) == 1 and 'are counted' in skipping[0].getMessage()

  with pytest.raises(latents.InputError, match=r'^--shard_size=12 is not a multiple of '
                                               r'--batch_size=8'):
    latents.check_arguments(splits=['train'], shard_size=12, batch_size=8, dtype='float32',
                            prefix='--')
  with pytest.raises(latents.InputError, match=r'^--splits=train,train; allowed: distinct'):
    latents.check_arguments(splits=['train', 'train'], shard_size=8, batch_size=8,
                            dtype='float32', prefix='--')

  # Library errors (here a logger of another package, and an exception ending a thread of it)
  # go to <command>.log; the console shows the command's one error line, naming the file.
  script = ('import logging, threading\n'
            'from rpe2d import cli\n'
            'log = cli.quiet_libraries("sample.py")\n'
            f'log.path = __import__("pathlib").Path({str(tmp_path)!r}) / "sample.log"\n'
            'logging.getLogger("absl").warning("a library warning")\n'
            'logging.getLogger("absl").warning("a library warning")\n'
            'try:\n  raise OSError(28, "No space left on device")\n'
            'except OSError:\n  logging.getLogger("orbax").exception("save failed")\n'
            'thread = threading.Thread(target=lambda: 1 / 0)\n'
            'thread.start(); thread.join()\n'
            'cli.fail("writing failed (No space left on device)", 1)\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
      'error: writing failed (No space left on device) (what the libraries logged, with '
      f'tracebacks: {tmp_path / "sample.log"})'), result.stderr
  assert result.stderr.count('a library warning') == 1 and 'Traceback' not in result.stderr
  logged = (tmp_path / 'sample.log').read_text()
  assert 'save failed' in logged and 'ZeroDivisionError' in logged and 'Traceback' in logged


def _hold_lock(path):
  """Another process holding the flock of `path`, as a live writer does; returns it."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import fcntl, os, sys, time\n'
       'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n'
       'fcntl.flock(fd, fcntl.LOCK_EX)\n'
       'os.pwrite(fd, b"pid 1234 on host elsewhere, since then", 0)\n'
       'print("held", flush=True)\n'
       'time.sleep(120)\n', str(path)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == 'held\n'
  return holder


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_class7_one_writer_per_directory_leases_and_a_bounded_start(trained, data_dir, tmp_path,
                                                                    warm_scripts):
  """extract.py and evaluate.py lock their output like train.py its workdir; retention waits for
  a reader's lease; multi-host start-up says what it waits for and gives up in one line."""
  from rpe2d import files, latents  # pylint: disable=g-import-not-at-top
  from rpe2d.evaluation import sweep  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'latents'
  out.mkdir()
  holder = _hold_lock(out / latents.LOCK)
  try:
    with pytest.raises(latents.InputError, match=rf'--output {re.escape(str(out))} is in use by '
                                                 r'another extract.py \(pid 1234 on host '
                                                 r'elsewhere'):
      latents.extract(tiny_config(data_dir, data__channels=3, data__image_size=32).data,
                      REPO / 'tests' / 'fixtures' / 'sd_vae_tiny', out, splits=['test'],
                      shard_size=8, batch_size=8)
  finally:
    holder.kill()
    holder.wait()
  outdir = tmp_path / 'eval'
  outdir.mkdir()
  holder = _hold_lock(outdir / sweep.LOCK)
  try:
    with pytest.raises(files.InUseError, match='is in use by another evaluate.py'):
      files.DirectoryLock(outdir, sweep.LOCK, 'evaluate.py').acquire(f'--outdir {outdir}', '')
  finally:
    holder.kill()
    holder.wait()

  # A reader's lease on a live run (a trainer holds train.lock; here this process): retention
  # keeping one checkpoint leaves the step being read. A finished run is read without a lease.
  workdir = copy_run(trained, tmp_path)
  config = tiny_config(data_dir, keep_checkpoints=1)
  with checkpoints.lease(workdir / 'checkpoints' / '2'):
    assert not (workdir / 'readers').exists()
  run = rundir.RunDir(workdir)
  run.lock()
  try:
    with checkpoints.lease(workdir / 'checkpoints' / '2'):
      assert checkpoints.prune(workdir, config) == [] and step_dirs(workdir) == [2, 4]
    assert checkpoints.prune(workdir, config) == [2] and step_dirs(workdir) == [4]
    with pytest.raises(checkpoints.CheckpointGone, match='deleted by its run'):
      with checkpoints.lease(workdir / 'checkpoints' / '2'):
        pass
  finally:
    run.unlock()

  # Multi-host start-up: bounded, saying what it waits for, one line naming what never came.
  port = free_port()
  layout = [f'--coordinator_address=localhost:{port}', '--num_processes=2',
            '--distributed_timeout=1', f'--workdir={tmp_path / "mh"}']
  for process, waiting, missing in (
      (0, 'waiting for process 1 at port', 'process 1 of 2 did not join'),
      (1, 'waiting for the coordinator, process 0, at localhost',
       'process 1 found no coordinator at localhost')):
    began = time.monotonic()
    result = command(TRAIN_PY, *layout, f'--process_id={process}', scripts=warm_scripts)
    assert time.monotonic() - began < 30
    assert waiting in result.stderr and missing in one_error_line(result, 1), result.stderr
  result = command(TRAIN_PY, '--coordinator_address=no-such-host.invalid:1234',
                   '--num_processes=2', '--process_id=1', scripts=warm_scripts)
  assert "the host 'no-such-host.invalid' does not resolve" in one_error_line(result, 1)
  assert not (tmp_path / 'mh').exists()


def test_class8_odd_input_is_refused_or_normalised_with_a_note(tiny_run, tmp_path, capsys):
  """Repeated resolutions and methods are sampled once, with a note; a reference batch for a
  size not evaluated, or two for one size, is refused; a decode tile below twice its overlap is
  named; a config argument with a missing or wrong part names the allowed values."""
  from rpe2d import inference  # pylint: disable=g-import-not-at-top
  from rpe2d.evaluation import metrics, sweep  # pylint: disable=g-import-not-at-top
  assert inference.distinct_sizes([(16, 16), (32, 32), (16, 16)], '--resolution') == \
      [(16, 16), (32, 32)]
  assert sweep.distinct_methods(['uniform', 'none@uniform', 'yarn', 'YaRN']) == ['uniform', 'yarn']
  out = capsys.readouterr().out
  assert 'note: --resolution lists 16x16, 32x32, 16x16; each size is sampled once' in out
  assert 'note: --methods lists uniform,none@uniform,yarn,YaRN; each method is evaluated once: ' \
      'uniform,yarn' in out
  assert sweep.parse_resolutions(['32', '32x32'], {4}) == [(32, 32), (32, 32)]  # then distinct
  npz = tmp_path / 'ref.npz'
  metrics.save_reference_npz(npz, np.zeros(metrics.FEATURE_DIM), np.eye(metrics.FEATURE_DIM))
  with pytest.raises(ValueError, match=r"entry '64x64:.*ref.npz' is for 64x64, which is not "
                                       r'evaluated \(--resolutions: 32x32\)'):
    sweep.parse_reference_npz([f'64x64:{npz}'], [(32, 32)])
  with pytest.raises(ValueError, match='names two references for 32x32'):
    sweep.parse_reference_npz([f'32:{npz}', f'32x32:{npz}'], [(32, 32)])
  assert inference.check_decode_tile('--decode_tile', 8) == [
      'note: --decode_tile=8 is smaller than twice the 16-latent-pixel overlap tiles are blended '
      'over: tiles overlap by 4 only, and seams may show (use 32 or more, or 0 to decode whole)']
  assert inference.check_decode_tile('--decode_tile', 0) == []
  for arg, message in (('XL,256', r'expected <size>,<resolution>,<positions>\[,pixels\] with size '
                                  r'in B\|XL, resolution in 256\|512, positions in rpe2d\|grid; '
                                  r'got 2 parts'),
                       ('XL,300,rope', r"not allowed: resolution '300', positions 'rope'"),
                       ('XL,256,rpe2d,latents', r"not allowed: 'latents' \(only pixels")):
    with pytest.raises(ValueError, match=message):
      config_lib.load(f'{REPO}/configs/imagenet.py:{arg}')
  assert config_lib.load(f'{REPO}/configs/imagenet.py:xl, 256,RPE2D').model.variant == 'XL/2'
  assert 'read as configs/imagenet.py:XL,256,rpe2d' in capsys.readouterr().out
