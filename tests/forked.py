"""The repository's scripts as forked children of one warm interpreter, for the tests that start
many of them only to see them refuse bad input.

A fresh `python evaluate.py ...` spends ~8 s of a loaded CPU on imports (jax, flax, orbax, grain,
tfds) before its first line of `main`. Here one server process imports those modules once, without
starting a jax backend (so no XLA threads exist when it forks), and forks a child per command. Each
child is a real process: its own argv, cwd, stdin from /dev/null, stdout and stderr to files, the
script run as `__main__`, and the interpreter's own exit (atexit handlers, the exit status of
`sys.exit` or 1 after a traceback). What it skips is only the re-import of unchanged modules.

  with forked.Scripts(['rpe2d.inference'], env) as scripts:
    result = scripts.run(['evaluate.py', '--runs=...'], cwd=REPO)  # a CompletedProcess
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import tempfile


def _serve(modules: list[str]) -> None:
  for name in modules:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  assert not xla_bridge.backends_are_initialized(), 'a module started a jax backend on import'
  channel_in, channel_out = sys.stdin, sys.stdout
  channel_out.write('ready\n')
  channel_out.flush()
  for line in channel_in:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: becomes `python <script> <args>` in cwd, and never returns here
      null = os.open(os.devnull, os.O_RDONLY)
      os.dup2(null, 0)
      for fd, path in ((1, request['stdout']), (2, request['stderr'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
      os.chdir(request['cwd'])
      script = request['argv'][0]
      sys.argv = list(request['argv'])
      sys.path[0] = str(pathlib.Path(script).resolve().parent)
      signal.signal(signal.SIGINT, signal.default_int_handler)
      runpy.run_path(script, run_name='__main__')
      sys.exit(0)  # out of _serve: the interpreter's normal exit, as after the script's last line
    channel_out.write(json.dumps({'pid': pid}) + '\n')
    channel_out.flush()
    _, status = os.waitpid(pid, 0)
    channel_out.write(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}) + '\n')
    channel_out.flush()


class Scripts:
  """A server that forks one child per `run`; `modules` are imported once, in the server."""

  def __init__(self, modules: list[str], env: dict[str, str]):
    self._server = subprocess.Popen([sys.executable, __file__, *modules], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self._tmp = tempfile.TemporaryDirectory()
    ready = self._server.stdout.readline()
    if ready != 'ready\n':
      self.close()
      raise RuntimeError(f'the script server did not start (exit {self._server.returncode})')

  def run(self, argv: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = (os.path.join(self._tmp.name, name) for name in ('stdout', 'stderr'))
    self._server.stdin.write(json.dumps(dict(argv=[str(a) for a in argv], cwd=str(cwd),
                                             stdout=out, stderr=err)) + '\n')
    self._server.stdin.flush()
    pid = json.loads(self._server.stdout.readline())['pid']
    killer = _Timer(timeout, lambda: os.kill(pid, signal.SIGKILL))
    try:
      returncode = json.loads(self._server.stdout.readline())['returncode']
    finally:
      timed_out = killer.cancel()
    stdout, stderr = (pathlib.Path(p).read_text(errors='replace') for p in (out, err))
    if timed_out:
      raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

  def close(self):
    if self._server.poll() is None:
      self._server.stdin.close()
      self._server.wait(timeout=30)
    self._tmp.cleanup()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Timer:
  """Calls `action` after `seconds` unless cancelled; `cancel()` says whether it fired."""

  def __init__(self, seconds, action):
    import threading  # pylint: disable=g-import-not-at-top
    self._fired = False

    def fire():
      self._fired = True
      action()

    self._timer = threading.Timer(seconds, fire)
    self._timer.daemon = True
    self._timer.start()

  def cancel(self) -> bool:
    self._timer.cancel()
    return self._fired


if __name__ == '__main__':
  _serve(sys.argv[1:])
