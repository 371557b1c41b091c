"""A run directory: what lives where in a workdir, and the rules for the config saved there.

  <workdir>/
    train.lock                    held (fcntl.flock) by the one train.py using the workdir
    config.json                   the run's config, JSON only (never unpickled)
    checkpoints/<step>/           orbax checkpoints (rpe2d.checkpoints)
    damaged_checkpoints/<step>/   checkpoints put aside by checkpoints.recover, kept for inspection
    readers/<step>.lock           leases of the readers (sample.py, evaluate.py) of a live run's
                                  checkpoint: retention does not delete a step while one is held
    metrics.jsonl, examples.jsonl the logs, one JSON object per line, each with its step
    <log>.damaged                 lines of a log that could not be read, set aside on resume
    tensorboard/                  the same scalars as TensorBoard event files
    samples/step_<step>_<H>x<W>.png
    train.log                     what the libraries (orbax, tensorstore, grain) logged, with
                                  their tracebacks, when they logged anything (rpe2d.cli)

Training, sampling and evaluation all find these paths here. The saved config decides what may
change when a run resumes (INCOMPATIBLE_KEYS, DATA_ORDER_KEYS) or lends its weights (init_from).
A workdir never lies inside another run's managed directories, nor holds another run in its own
(`check_not_nested`): a run's retention deletes inside them.
"""

import dataclasses
import json
import os
import pathlib
import shutil

from absl import logging
import jax
import ml_collections

from rpe2d import config as config_lib, files

# Config keys that change the shapes of the saved arrays or what they mean. A run may not resume,
# or lend its weights, with different values.
INCOMPATIBLE_KEYS = (
    'model.variant', 'model.position_embedding', 'model.qk_norm', 'model.micro_conditioning',
    'model.mlp_ratio', 'model.mlp', 'model.norm', 'model.adaln', 'model.adaln_rank',
    'model.prediction', 'model.time_scale', 'model.sincos_order', 'model.learned_variance',
    'data.name', 'data.image_size', 'data.channels', 'data.num_classes',
    'data.image_dir',
)
# What init_from needs to agree on: the weights' shapes and the label ids.
MODEL_KEYS = tuple(k for k in INCOMPATIBLE_KEYS if k.startswith('model.')) + (
    'data.channels', 'data.num_classes')
# Keys the saved data iterator position depends on: a resumed run with other values would skip or
# repeat examples without noticing. Sampling from a run does not care.
DATA_ORDER_KEYS = ('seed', 'batch_size')
# What a checkpoint's weights mean when sampled: their shapes, the positions and range they were
# trained on, the data (and for latents the VAE) they model. A checkpoint sampled with another
# run's config must agree on these.
CHECKPOINT_KEYS = INCOMPATIBLE_KEYS + (
    'model.rope_base', 'positions.train', 'positions.max_grid', 'positions.continuous',
    'data.vae_sha256', 'data.latent_scaling')
# Directories of a run that it writes into and deletes inside (checkpoints: retention and
# recovery); another run must not live in them.
MANAGED_DIRS = ('checkpoints', 'damaged_checkpoints', 'readers', 'samples', 'tensorboard')
LOG_FILES = ('metrics.jsonl', 'examples.jsonl')
DAMAGED_SUFFIX = '.damaged'
# Files that mark a directory as a run directory.
RUN_MARKERS = ('train.lock', 'config.json')

WorkdirInUseError = files.InUseError  # another live process trains in this workdir


def _is_run(directory: pathlib.Path) -> bool:
  """A run directory: one train.py took (train.lock), or one of 0.1 (config.json, checkpoints/)."""
  return (directory / 'train.lock').is_file() or (
      (directory / 'config.json').is_file() and (directory / 'checkpoints').is_dir())


