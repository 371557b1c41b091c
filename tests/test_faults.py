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


def command(script, *args, cache, timeout=180) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO,
                        env=subprocess_env(cache), capture_output=True, text=True,
                        timeout=timeout)


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
  workdir = pathlib.Path(workdir)
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in workdir.rglob('*')
          if p.is_file()}


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
                                                            compilation_cache, overrides, match):
  workdir = copy_run(trained, tmp_path)
  before = snapshot(workdir)
  result = command(TRAIN_PY, f'--workdir={workdir}',
                   *flag_args(data_dir, **{'total_steps': 6, 'checkpoint_every_steps': 2, **overrides}),
                   cache=compilation_cache, timeout=120)
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
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f'train.py exited early:\n{err.read_text()[-3000:]}'
    assert time.monotonic() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.1)


def test_a_second_trainer_on_a_live_workdir_is_refused(data_dir, tmp_path, compilation_cache):
  workdir = tmp_path / 'run'
  process, _, err = start_training(workdir, data_dir, compilation_cache, tmp_path,
                                   total_steps=100_000, checkpoint_every_steps=2)
  try:
    wait_for(lambda: checkpoints.steps(workdir / 'checkpoints'), process, err, 'checkpoint')
    second = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=3),
                     cache=compilation_cache, timeout=120)
    line = one_error_line(second, 1)
    assert str(workdir) in line and f'pid {process.pid}' in line, line
    assert process.poll() is None  # the first one trains on

    # Readers only read: sampling the live run works.
    sampled = command(SAMPLE_PY, f'--workdir={workdir}', '--resolution=16x16', '--num_samples=2',
                      f'--output={tmp_path / "live.png"}', cache=compilation_cache)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / 'live.png').is_file()
  finally:
    process.kill()  # SIGKILL: the kernel releases the lock
    process.wait()
  newest = checkpoints.recover(workdir)
  resumed = command(TRAIN_PY, f'--workdir={workdir}', *flag_args(data_dir, total_steps=newest + 1),
                    cache=compilation_cache)
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


def test_command_line_config_file_without_get_config(tmp_path, compilation_cache):
  for name in ('no_get_config.py', 'returns_dict.py'):
    text, match = BAD_CONFIG_FILES[name]
    (tmp_path / name).write_text(text)
    result = command(TRAIN_PY, f'--config={tmp_path / name}', f'--workdir={tmp_path / "run"}',
                     '--config.seed=1', cache=compilation_cache, timeout=120)
    assert re.search(match, one_error_line(result, 1))
    assert len(result.stderr.splitlines()) < 5, result.stderr[-2000:]
  assert not (tmp_path / 'run').exists()
