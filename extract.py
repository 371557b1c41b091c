"""Encodes a data set to SD-VAE latents once (rpe2d.latents); run it again to resume.

  python extract.py --vae=vae/diffusion_pytorch_model.safetensors --output=latents/animals
  python extract.py --config=configs/imagenet.py --vae=vae --output=latents/in256 --flip \
      --config.data.image_size=256 --batch_size=256

Bad input (a missing or pickled VAE file, an image size or channel count the VAE cannot encode,
an --output of other settings or not writable) exits 2 before any encoding.
"""

import pathlib
import re
import sys

from absl import app, flags, logging

from rpe2d import config as config_lib, latents

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string(
    'config', str(_HERE / 'configs' / 'default.py'),
    'Config file (file.py, or file.py:args); override any field with --config.<key>=<value>. '
    'Only config.data is used.')
_VAE = flags.DEFINE_string('vae', None, 'A diffusers diffusion_pytorch_model.safetensors, or its '
                           'folder (required).')
_OUTPUT = flags.DEFINE_string('output', None, 'The latents directory (required).')
_FLIP = flags.DEFINE_bool('flip', False, 'Also encode every image flipped horizontally.')
_SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to encode.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 1024, 'Records per shard file.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per encoder call, over all local '
                                   'devices; shard_size must be a multiple of it.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'VAE compute dtype.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')
# --config.<key>=<value> and --noconfig.<key>: left to config_lib.load, as in train.py.
_OVERRIDE = re.compile(r'^--?(no)?config\.')


def parse_flags(argv):
  """absl parses the plain flags; the --config.<key>=<value> overrides pass through to main."""
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
  for flag in (_VAE, _OUTPUT):  # not absl's required=: that would break --help
    if not flag.value:
      print(f'error: --{flag.name} is required', file=sys.stderr)
      sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # tfds logs every file it touches at INFO
  try:
    config = config_lib.load(_CONFIG.value, [a for a in argv[1:] if _OVERRIDE.match(a)])
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    latents.extract(config.data, _VAE.value, _OUTPUT.value, splits=_SPLITS.value,
                    flip=_FLIP.value, shard_size=_SHARD_SIZE.value,
                    batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, progress=_PROGRESS.value)
  except latents.InputError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
