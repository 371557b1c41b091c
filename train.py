"""Trains a DiT from a config; resumes from the newest intact checkpoint in --workdir.

  python train.py                                              # the embedded default
  python train.py --config=configs/animals_grid.py --workdir=runs/grid
  python train.py --config.total_steps=5000 --config.batch_size=128
"""

import pathlib
import pickle
import re
import sys

from absl import app, flags, logging

from rpe2d import checkpoints, config as config_lib, train_loop

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string(
    'config', str(_HERE / 'configs' / 'default.py'),
    'Config file (file.py, or file.py:args); override any field with --config.<key>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, logs and samples go here.')
# --config.<key>=<value> and --noconfig.<key>: left to config_lib.load, which names a bad one
# (inside absl's flag parsing an unknown key is a traceback at import time).
_OVERRIDE = re.compile(r'^--?(no)?config\.')


def parse_flags(argv):
  """absl parses the plain flags; the --config.<key>=<value> overrides pass through to main.

  --help also lists every config field, its default and what it allows (rpe2d.config.SCHEMA).
  """
  if any(a in ('-h', '--help', '-?') for a in argv[1:]):
    flags.FLAGS(argv[:1])
    print(f'{flags.FLAGS.main_module_help()}\n\nConfig fields (--config.<key>=<value>):\n'
          f'{config_lib.help_text()}')
    sys.exit(0)
  plain = [argv[0]] + [a for a in argv[1:] if not _OVERRIDE.match(a)]
  return app.parse_flags_with_usage(plain) + [a for a in argv[1:] if _OVERRIDE.match(a)]


def main(argv):
  extra = [a for a in argv[1:] if not _OVERRIDE.match(a)]
  if extra:
    raise app.UsageError(f'unexpected arguments: {extra}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  try:
    config = config_lib.load(_CONFIG.value, [a for a in argv[1:] if _OVERRIDE.match(a)])
    train_loop.train(config, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError, checkpoints.CheckpointError,
          pickle.UnpicklingError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
