"""Orbax checkpoints of a run: <workdir>/checkpoints/<step>/{state, data, config, manifest}.

`state` is the TrainState (params, optimizer state, EMA params, step), `data` the grain iterator
state of each process (one file per process; the same state on all of them, so another process
count can resume it), `config` the run's config as JSON. Where a workdir keeps what is
rpe2d.rundir; the config also sits in <workdir>/config.json so tools can read a run without orbax.

`rpe2d_manifest.json` holds the checkpoint format version and the size and sha256 of every file.
Orbax writes a checkpoint into <step>.orbax-checkpoint-tmp and renames it when complete; the
manifest is written just before that rename, so it is part of the atomic commit. Resuming checks
it first: tensorstore restores a flipped byte in an array file without complaint. Checkpoints
without a manifest (written before it existed) get the structural checks only.

Retention (keep_checkpoints, keep_every_steps) is rpe2d's, not orbax's (`prune`): it deletes only
the files a step's manifest lists, and only when the step directory holds nothing else; a step
that a reader (sample.py, evaluate.py) holds a lease on (`lease`) waits for the next prune.
"""

import contextlib
import fcntl
import functools
import json
import math
import os
import pathlib
import shutil

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from rpe2d import files as files_lib, rundir

# Raise when the layout of a checkpoint changes; a checkpoint in a newer format is refused.
FORMAT_VERSION = 1
MANIFEST = 'rpe2d_manifest.json'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's unfinished saves: <step>.orbax-checkpoint-tmp
# Written by orbax after the manifest, so outside it (their presence is checked instead).
_COMMIT_FILES = ('commit_success.txt', '_CHECKPOINT_METADATA')
_CONFIG_FILE = 'config/metadata'  # the run's config, as JSON


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored; the message names it and what to do."""


class NewerFormatError(ValueError):
  """A checkpoint written by a newer rpe2d, in a format this version cannot read."""


def check_retention(config) -> None:
  """Refuses retention settings that would delete what they are meant to keep: keep_checkpoints
  below 1 (the newest checkpoint must survive every save), and keep_every_steps that no
  checkpoint step is a multiple of (orbax keeps a step only when K divides it)."""
  for key in ('keep_checkpoints', 'checkpoint_every_steps'):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{key}={value!r} must be an integer >= 1 (the newest checkpoint is always '
                       'kept)')
  every, keep = config.checkpoint_every_steps, config.keep_every_steps
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
    raise ValueError(f'keep_every_steps={keep!r} must be an integer >= 0 (0: keep only the last '
                     'keep_checkpoints)')
  if keep and keep % every:
    kept = keep * every // math.gcd(keep, every)
    raise ValueError(f'keep_every_steps={keep} is not a multiple of checkpoint_every_steps='
                     f'{every}: only every {kept}-th step would be kept; use a multiple of '
                     f'{every}, e.g. {(keep // every + 1) * every}')


def manager(workdir, config, *, read_only: bool = False,
            item_handlers=None) -> ocp.CheckpointManager:
  """read_only: for inspecting a run (it never creates, saves or deletes anything). Orbax keeps
  every checkpoint: retention is `prune`'s.
  item_handlers: orbax's handler of each item, where the defaults will not do."""
  directory = rundir.RunDir(workdir).checkpoints
  if not read_only:
    check_retention(config)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      enable_async_checkpointing=True,
      create=not read_only,
      read_only=read_only,
      async_options=None if read_only else ocp.AsyncOptions(
          post_finalization_callback=functools.partial(_write_manifests, directory)),
  )
  return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def save(mngr, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
  """Starts an async save; a failure raises CheckpointError naming the step."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config.to_dict()),
  )
  try:
    return mngr.save(step, args=args, force=force)
  except Exception as e:  # orbax and tensorstore raise many types for one disk-full
    raise _save_error(mngr, step, e) from e


def save_weights(workdir, step: int, weights, config) -> None:
  """Writes a checkpoint of weights alone at `step`: {'step', 'params', 'ema_params'} (no optimizer
  or data iterator state), with the run's config and manifest, and waits for it. An imported
  model's run directory (rpe2d.importing) is this: everything that reads weights
  (restore_weights: sample.py, evaluate.py, init_from) reads it; resuming it is refused
  (`holds_training_state`).

  The weights are written at most a GiB at a time: orbax's default (96 GiB in flight) copies
  every array at once, which for params and EMA params of an XL/2 (2 x 2.7 GB) doubled the
  memory of the import; it makes no difference to what is written."""
  mngr = manager(workdir, config, item_handlers={
      'state': ocp.StandardCheckpointHandler(save_concurrent_gb=1),
      'config': ocp.JsonCheckpointHandler()})
  args = ocp.args.Composite(state=ocp.args.StandardSave(weights),
                            config=ocp.args.JsonSave(config.to_dict()))
  try:
    mngr.save(step, args=args, force=True)
  except Exception as e:  # orbax and tensorstore raise many types for one disk-full
    raise _save_error(mngr, step, e) from e
  close(mngr, step)


def holds_training_state(step_dir) -> bool:
  """Whether a checkpoint can resume training (it has the data iterator's state): not one written
  by save_weights."""
  return (pathlib.Path(step_dir) / 'data').is_dir()


def wait(mngr, step: int | None) -> None:
  """Waits for the save of `step` in flight; if it failed, raises CheckpointError naming it."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise _save_error(mngr, step, e) from e


def close(mngr, step: int | None) -> None:
  """Waits for the save of `step` and closes the manager; raises like wait()."""
  try:
    mngr.close()
  except Exception as e:  # orbax raises a failed save again on every wait, close included
    raise _save_error(mngr, step, e) from e


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception of a chain: orbax and tensorstore wrap an OSError several times."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  return error


def _one_line(error: BaseException) -> str:
  """An error of a library in one line: the OS error at the root of its chain if there is one
  (orbax and tensorstore wrap a full disk several times), else the first line of its text."""
  from rpe2d import cli  # pylint: disable=g-import-not-at-top  # cli is imported by data
  root = _root_cause(error)
  return cli.reason(root if isinstance(root, OSError) else error)


def _save_error(mngr, step, error) -> CheckpointError:
  directory = pathlib.Path(mngr.directory)
  intact = [s for s in steps(directory) if s != step]
  kept = f'the newest is step {max(intact)}' if intact else 'there are none yet'
  return CheckpointError(
      f'could not save the checkpoint at step {step} in {directory}: {_one_line(error)}; '
      f'checkpoints saved before it are untouched ({kept}); fix the cause (disk space?) and run '
      'again to resume from the newest.')


def restore(mngr, step: int, abstract_state, data_iterator):
  """Restores state (with the shardings in abstract_state) and, in place, the data iterator.

  The iterator state of a checkpoint written by another number of processes is used when every
  process saved the same one (rpe2d.data's global order: it counts global steps); else the
  restore is refused, naming the process count that can resume it.
  """
  step_dir = pathlib.Path(mngr.directory) / str(step)
  own_data = step_dir / 'data' / _data_file(jax.process_index(), jax.process_count())
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if own_data.is_file():
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  else:
    data_state = _shared_data_state(step_dir / 'data')
  try:
    state = mngr.restore(step, args=ocp.args.Composite(**args)).state
  except Exception as e:
    raise CheckpointError(f'could not restore the checkpoint {step_dir}: {_one_line(e)}') from e
  if not own_data.is_file():
    data_iterator.set_state(data_state)
    if hasattr(data_iterator, 'start_prefetch'):  # as grain's CheckpointHandler.restore does
      data_iterator.start_prefetch()
  return state


def _data_file(process_index: int, process_count: int) -> str:
  return f'process_{process_index}-of-{process_count}.json'  # grain's CheckpointHandler names


def _shared_data_state(data_dir) -> dict:
  """The one data iterator state every process of another process count saved."""
  counts = {int(p.stem.rsplit('-of-', 1)[1]) for p in data_dir.glob('process_*-of-*.json')}
  if len(counts) != 1:
    raise CheckpointError(f'{data_dir} holds no data iterator state of one process count '
                          f'({sorted(counts) or "none"}); cannot resume its data order')
  (count,) = counts
  states = []
  for i in range(count):
    path = data_dir / _data_file(i, count)
    if not path.is_file():
      raise CheckpointError(f'{path} is missing; cannot resume the data order of {data_dir}')
    states.append(json.loads(path.read_text()))
  if any(state != states[0] for state in states):
    raise CheckpointError(
        f'{data_dir} was written by {count} processes whose data iterators are at different '
        f'positions, so their order cannot be split over {jax.process_count()}; resume it with '
        f'{count} processes')
  return states[0]


# ------------------------------------------------------------------------------------------------
# Detecting cut-short and damaged checkpoints.


def write_manifest(step_dir) -> None:
  step_dir = pathlib.Path(step_dir)
  files = {}
  for path in sorted(p for p in step_dir.rglob('*') if p.is_file()):
    name = path.relative_to(step_dir).as_posix()
    if name not in _COMMIT_FILES and name != MANIFEST:
      files[name] = [path.stat().st_size, files_lib.sha256_file(path)]
  with files_lib.atomic_path(step_dir / MANIFEST) as tmp:
    tmp.write_text(json.dumps({'format': FORMAT_VERSION, 'files': files}, indent=1))


def _write_manifests(directory) -> None:
  # Orbax's post-finalization callback (primary process, after every process has written its
  # files): saves are serialised, so the unfinished save here is the one about to be renamed.
  for tmp in pathlib.Path(directory).glob(f'*{_TMP_SUFFIX}*'):
    if tmp.is_dir() and not (tmp / MANIFEST).exists():
      write_manifest(tmp)


def damage(step_dir) -> str | None:
  """What makes a checkpoint directory unusable (cut short, files missing or changed), or None.

  Raises NewerFormatError for a checkpoint in a format newer than FORMAT_VERSION.
  """
  step_dir = pathlib.Path(step_dir)
  for name in _COMMIT_FILES:
    if not (step_dir / name).is_file():
      return f'{name} is missing (the save never finished)'
  try:
    json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())
    manifest = json.loads((step_dir / MANIFEST).read_text())
    version = manifest['format']
    files = {str(name): (int(size), str(digest)) for name, (size, digest) in
             manifest['files'].items()}
  except FileNotFoundError:  # written before manifests existed
    missing = [item for item in ('state', 'data', 'config') if not (step_dir / item).is_dir()]
    return f'{", ".join(missing)} missing' if missing else None
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    return f'its metadata is unreadable ({type(e).__name__}: {e})'
  if not isinstance(version, int):
    return f'{MANIFEST} has no format version'
  if version > FORMAT_VERSION:
    raise NewerFormatError(
        f'{step_dir} is a checkpoint in format {version!r}, written by a newer rpe2d; this version '
        f'reads formats up to {FORMAT_VERSION}. Upgrade rpe2d to use it.')
  for name, (size, digest) in files.items():
    path = step_dir / name
    if not path.is_file():
      return f'{name} is missing'
    if path.stat().st_size != size:
      return f'{name} has {path.stat().st_size} bytes where {size} were written'
    if files_lib.sha256_file(path) != digest:
      return f'{name} does not match its sha256'
  return None


def steps(directory) -> list[int]:
  """The step numbers of the checkpoint directories in `directory`, ascending."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def recover(workdir) -> int | None:
  """Readies <workdir>/checkpoints for resuming; returns the newest intact step (None: none).

  Unfinished saves (a run killed while writing) are removed, with a warning naming them. Finished
  checkpoints that are cut short or damaged, newest first until an intact one, are moved to
  <workdir>/damaged_checkpoints/ with a warning: never deleted, and out of reach of retention and
  of a later save of the same step. A step directory that holds another run is left alone.
  """
  run = rundir.RunDir(workdir)
  directory = run.checkpoints
  if jax.process_index() == 0:
    for tmp in sorted(directory.glob(f'*{_TMP_SUFFIX}*')) if directory.is_dir() else []:
      logging.warning('Removing %s: a save that never finished (the run stopped while writing '
                      'it); the checkpoints before it are intact', tmp)
      shutil.rmtree(tmp)
    for step in reversed(steps(directory)):
      step_dir = directory / str(step)
      if any((step_dir / marker).exists() for marker in rundir.RUN_MARKERS):
        logging.warning('%s holds another run, not a checkpoint: left alone (move that run out of '
                        'this run\'s checkpoints)', step_dir)
        continue
      problem = damage(step_dir)
      if problem is None:
        break
      aside, n = run.damaged_checkpoints / str(step), 1
      while aside.exists():  # the same step damaged again: keep both
        n += 1
        aside = run.damaged_checkpoints / f'{step}.{n}'
      aside.parent.mkdir(exist_ok=True)
      step_dir.rename(aside)
      logging.warning('Skipping the checkpoint at step %d: %s. Moved it to %s (inspect or delete '
                      'it yourself); resuming from the newest intact checkpoint.',
                      step, problem, aside)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('rpe2d.checkpoints.recover')
  remaining = steps(directory)
  return remaining[-1] if remaining else None


def find_step_dir(source) -> pathlib.Path:
  """A run directory (its newest intact step) or <run>/checkpoints/<step> -> the step directory.

  Read-only: damaged checkpoints are skipped with a warning, never moved.
  """
  path = pathlib.Path(source).absolute()
  if rundir.RunDir(path).checkpoints.is_dir():
    path = rundir.RunDir(path).checkpoints
  if (path / 'state').is_dir():
    problem = damage(path)
    if problem:
      raise ValueError(f'checkpoint {path} is damaged: {problem}')
    return path
  skipped = []
  for step in reversed(steps(path)):
    problem = damage(path / str(step))
    if problem is None:
      return path / str(step)
    logging.warning('Skipping the damaged checkpoint %s: %s', path / str(step), problem)
    skipped.append(f'{step} ({problem})')
  raise FileNotFoundError(f'{str(source)!r} holds no {"intact " if skipped else ""}checkpoint'
                          + (f' (damaged: {"; ".join(skipped)})' if skipped else '')
                          + '; give a run directory or <run>/checkpoints/<step>')


def check_init_from(source, config) -> pathlib.Path:
  """The step directory init_from names, refused before compiling if its model differs.

  One difference is allowed: micro-conditioning turned on over a model without it (RPE-2D
  fine-tuning from a grid-trained run or an import). Its crop embedder is new; its output layer
  starts at zero, so the model starts out computing what the weights it loads computed.
  """
  try:
    step_dir = find_step_dir(source)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'init_from={e}') from None
  saved = saved_config(step_dir)  # the checkpoint's own config: the truth about its weights
  if saved is None:
    raise ValueError(f'init_from={source}: the checkpoint {step_dir} holds no readable config, so '
                     'what its weights are cannot be checked; use another step')
  keys = rundir.MODEL_KEYS
  if not saved.model.micro_conditioning and config.model.micro_conditioning:
    keys = tuple(k for k in keys if k != 'model.micro_conditioning')
  differences = rundir.differing_keys(saved, config, keys)
  if differences:
    raise ValueError(f'init_from={source} holds weights of another model; differing keys:\n  '
                     + '\n  '.join(differences))
  return step_dir


def saved_config(step_dir):
  """The config a checkpoint was saved with (fields it predates at their defaults), or None when
  it has none that reads back intact: the config file is checked against the manifest's sha256
  (not the arrays: see `damage`)."""
  from rpe2d import config as config_lib  # pylint: disable=g-import-not-at-top
  step_dir = pathlib.Path(step_dir)
  path = step_dir / _CONFIG_FILE
  try:
    manifest = json.loads((step_dir / MANIFEST).read_text())
    size, digest = manifest['files'][_CONFIG_FILE]
    if path.stat().st_size != size or files_lib.sha256_file(path) != digest:
      return None
  except FileNotFoundError:
    pass  # a checkpoint from before manifests: its config is read as it is
  except (OSError, ValueError, TypeError, KeyError):
    return None
  try:
    saved = rundir.read_config(path)
  except (OSError, ValueError):
    return None
  return None if saved is None else config_lib.complete(saved)


def restore_weights(step_dir, abstract_params, *, names=('params', 'ema_params')) -> dict:
  """{name: weights} for `names` of the TrainState in a step directory (found and checked by
  find_step_dir), restored with the shardings of `abstract_params` (a tree of
  jax.ShapeDtypeStruct). Only those arrays are read: not the optimizer state, not the rest."""
  step_dir = pathlib.Path(step_dir)
  item = {name: abstract_params for name in names}
  try:
    return ocp.PyTreeCheckpointer().restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  except Exception as e:
    raise CheckpointError(f'could not restore the checkpoint {step_dir}: {_one_line(e)}') from e


# ------------------------------------------------------------------------------------------------
# Retention, and the readers it waits for.


class CheckpointGone(CheckpointError):
  """A step directory deleted (by its run's retention) before a reader could take its lease."""


def retained(all_steps, keep_checkpoints: int, keep_every_steps: int) -> set[int]:
  """The steps retention keeps: the newest `keep_checkpoints`, plus every `keep_every_steps`-th."""
  all_steps = sorted(all_steps)
  kept = set(all_steps[-keep_checkpoints:])
  if keep_every_steps:
    kept |= {s for s in all_steps if s % keep_every_steps == 0}
  return kept


def _lease_path(step_dir: pathlib.Path) -> pathlib.Path | None:
  if step_dir.parent.name != 'checkpoints' or not step_dir.name.isdigit():
    return None
  return rundir.RunDir(step_dir.parent.parent).readers / f'{step_dir.name}.lock'


@contextlib.contextmanager
def lease(step_dir):
  """Holds a reader's lease on a checkpoint while the block reads it: `prune` leaves a leased
  step for a later prune. A shared `flock` on <run>/readers/<step>.lock, dropped by the kernel
  when the reader dies. Raises CheckpointGone when the step was deleted before the lease was
  held. A run no train.py holds (train.lock) is read without a lease, and where none can be taken
  (a run directory the reader cannot write) the block runs without one; `inference.load_run` then
  retries with the newest step if the read fails."""
  step_dir = pathlib.Path(step_dir)
  path, fd = _lease_path(step_dir), None
  if path is not None and _live(step_dir.parent.parent):
    try:
      path.parent.mkdir(exist_ok=True)
      fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
      fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a prune deletes this very step
    except OSError:
      if fd is not None:
        os.close(fd)
      fd = None
  try:
    if not all((step_dir / name).is_file() for name in _COMMIT_FILES):
      if fd is not None and path is not None:
        path.unlink(missing_ok=True)  # a lease of a step that is gone
      raise CheckpointGone(f'{step_dir} was deleted by its run\'s retention before it was read')
    yield step_dir
  finally:
    if fd is not None:
      os.close(fd)


def _live(workdir: pathlib.Path) -> bool:
  """Whether a train.py holds the workdir's lock now (only then can retention run meanwhile; a
  finished run is read without writing a lease into it)."""
  try:
    fd = os.open(rundir.RunDir(workdir).lock_path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  except OSError:
    return False
  finally:
    os.close(fd)


_REFUSED = set()  # step directories retention already said it leaves alone (said once)


def _deletable(step_dir: pathlib.Path) -> tuple[list[pathlib.Path], str | None]:
  """(the files of a checkpoint, None) when the step directory holds only what its manifest lists
  (and orbax's commit files); else ([], why it is left alone)."""
  try:
    listed = set(json.loads((step_dir / MANIFEST).read_text())['files'])
  except FileNotFoundError:
    return [], (f'it has no {MANIFEST} (written before rpe2d had manifests), so nothing proves '
                'rpe2d wrote all of it')
  except (OSError, ValueError, TypeError, KeyError) as e:
    return [], f'its {MANIFEST} is unreadable ({type(e).__name__})'
  ours = listed | set(_COMMIT_FILES) | {MANIFEST}
  present = [p for p in step_dir.rglob('*') if p.is_symlink() or not p.is_dir()]
  foreign = sorted(p.relative_to(step_dir).as_posix() for p in present
                   if p.is_symlink() or p.relative_to(step_dir).as_posix() not in ours)
  if foreign:
    shown = ', '.join(foreign[:3]) + (', ...' if len(foreign) > 3 else '')
    return [], f'it holds {len(foreign)} files no checkpoint save wrote ({shown})'
  return present, None


def _delete(step_dir: pathlib.Path, present: list[pathlib.Path]) -> None:
  for path in present:
    path.unlink()
  for directory in sorted((p for p in step_dir.rglob('*') if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
    directory.rmdir()  # empty by now; a file that appeared meanwhile stops it (OSError)
  step_dir.rmdir()


def prune(workdir, config) -> list[int]:
  """Deletes the checkpoints that retention does not keep (`retained`), on process 0; returns
  their steps. Safe at any moment: it reads only finished step directories, and keeps the newest.

  A step is deleted only when everything in it is listed in its manifest (or is one of orbax's
  commit files): a step directory holding anything else, or written before manifests, is left
  alone with one warning. A step a reader holds a lease on (`lease`) is left for a later prune.
  """
  if jax.process_index() != 0:
    return []
  run = rundir.RunDir(workdir)
  all_steps = steps(run.checkpoints)
  kept = retained(all_steps, config.keep_checkpoints, config.keep_every_steps)
  deleted = []
  for step in all_steps:
    if step in kept:
      continue
    step_dir = run.checkpoints / str(step)
    lease_path, fd = _lease_path(step_dir), None
    try:
      lease_path.parent.mkdir(exist_ok=True)
      fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a reader is reading it
      os.close(fd)
      continue
    except OSError as e:
      if fd is not None:
        os.close(fd)
      logging.warning('Retention leaves %s: its reader lease cannot be taken (%s)', step_dir, e)
      continue
    try:
      present, why = _deletable(step_dir)
      if why is not None:
        if step_dir not in _REFUSED:
          _REFUSED.add(step_dir)
          logging.warning('Retention leaves %s: %s; delete it yourself if it is not needed',
                          step_dir, why)
        continue
      _delete(step_dir, present)
      lease_path.unlink(missing_ok=True)
      deleted.append(step)
    except OSError as e:
      logging.warning('Retention could not delete %s (%s); it is tried again at the next save',
                      step_dir, e)
    finally:
      os.close(fd)
  return deleted
