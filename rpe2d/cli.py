"""What the commands share about failing: one `error: ...` line, and checks of where they write.

Bad input (found before any work) exits with status 2; a failure after work started (a disk that
fills, memory that runs out, samples that are not finite) exits with status 1, naming what failed
and what was kept. Neither prints a traceback.

The libraries a command drives (orbax, tensorstore, grain, jax, TFDS) log their own failures, often
with tracebacks and from their own threads, and a full disk would bury the one line that says what
happened under them. `quiet_libraries` sends their errors (with tracebacks) and the exceptions that
end their threads to a log file beside the command's output, `<command>.log`, created only when
something is written there, and the error line names the file; their warnings stay on the console,
each at most once and without a traceback; rpe2d's own lines are untouched.

Worker processes die with their command (`die_with_parent`, grain's worker_init_fn): a command
killed with SIGKILL runs no code of its own, so its children must notice by themselves.
"""

import contextlib
import datetime
import logging
import os
import pathlib
import sys
import threading
import time
import traceback

BAD_INPUT, FAILED = 2, 1


def reason(error: BaseException) -> str:
  """An error in a few words: an OSError's strerror and file, else the first line of its text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror + (f': {error.filename}' if error.filename else '')
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def fail(message: str, status: int) -> None:
  if _LIBRARY_LOG and _LIBRARY_LOG[0].written:
    message = f'{message} (what the libraries logged, with tracebacks: {_LIBRARY_LOG[0].where})'
  print(f'error: {message}', file=sys.stderr, flush=True)
  if _LIBRARY_LOG and _LIBRARY_LOG[0].written:
    _LIBRARY_LOG[0].take_stderr()
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


# ------------------------------------------------------------------------------------------------
# Library messages go to a file.

_PACKAGE = pathlib.Path(__file__).resolve().parent
_LIBRARY_LOG = []  # the LibraryLog of this process, once a command installed it


def _ours(pathname: str) -> bool:
  """Whether a log record comes from rpe2d or the command's script (not from a library)."""
  if not pathname or pathname.startswith('<'):  # code without a file: not ours
    return False
  try:
    path = pathlib.Path(pathname).resolve()
    script = pathlib.Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith('.py') \
        else None
  except (OSError, ValueError):
    return False
  return _PACKAGE in path.parents or (script is not None and path.parent == script.parent)


class LibraryLog(logging.Handler):
  """Where the libraries' messages go: appended to `path` (set it once the command knows where
  it writes; until then, and when it cannot be written, to `$RPE2D_CACHE/logs/<command>.log`).
  Nothing is created until there is something to write."""

  def __init__(self, command: str):
    super().__init__(logging.ERROR)
    self.command = command
    self.path: pathlib.Path | None = None
    self.where: pathlib.Path | None = None
    self.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(pathname)s:'
                                        '%(lineno)d] %(message)s'))

  @property
  def written(self) -> bool:
    return self.where is not None

  def _fallback(self) -> pathlib.Path:
    cache = os.environ.get('RPE2D_CACHE') or pathlib.Path.home() / '.cache' / 'rpe2d'
    return pathlib.Path(cache) / 'logs' / f'{pathlib.Path(self.command).stem}.log'

  def write(self, text: str) -> None:
    candidates = ([self.path] if self.path is not None else []) + [self._fallback()]
    for path in candidates:
      try:
        if self.where != path:
          path.parent.mkdir(parents=True, exist_ok=True)
          with open(path, 'a', encoding='utf-8') as f:
            f.write(f'--- {self.command}, pid {os.getpid()}, '
                    f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
        with open(path, 'a', encoding='utf-8') as f:
          f.write(text if text.endswith('\n') else text + '\n')
        self.where = path
        return
      except OSError:
        continue  # a full disk: the console keeps the one line

  def take_stderr(self) -> None:
    """Sends what is printed to stderr from now on (by the libraries' threads and callbacks as
    the process ends) to the log, after the one error line that names the log."""
    self.write('--- printed to stderr as the process ended:')
    try:
      sys.stderr.flush()
      fd = os.open(str(self.where), os.O_WRONLY | os.O_APPEND)
      os.dup2(fd, 2)
      os.close(fd)
    except OSError:
      pass

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self.write(self.format(record))
    except Exception:  # pylint: disable=broad-except  # logging must never raise
      pass


class _NotLibraryErrors(logging.Filter):
  """On the console: rpe2d's records, and a library's warnings once each, without traceback."""

  def __init__(self):
    super().__init__()
    self.seen = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if _ours(record.pathname):
      return True
    if record.levelno >= logging.ERROR:
      return False  # in the LibraryLog
    key = (record.name, str(record.msg))  # a message template, whatever its arguments
    if key in self.seen:
      return False
    self.seen.add(key)
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


class _OnlyLibraries(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not _ours(record.pathname)


def quiet_libraries(command: str) -> LibraryLog:
  """Sends the libraries' errors and the exceptions that end their threads to a LibraryLog instead
  of the console, and shows each of their warnings once, without traceback; rpe2d's own records
  are untouched. Installed once per process, by a command's main; returns the log (set its
  `path` once the command knows where it writes)."""
  if _LIBRARY_LOG:
    return _LIBRARY_LOG[0]
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  log = LibraryLog(command)
  log.addFilter(_OnlyLibraries())
  root = logging.getLogger()
  absl_logging.use_absl_handler()  # the console handler (absl.app.run installs it too)
  absl_handler = absl_logging.get_absl_handler()
  console = _NotLibraryErrors()
  for handler in {*root.handlers, absl_handler}:
    handler.addFilter(console)
  root.addHandler(log)

  def thread_died(args):
    if args.exc_type is SystemExit:
      return
    name = args.thread.name if args.thread is not None else 'a thread'
    log.write(f'exception in {name}:\n'
              + ''.join(traceback.format_exception(args.exc_type, args.exc_value,
                                                   args.exc_traceback)))

  threading.excepthook = thread_died
  unraisable_by_python = sys.unraisablehook

  def unraisable(args):
    # PyErr_WriteUnraisable: tensorstore's callbacks into the event loop that orbax closed after
    # a failed save ('Event loop is closed'), from its own threads; rpe2d's own print as ever.
    frames = traceback.extract_tb(args.exc_traceback)
    if not frames or any(_ours(frame.filename) for frame in frames):
      unraisable_by_python(args)
      return
    log.write(f'{args.err_msg or "exception ignored"} in {threading.current_thread().name}:\n'
              + ''.join(traceback.format_exception(args.exc_type, args.exc_value,
                                                   args.exc_traceback)))

  sys.unraisablehook = unraisable
  _LIBRARY_LOG.append(log)
  return log
