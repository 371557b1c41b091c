"""Multi-host runs: joins JAX's distributed runtime when a command is asked to.

`initialize_from_flags()` is the first thing train.py and extract.py do in main (before any
other JAX call: the runtime must start before the backends). With none of the flags below it does
nothing and the command runs as one process. `--distributed` alone lets jax detect the cluster
(Cloud TPU VMs, SLURM, Open MPI, Kubernetes JobSets); `--coordinator_address=host:port
--num_processes=N --process_id=i` name it explicitly (every process gets the same address, that
of process 0). Collectives across CPU processes use gloo, jax's default on CPU.

Start-up is bounded and says what it waits for. jax's own client aborts the process with a C++
stack when its peers do not come in time, so with an explicit layout the processes first meet on
the coordinator's port in plain Python (`rendezvous`): process 0 listens and names the processes
still missing, the others name the coordinator they wait for, and after --distributed_timeout
seconds every process stops with one line naming what never came. Only then does jax start its
service on that port, with what is left of the timeout.
"""

import socket
import sys
import time

from absl import flags
import jax

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run; without the three flags below, jax detects '
    'the cluster (Cloud TPU VM, SLURM, Open MPI, Kubernetes).')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port where process 0 serves the distributed runtime '
    '(the same on every process); implies --distributed.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds every process waits for the others to join the run; '
    'then a one-line error names the processes (or the coordinator) that never came.')

# How often a waiting process says again what it waits for, in seconds.
REPORT_EVERY = 30.0


def check_address(address: str) -> tuple[str, int]:
  """(host, port) of a coordinator address; refuses a malformed one, naming it."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address!r} must be host:port (port 1..65535)')
  return host.strip('[]'), int(port)  # [::1]:port


def resolve(address: str) -> tuple[str, int]:
  """check_address, and refuses a host that does not resolve, naming it."""
  host, port = check_address(address)
  try:
    socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ValueError(f'--coordinator_address={address!r}: the host {host!r} does not resolve '
                     f'({e.strerror}); give the host name or address of process 0, reachable '
                     'from every process') from None
  return host, port


def _say(text: str) -> None:
  print(f'distributed: {text}', file=sys.stderr, flush=True)


def _read_line(connection: socket.socket, deadline: float) -> str:
  data = b''
  while not data.endswith(b'\n'):
    connection.settimeout(max(deadline - time.monotonic(), 0.01))
    chunk = connection.recv(64)
    if not chunk:
      break
    data += chunk
  return data.decode(errors='replace').strip()


def _serve(host: str, port: int, num_processes: int, timeout: float) -> None:
  """Process 0: waits on the coordinator's port for processes 1..N-1 to say their ids."""
  deadline = time.monotonic() + timeout
  try:
    server = socket.create_server(('', port), family=socket.AF_INET6, dualstack_ipv6=True) \
        if socket.has_dualstack_ipv6() else socket.create_server(('', port))
  except OSError as e:
    raise ValueError(f'--coordinator_address={host}:{port}: process 0 cannot listen on port '
                     f'{port} ({e.strerror}); is another run using it? Choose a free port') \
        from None
  arrived, connections = set(), []
  missing = lambda: sorted(set(range(1, num_processes)) - arrived)
  _say(f'process 0 of {num_processes}: waiting for process{"es" if num_processes > 2 else ""} '
       f'{", ".join(map(str, missing()))} at port {port} (up to {timeout:.0f} s, '
       '--distributed_timeout)')
  report = time.monotonic() + REPORT_EVERY
  try:
    while missing():
      now = time.monotonic()
      if now >= deadline:
        for connection in connections:
          connection.sendall(f'missing {",".join(map(str, missing()))}\n'.encode())
        raise ValueError(f'distributed start-up: process{"es" if len(missing()) > 1 else ""} '
                         f'{", ".join(map(str, missing()))} of {num_processes} did not join '
                         f'{host}:{port} within {timeout:.0f} s (--distributed_timeout); start '
                         'every process with the same --coordinator_address and '
                         '--num_processes, each with its own --process_id')
      if now >= report:
        _say(f'still waiting for processes {", ".join(map(str, missing()))} '
             f'({now - deadline + timeout:.0f} s)')
        report = now + REPORT_EVERY
      server.settimeout(min(deadline, report) - now)
      try:
        connection, _ = server.accept()
      except socket.timeout:
        continue
      try:
        claimed = int(_read_line(connection, time.monotonic() + 10))
      except (ValueError, OSError):
        connection.close()  # not one of ours (a port scanner, a stale client)
        continue
      if claimed in arrived or not 0 < claimed < num_processes:
        connection.sendall(b'refused\n')
        connection.close()
        raise ValueError(f'distributed start-up: a second process says --process_id={claimed} '
                         f'(of --num_processes={num_processes}); give each process its own id')
      arrived.add(claimed)
      connections.append(connection)
    for connection in connections:
      connection.sendall(b'go\n')
    for connection in connections:  # they close first: no TIME_WAIT on jax's port here
      try:
        _read_line(connection, time.monotonic() + 10)
      except OSError:
        pass
  finally:
    for connection in connections:
      connection.close()
    server.close()


