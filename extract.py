"""Encodes a data set to VAE latents once (rpe2d.latents); run it again to resume.

  python extract.py --vae=vae/diffusion_pytorch_model.safetensors --output=latents/animals
  python extract.py --config=configs/imagenet.py:XL,256,rpe2d --vae=sd-vae-ft-ema \
      --output=latents/imagenet256 --flip --batch_size=256
  python extract.py --config=configs/imagenet.py:XL,256,grid \
      --vae=vavae-imagenet256-f16d32-dinov2.pt --vae_statistics=latents_stats.pt \
      --output=latents/imagenet256_vavae --flip

--vae is a diffusers folder or safetensors file (the SD VAE), or an LDM-layout checkpoint such as
LightningDiT's VA-VAE (a torch file, read through rpe2d's allow-listed unpickler; the other
networks it carries are left unread). Bad input (a missing VAE file, one that is not a VAE or
pickles a global outside the allow-list, statistics that do not fit it, an image size or channel
count the VAE cannot encode, an --output of other settings, not writable, inside a run's
checkpoints or in use by another extract.py) exits 2 before any encoding.
"""

import pathlib

from absl import app, flags, logging

from rpe2d import cli, config as config_lib, data, distributed, latents, rundir

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string(
    'config', str(_HERE / 'configs' / 'default.py'),
    'Config file (file.py, or file.py:args); override any field with --config.<key>=<value>. '
    'Only config.data is used: its images, or for a latent config (data.name=latents) the source '
    'images it names (data.source_name, data.source_image_size).')
_VAE = flags.DEFINE_string('vae', None, 'The VAE (required): a diffusers '
                           'diffusion_pytorch_model.safetensors or its folder, or an LDM-layout '
                           "checkpoint (the VA-VAE's .pt).")
_VAE_STATISTICS = flags.DEFINE_string(
    'vae_statistics', None, "The VAE's per-channel latent statistics file (the VA-VAE's "
    "latents_stats.pt): recorded, and what data.latent_scaling='vae' normalises by.")
_OUTPUT = flags.DEFINE_string('output', None, 'The latents directory (required).')
_FLIP = flags.DEFINE_bool('flip', False, 'Also encode every image flipped horizontally.')
_SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to encode.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 1024, 'Records per shard file.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per encoder call, over all local '
                                   'devices; shard_size must be a multiple of it.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'VAE compute dtype.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')
flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags


def main(argv):
  extra, overrides = config_lib.split_overrides(argv[1:])
  if extra:
    raise app.UsageError(f'unexpected arguments: {extra}')
  logging.set_verbosity(logging.WARNING)  # tfds logs every file it touches at INFO
  log = cli.quiet_libraries('extract.py')
  try:
    for flag in (_VAE, _OUTPUT):  # not absl's required=: that would break --help
      if not flag.value or not flag.value.strip():
        raise ValueError(f'--{flag.name} is required' + (' (it is empty)' if flag.value else ''))
    latents.check_arguments(splits=_SPLITS.value, shard_size=_SHARD_SIZE.value,
                            batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, prefix='--')
    rundir.check_not_managed(_OUTPUT.value, '--output')
    log.path = pathlib.Path(_OUTPUT.value).expanduser().absolute() / 'extract.log'
    distributed.initialize_from_flags()  # before any other JAX call
    config = config_lib.load(_CONFIG.value, overrides)
    images = data.source_data_config(config.data)
  except ValueError as e:
    cli.fail(str(e), cli.BAD_INPUT)
  try:
    latents.extract(images, _VAE.value, _OUTPUT.value, splits=_SPLITS.value, flip=_FLIP.value,
                    shard_size=_SHARD_SIZE.value, batch_size=_BATCH_SIZE.value,
                    dtype=_DTYPE.value, progress=_PROGRESS.value,
                    vae_statistics=_VAE_STATISTICS.value)
  except latents.InputError as e:
    cli.fail(str(e), cli.BAD_INPUT)
  except (ValueError, OSError) as e:
    cli.fail(str(e) if not isinstance(e, OSError) else cli.reason(e), cli.FAILED)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
