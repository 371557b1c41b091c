"""Soak test of resuming: SIGKILLs training at random moments and checks it still ends exactly.

  python benchmarks/soak_kill.py --kills=20                  # one process, 8 CPU devices
  python benchmarks/soak_kill.py --kills=20 --processes=2    # two processes x 4 CPU devices

A tiny run (micro/4, 16x16 synthetic animal_mnist, batch 8) is trained once uninterrupted, then
again while being killed: half of the kills at a uniformly random moment of a launch, half just as
a checkpoint save starts writing (a `<step>.orbax-checkpoint-tmp` directory appears, after one
save of that launch has committed, so every launch makes progress). With several processes one
random process is killed first, then the others (a scheduler restarting the job). After every
kill the run is launched again; when a launch finishes, the final checkpoint's params, EMA params,
optimizer state and step must equal the uninterrupted run's bit for bit, and examples.jsonl too.
A launch that finishes before its kill starts a new round in a fresh workdir until --kills kills
happened. Not a CI test: minutes on a loaded CPU.
"""

import argparse
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rpe2d import config as config_lib, training  # noqa: E402
from rpe2d.datasets import animal_mnist  # noqa: E402

TMP_MARK = '.orbax-checkpoint-tmp'
OVERRIDES = {
    'model.variant': 'micro/4', 'positions.train': 'rpe2d', 'positions.max_grid': (8, 8),
    'data.augment': 'rpe2d_crop', 'model.micro_conditioning': True, 'sampling.cfg_scale': 1.0,
    'data.image_size': 16, 'batch_size': 8, 'log_every_steps': 1, 'sample_every_steps': 100000,
    'keep_checkpoints': 3, 'sampling.steps': 2, 'sampling.resolutions': ((16, 16),),
    'sampling.num_per_class': 1, 'optim.warmup_steps': 0, 'data.read_threads': 2,
    'data.prefetch_batches': 2, 'log_example_indices': True,
}


def synthetic_animals(root: pathlib.Path) -> str:
  """animal_mnist prepared from a synthetic wheel (180 train records), no network."""
  if (root / 'animal_mnist').is_dir():
    return str(root)
  return animal_mnist.prepare_synthetic(root)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class Launcher:
  def __init__(self, args, data_dir, cache_dir):
    self.args, self.data_dir, self.cache_dir = args, data_dir, cache_dir

  def start(self, workdir) -> list[subprocess.Popen]:
    n = self.args.processes
    values = dict(OVERRIDES, **{'data.data_dir': self.data_dir, 'total_steps': self.args.steps,
                                'checkpoint_every_steps': self.args.checkpoint_every})
    flags = [f'--config.{k}={v}' for k, v in values.items()]
    if n > 1:
      port = free_port()
      flags += [f'--coordinator_address=localhost:{port}', f'--num_processes={n}']
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // n}',
               JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
               JAX_COMPILATION_CACHE_DIR=self.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', PYTHONPATH=str(REPO))
    procs = []
    for i in range(n):
      log = open(f'{workdir}.{i}.log', 'a')
      procs.append(subprocess.Popen(
          [sys.executable, str(REPO / 'train.py'), f'--workdir={workdir}', *flags]
          + ([f'--process_id={i}'] if n > 1 else []), env=env, stdout=log,
          stderr=subprocess.STDOUT))
    return procs


def finished(procs) -> bool:
  return all(p.poll() is not None for p in procs)


def check_exits(procs, workdir):
  for i, p in enumerate(procs):
    if p.wait() != 0:
      raise SystemExit(f'process {i} failed (exit {p.returncode}); see {workdir}.{i}.log')


def writing(checkpoints: pathlib.Path) -> bool:
  return checkpoints.is_dir() and any(TMP_MARK in p.name for p in checkpoints.iterdir())


def committed(checkpoints: pathlib.Path) -> set[int]:
  if not checkpoints.is_dir():
    return set()
  return {int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()}


def wait_for_kill_moment(procs, checkpoints, mode, delay, timeout):
  """Returns True at the kill moment, False if the launch finished first."""
  start, before = time.monotonic(), committed(checkpoints)
  while time.monotonic() - start < timeout:
    if finished(procs):
      return False
    if mode == 'random' and time.monotonic() - start >= delay:
      return True
    if mode == 'write' and committed(checkpoints) - before and writing(checkpoints):
      return True
    time.sleep(0.002)
  raise SystemExit(f'no kill moment within {timeout} s')


def kill_all(procs, rng):
  order = list(range(len(procs)))
  rng.shuffle(order)  # one random process first, as a host failure would
  for i in order:
    procs[i].send_signal(signal.SIGKILL)
    procs[i].wait()


def final_state(workdir, step, abstract):
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  return jax.device_get(ocp.StandardCheckpointer().restore(path, abstract))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--processes', type=int, default=1, choices=(1, 2))
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--checkpoint_every', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dir', default=None, help='work directory (default: a new tmp dir)')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix='soak_kill_'))
  data_dir = synthetic_animals(root / 'tfds')
  launcher = Launcher(args, data_dir, str(root / 'jax_cache'))

  reference = root / 'reference'
  shutil.rmtree(reference, ignore_errors=True)
  t = time.monotonic()
  check_exits(launcher.start(reference), reference)
  duration = time.monotonic() - t
  print(f'uninterrupted run: {duration:.0f} s', flush=True)

  config = config_lib.base()
  config.update_from_flattened_dict(dict(OVERRIDES, **{'data.data_dir': data_dir}))
  built = config_lib.validate(config)
  abstract = training.Trainer(built.model, built.training,
                              training.make_mesh(1)).abstract_sharded_state()
  want = final_state(reference, args.steps, abstract)
  want_log = (reference / 'examples.jsonl').read_text()

  kills = in_write = rounds = launches = 0
  while kills < args.kills:
    rounds += 1
    workdir = root / f'round_{rounds}'
    shutil.rmtree(workdir, ignore_errors=True)
    while True:
      procs = launcher.start(workdir)
      launches += 1
      mode = 'write' if rng.random() < 0.5 else 'random'
      if kills >= args.kills or not wait_for_kill_moment(
          procs, workdir / 'checkpoints', mode, rng.uniform(0, duration), 3 * duration + 300):
        check_exits(procs, workdir)
        break
      hit = writing(workdir / 'checkpoints')
      kill_all(procs, rng)
      kills += 1
      in_write += hit
      print(f'kill {kills}: {mode}, during a checkpoint write: {hit}, checkpoints '
            f'{sorted(committed(workdir / "checkpoints"))}', flush=True)
    got = final_state(workdir, args.steps, abstract)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    same_log = (workdir / 'examples.jsonl').read_text() == want_log
    print(f'round {rounds}: step {int(got.step)}, all leaves identical: {same}, examples.jsonl '
          f'identical: {same_log}', flush=True)
    if not (same and same_log and int(got.step) == args.steps):
      raise SystemExit('FAILED: the killed run differs from the uninterrupted one')
  print(f'OK: {kills} SIGKILLs ({in_write} during checkpoint writes), {launches} launches, '
        f'{rounds} round(s), processes={args.processes}; every round ended bit-identical')


if __name__ == '__main__':
  main()
