"""The training loop: preflight, resume, steps, logs, checkpoints, sample grids, preemption.

`train(config, workdir)` is what train.py runs, and what a notebook or a test calls: it trains (or
resumes) to config.total_steps and returns the final state. Bad input fails in `preflight`, before
anything compiles: the sample grids the run will draw are checked there too (position rule and
range, memory). A step's loss and gradient are checked for NaN/Inf on the host only at log, save
and sample steps (no per-step sync), and a non-finite step is never applied.

A side task that fails (the metrics, the examples log, TensorBoard, the sample grids) stops the
run only after the current step is saved: nothing trained is lost, and the error names the
checkpoint. With several processes they agree on it at the log and sample steps.
"""

import collections
import json
import math
import os
import signal
import socket
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from rpe2d import checkpoints, cli, config as config_lib, data, files, images, inference
from rpe2d import model as model_lib, rundir, sampler, training
from rpe2d.metric_writer import MetricWriter


def preflight(config, run: rundir.RunDir):
  """Every check that needs no compilation, so bad input fails in seconds; then puts aside
  unfinished and damaged checkpoints (checkpoints.recover). Returns the typed objects of the
  config, the workdir's saved config (None for a new run), init_from's step directory, a latent
  run's VAE and the mesh (mesh.fsdp=0 resolved from the devices' memory)."""
  built = config_lib.validate(config)
  if config.model.prediction != 'velocity':
    raise ValueError(f'model.prediction={config.model.prediction!r}: training fits velocity models '
                     "(flow matching); an imported DiT ('ddpm_epsilon') samples, but does not "
                     'train here')
  checkpoints.check_retention(config)
  normalise_resolutions(config)
  vae = record_latents(config) if inference.is_latent(config) else None
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {devices} devices; '
                     f'use a multiple of {devices}')
  mesh = training.make_mesh(training.resolve_fsdp(config.mesh.fsdp, built.model, built.training,
                                                  jax.devices()))
  check_sample_grids(config, built, vae)
  run.check_layout(written_names(config))
  run.check_not_nested()
  created = run.check_writable()
  newest = checkpoints.steps(run.checkpoints)
  newest = run.checkpoints / str(newest[-1]) if newest else None
  # An intact checkpoint without the data order: weights only, which convert.py writes.
  if newest and not checkpoints.holds_training_state(newest) and not checkpoints.damage(newest):
    raise ValueError(f'workdir {run.root} holds weights only (an import by convert.py): there is '
                     'no training to resume; fine-tune from it into a new workdir with '
                     f'--config.init_from={run.root}')
  try:
    saved_config = rundir.check_compatible(run, config)
    init_dir = checkpoints.check_init_from(config.init_from, config) if config.init_from else None
    run.lock()  # after the read-only checks, before anything in the workdir changes
    run.set_aside_config()
    _prepare_data_once(config.data)
  except BaseException:
    run.discard(created)  # a refused run leaves no empty workdir behind
    raise
  checkpoints.recover(run.root)
  checkpoints.prune(run.root, config)  # a resume may keep fewer than the run kept so far
  return built, saved_config, init_dir, vae, mesh


def normalise_resolutions(config) -> None:
  """Drops repeated sizes from sampling.resolutions (each grid is drawn once), with a note."""
  sizes = [tuple(int(v) for v in size) for size in config.sampling.resolutions]
  distinct = tuple(dict.fromkeys(sizes))
  if len(distinct) != len(sizes) and jax.process_index() == 0:
    print(f'note: sampling.resolutions lists {", ".join(f"{h}x{w}" for h, w in sizes)}; each size '
          f'is drawn once: {", ".join(f"{h}x{w}" for h, w in distinct)}', flush=True)
  if len(distinct) != len(sizes):
    config.sampling.resolutions = distinct