def _join(host: str, port: int, process_id: int, num_processes: int, timeout: float) -> None:
  """Process i > 0: says its id to process 0 on the coordinator's port, and waits for 'go'."""
  deadline = time.monotonic() + timeout
  _say(f'process {process_id} of {num_processes}: waiting for the coordinator, process 0, at '
       f'{host}:{port} (up to {timeout:.0f} s, --distributed_timeout)')
  report = time.monotonic() + REPORT_EVERY
  while True:
    try:
      connection = socket.create_connection((host, port), timeout=5)
      break
    except OSError:
      now = time.monotonic()
      if now >= deadline:
        raise ValueError(f'distributed start-up: process {process_id} found no coordinator at '
                         f'{host}:{port} within {timeout:.0f} s (--distributed_timeout); start '
                         'process 0 with the same --coordinator_address (its host and a free '
                         'port)') from None
      if now >= report:
        _say(f'still waiting for the coordinator at {host}:{port}')
        report = now + REPORT_EVERY
      time.sleep(0.5)
  with connection:
    try:
      connection.sendall(f'{process_id}\n'.encode())
      answer = _read_line(connection, deadline + 5)
    except OSError:
      answer = ''
  if answer == 'go':
    return
  if answer.startswith('missing'):
    raise ValueError(f'distributed start-up: process 0 at {host}:{port} gave up waiting for '
                     f'processes {answer.split()[1]} (--distributed_timeout); start them all')
  if answer == 'refused':
    raise ValueError(f'distributed start-up: process 0 refused --process_id={process_id}: another '
                     'process has it; give each process its own id')
  raise ValueError(f'distributed start-up: process 0 at {host}:{port} did not answer within '
                   f'{timeout:.0f} s (--distributed_timeout)')


def rendezvous(address: str, num_processes: int, process_id: int, timeout: float) -> float:
  """Every process of an explicit layout meets on the coordinator's port before jax's runtime
  starts there; returns the seconds left of `timeout`. Raises ValueError with one line naming the
  processes, or the coordinator, that never came."""
  host, port = resolve(address)
  began = time.monotonic()
  if num_processes > 1:
    if process_id == 0:
      _serve(host, port, num_processes, timeout)
    else:
      _join(host, port, process_id, num_processes, timeout)
  return max(timeout - (time.monotonic() - began), 1.0)


def initialize(*, distributed: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout: int = 300) -> bool:
  """Starts the distributed runtime when any argument asks for it; returns whether it did.

  Bad values raise ValueError naming them, before anything connects; so does a start-up that
  does not complete within `timeout` seconds (`rendezvous`).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if not distributed and all(v is None for v in explicit):
    return False
  if coordinator_address is not None:
    check_address(coordinator_address)
  if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
    raise ValueError(f'--distributed_timeout={timeout!r} must be a positive number of seconds')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1')
  if process_id is not None and (process_id < 0 or (num_processes is not None
                                                    and process_id >= num_processes)):
    raise ValueError(f'--process_id={process_id} must lie in [0, --num_processes='
                     f'{num_processes})')
  if any(v is not None for v in explicit) and coordinator_address is None:
    # On a cluster jax would fill in the rest; half an explicit layout is a mistake.
    raise ValueError('--num_processes and --process_id need --coordinator_address=host:port')
  if coordinator_address is not None and num_processes is not None and process_id is not None:
    timeout = int(rendezvous(coordinator_address, num_processes, process_id, timeout))
  elif coordinator_address is not None:
    resolve(coordinator_address)
  else:
    _say(f'joining the cluster jax detects (up to {timeout} s, --distributed_timeout)')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout)
  return True


def initialize_from_flags() -> bool:
  """`initialize` with this module's command-line flags; process 0 prints the layout."""
  started = initialize(distributed=_DISTRIBUTED.value,
                       coordinator_address=_COORDINATOR_ADDRESS.value,
                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                       timeout=_TIMEOUT.value)
  if started and jax.process_index() == 0:
    print(describe(), flush=True)
  return started


def describe() -> str:
  """One line: this process, the process count and the devices."""
  return (f'distributed: process {jax.process_index()} of {jax.process_count()}, '
          f'{jax.local_device_count()} local of {jax.device_count()} devices '
          f'({jax.devices()[0].platform})')
