"""Writing files so that a reader, or a crash, never sees half of one; naming their bytes; one
lock discipline for every directory a command writes; and the name lengths a file system allows."""

import contextlib
import datetime
import fcntl
import hashlib
import os
import pathlib
import socket
import time


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

  The temporary name keeps the suffix (np.savez would otherwise append '.npz'); on an error it is
  removed and `path` keeps its old contents.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = tmp_name(path)
  try:
    yield tmp
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def tmp_name(path) -> pathlib.Path:
  """The temporary sibling `atomic_path` writes first (its name is longer than `path`'s)."""
  path = pathlib.Path(path)
  return path.with_name(path.name + '.tmp' + path.suffix)


class InUseError(ValueError):
  """Another live process writes in this directory."""


class DirectoryLock:
  """One writer per directory: an exclusive `flock` on `<directory>/<name>`, which names its
  holder (pid, host, since when). The kernel drops a flock when its holder dies, even by SIGKILL,
  so a killed writer never leaves the lock stuck; readers take no lock.

  `acquire` raises InUseError naming the holder; taken again by its holder it is a no-op.
  """

  _held = {}  # lock file -> the descriptor holding its flock, in this process

  def __init__(self, directory, name: str, command: str):
    self.path = pathlib.Path(directory).absolute() / name
    self.command = command

  def acquire(self, what: str, advice: str) -> None:
    """what: the directory as the user named it (`workdir ...`); advice: what to do instead."""
    if self.path in self._held:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      for attempt in range(10):  # a reader asking whether the writer is live holds it a moment
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if attempt == 9:
            raise
          time.sleep(0.1)
    except BlockingIOError:
      holder = os.pread(fd, 1024, 0).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise InUseError(f'{what} is in use by another {self.command} ({holder}); {advice}') \
          from None
    except OSError:
      os.close(fd)
      raise
    since = datetime.datetime.now().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}, since {since}\n'.encode(), 0)
    self._held[self.path] = fd

  def release(self) -> None:
    fd = self._held.pop(self.path, None)
    if fd is not None:
      os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def exclusive(path, what: str):
  """Holds an exclusive `flock` on the file `path` for the block, waiting (and saying so, naming
  `what`) while another process holds it: for work two processes must not do at once."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'waiting for another process preparing {what} ...', flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _existing(path: pathlib.Path) -> pathlib.Path:
  for candidate in (path, *path.parents):
    if candidate.exists():
      return candidate
  return pathlib.Path('/')


def check_names_fit(directory, names, what: str) -> None:
  """Raises ValueError when a file `directory/<name>` for one of `names` (relative paths, as the
  command will write them, temporary names included) would exceed this file system's limits: a
  component longer than NAME_MAX bytes or a path longer than PATH_MAX. Found before any work, not
  when the first file is written."""
  directory = pathlib.Path(directory).absolute()
  base = _existing(directory)
  try:
    name_max = os.pathconf(base, 'PC_NAME_MAX')
    path_max = os.pathconf(base, 'PC_PATH_MAX')
  except (OSError, ValueError):
    name_max, path_max = 255, 4096
  for name in names:
    full = directory / name
    longest = max(full.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > name_max:
      raise ValueError(f'{what}: the file name {longest!r} it would write is '
                       f'{len(os.fsencode(longest))} bytes long; this file system allows '
                       f'{name_max}: use a shorter name')
    if len(os.fsencode(str(full))) >= path_max:
      raise ValueError(f'{what}: {directory} is too long for the files written in it: '
                       f'{full.relative_to(directory)} would make a path of '
                       f'{len(os.fsencode(str(full)))} bytes, and this file system allows '
                       f'{path_max - 1}; use a shorter path')


def sha256_file(path: os.PathLike[str] | str) -> str:
  """The hex sha256 of a file's bytes, read in one streaming pass (nothing is cached)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()
