"""What the commands share about failing: one `error: ...` line, and checks of where they write.

Bad input (found before any work) exits with status 2; a failure after work started (a disk that
fills, memory that runs out, samples that are not finite) exits with status 1, naming what failed
and what was kept. Neither prints a traceback.

Worker processes die with their command (`die_with_parent`, grain's worker_init_fn): a command
killed with SIGKILL runs no code of its own, so its children must notice by themselves.
"""

import contextlib
import os
import pathlib
import sys
import threading
import time

BAD_INPUT, FAILED = 2, 1


def reason(error: BaseException) -> str:
  """An error in a few words: an OSError's strerror and file, else the first line of its text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror + (f': {error.filename}' if error.filename else '')
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def fail(message: str, status: int) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


@contextlib.contextmanager
def exit_on(status: int, *types):
  """Turns the errors of `types` raised in the block into one `error:` line and exit `status`."""
  try:
    yield
  except types as e:  # pylint: disable=catching-non-exception
    fail(' '.join(str(e).split('\n')) if not isinstance(e, OSError) else reason(e), status)


def check_writable_dir(directory, what: str) -> pathlib.Path:
  """Creates `directory` (and its parents) and writes and removes a probe file in it; raises
  ValueError naming `what` when that fails, so a command finds out before any work."""
  directory = pathlib.Path(directory).absolute()
  probe = directory / f'.write_probe_{os.getpid()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'0')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'{what} {directory} is not writable ({reason(e)})') from None
  return directory


def available_memory() -> int | None:
  """Bytes of memory available to new allocations (Linux MemAvailable), None where unknown."""
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def gib(size: float) -> str:
  return f'{size / 2**30:.1f} GiB'


PARENT_POLL_SECONDS = 0.5
_watching = []


def die_with_parent(*unused_worker_index_and_count) -> None:
  """In a child process: exit as soon as the parent is gone (the kernel reparents an orphan, so
  os.getppid() changes). Idempotent; takes grain's worker_init_fn arguments."""
  if _watching:
    return
  parent = os.getppid()
  _watching.append(parent)

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  # nothing of ours to clean up in a worker

  threading.Thread(target=watch, daemon=True, name='rpe2d-die-with-parent').start()