def managing_run(path) -> pathlib.Path | None:
  """The run directory whose managed directories (MANAGED_DIRS) hold `path` (or are it), if any."""
  path = pathlib.Path(path).absolute()
  for inner, outer in zip((path, *path.parents), path.parents):
    if inner.name in MANAGED_DIRS and _is_run(outer):
      return outer
  return None


def check_not_managed(path, what: str) -> None:
  """Refuses a path inside a run's checkpoint directories, where its retention and recovery
  delete and move things (what: the flag, e.g. '--output')."""
  owner = managing_run(path)
  if owner is not None:
    inside = pathlib.Path(path).absolute().relative_to(owner).parts[0]
    if inside in ('checkpoints', 'damaged_checkpoints', 'readers'):
      raise ValueError(f'{what} {pathlib.Path(path).absolute()} lies inside {inside}/ of the run '
                       f'{owner}, which its retention deletes: choose a path outside it')


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of one run directory (nothing is created until something is written)."""
  root: pathlib.Path

  def __init__(self, root):
    if not str(root).strip():
      raise ValueError("workdir '' is empty; name a directory, e.g. --workdir=runs/default")
    object.__setattr__(self, 'root', pathlib.Path(root).expanduser().absolute())

  @property
  def config_path(self) -> pathlib.Path:
    return self.root / 'config.json'

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.root / 'checkpoints'

  @property
  def damaged_checkpoints(self) -> pathlib.Path:
    return self.root / 'damaged_checkpoints'

  @property
  def readers(self) -> pathlib.Path:
    return self.root / 'readers'

  @property
  def metrics(self) -> pathlib.Path:
    return self.root / 'metrics.jsonl'

  @property
  def examples(self) -> pathlib.Path:
    return self.root / 'examples.jsonl'

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / 'tensorboard'

  @property
  def library_log(self) -> pathlib.Path:
    suffix = '' if jax.process_index() == 0 else f'.{jax.process_index()}'
    return self.root / f'train{suffix}.log'

  def sample_grid(self, step: int, height: int, width: int) -> pathlib.Path:
    return self.root / 'samples' / f'step_{step:07d}_{height}x{width}.png'

  def check_not_nested(self) -> None:
    """Refuses a workdir inside another run's managed directories (its retention would delete
    this run) or holding another run inside its own (this run's retention would delete that)."""
    owner = managing_run(self.root)
    if owner is not None and owner != self.root:
      inside = self.root.relative_to(owner).parts[0]
      raise ValueError(f'workdir {self.root} lies inside {inside}/ of the run {owner}, which that '
                       'run manages (its retention deletes checkpoint directories): choose a '
                       'workdir outside it')
    for name in MANAGED_DIRS:
      directory = self.root / name
      if not directory.is_dir():
        continue
      for parent, _, names in os.walk(directory):
        if any(marker in names for marker in RUN_MARKERS):
          raise ValueError(f'workdir {self.root} holds another run in {name}/ ({parent}): this '
                           "run's retention would delete it; move that run out, or choose another "
                           'workdir')

  def check_layout(self, names=()) -> None:
    """Refuses a workdir whose own paths are of the wrong kind (a file where a directory goes, or
    the reverse), and one too long for the file names the run will write (`names`, relative)."""
    files.check_names_fit(self.root, names, f'workdir {self.root}')
    for name in MANAGED_DIRS:
      if (self.root / name).exists() and not (self.root / name).is_dir():
        raise ValueError(f'workdir {self.root}: {name} is a file where the run keeps the '
                         f'directory {name}/; move it away, or choose another --workdir')
    for name in ('config.json', *LOG_FILES):
      if (self.root / name).is_dir():
        raise ValueError(f'workdir {self.root}: {name} is a directory where the run writes the '
                         f'file {name}; move it away, or choose another --workdir')

  def check_writable(self) -> pathlib.Path | None:
    """Raises ValueError naming the workdir when it, or its checkpoints/, cannot be written.
    Returns the outermost directory this call created (None: the workdir existed), which
    `discard` removes when the run is refused after all."""
    created = None
    for directory in (self.root, *self.root.parents):
      if directory.exists():
        break
      created = directory
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      for directory in (self.root, self.checkpoints, self.root / 'samples', self.tensorboard):
        if directory.is_dir():
          probe = directory / f'.write_probe_{os.getpid()}'
          probe.write_bytes(b'0')
          probe.unlink()
    except OSError as e:
      raise ValueError(f'workdir {self.root} is not writable ({e.strerror or e}: {e.filename}); '
                       'choose another --workdir') from None
    return created

  def discard(self, created: pathlib.Path | None) -> None:
    """Removes `created` (what check_writable made) when it holds nothing but this process's
    train.lock: a run refused by its preflight leaves no new directory behind."""
    self.unlock()
    if created is None or not created.is_dir():
      return
    left = [p for p in created.rglob('*') if not p.is_dir() and p != self.lock_path]
    if left:
      return  # something else wrote there meanwhile: not ours to delete
    shutil.rmtree(created, ignore_errors=True)

  @property
  def lock_path(self) -> pathlib.Path:
    return self.root / 'train.lock'

  def _lock(self) -> files.DirectoryLock:
    return files.DirectoryLock(self.root, self.lock_path.name, 'train.py')

  def lock(self) -> None:
    """Takes the workdir for this process (process 0 of a multi-process run), or raises
    WorkdirInUseError naming the holder (files.DirectoryLock: the kernel drops it when the holder
    dies, so a killed run never leaves it stuck). Taken again by its holder, it is a no-op;
    `unlock` gives it back."""
    if jax.process_index() != 0:
      return
    self._lock().acquire(f'workdir {self.root}', 'wait for it to finish or stop it, or choose '
                         'another --workdir')

  def unlock(self) -> None:
    self._lock().release()

  def read_config(self) -> ml_collections.ConfigDict | None:
    """The run's saved config, with the fields it predates at their defaults (None: no run).
    A damaged config.json raises ValueError naming it."""
    saved = read_config(self.config_path)
    return None if saved is None else config_lib.complete(saved)

  def write_config(self, config) -> None:
    if jax.process_index() == 0:
      with files.atomic_path(self.config_path) as tmp:
        tmp.write_text(config.to_json_best_effort(indent=2))

  def set_aside(self, path: pathlib.Path, data: bytes) -> pathlib.Path:
    """Appends `data` (what could not be read of `path`) to <path>.damaged, kept for inspection."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    with open(aside, 'ab') as f:
      f.write(data)
    return aside

  def set_aside_config(self) -> None:
    """A damaged config.json is moved to config.json.damaged (write_config writes it again)."""
    if jax.process_index() == 0 and self.config_path.is_file():
      try:
        read_config(self.config_path)
      except ValueError:
        aside = self.config_path.with_name(self.config_path.name + DAMAGED_SUFFIX)
        self.config_path.replace(aside)
        logging.warning('%s was damaged: moved to %s; it is written again from the config',
                        self.config_path, aside)

  def truncate_logs(self, step: int) -> None:
    """Drops log lines past `step` (a run killed after its newest checkpoint logged steps it is
    about to train again); lines that cannot be read (cut short by a kill, not UTF-8, not a JSON
    object with a step) are set aside in <log>.damaged, with a warning naming it: never dropped
    silently, and they never stop a run from resuming."""
    if jax.process_index() != 0:
      return
    for path in (self.metrics, self.examples):
      if not path.is_file():
        continue
      data = path.read_bytes()
      kept, damaged = [], []
      for line in data.splitlines(keepends=True):
        logged = _logged_step(line)
        if logged is None or not line.endswith(b'\n'):
          damaged.append(line if line.endswith(b'\n') else line + b'\n')
        elif logged <= step:
          kept.append(line)
      if damaged:
        aside = self.set_aside(path, b''.join(damaged))
        logging.warning('%s: %d line%s that could not be read (cut short by a kill, or damaged) '
                        'set aside in %s; the run resumes from the rest', path, len(damaged),
                        's' if len(damaged) > 1 else '', aside)
      if b''.join(kept) != data:
        with files.atomic_path(path) as tmp:
          tmp.write_bytes(b''.join(kept))


def _logged_step(line: bytes) -> int | None:
  """The step a log line is about; None for a line that cannot be read."""
  try:
    step = json.loads(line.decode('utf-8'))['step']
  except (ValueError, KeyError, TypeError):
    return None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_config(path) -> ml_collections.ConfigDict | None:
  """A JSON config file (a run's config.json), or None if there is none."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_bytes().decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f'{path} is not a JSON config ({type(e).__name__}: {e}); it is read as '
                     'JSON only, never unpickled') from None
  if not isinstance(saved, dict):
    raise ValueError(f'{path} holds a JSON {type(saved).__name__}, not a config')
  return ml_collections.ConfigDict(saved)


def _flatten(tree, prefix=''):
  """{'a.b': value} of a nested dict; tuples become lists, as they are in a saved config."""
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items()
            for k, v in _flatten(value, f'{prefix}{key}.').items()}
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _flat_config(config) -> dict:
  return _flatten(json.loads(config.to_json_best_effort()))


