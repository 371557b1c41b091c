"""Trains a DiT from a config; resumes from the newest intact checkpoint in --workdir.

  python train.py                                              # the embedded default
  python train.py --config=configs/animals_grid.py --workdir=runs/grid
  python train.py --config.total_steps=5000 --config.batch_size=128
"""

import json
import os
import pathlib
import pickle
import re
import signal
import sys
import time

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from rpe2d import checkpoints, config as config_lib, data, files, images, sampler, training
from rpe2d.metric_writer import MetricWriter

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string(
    'config', str(_HERE / 'configs' / 'default.py'),
    'Config file (file.py, or file.py:args); override any field with --config.<key>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, logs and samples go here.')
# --config.<key>=<value> and --noconfig.<key>: left to config_lib.load, which names a bad one
# (inside absl's flag parsing an unknown key is a traceback at import time).
_OVERRIDE = re.compile(r'^--?(no)?config\.')
LOGS = ('metrics.jsonl', 'examples.jsonl')


def check_writable(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    for directory in (workdir, workdir / 'checkpoints'):
      if directory.is_dir():
        probe = directory / f'.write_probe_{os.getpid()}'
        probe.write_bytes(b'0')
        probe.unlink()
  except OSError as e:
    raise ValueError(f'workdir {workdir} is not writable ({e.strerror or e}: {e.filename}); '
                     'choose another --workdir') from None


def preflight(config, workdir):
  """Every check that needs no compilation, so bad input fails in seconds; then puts aside
  unfinished and damaged checkpoints (checkpoints.recover). Returns the workdir's saved config
  (None for a new run)."""
  config_lib.validate(config)
  data.parse_config(config.data)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {devices} devices; '
                     f'use a multiple of {devices}')
  if devices % config.mesh.fsdp:
    raise ValueError(f'mesh.fsdp={config.mesh.fsdp} must divide the {devices} devices')
  workdir = pathlib.Path(workdir)
  check_writable(workdir)
  saved_config = checkpoints.check_compatible(workdir, config)
  if config.init_from:
    checkpoints.check_init_from(config.init_from, config)
  data.prepare(config.data)
  checkpoints.recover(workdir)
  return saved_config


