"""A run directory: what lives where in a workdir, and the rules for the config saved there.

  <workdir>/
    train.lock                    held (fcntl.flock) by the one train.py using the workdir
    config.json                   the run's config, JSON only (never unpickled)
    checkpoints/<step>/           orbax checkpoints (rpe2d.checkpoints)
    damaged_checkpoints/<step>/   checkpoints put aside by checkpoints.recover, kept for inspection
    metrics.jsonl, examples.jsonl the logs, one JSON object per line, each with its step
    tensorboard/                  the same scalars as TensorBoard event files
    samples/step_<step>_<H>x<W>.png

Training, sampling and evaluation all find these paths here. The saved config decides what may
change when a run resumes (INCOMPATIBLE_KEYS, DATA_ORDER_KEYS) or lends its weights (init_from).
"""

import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import socket

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


class WorkdirInUseError(ValueError):
  """Another live process trains in this workdir."""


_HELD = {}  # workdir -> the descriptor whose flock this process holds


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of one run directory (nothing is created until something is written)."""
  root: pathlib.Path

  def __init__(self, root):
    object.__setattr__(self, 'root', pathlib.Path(root).absolute())

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
  def metrics(self) -> pathlib.Path:
    return self.root / 'metrics.jsonl'

  @property
  def examples(self) -> pathlib.Path:
    return self.root / 'examples.jsonl'

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / 'tensorboard'

  def sample_grid(self, step: int, height: int, width: int) -> pathlib.Path:
    return self.root / 'samples' / f'step_{step:07d}_{height}x{width}.png'

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
      for directory in (self.root, self.checkpoints):
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

  def lock(self) -> None:
    """Takes the workdir for this process (process 0 of a multi-process run), or raises
    WorkdirInUseError naming the holder. The lock is a `flock` on train.lock: the kernel drops it
    when the holder dies, so a killed run never leaves it stuck. Taken again by its holder, it is
    a no-op; `unlock` gives it back."""
    if jax.process_index() != 0 or self.root in _HELD:
      return
    self.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1024, 0).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise WorkdirInUseError(f'workdir {self.root} is in use by another train.py ({holder}); '
                              'wait for it to finish or stop it, or choose another --workdir') \
          from None
    except OSError:
      os.close(fd)
      raise
    since = datetime.datetime.now().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}, since {since}\n'.encode(), 0)
    _HELD[self.root] = fd

  def unlock(self) -> None:
    fd = _HELD.pop(self.root, None)
    if fd is not None:
      os.close(fd)  # closing the last descriptor releases the flock

  def read_config(self) -> ml_collections.ConfigDict | None:
    """The run's saved config, with the fields it predates at their defaults (None: no run)."""
    saved = read_config(self.config_path)
    return None if saved is None else config_lib.complete(saved)

  def write_config(self, config) -> None:
    if jax.process_index() == 0:
      with files.atomic_path(self.config_path) as tmp:
        tmp.write_text(config.to_json_best_effort(indent=2))

  def truncate_logs(self, step: int) -> None:
    """Drops log lines past `step`: a run killed after its newest checkpoint logged steps it is
    about to train again."""
    if jax.process_index() != 0:
      return
    for path in (self.metrics, self.examples):
      if not path.is_file():
        continue
      text = path.read_text()
      kept = ''.join(line + '\n' for line in text.splitlines() if _logged_step(line) <= step)
      if kept != text:
        with files.atomic_path(path) as tmp:
          tmp.write_text(kept)


def _logged_step(line) -> float:
  """The step a log line is about; +inf (dropped) for a line cut short by a kill."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return float('inf')


def read_config(path) -> ml_collections.ConfigDict | None:
  """A JSON config file (a run's config.json), or None if there is none."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
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
  """(the config saved in the newest intact checkpoint, its step); (None, None) without one.
  Every checkpoint carries the run's config, so a lost config.json loses nothing."""
  from rpe2d import checkpoints  # pylint: disable=g-import-not-at-top  # it imports this module
  for step in reversed(checkpoints.steps(run.checkpoints)):
    step_dir = run.checkpoints / str(step)
    if checkpoints.damage(step_dir) is None:
      saved = read_config(step_dir / 'config' / 'metadata')
      if saved is not None:
        return config_lib.complete(saved), step
  return None, None


def check_compatible(run: RunDir, config) -> ml_collections.ConfigDict | None:
  """The run's saved config (None for a new run); refuses one of another model or data order,
  before anything is compiled."""
  saved = run.read_config()
  if saved is None:
    saved, step = checkpoint_config(run)
    if saved is None:
      return None
    print(f'workdir {run.root} has no config.json: checking the config against the one saved '
          f'in its newest checkpoint, step {step}', flush=True)
  differences = differing_keys(saved, config, INCOMPATIBLE_KEYS + DATA_ORDER_KEYS)
  if differences:
    raise ValueError(f'workdir {run.root} holds a run of an incompatible model or data order; '
                     'differing keys:\n  ' + '\n  '.join(differences)
                     + '\nuse another --workdir, or start from its weights with '
                     '--config.init_from=<that run> where the shapes agree')
  return saved