def differing_keys(saved, config, keys=INCOMPATIBLE_KEYS) -> list[str]:
  """Keys whose values differ between a saved config and the current one."""
  a, b = _flat_config(saved), _flat_config(config)
  return [f'{k}: saved {a.get(k)!r}, now {b.get(k)!r}' for k in keys if a.get(k) != b.get(k)]


def changed_keys(saved, config) -> list[str]:
  """Every key whose value differs between a saved config and the current one."""
  a, b = _flat_config(saved), _flat_config(config)
  return [f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k)]


def checkpoint_config(run: RunDir) -> tuple[ml_collections.ConfigDict | None, int | None]:
  """(the config saved in the newest checkpoint whose config reads back intact, its step);
  (None, None) without one. Every checkpoint carries the run's config, so a lost config.json loses
  nothing. Only the config's own file is checked (against the manifest), not the arrays."""
  from rpe2d import checkpoints  # pylint: disable=g-import-not-at-top  # it imports this module
  for step in reversed(checkpoints.steps(run.checkpoints)):
    saved = checkpoints.saved_config(run.checkpoints / str(step))
    if saved is not None:
      return saved, step
  return None, None


def check_compatible(run: RunDir, config) -> ml_collections.ConfigDict | None:
  """The run's saved config (None for a new run); refuses one of another model or data order,
  before anything is compiled. Both config.json and the config inside the newest checkpoint (the
  one a resume restores) are checked; a damaged config.json is named, and the checkpoint's used."""
  try:
    saved = run.read_config()
  except ValueError as e:
    saved = None
    logging.warning('%s; using the config saved in the newest checkpoint instead (config.json is '
                    'moved to config.json%s and written again)', e, DAMAGED_SUFFIX)
  in_checkpoint, step = checkpoint_config(run)
  if saved is None and in_checkpoint is not None and not run.config_path.exists():
    print(f'workdir {run.root} has no config.json: checking the config against the one saved '
          f'in its newest checkpoint, step {step}', flush=True)
  for source, found in (('config.json', saved), (f'its newest checkpoint, step {step}',
                                                   in_checkpoint)):
    if found is None:
      continue
    differences = differing_keys(found, config, INCOMPATIBLE_KEYS + DATA_ORDER_KEYS)
    if differences:
      raise ValueError(f'workdir {run.root} holds a run of an incompatible model or data order '
                       f'({source}); differing keys:\n  ' + '\n  '.join(differences)
                       + '\nuse another --workdir, or start from its weights with '
                       '--config.init_from=<that run> where the shapes agree')
  return saved if saved is not None else in_checkpoint
