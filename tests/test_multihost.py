"""Multi-host training with real processes on localhost: 2 processes x 4 CPU devices against
1 process x 8, a SIGKILL of one process, and checkpoints resumed on another process count.

Every run is train.py in subprocesses joined by jax's distributed runtime (gloo collectives on
CPU). The reference is one process with the runtime started (--num_processes=1): its all-reduce is
gloo's over 8 ranks, as in the 2 x 4 run, so they agree bit for bit. A plain one-process run sums
in XLA's in-process all-reduce, another order: its parameters differ from these by float32 rounding
(about 3e-8 after 6 steps of the tiny run), which is why it is not the reference here.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import orbax.checkpoint as ocp
import pytest

from conftest import (TRAIN_PY, flag_args, read_jsonl, step_dirs, subprocess_env, tiny_config)
from rpe2d import checkpoints, config as config_lib, distributed, training

pytestmark = pytest.mark.usefixtures('eight_devices')

TOTAL_STEPS = 6
EVERY = 2  # checkpoints at 2, 4, 6
TIMEOUT = 240  # seconds for one launch on a loaded machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, processes: int, cache_dir, data_dir) -> list[subprocess.Popen]:
  """train.py as `processes` processes of one distributed run on 8 CPU devices in all."""
  port = free_port()
  args = flag_args(data_dir, total_steps=TOTAL_STEPS, checkpoint_every_steps=EVERY,
                   log_example_indices=True)
  procs = []
  for i in range(processes):
    env = subprocess_env(cache_dir)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={8 // processes}'
    log = open(pathlib.Path(f'{workdir}.{i}.log'), 'w')
    procs.append(subprocess.Popen(
        [sys.executable, str(TRAIN_PY), f'--workdir={workdir}', *args,
         f'--coordinator_address=localhost:{port}', f'--num_processes={processes}',
         f'--process_id={i}'], env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def finish(procs, workdir) -> list[str]:
  """Waits for every process; asserts they succeeded; returns their outputs."""
  for p in procs:
    try:
      p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  outputs = [pathlib.Path(f'{workdir}.{i}.log').read_text() for i in range(len(procs))]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def train(workdir, processes, cache_dir, data_dir) -> list[str]:
  return finish(launch(workdir, processes, cache_dir, data_dir), workdir)


@pytest.fixture(scope='module')
def abstract_state(data_dir):
  """The TrainState's shapes with 8-device shardings, to read any run's checkpoints here."""
  config = tiny_config(data_dir)
  built = config_lib.validate(config)
  trainer = training.Trainer(built.model, built.training, training.make_mesh(1))
  return trainer.abstract_sharded_state()


def saved_state(workdir, step, abstract_state):
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  return jax.device_get(ocp.StandardCheckpointer().restore(path, abstract_state))


def assert_same_run(workdir, reference, abstract_state):
  """Bit-identical params, EMA, optimizer state and step; the same examples at every step."""
  got = saved_state(workdir, TOTAL_STEPS, abstract_state)
  want = saved_state(reference, TOTAL_STEPS, abstract_state)
  assert int(got.step) == int(want.step) == TOTAL_STEPS
  chex.assert_trees_all_equal(got, want)
  log, ref_log = read_jsonl(workdir / 'examples.jsonl'), read_jsonl(reference / 'examples.jsonl')
  assert [r['step'] for r in log] == list(range(1, TOTAL_STEPS + 1))
  assert log == ref_log


@pytest.fixture(scope='module')
def reference(tmp_path_factory, jax_cache_dir, data_dir):
  """One process x 8 devices with the distributed runtime: 6 steps, checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp('mh') / 'reference'
  out = train(workdir, 1, jax_cache_dir, data_dir)
  assert 'distributed: process 0 of 1, 8 local of 8 devices (cpu)' in out[0]
  assert step_dirs(workdir) == [2, 4, 6]
  return workdir


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, jax_cache_dir, data_dir):
  workdir = tmp_path_factory.mktemp('mh') / 'two'
  return workdir, train(workdir, 2, jax_cache_dir, data_dir)


