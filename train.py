"""Trains a DiT from a config; resumes from the newest checkpoint in --workdir.

  python train.py                                              # the embedded default
  python train.py --config=configs/animals_grid.py --workdir=runs/grid
  python train.py --config.total_steps=5000 --config.batch_size=128
"""

import json
import pathlib
import signal
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np
import tqdm
from ml_collections import config_flags

from rpe2d import checkpoints, config as config_lib, data, images, sampler, training
from rpe2d.metric_writer import MetricWriter

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
    'config', str(_HERE / 'configs' / 'default.py'), 'Training config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, logs and samples go here.')


def preflight(config, workdir):
  """Every check that needs no compilation, so bad input fails in seconds."""
  config_lib.validate(config)
  data.parse_config(config.data)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {devices} devices; '
                     f'use a multiple of {devices}')
  if devices % config.mesh.fsdp:
    raise ValueError(f'mesh.fsdp={config.mesh.fsdp} must divide the {devices} devices')
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.check_compatible(workdir, config)
  if config.init_from:
    checkpoints.check_init_from(config.init_from, config)
  data.prepare(config.data)


class Preemption:
  """Turns SIGTERM (TPU preemption, scheduler kills) into 'save now and exit cleanly'."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


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
  preflight(config, workdir)
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
    logging.info('Resuming from the checkpoint at step %d in %s', latest, workdir)
    print(f'Resuming from step {latest} ({workdir / "checkpoints" / str(latest)})', flush=True)
  else:
    state = trainer.init_state()
    if config.init_from:
      params, ema_params = checkpoints.restore_weights(config.init_from, abstract_state)
      state = state.replace(params=params, ema_params=ema_params)
      print(f'Starting from the weights in {config.init_from} (fresh optimizer, step 0)',
            flush=True)
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
  try:
    while step < config.total_steps:
      local_batch = next(iterator)
      state, metrics = trainer.step(state, trainer.device_batch(local_batch))
      step += 1
      if examples_log:
        examples_log.write(json.dumps({'step': step, 'index': local_batch['index'].tolist()}) + '\n')
        examples_log.flush()
      window_steps += 1
      progress.update(1)

      preempted = preemption.requested  # read once: the signal may arrive at any moment
      log_now = step % config.log_every_steps == 0 or step == config.total_steps
      save_now = step % config.checkpoint_every_steps == 0 or step == config.total_steps \
          or preempted
      if log_now or save_now:  # never log or save a step whose loss is not finite
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics['loss']):
          raise FloatingPointError(f'loss is {metrics["loss"]} at step {step}; the last '
                                   f'checkpoint in {workdir / "checkpoints"} is untouched')
      if log_now:
        seconds = time.perf_counter() - window_start
        images_per_second = window_steps * config.batch_size / seconds
        tflops = images_per_second * flops_per_image / 1e12
        scalars = dict(metrics, images_per_second=images_per_second, tflops=tflops,
                       mfu=tflops * 1e12 / (peak * jax.device_count()) if peak else None)
        writer.write(step, scalars)
        progress.set_postfix(loss=f'{metrics["loss"]:.4f}', img_s=f'{images_per_second:.0f}')
        window_start, window_steps = time.perf_counter(), 0

      if save_now:
        checkpoints.save(manager, step, state, iterator, config, force=True)
      if preempted:
        manager.wait_until_finished()
        print(f'SIGTERM: saved the checkpoint at step {step}; exiting', flush=True)
        break
      if step % config.sample_every_steps == 0 or step == config.total_steps:
        save_sample_grids(trainer, state, step, workdir, class_names)
  finally:
    progress.close()
    preemption.restore()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if examples_log:
      examples_log.close()
  return state


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