def check_sample_grids(config, built, vae) -> None:
  """Every sample grid the run will draw (sampling.resolutions, with the run's own sampling plan)
  can be drawn: its position rule fits its tokens (e.g. 'random' positions need the tokens inside
  the trained range), and its images and attention fit in memory. A grid that could not be drawn
  would otherwise stop the run at the first sample step."""
  factor = 1 if vae is None else vae.config.downsampling
  channels = 3 if vae is not None else config.data.channels
  count = built.model.num_classes * config.sampling.num_per_class
  available = cli.available_memory()
  for i, (height, width) in enumerate(config.sampling.resolutions):
    what = f'sampling.resolutions[{i}]={height}x{width}'
    try:
      sampler.check_resolution(built.model, built.sampling, height // factor, width // factor)
      inference.check_memory(
          built.model, height, width, num_samples=count, batch_size=count, channels=channels,
          factor=factor, available=available,
          flags={'num_samples': '--config.sampling.num_per_class',
                 'batch_size': '--config.sampling.num_per_class',
                 'attention': '--config.model.attention_implementation'})
    except ValueError as e:
      raise ValueError(f'{what}: the sample grid drawn there during training cannot be drawn: {e}'
                       '; change --config.sampling.resolutions (or what the message names)'
                       ) from None


def written_names(config) -> list[str]:
  """The longest names (relative to the workdir) of the files a run writes, temporary ones
  included, so that a workdir too long for them is refused before any work."""
  step, processes = config.total_steps, jax.process_count()
  zeros = '0' * 20
  names = [
      f'checkpoints/{step}.orbax-checkpoint-tmp-{zeros}/state/ocdbt.process_{processes - 1}/d/'
      f'{"0" * 32}.{zeros}',
      f'checkpoints/{step}.orbax-checkpoint-tmp-{zeros}/data/process_{processes - 1}-of-'
      f'{processes}.json',
      f'damaged_checkpoints/{step}.{zeros}', f'readers/{step}.lock',
      f'tensorboard/events.out.tfevents.{zeros}.{socket.gethostname()}.{zeros}',
      'metrics.jsonl.damaged', 'examples.jsonl.damaged', 'config.json.tmp.json', 'train.log',
  ]
  names += [f'samples/step_{step:07d}_{h}x{w}.png.tmp.png' for h, w in config.sampling.resolutions]
  return names


def _prepare_data_once(data_config):
  """data.prepare on process 0 first: several processes building one TFDS data set in a shared
  directory would race; the others then find it prepared."""
  if jax.process_index() == 0:
    data.prepare(data_config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('rpe2d.train_loop.prepare')
    if jax.process_index() != 0:
      data.prepare(data_config)


def _global_rows(local):
  """A process-local array -> the rows of every process, in global batch order."""
  if jax.process_count() == 1:
    return np.asarray(local)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def _global_sum(local: int) -> int:
  if jax.process_count() == 1:
    return int(local)
  return int(np.sum(multihost_utils.process_allgather(np.int64(local))))


class Interrupted(InterruptedError):
  """Training stopped by SIGINT (Ctrl-C) after saving; the message names the checkpoint."""


class TrainingFailed(checkpoints.CheckpointError):
  """A failure after training started (memory, disk, the device); the message names what failed
  and the checkpoint that is kept (train.py prints it as one error line)."""


class SideTaskFailed(TrainingFailed):
  """A side task (metrics, examples log, TensorBoard, sample grids) failed; the current step was
  saved first, and the message names that checkpoint."""


def side_task(what: str, fn, *args):
  """Runs a side task of the loop; (what, the error) if it failed, else None. The loop saves the
  current step before it stops for a failed one (it never loses a trained step to it)."""
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except  # whatever it was, the step is saved
    return what, e
  return None


def _write_line(log, record: dict) -> None:
  log.write(json.dumps(record) + '\n')
  log.flush()


def _failed_anywhere(side_failure) -> int | None:
  """The first process whose side task failed (this one: side_failure), or None; with several
  processes a collective, so every process decides the same."""
  if jax.process_count() == 1:
    return None if side_failure is None else 0
  flags = np.asarray(multihost_utils.process_allgather(np.int32(side_failure is not None)))
  failed = np.flatnonzero(flags)
  return int(failed[0]) if failed.size else None


def side_failure_message(side_failure, process: int, step: int, run: rundir.RunDir,
                         config) -> str:
  if side_failure is not None:
    what, error = side_failure
    failed = f'{what} failed ({cli.reason(error)})'
  else:
    failed = f'a side task failed on process {process} (its error says which)'
  then = ('training is complete: draw the grids with python sample.py --workdir=' + str(run.root)
          if step == config.total_steps else 'fix the cause and run the same command to resume')
  return (f'step {step}: {failed}; the step was saved first: the newest checkpoint, step {step}, '
          f'is in {run.checkpoints}: {then}')


class Preemption:
  """Turns SIGTERM (TPU preemption, scheduler kills) and SIGINT (Ctrl-C) into 'save now and exit
  cleanly'.

  One process: our own handlers for both. Before the first step has run (preflight, restoring,
  the first compile) there is nothing to save, and the signal ends the process at once: a
  watchdog thread learns of it through `signal.set_wakeup_fd`, which the C-level handler writes
  even while the main thread is inside a long XLA compile (Python handlers only run between
  bytecodes of the main thread). What a kill leaves in the workdir is undone by the next run, so
  this is as safe as SIGKILL. After that, the loop saves at the current step. A second signal
  exits at once (an unfinished save is removed by the next run). SIGTERM exits 0, SIGINT 1.

  Several processes: JAX's preemption service (started by jax.distributed.initialize) catches
  SIGTERM on any host and agrees on one step for all of them, so every host saves the same step;
  a handler of ours would replace the service's, and SIGINT keeps Python's default.
  """

  SIGNALS = {signal.SIGTERM: ('SIGTERM', 0), signal.SIGINT: ('SIGINT', 1)}

  def __init__(self):
    self.requested = None  # the name of the signal asking to stop
    self.started = False  # set after the first step: from then on there is something to save
    self._previous, self._wakeup = {}, None
    self._sync_point = jax.process_count() > 1
    if not self._sync_point:
      if threading.current_thread() is threading.main_thread():
        for signum in self.SIGNALS:
          self._previous[signum] = signal.signal(signum, self._handle)
        self._watch()
      else:
        logging.warning('train() runs outside the main thread: SIGTERM and SIGINT keep their '
                        'handlers (no checkpoint on a signal)')
    elif not jax.config.jax_enable_preemption_service:
      self._sync_point = False
      logging.warning('jax_enable_preemption_service is off: SIGTERM stops this run without a '
                      'checkpoint (one process saving alone would leave the others hanging)')

  def _handle(self, signum, frame):
    del frame
    self.requested = self.requested or self.SIGNALS[signum][0]

  def _watch(self):
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
    threading.Thread(target=self._watchdog, args=(read,), daemon=True,
                     name='rpe2d-signals').start()

  def _watchdog(self, read):
    try:
      self._watch_signals(read)
    finally:
      os.close(read)

  def _watch_signals(self, read):
    seen = 0
    while True:
      try:
        received = os.read(read, 64)
      except OSError:
        return
      if not received:  # restore() closed the pipe
        return
      for signum in received:
        if signum not in self.SIGNALS:
          continue
        name, status = self.SIGNALS[signum]
        seen += 1
        self.requested = self.requested or name
        if not self.started or seen > 1:
          why = ('before the first step: nothing to save' if not self.started and seen == 1 else
                 'again: exiting without waiting for the save (the next run removes an '
                 'unfinished one)')
          # On a line of its own: the progress bar may be half drawn on stderr.
          print(('\nerror: ' if status else '\n') + f'{name} {why}',
                file=sys.stderr if status else sys.stdout, flush=True)
          os._exit(status)  # pylint: disable=protected-access

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop; call it after every step."""
    if self._sync_point:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested is not None

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self._wakeup is not None:
      write, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      os.close(write)  # the watchdog reads end-of-file, closes its end and returns
      self._wakeup = None


def check_finite(window, policy: str, saved_step, run: rundir.RunDir):
  """(the newest metrics, the number of non-finite steps) of the (step, metrics) since the last
  check; with nonfinite='error' the first non-finite step raises FloatingPointError naming it."""
  bad = [(step, m) for step, m in window if not m['finite']]
  for step, m in bad:
    what = f'the loss is {m["loss"]} and the gradient norm {m["grad_norm"]}'
    if not m['update_finite']:
      what += '; the update would make the parameters non-finite'
    if policy == 'error':
      kept = (f'the newest checkpoint, step {saved_step}, is untouched' if saved_step is not None
              else 'no checkpoint was saved')
      raise FloatingPointError(
          f'step {step}: {what}; stopped ({kept} in {run.checkpoints}). '
          '--config.nonfinite=skip skips such steps.')
    logging.warning('step %d: %s; update skipped (nonfinite=skip)', step, what)
  return {k: v for k, v in window[-1][1].items() if k not in ('finite', 'update_finite')}, len(bad)


def record_latents(config):
  """A latent run's facts from its extraction, recorded in the config (sampling needs them after
  the latents are gone): the VAE's path and sha256 (and its statistics file's), the source images,
  the per-channel normalisation the model sees (data.latent_mean, data.latent_std).
  Returns the VAE, checked by sha256, which decodes the sample grids."""
  d = config.data
  opts = data.parse_config(d)
  manifest = data.latent_manifest(opts)
  d.vae_path = d.vae_path or manifest.vae['path']
  d.vae_sha256 = manifest.vae['sha256']
  statistics = manifest.vae.get('statistics')
  if statistics is not None:
    d.vae_statistics, d.vae_statistics_sha256 = statistics['path'], statistics['sha256']
  d.source_name = manifest.source['name']
  d.source_image_size = int(manifest.source['image_size'])
  d.image_dir = manifest.source['image_dir']
  vae = inference.load_vae(config)
  factors = (vae.config.scaling_factor, vae.config.shift_factor)
  if factors != (manifest.vae['scaling_factor'], manifest.vae['shift_factor']):
    raise ValueError(f'the VAE {d.vae_path} has (scaling_factor, shift_factor) = {factors}; the '
                     f"extraction {d.latent_dir} was made with "
                     f"{(manifest.vae['scaling_factor'], manifest.vae['shift_factor'])}")
  scale, shift = data.manifest_scale_shift(opts, manifest)
  d.latent_mean, d.latent_std = tuple(map(float, shift)), tuple(float(1 / v) for v in scale)
  patch = model_lib.parse_variant(config.model.variant)[3]
  for i, (height, width) in enumerate(config.sampling.resolutions):
    inference.check_size(height, width, patch, vae.config.downsampling,
                         f'sampling.resolutions[{i}]')
  return vae


def save_sample_grids(config, model, plan, ema_params, step, run: rundir.RunDir, class_names,
                      vae=None, writer=None, mesh=None):
  """EMA samples at sampling.resolutions (pixels; a latent run samples latents and decodes them
  with its VAE), as PNG grids and, given a MetricWriter, as TensorBoard images. `mesh`: the
  training mesh the EMA weights live on (default: all devices, data-parallel)."""
  num_classes, per_class = model.num_classes, config.sampling.num_per_class
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  factor = 1 if vae is None else vae.config.downsampling
  decoder = None if vae is None else inference.Run(config=config, model=model, params=None,
                                                   step=step, checkpoint=None, vae=vae)
  mesh = training.make_mesh(1) if mesh is None else mesh
  for height, width in config.sampling.resolutions:
    with jax.set_mesh(mesh):  # the attention kernels' platform and shard_map axes
      generated = sampler.sample_jit(model, ema_params, training.seed_key(config.seed), labels,
                                     height=height // factor, width=width // factor, plan=plan)
    if jax.process_index() == 0:
      if decoder is not None:
        generated = inference.decode(decoder, jax.device_get(generated), devices=jax.devices()[:1])
      picture = images.grid(images.to_uint8(generated), rows=num_classes, row_labels=class_names)
      with files.atomic_path(run.sample_grid(step, height, width)) as tmp:
        picture.save(tmp, format='PNG')
      if writer is not None:
        writer.write_image(f'samples/{height}x{width}', step, np.asarray(picture))


class StepProgress:
  """A progress bar over the steps the device has finished, not the ones dispatched.

  JAX dispatches a step and returns at once, so a bar advanced at dispatch races ahead of the
  device and then stalls wherever the host waits (the log steps), with a meaningless ETA. Here each
  dispatched step's loss is queued; steps whose loss `is_ready()` advance the bar, and when more
  than `in_flight` steps are queued the host blocks on the oldest. Blocking on the step dispatched
  `in_flight` steps ago (not the newest) leaves that many steps queued on the device, so it never
  idles while the host prepares the next batch, and the bar is at most `in_flight` steps behind
  the device. The NaN/Inf check still reads the values only at log, save and sample steps.
  """

  def __init__(self, bar, in_flight: int = 2):
    self.bar, self.in_flight = bar, in_flight
    self.pending = collections.deque()  # (step, a device array of that step), oldest first

  def dispatched(self, step: int, marker: jax.Array) -> None:
    self.pending.append((step, marker))
    while self.pending and (len(self.pending) > self.in_flight or self.pending[0][1].is_ready()):
      self._complete(self.pending.popleft())

  def finish(self) -> None:
    """Waits for every queued step (the values are needed anyway: a log, save or the end)."""
    while self.pending:
      self._complete(self.pending.popleft())

  def _complete(self, entry) -> None:
    step, marker = entry
    marker.block_until_ready()
    self.bar.update(step - self.bar.n)


def describe(config, built, trainer, run: rundir.RunDir, step: int) -> str:
  """The block printed before training: what is trained, on what, where, for how long."""
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(
      trainer.abstract_sharded_state().params))
  model = built.model
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  d = config.data
  size = f'{d.image_size}x{d.image_size}x{d.channels}'
  grid = 'x'.join(map(str, model.train_grid))
  lines = [
      f'model     {config.model.variant} DiT, {params / 1e6:.2f} M parameters, positions '
      f'{config.positions.train} ({grid} tokens, range {"x".join(map(str, model.position_range))})',
      f'data      {d.name}{" (" + d.latent_dir + ")" if d.name == "latents" else ""}, {size}, '
      f'{d.num_classes} classes, in {d.data_dir or "~/tensorflow_datasets"}',
      f'devices   {len(devices)} x {", ".join(kinds)} ({jax.default_backend()}'
      + (f', {jax.process_count()} processes' if jax.process_count() > 1 else '')
      + f'; mesh data x fsdp = {trainer.mesh.shape["data"]} x {trainer.mesh.shape["fsdp"]}'
      + (' (fsdp auto)' if not config.mesh.fsdp else '') + ')',
      f'workdir   {run.root}',
      f'training  batch {config.batch_size}, steps {step} -> {config.total_steps}; logs every '
      f'{config.log_every_steps}, checkpoints every {config.checkpoint_every_steps}, sample grids '
      f'every {config.sample_every_steps} steps and at the end',
  ]
  return '\n'.join(lines)


def start_from(trainer, state, init_dir, config) -> training.TrainState:
  """The fresh state with init_from's weights (params and EMA) in place of the initial ones.
  Modules the init_from model lacks (the crop embedder, when micro-conditioning is new:
  checkpoints.check_init_from) keep their initial values, and the message names them."""
  saved_config = rundir.RunDir(init_dir.parent.parent).read_config()
  saved_model = trainer.model if saved_config is None else config_lib.build_model(saved_config)
  abstract = training.abstract_saved_params(saved_model, trainer.mesh)
  weights = checkpoints.restore_weights(init_dir, abstract)
  fresh = trainer.to_saved(state)
  new = sorted(set(fresh.params['params']) - set(weights['params']['params']))
  merged = {name: {'params': {**getattr(fresh, name)['params'], **weights[name]['params']}}
            for name in ('params', 'ema_params')}
  state = state.replace(**trainer.from_saved(merged))
  print(f'Starting from the weights in {config.init_from} (fresh optimizer, step 0)'
        + (f'; new in this model, initialised here: {", ".join(new)} (a zero output layer: the '
           'model starts out computing what the loaded one did)' if new else ''), flush=True)
  return state


def _sizes(config) -> str:
  return ', '.join(f'{h}x{w}' for h, w in config.sampling.resolutions)


def describe_results(config, run: rundir.RunDir, saved_step, bad_records: int = 0) -> str:
  """Where the results of a finished (or stopped) run are."""
  lines = [f'results in {run.root}:']
  if bad_records:
    lines.insert(0, f'{bad_records} unreadable data records were skipped and replaced by the next '
                 'readable ones (data.bad_records=skip; counted per log step as bad_records in '
                 f'{run.metrics.name})')
  if saved_step is not None:
    lines.append(f'  checkpoint    {run.checkpoints / str(saved_step)}')
  samples = [run.sample_grid(saved_step, h, w) for h, w in config.sampling.resolutions
             ] if saved_step is not None else []
  samples = [p for p in samples if p.exists()]
  if samples:
    lines.append(f'  samples       {samples[0].parent}/ ({", ".join(p.name for p in samples)})')
  lines.append(f'  metrics       {run.metrics}, {run.tensorboard}/ '
               f'(tensorboard --logdir={run.tensorboard})')
  return '\n'.join(lines)


def train(config, workdir) -> training.TrainState:
  """Runs (or resumes) training to config.total_steps and returns the final state. A workdir
  another live process trains in is refused (rundir.RunDir.lock)."""
  run = rundir.RunDir(workdir)
  preemption = Preemption()  # first: a signal during preflight or the first compile is handled
  try:
    return _train(config, run, preemption)
  finally:
    preemption.restore()
    run.unlock()


def _train(config, run: rundir.RunDir, preemption: Preemption) -> training.TrainState:
  built, saved_config, init_dir, vae, mesh = preflight(config, run)
  trainer = training.Trainer(built.model, built.training, mesh)
  iterator = data.make_iterator(config.data, split='train', seed=config.seed,
                                global_batch_size=config.batch_size)
  manager = checkpoints.manager(run.root, config)
  abstract_state = trainer.abstract_sharded_state()

  latest = manager.latest_step()
  if latest is not None:
    state = trainer.from_saved(checkpoints.restore(manager, latest, abstract_state, iterator))
    changes = rundir.changed_keys(saved_config, config) if saved_config is not None else []
    print(f'Resuming from step {latest} ({run.checkpoints / str(latest)})'
          + (f'; config changes: {", ".join(changes)}' if changes else ''), flush=True)
  else:
    state = trainer.init_state()
    if init_dir is not None:
      state = start_from(trainer, state, init_dir, config)
  run.truncate_logs(int(state.step))
  run.write_config(config)

  step = int(state.step)
  if jax.process_index() == 0:
    print(describe(config, built, trainer, run, step), flush=True)
  if step >= config.total_steps:
    print(f'Nothing to do: step {step} >= total_steps {config.total_steps}', flush=True)
    manager.close()
    return state

  class_names = data.class_names(config.data)
  writer = MetricWriter(run)
  examples_log = None
  if config.log_example_indices and jax.process_index() == 0:
    examples_log = open(run.examples, 'a', encoding='utf-8')
  log_examples = config.log_example_indices  # every process: the indices are gathered
  peak = training.peak_flops_per_device()
  flops_per_image = trainer.flops_per_image()
  bar = tqdm.tqdm(total=config.total_steps, initial=step, disable=jax.process_index() != 0,
                  dynamic_ncols=True, desc='train', unit='step')
  progress = StepProgress(bar)
  window_start, window_steps = time.perf_counter(), 0
  saved_step = latest  # the newest checkpoint (None: none yet)
  unchecked = []  # (step, metrics on the device) not yet checked for NaN/Inf: no per-step sync
  skipped_steps = bad_records = total_bad_records = 0  # since the last log line; in all
  side_failure = None  # (what, error) of a side task that failed on this process
  try:
    while step < config.total_steps:
      local_batch = next(iterator)
      state, metrics = trainer.step(state, trainer.device_batch(local_batch))
      preemption.started = True  # compiled and dispatched: a signal now saves this step
      step += 1
      unchecked.append((step, metrics))
      bad_records += int(local_batch['skipped'].sum())
      if log_examples:
        indices = _global_rows(local_batch['index'])
        if examples_log and side_failure is None:
          side_failure = side_task('writing examples.jsonl', lambda: _write_line(
              examples_log, {'step': step, 'index': indices.tolist()}))
      window_steps += 1
      progress.dispatched(step, metrics['loss'])

      preempted = preemption.reached(step)  # read once: the signal may arrive at any moment
      log_now = step % config.log_every_steps == 0 or step == config.total_steps
      save_now = step % config.checkpoint_every_steps == 0 or step == config.total_steps \
          or preempted
      sample_now = step % config.sample_every_steps == 0 or step == config.total_steps
      if log_now or save_now or sample_now:  # nothing is logged, saved or sampled past a NaN
        progress.finish()
        metrics, skipped = check_finite(jax.device_get(unchecked), config.nonfinite, saved_step,
                                        run)
        unchecked, skipped_steps = [], skipped_steps + skipped
        checkpoints.prune(run.root, config)  # what retention no longer keeps (process 0)
      if log_now:
        seconds = time.perf_counter() - window_start
        images_per_second = window_steps * config.batch_size / seconds
        tflops = images_per_second * flops_per_image / 1e12
        window_bad = _global_sum(bad_records)
        total_bad_records += window_bad
        scalars = dict(metrics, images_per_second=images_per_second, tflops=tflops,
                       mfu=tflops * 1e12 / (peak * jax.device_count()) if peak else None,
                       skipped_steps=skipped_steps, bad_records=window_bad)
        if side_failure is None:
          side_failure = side_task('writing the metrics', writer.write, step, scalars)
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}', img_s=f'{images_per_second:.0f}')
        window_start, window_steps = time.perf_counter(), 0
        skipped_steps = bad_records = 0

      if step == config.total_steps and jax.process_index() == 0:
        bar.close()  # the bar is done; what follows is said, not left to a still bar
        print(f'step {step}: saving the checkpoint in {run.checkpoints / str(step)} and '
              f'sampling grids at {_sizes(config)} (EMA weights) ...', flush=True)
      if save_now:
        checkpoints.wait(manager, saved_step)  # a failed earlier save is reported as its own
        checkpoints.save(manager, step, trainer.to_saved(state), iterator, config, force=True)
        saved_step = step
      if preempted:
        checkpoints.wait(manager, step)
        if preemption.requested == 'SIGINT':
          raise Interrupted(f'interrupted (SIGINT) at step {step}: saved the checkpoint '
                            f'{run.checkpoints / str(step)}; run the same command to resume')
        print(f'SIGTERM: saved the checkpoint at step {step}; exiting', flush=True)
        break
      if sample_now and side_failure is None:
        side_failure = side_task('drawing the sample grids', save_sample_grids, config,
                                 built.model, built.sampling, state.ema_params, step, run,
                                 class_names, vae, writer, trainer.mesh)
      # Every process reaches the log and sample steps together: there they agree to stop.
      if jax.process_count() == 1 or log_now or sample_now:
        failed = _failed_anywhere(side_failure)
        if failed is not None:
          if saved_step != step:
            checkpoints.wait(manager, saved_step)
            checkpoints.save(manager, step, trainer.to_saved(state), iterator, config,
                             force=True)
            saved_step = step
          checkpoints.wait(manager, step)
          raise SideTaskFailed(side_failure_message(side_failure, failed, step, run, config))
  except (OSError, MemoryError, RuntimeError) as e:
    if isinstance(e, (checkpoints.CheckpointError, Interrupted)):  # they name their checkpoint
      raise
    kept = (f'the newest checkpoint, step {saved_step}, is kept' if saved_step is not None
            else 'no checkpoint was saved yet')
    fix = 'fix the cause'
    if 'RESOURCE_EXHAUSTED' in str(e) or isinstance(e, MemoryError):
      fix = (f'the step does not fit the device memory with mesh.fsdp={mesh.shape["fsdp"]} and '
             f'batch_size={config.batch_size} and the {config.model.attention_implementation!r} '
             'attention kernel: set model.remat=True, a larger mesh.fsdp, '
             "model.attention_implementation='splash' (TPU) or 'chunked' (any device), or a "
             'smaller batch_size (benchmarks/tpu_compile.py measures a setting without running '
             'it)')
    raise TrainingFailed(f'step {step}: the train step failed ({cli.reason(e)}); {kept} in '
                         f'{run.checkpoints}: {fix} and run again to resume') from e
  finally:
    bar.close()
    try:
      checkpoints.close(manager, saved_step)  # waits for the save in flight
      checkpoints.prune(run.root, config)
    finally:
      writer.close()
      if examples_log:
        examples_log.close()
  if jax.process_index() == 0:
    print(describe_results(config, run, saved_step, total_bad_records), flush=True)
  return state
