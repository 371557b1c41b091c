"""The repository's scripts as forked children of one warm interpreter, for the tests that start
many of them.

A fresh `python train.py ...` spends ~2.5 s of CPU on imports (jax, flax, orbax, grain, tfds)
before its first line of `main`; the suite starts dozens. Here one server process imports those
modules once, without starting a jax backend (so no XLA threads exist when it forks), and forks a
child per command. Each child is a real process: its own pid, argv, cwd, environment, stdin from
/dev/null, stdout and stderr to files, the script run as `__main__`, signals delivered to it alone,
and the interpreter's own exit (atexit handlers, the exit status of `sys.exit` or 1 after a
traceback). What it skips is only the re-import of unchanged modules. Children run concurrently
(the processes of a multi-host run, a reader beside a trainer).

  with forked.Scripts(['rpe2d.inference'], env) as scripts:
    result = scripts.run(['evaluate.py', '--runs=...'], cwd=REPO)  # a CompletedProcess
    process = scripts.start(['train.py', ...], cwd=REPO, stdout=path, stderr=path)  # Popen-like

The server's environment is fixed when it starts: what the interpreter and the imported modules
read at import (PYTHONPATH, JAX_* options) must be the same for every child, so a request may
change only the variables in PER_CHILD (read later: XLA_FLAGS when the backend starts,
PYTHONUNBUFFERED applied by the child).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import tempfile
import time

# What a child may set differently from the server (read after the fork, not at import).
PER_CHILD = ('XLA_FLAGS', 'PYTHONUNBUFFERED')


def _write_status(status_dir: str, pid: int, status: int) -> None:
  tmp = os.path.join(status_dir, f'{pid}.tmp')
  with open(tmp, 'w') as f:
    f.write(str(os.waitstatus_to_exitcode(status)))
  os.replace(tmp, os.path.join(status_dir, str(pid)))  # the client never reads half a number


def _serve(modules: list[str]) -> None:
  for name in modules:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  assert not xla_bridge.backends_are_initialized(), 'a module started a jax backend on import'
  channel_in, channel_out = sys.stdin, sys.stdout
  status_dir = channel_in.readline().strip()

  def reap(*_):
    while True:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        return
      if pid == 0:
        return
      _write_status(status_dir, pid, status)

  signal.signal(signal.SIGCHLD, reap)
  channel_out.write('ready\n')
  channel_out.flush()
  for line in channel_in:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: becomes `python <script> <args>` in cwd, and never returns here
      signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its own children are its business
      signal.signal(signal.SIGINT, signal.default_int_handler)
      null = os.open(os.devnull, os.O_RDONLY)
      os.dup2(null, 0)
      for fd, path in ((1, request['stdout']), (2, request['stderr'])):
        if fd == 2 and path == request['stdout']:  # one log for both, as stderr=STDOUT
          os.dup2(1, 2)
        else:
          os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
      for name in PER_CHILD:
        if request['env'].get(name) is None:
          os.environ.pop(name, None)
        else:
          os.environ[name] = request['env'][name]
      if os.environ.get('PYTHONUNBUFFERED'):  # as `python -u`: every write reaches the file
        sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), write_through=True,
                                      errors='backslashreplace')
      os.chdir(request['cwd'])
      script = request['argv'][0]
      sys.argv = list(request['argv'])
      sys.path[0] = str(pathlib.Path(script).resolve().parent)
      runpy.run_path(script, run_name='__main__')
      sys.exit(0)  # out of _serve: the interpreter's normal exit, as after the script's last line
    channel_out.write(json.dumps({'pid': pid}) + '\n')
    channel_out.flush()


class Process:
  """A started child, with the part of subprocess.Popen's interface the tests use."""

  def __init__(self, argv, pid: int, status_path: pathlib.Path):
    self.args, self.pid, self._status_path = argv, pid, status_path
    self.returncode = None

  def poll(self):
    if self.returncode is None and self._status_path.exists():
      self.returncode = int(self._status_path.read_text())
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while self.poll() is None:
      if deadline is not None and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(self.args, timeout)
      time.sleep(delay)
      delay = min(2 * delay, 0.02)
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:  # as Popen: never signal a pid that may have been reused
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)


class Scripts:
  """A server that forks one child per `start` or `run`; `modules` are imported once, in the
  server, under `env`."""

  def __init__(self, modules: list[str], env: dict[str, str]):
    self.env = dict(env)
    self._tmp = tempfile.TemporaryDirectory()
    self._status = pathlib.Path(self._tmp.name) / 'status'
    self._status.mkdir()
    self._server = subprocess.Popen([sys.executable, __file__, *modules], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self._server.stdin.write(f'{self._status}\n')
    self._server.stdin.flush()
    self._runs = 0
    ready = self._server.stdout.readline()
    if ready != 'ready\n':
      self.close()
      raise RuntimeError(f'the script server did not start (exit {self._server.returncode})')

  def start(self, argv, cwd, *, stdout, stderr, env: dict[str, str] | None = None) -> Process:
    """`python argv[0] argv[1:]` in `cwd`, output to the files `stdout` and `stderr` (the same
    path: one file for both); `env` (default: the server's) may differ from the server's only in
    PER_CHILD."""
    env = self.env if env is None else env
    differ = sorted(k for k in set(env) | set(self.env)
                    if env.get(k) != self.env.get(k) and k not in PER_CHILD)
    if differ:
      raise ValueError(f'{differ} are read at import: start a server with that environment')
    argv = [str(a) for a in argv]
    for path in (stdout, stderr):  # there when this returns, as with subprocess.Popen's files
      pathlib.Path(path).touch()
    self._server.stdin.write(json.dumps(dict(
        argv=argv, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr),
        env={k: env.get(k) for k in PER_CHILD})) + '\n')
    self._server.stdin.flush()
    pid = json.loads(self._server.stdout.readline())['pid']
    return Process(argv, pid, self._status / str(pid))

  def run(self, argv: list[str], cwd, timeout: float = 300,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """start() and wait: the completed process with its output, as subprocess.run."""
    self._runs += 1
    out, err = (os.path.join(self._tmp.name, f'{self._runs}.{name}')
                for name in ('stdout', 'stderr'))
    process = self.start(argv, cwd, stdout=out, stderr=err, env=env)
    try:
      process.wait(timeout)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      stdout, stderr = (pathlib.Path(p).read_text(errors='replace') for p in (out, err))
      raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from None
    stdout, stderr = (pathlib.Path(p).read_text(errors='replace') for p in (out, err))
    for path in (out, err):
      os.unlink(path)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

  def close(self):
    if self._server.poll() is None:
      self._server.stdin.close()
      self._server.wait(timeout=30)
    self._tmp.cleanup()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


if __name__ == '__main__':
  _serve(sys.argv[1:])
