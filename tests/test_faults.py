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
  process, _, err = start_training(workdir, data_dir, compilation_cache, tmp_path,
                                   total_steps=100_000, checkpoint_every_steps=2)
  try:
    wait_for(lambda: checkpoints.steps(workdir / 'checkpoints'), process, err, 'checkpoint')
    second = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=3),
                     scripts=warm_scripts, timeout=120)
    line = one_error_line(second, 1)
    assert str(workdir) in line and f'pid {process.pid}' in line, line
    assert process.poll() is None  # the first one trains on

    # Readers only read: sampling the live run works.
    sampled = command(SAMPLE_PY, f'--workdir={workdir}', '--resolution=16x16', '--num_samples=2',
                      f'--output={tmp_path / "live.png"}', scripts=warm_scripts)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / 'live.png').is_file()
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