class Preemption:
  """Turns SIGTERM (TPU preemption, scheduler kills) into 'save now and exit cleanly'.

  One process: our own SIGTERM handler. Several: JAX's preemption service (started by
  jax.distributed.initialize) catches the signal on any host and agrees on one step for all of
  them, so every host saves the same step; a handler of ours would replace the service's.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync_point = jax.process_count() > 1
    if not self._sync_point:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    elif not jax.config.jax_enable_preemption_service:
      self._sync_point = False
      logging.warning('jax_enable_preemption_service is off: SIGTERM stops this run without a '
                      'checkpoint (one process saving alone would leave the others hanging)')

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop; call it after every step."""
    if self._sync_point:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _logged_step(line) -> float:
  """The step a log line is about; +inf (dropped) for a line cut short by a kill."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return float('inf')


def truncate_logs(workdir: pathlib.Path, step: int) -> None:
  """Drops log lines past `step`: a run killed after its newest checkpoint logged steps it is about
  to train again."""
  if jax.process_index() != 0:
    return
  for name in LOGS:
    path = workdir / name
    if not path.is_file():
      continue
    text = path.read_text()
    kept = ''.join(line + '\n' for line in text.splitlines() if _logged_step(line) <= step)
    if kept != text:
      with files.atomic_path(path) as tmp:
        tmp.write_text(kept)


def check_finite(window, config, saved_step, workdir):
  """(the newest metrics, the number of non-finite steps) of the (step, metrics) since the last
  check; with nonfinite='error' the first non-finite step raises FloatingPointError naming it."""
  bad = [(step, m) for step, m in window if not m['finite']]
  for step, m in bad:
    if config.nonfinite == 'error':
      kept = (f'the newest checkpoint, step {saved_step}, is untouched' if saved_step is not None
              else 'no checkpoint was saved')
      raise FloatingPointError(
          f'step {step}: the loss is {m["loss"]} and the gradient norm {m["grad_norm"]}; stopped '
          f'({kept} in {workdir / "checkpoints"}). --config.nonfinite=skip skips such steps.')
    logging.warning('step %d: the loss is %s and the gradient norm %s; update skipped '
                    '(nonfinite=skip)', step, m['loss'], m['grad_norm'])
  return {k: v for k, v in window[-1][1].items() if k != 'finite'}, len(bad)


def save_sample_grids(trainer, state, step, workdir, class_names):
  config = trainer.config
  num_classes, per_class = config.data.num_classes, config.sampling.num_per_class
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  plan = config_lib.sampling_plan(config)
  for height, width in config.sampling.resolutions:
    generated = sampler.sample_jit(trainer.model, state.ema_params, jax.random.key(config.seed),
                                   labels, height=height, width=width, plan=plan)
    if jax.process_index() == 0:
      path = pathlib.Path(workdir) / 'samples' / f'step_{step:07d}_{height}x{width}.png'
      images.save_grid(path, images.to_uint8(generated), rows=num_classes, row_labels=class_names)


def train(config, workdir) -> training.TrainState:
  """Runs (or resumes) training to config.total_steps and returns the final state."""
  saved_config = preflight(config, workdir)
  workdir = pathlib.Path(workdir)
  mesh = training.make_mesh(config.mesh.fsdp)
  trainer = training.Trainer(config, mesh)
  iterator = data.make_iterator(config.data, split='train', seed=config.seed,
                                global_batch_size=config.batch_size)
  manager = checkpoints.manager(workdir, config)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      trainer.abstract_state, trainer.state_sharding)

  latest = manager.latest_step()
  if latest is not None:
    state = checkpoints.restore(manager, latest, abstract_state, iterator)
    changes = checkpoints.changed_keys(saved_config, config) if saved_config else []
    print(f'Resuming from step {latest} ({workdir / "checkpoints" / str(latest)})'
          + (f'; config changes: {", ".join(changes)}' if changes else ''), flush=True)
  else:
    state = trainer.init_state()
    if config.init_from:
      params, ema_params = checkpoints.restore_weights(config.init_from, abstract_state)
      state = state.replace(params=params, ema_params=ema_params)
      print(f'Starting from the weights in {config.init_from} (fresh optimizer, step 0)',
            flush=True)
  truncate_logs(workdir, int(state.step))
  checkpoints.write_config(workdir, config)

  step = int(state.step)
  if step >= config.total_steps:
    print(f'Nothing to do: step {step} >= total_steps {config.total_steps}', flush=True)
    manager.close()
    return state

  class_names = data.class_names(config.data)
  writer = MetricWriter(workdir)
  examples_log = None
  if config.log_example_indices and jax.process_index() == 0:
    examples_log = open(workdir / 'examples.jsonl', 'a', encoding='utf-8')
  preemption = Preemption()
  peak = training.peak_flops_per_device()
  flops_per_image = trainer.flops_per_image()
  progress = tqdm.tqdm(total=config.total_steps, initial=step, disable=jax.process_index() != 0,
                       dynamic_ncols=True, desc='train')
  window_start, window_steps = time.perf_counter(), 0
  saved_step = latest  # the newest checkpoint (None: none yet)
  unchecked = []  # (step, metrics on the device) not yet checked for NaN/Inf: no per-step sync
  skipped_steps = bad_records = 0  # since the last log line
  try:
    while step < config.total_steps:
      local_batch = next(iterator)
      state, metrics = trainer.step(state, trainer.device_batch(local_batch))
      step += 1
      unchecked.append((step, metrics))
      bad_records += int(local_batch['skipped'].sum())
      if examples_log:
        examples_log.write(json.dumps({'step': step, 'index': local_batch['index'].tolist()}) + '\n')
        examples_log.flush()
      window_steps += 1
      progress.update(1)

      preempted = preemption.reached(step)  # read once: the signal may arrive at any moment
      log_now = step % config.log_every_steps == 0 or step == config.total_steps
      save_now = step % config.checkpoint_every_steps == 0 or step == config.total_steps \
          or preempted
      sample_now = step % config.sample_every_steps == 0 or step == config.total_steps
      if log_now or save_now or sample_now:  # nothing is logged, saved or sampled past a NaN
        metrics, skipped = check_finite(jax.device_get(unchecked), config, saved_step, workdir)
        unchecked, skipped_steps = [], skipped_steps + skipped
      if log_now:
        seconds = time.perf_counter() - window_start
        images_per_second = window_steps * config.batch_size / seconds
        tflops = images_per_second * flops_per_image / 1e12
        scalars = dict(metrics, images_per_second=images_per_second, tflops=tflops,
                       mfu=tflops * 1e12 / (peak * jax.device_count()) if peak else None,
                       skipped_steps=skipped_steps, bad_records=bad_records)
        writer.write(step, scalars)
        progress.set_postfix(loss=f'{metrics["loss"]:.4f}', img_s=f'{images_per_second:.0f}')
        window_start, window_steps = time.perf_counter(), 0
        skipped_steps = bad_records = 0

      if save_now:
        checkpoints.wait(manager, saved_step)  # a failed earlier save is reported as its own
        checkpoints.save(manager, step, state, iterator, config, force=True)
        saved_step = step
      if preempted:
        checkpoints.wait(manager, step)
        print(f'SIGTERM: saved the checkpoint at step {step}; exiting', flush=True)
        break
      if sample_now:
        save_sample_grids(trainer, state, step, workdir, class_names)
  finally:
    progress.close()
    preemption.restore()
    try:
      checkpoints.close(manager, saved_step)  # waits for the save in flight
    finally:
      writer.close()
      if examples_log:
        examples_log.close()
  return state


def parse_flags(argv):
  """absl parses the plain flags; the --config.<key>=<value> overrides pass through to main."""
  plain = [argv[0]] + [a for a in argv[1:] if not _OVERRIDE.match(a)]
  return app.parse_flags_with_usage(plain) + [a for a in argv[1:] if _OVERRIDE.match(a)]


def main(argv):
  extra = [a for a in argv[1:] if not _OVERRIDE.match(a)]
  if extra:
    raise app.UsageError(f'unexpected arguments: {extra}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  try:
    config = config_lib.load(_CONFIG.value, [a for a in argv[1:] if _OVERRIDE.match(a)])
    train(config, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError, checkpoints.CheckpointError,
          pickle.UnpicklingError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