def test_two_processes_train_exactly_like_one(two_process_run, reference, abstract_state):
  workdir, outputs = two_process_run
  assert 'distributed: process 0 of 2, 4 local of 8 devices (cpu)' in outputs[0]
  assert 'local of 8 devices' not in outputs[1]  # process 0 prints the summary
  # Start-up says what each process waits for (issue 24, class 7).
  assert 'distributed: process 0 of 2: waiting for process 1 at port' in outputs[0]
  assert 'distributed: process 1 of 2: waiting for the coordinator, process 0, at' in outputs[1]
  assert step_dirs(workdir) == [2, 4, 6]
  # Each process saved its data state, and they are the same one (the global step).
  data_dir = workdir / 'checkpoints' / '6' / 'data'
  states = [json.loads((data_dir / f'process_{i}-of-2.json').read_text()) for i in range(2)]
  assert states[0] == states[1]
  # One process wrote the manifest, over both processes' files.
  manifest = json.loads((workdir / 'checkpoints' / '6' / checkpoints.MANIFEST).read_text())
  assert {'data/process_0-of-2.json', 'data/process_1-of-2.json'} <= set(manifest['files'])
  assert checkpoints.damage(workdir / 'checkpoints' / '6') is None
  # Logs come from process 0 only, with the whole global batch.
  assert [len(r['index']) for r in read_jsonl(workdir / 'examples.jsonl')] == [8] * TOTAL_STEPS
  assert [r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')] == list(range(1, 7))
  assert_same_run(workdir, reference, abstract_state)


def _resume_copy(source, target, keep_step):
  """A copy of a run stopped at checkpoint `keep_step` (later checkpoints removed)."""
  shutil.copytree(source, target)
  for step in step_dirs(target):
    if step > keep_step:
      shutil.rmtree(target / 'checkpoints' / str(step))


def _resumed_steps(output) -> list[int]:
  return [int(s) for s in re.findall(r'Resuming from step (\d+)', output)]


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, reference,
                                                         abstract_state, tmp_path, jax_cache_dir,
                                                         data_dir):
  workdir = tmp_path / 'two_to_one'
  _resume_copy(two_process_run[0], workdir, 2)
  outputs = train(workdir, 1, jax_cache_dir, data_dir)
  assert _resumed_steps(outputs[0]) == [2]
  assert_same_run(workdir, reference, abstract_state)


def test_one_process_checkpoint_in_two_then_sigkill_of_one_then_restart(
    tmp_path, reference, abstract_state, jax_cache_dir, data_dir):
  """Elastic resume 1 -> 2 processes, and a SIGKILL of one process while step 4 is being saved:
  both restarted, the run ends bit-identical to the uninterrupted one (one launch does both, to
  keep this file's time down)."""
  workdir = tmp_path / 'killed'
  _resume_copy(reference, workdir, 2)
  procs = launch(workdir, 2, jax_cache_dir, data_dir)
  checkpoint_dir = workdir / 'checkpoints'
  deadline = time.monotonic() + TIMEOUT
  # Kill process 1 as the save of step 4 starts writing (or, on a slow tick, soon after).
  while not any(p.name.startswith('4') for p in checkpoint_dir.iterdir()):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
        pathlib.Path(f'{workdir}.0.log').read_text()[-3000:]
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  # The survivor would wait for its peer until the runtime's heartbeat timeout; a scheduler
  # restarting the job kills it.
  procs[0].send_signal(signal.SIGKILL)
  procs[0].wait()
  first = pathlib.Path(f'{workdir}.0.log').read_text()
  assert _resumed_steps(first) == [2], first[-2000:]  # the one-process checkpoint, in two
  assert TOTAL_STEPS not in step_dirs(workdir), 'the run finished before the kill'

  outputs = train(workdir, 2, jax_cache_dir, data_dir)
  assert _resumed_steps(outputs[0]) in ([2], [4]), outputs[0][-2000:]
  assert_same_run(workdir, reference, abstract_state)


def test_data_states_that_differ_per_process_are_refused(tmp_path):
  # What a pipeline that shards records per process would save: per-process positions.
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  for i, index in enumerate((3, 5)):
    (data_dir / f'process_{i}-of-2.json').write_text(json.dumps({'next_index': index}))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'written by 2 processes whose data iterators are at different '
                           r'positions.*resume it with 2 processes'):
    checkpoints._shared_data_state(data_dir)  # pylint: disable=protected-access
  (data_dir / 'process_1-of-2.json').unlink()
  with pytest.raises(checkpoints.CheckpointError, match=r'process_1-of-2.json is missing'):
    checkpoints._shared_data_state(data_dir)  # pylint: disable=protected-access


@pytest.mark.parametrize('kwargs, message', [
    ({'coordinator_address': 'localhost'}, r"--coordinator_address='localhost' must be host:port"),
    ({'coordinator_address': 'h:1', 'num_processes': 0}, r'--num_processes=0 must be >= 1'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2},
     r'--process_id=2 must lie in \[0, --num_processes=2\)'),
    ({'num_processes': 2, 'process_id': 0}, r'need --coordinator_address=host:port'),
])
def test_bad_distributed_flags_are_refused_before_connecting(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_no_flags_stays_one_process():
  assert distributed.initialize() is False
  assert jax.process_count() == 1
