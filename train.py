"""Trains a DiT from a config; resumes from the newest intact checkpoint in --workdir.

  python train.py                                              # the embedded default
  python train.py --config=configs/animals_grid.py --workdir=runs/grid
  python train.py --config.total_steps=5000 --config.batch_size=128
  python train.py --workdir=runs/mh --coordinator_address=localhost:12345 --num_processes=2 \
      --process_id=0    # and --process_id=1 in a second shell (README.md, Multi-host)
"""

import pathlib
import pickle

from absl import app, flags, logging

from rpe2d import checkpoints, cli, config as config_lib, distributed, rundir, train_loop

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string(
    'config', str(_HERE / 'configs' / 'default.py'),
    'Config file (file.py, or file.py:args); override any field with --config.<key>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, logs and samples go here.')
flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags


def main(argv):
  extra, overrides = config_lib.split_overrides(argv[1:])
  if extra:
    raise app.UsageError(f'unexpected arguments: {extra}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  log = cli.quiet_libraries('train.py')
  try:
    run = rundir.RunDir(_WORKDIR.value)  # refuses an empty --workdir=
    log.path = run.root / 'train.log'
    distributed.initialize_from_flags()  # before any other JAX call
    log.path = run.library_log  # train.<p>.log for process p > 0
    config = config_lib.load(_CONFIG.value, overrides)
    train_loop.train(config, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError, checkpoints.CheckpointError,
          pickle.UnpicklingError) as e:
    cli.fail(str(e), 1)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
