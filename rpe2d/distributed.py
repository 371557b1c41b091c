"""Multi-host runs: joins JAX's distributed runtime when a command is asked to.

`initialize_from_flags()` is the first thing train.py and extract.py do in main (before any
other JAX call: the runtime must start before the backends). With none of the flags below it does
nothing and the command runs as one process. `--distributed` alone lets jax detect the cluster
(Cloud TPU VMs, SLURM, Open MPI, Kubernetes JobSets); `--coordinator_address=host:port
--num_processes=N --process_id=i` name it explicitly (every process gets the same address, that
of process 0). Collectives across CPU processes use gloo, jax's default on CPU.
"""

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


def check_address(address: str) -> None:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address!r} must be host:port (port 1..65535)')


def initialize(*, distributed: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the distributed runtime when any argument asks for it; returns whether it did.

  Bad values raise ValueError naming them, before anything connects.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if not distributed and all(v is None for v in explicit):
    return False
  if coordinator_address is not None:
    check_address(coordinator_address)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1')
  if process_id is not None and (process_id < 0 or (num_processes is not None
                                                    and process_id >= num_processes)):
    raise ValueError(f'--process_id={process_id} must lie in [0, --num_processes='
                     f'{num_processes})')
  if any(v is not None for v in explicit) and coordinator_address is None:
    # On a cluster jax would fill in the rest; half an explicit layout is a mistake.
    raise ValueError('--num_processes and --process_id need --coordinator_address=host:port')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def initialize_from_flags() -> bool:
  """`initialize` with this module's command-line flags; process 0 prints the layout."""
  started = initialize(distributed=_DISTRIBUTED.value,
                       coordinator_address=_COORDINATOR_ADDRESS.value,
                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  if started and jax.process_index() == 0:
    print(describe(), flush=True)
  return started


def describe() -> str:
  """One line: this process, the process count and the devices."""
  return (f'distributed: process {jax.process_index()} of {jax.process_count()}, '
          f'{jax.local_device_count()} local of {jax.device_count()} devices '
          f'({jax.devices()[0].platform})')
