"""Latent extraction: a data set encoded once by a VAE (the SD VAE, the VA-VAE: rpe2d.autoencoder),
resumable and exact, and its reader.

  manifest = latents.extract(config.data, 'vae/diffusion_pytorch_model.safetensors',
                             'latents/animals', flip=True)
  manifest = latents.extract(config.data, 'vavae-imagenet256-f16d32-dinov2.pt', 'latents/in256',
                             vae_statistics='latents_stats.pt')
  source = latents.LatentSource('latents/animals', 'train')   # random access, for grain

Format
------
An output directory holding:

  `manifest.json`                    written last, by process 0; `complete: true` (see `Manifest`)
  `<split>-<k:05d>.array_record`     shard k of a split: records k*shard_size .. of the split, in
                                     the split's order (ArrayRecord, group_size 1, uncompressed)
  `progress-<p:05d>.json`            the shards process p has finished (name, records, bytes,
                                     sha256) and the settings; what a restart resumes from

Each record is fixed-size little-endian bytes, no pickle (h, w, c = `latent_shape`):

  mean            float32 (h, w, c)   posterior mean of the centre-cropped image
  logvar          float32 (h, w, c)   posterior log-variance (clipped to [-30, 20])
  mean_flipped    float32 (h, w, c)   only when `flip`: the same for the horizontally flipped
  logvar_flipped  float32 (h, w, c)   image
  label           int32
  index           int64               the record's index in the source split

The latents are the VAE's own (unscaled); the diffusion model sees
`autoencoder.latents_to_model(z, config)` (the manifest keeps `scaling_factor` and
`shift_factor`, and the VAE's per-channel `statistics` when it has a statistics file: then
scaling_factor * (z - mean) / std), or a normalisation by `channel_mean` / `channel_std` (per
channel over the posterior means of the `train` split; None when `train` was not extracted).

Exactness: encoding is deterministic (posterior moments, no sampling), shards end on batch
boundaries (`shard_size` is a multiple of `batch_size`), so every batch is the same in a run that
was killed and restarted as in one that was not, and the shards and manifest come out byte for
byte the same. A shard is written under `<name>.tmp`, fsynced, renamed, and only then listed in
the progress file (written atomically). A restart keeps the listed shards whose size and sha256
match, removes (with a warning) temporary files and shards that are not listed, and encodes the
rest. The settings that decide the bytes (VAE sha256 and architecture, data source, image size,
channels, flip, dtype, shard and batch size) are kept with the progress; a run with other settings
is refused before any work, naming the keys that differ. The number of local devices is not one
of them: a restart on another machine may differ in the last bits.

Processes: shard k is encoded and written by process k % jax.process_count(); each process
keeps its own progress file; process 0 writes the manifest once every process has finished
(`multihost_utils.sync_global_devices`). The directory must be shared by the processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import pickle
import re
import struct
import time
from typing import Any, Iterable, Sequence

from absl import logging
from array_record.python import array_record_data_source, array_record_module
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from rpe2d import autoencoder, autoencoder_weights, data, files

# Raise when the layout of the directory or of a record changes; a newer one is refused.
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PROGRESS = 'progress-{:05d}.json'
SHARD_SUFFIX = '.array_record'
TMP_SUFFIX = '.tmp'
# zstd (the default) saved 7% on float32 latents here at 3.7x the write and 2.8x the read time:
# not worth it for data a trainer reads at random.
WRITER_OPTIONS = 'group_size:1,uncompressed'
_SPLIT_NAME = re.compile(r'^[A-Za-z0-9_]+$')
_PROGRESS_NAME = re.compile(r'^progress-\d{5}\.json$')
_OWN_FILE = re.compile(r'^((manifest\.json|progress-\d{5}\.json|[A-Za-z0-9_]+-\d{5}\.array_record)'
                       r'(\.tmp(\.json)?|\.damaged)?|\.write-probe-\d+-\d+|extract\.(lock|log))$')
LOCK = 'extract.lock'  # held (fcntl.flock) by the one extraction writing the directory
DAMAGED_SUFFIX = '.damaged'  # a manifest or progress file that could not be read, kept
# What decides the bytes of the shards; a restart with any other value is refused.
SETTINGS = ('vae.sha256', 'vae.config', 'source.name', 'source.image_dir', 'source.image_size',
            'source.channels', 'latent_shape', 'flip', 'dtype', 'shard_size', 'batch_size',
            'vae.statistics.sha256')
# Fields of vae.config that extractions from before they existed did not record, at the value that
# was implied then.
_VAE_CONFIG_ADDED = {'attention_levels': []}


class InputError(ValueError):
  """Bad input to `extract`, found before any encoding (extract.py exits 2)."""


class LatentsError(ValueError):
  """A latents directory that cannot be read: missing, unfinished, damaged or newer."""


# ------------------------------------------------------------------------------------------------
# Records.


def record_bytes(latent_shape: Sequence[int], flip: bool) -> int:
  """The size of one record: 2 (4 with flips) float32 latents, an int32 and an int64."""
  return 4 * math.prod(latent_shape) * (4 if flip else 2) + 4 + 8


def encode_record(mean, logvar, label: int, index: int, mean_flipped=None,
                  logvar_flipped=None) -> bytes:
  """One record (see the module doc); pass both flipped arrays or neither."""
  if (mean_flipped is None) != (logvar_flipped is None):
    raise ValueError('mean_flipped and logvar_flipped: pass both or neither')
  arrays = [mean, logvar] + ([] if mean_flipped is None else [mean_flipped, logvar_flipped])
  shape = np.shape(mean)
  if any(np.shape(a) != shape or len(shape) != 3 for a in arrays):
    raise ValueError(f'latents have shapes {[np.shape(a) for a in arrays]}; expected one '
                     f'(h, w, c) shape for all')
  body = b''.join(np.ascontiguousarray(a, dtype='<f4').tobytes() for a in arrays)
  return body + struct.pack('<iq', int(label), int(index))


def decode_record(record: bytes, latent_shape: Sequence[int], flip: bool) -> dict[str, Any]:
  """A record -> {'mean', 'logvar'[, 'mean_flipped', 'logvar_flipped'], 'label', 'index'}."""
  size = record_bytes(latent_shape, flip)
  if len(record) != size:
    raise LatentsError(f'a record of {len(record)} bytes; expected {size} for latents '
                       f'{tuple(latent_shape)}{" with flips" if flip else ""}')
  n = math.prod(latent_shape)
  keys = ('mean', 'logvar') + (('mean_flipped', 'logvar_flipped') if flip else ())
  floats = np.frombuffer(record, dtype='<f4', count=n * len(keys))
  out = {k: floats[i * n:(i + 1) * n].reshape(latent_shape).astype(np.float32)
         for i, k in enumerate(keys)}
  label, index = struct.unpack_from('<iq', record, 4 * n * len(keys))
  out['label'], out['index'] = label, index
  return out


def _means(records: Sequence[bytes], latent_shape, flip: bool) -> np.ndarray:
  """The posterior means of many records, as (n, h, w, c) float32, without a Python loop."""
  size = record_bytes(latent_shape, flip)
  raw = np.frombuffer(b''.join(records), dtype=np.uint8).reshape(len(records), size)
  n = math.prod(latent_shape)
  return raw[:, :4 * n].copy().view('<f4').reshape(len(records), *latent_shape)


# ------------------------------------------------------------------------------------------------
# The manifest.


@dataclasses.dataclass(frozen=True)
class Manifest:
  """`manifest.json`. `splits`: {name: {'count': n, 'shards': [{'name', 'records', 'bytes',
  'sha256'}, ...]}}; `vae`: {'path', 'sha256', 'config', 'scaling_factor', 'shift_factor',
  'statistics'} (statistics: None, or {'path', 'sha256', 'mean', 'std'} of its statistics file);
  `source`: {'name', 'image_dir', 'image_size', 'channels'}."""
  format: int
  vae: dict
  source: dict
  latent_shape: tuple[int, int, int]
  flip: bool
  dtype: str
  shard_size: int
  batch_size: int
  splits: dict
  channel_mean: tuple[float, ...] | None
  channel_std: tuple[float, ...] | None
  complete: bool

  @property
  def record_bytes(self) -> int:
    return record_bytes(self.latent_shape, self.flip)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1) + '\n'

  @classmethod
  def from_dict(cls, raw: dict) -> 'Manifest':
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(raw) != fields:
      raise ValueError(f'keys {sorted(raw)}; expected {sorted(fields)}')
    raw = dict(raw, latent_shape=tuple(raw['latent_shape']))
    for key in ('channel_mean', 'channel_std'):
      raw[key] = None if raw[key] is None else tuple(raw[key])
    return cls(**raw)


def _settings(record: dict) -> dict:
  """The SETTINGS of a manifest or progress file (nested dicts) as a flat dict."""
  out = {}
  for key in SETTINGS:
    value = record
    for part in key.split('.'):
      value = value.get(part) if isinstance(value, dict) else None
    if key == 'vae.config' and isinstance(value, dict):
      value = {**_VAE_CONFIG_ADDED, **value}
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def _differing(found: dict, wanted: dict) -> list[str]:
  a, b = _settings(found), _settings(wanted)
  return [f'{k} ({a[k]!r} there, {b[k]!r} asked)' for k in SETTINGS if a[k] != b[k]]


def _read_json(path: pathlib.Path, directory) -> dict:
  try:
    raw = json.loads(path.read_bytes().decode('utf-8'))
  except (OSError, ValueError) as e:
    raise LatentsError(f'latents directory {directory}: cannot read {path.name} ({e})') from None
  if not isinstance(raw, dict) or not isinstance(raw.get('format'), int):
    raise LatentsError(f'latents directory {directory}: {path.name} has no format version')
  if raw['format'] > FORMAT_VERSION:
    raise LatentsError(f'latents directory {directory}: {path.name} has format {raw["format"]}, '
                       f'newer than this rpe2d reads ({FORMAT_VERSION}); update rpe2d')
  return raw


def read_manifest(directory) -> Manifest:
  """The manifest of a finished extraction; `LatentsError` (one line naming the directory) when
  it is missing, unfinished, unreadable or of a newer format. Shards are not checked here."""
  directory = pathlib.Path(directory)
  path = directory / MANIFEST
  if not path.is_file():
    raise LatentsError(f'latents directory {directory}: no {MANIFEST} (not a latents directory, '
                       f'or its extraction never finished: run extract.py again to finish it)')
  rebuild = ('run extract.py again with the same flags: it verifies the shards and writes the '
             'manifest again')
  try:
    raw = _read_json(path, directory)
  except LatentsError as e:
    if 'newer than this rpe2d' in str(e):
      raise
    raise LatentsError(f'{e}; {rebuild}') from None
  try:
    manifest = Manifest.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise LatentsError(f'latents directory {directory}: {MANIFEST} is malformed ({e}); '
                       f'{rebuild}') from None
  if manifest.complete is not True:
    raise LatentsError(f'latents directory {directory}: {MANIFEST} says the extraction is not '
                       f'complete; run extract.py again to finish it')
  return manifest


def check_shards(directory, manifest: Manifest, *, verify_sha256: bool = True) -> None:
  """Refuses (`LatentsError` naming the directory and shard) a missing shard, one whose size
  differs from the manifest's (cut short or grown), and with `verify_sha256` a changed one."""
  directory = pathlib.Path(directory)
  for split, info in manifest.splits.items():
    if sum(s['records'] for s in info['shards']) != info['count']:
      raise LatentsError(f'latents directory {directory}: the shards of {split!r} hold '
                         f'{sum(s["records"] for s in info["shards"])} records, not its count '
                         f'{info["count"]}')
    for shard in info['shards']:
      problem = _shard_problem(directory / shard['name'], shard, verify_sha256)
      if problem:
        raise LatentsError(f'latents directory {directory}: {problem}; extract it again')


def _shard_problem(path: pathlib.Path, entry: dict, verify_sha256: bool) -> str | None:
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    return f'shard {path.name} is missing'
  if size != entry['bytes']:
    return (f'shard {path.name} has {size} bytes, the manifest says {entry["bytes"]} '
            f'(truncated or changed)')
  if verify_sha256 and files.sha256_file(path) != entry['sha256']:
    return f'shard {path.name} has another sha256 than the manifest says (changed on disk)'
  return None


# ------------------------------------------------------------------------------------------------
# Reading.


class LatentSource:
  """A random-access source over one split of a latents directory, for grain.

  `source[i]` -> {'mean', 'logvar' (float32 (h, w, c)), 'mean_flipped', 'logvar_flipped' (when
  the set has flips), 'label' (int), 'index' (int: the record's index in the image split)}.
  Opening validates the manifest and the shard sizes (no hashing, so it is fast); files are
  opened on first read, and again after unpickling (grain workers).
  """

  def __init__(self, directory, split: str):
    self.directory = pathlib.Path(directory)
    self.manifest = read_manifest(self.directory)
    if split not in self.manifest.splits:
      raise LatentsError(f'latents directory {self.directory}: split={split!r} is not there; '
                         f'available: {", ".join(self.manifest.splits)}')
    check_shards(self.directory, self.manifest, verify_sha256=False)
    self.split = split
    shards = self.manifest.splits[split]['shards']
    # path[start:end] tells ArrayRecordDataSource the record count without opening the file.
    self._paths = [f'{self.directory / s["name"]}[0:{s["records"]}]' for s in shards]
    self._count = self.manifest.splits[split]['count']
    self._source = None

  def __len__(self) -> int:
    return self._count

  def _records(self):
    if self._source is None:
      self._source = array_record_data_source.ArrayRecordDataSource(self._paths)
    return self._source

  def _decode(self, record: bytes) -> dict[str, Any]:
    return decode_record(record, self.manifest.latent_shape, self.manifest.flip)

  def __getitem__(self, i) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < self._count:
      raise IndexError(f'{self.split} record {i}; allowed: 0..{self._count - 1}')
    return self._decode(self._records()[i])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    for i in indices:
      if not 0 <= int(i) < self._count:
        raise IndexError(f'{self.split} record {int(i)}; allowed: 0..{self._count - 1}')
    return [self._decode(r) for r in self._records().__getitems__([int(i) for i in indices])]

  def __getstate__(self):
    return dict(self.__dict__, _source=None)  # open readers do not pickle

  def __repr__(self) -> str:
    return f'LatentSource({str(self.directory)!r}, {self.split!r}: {self._count} records)'


# ------------------------------------------------------------------------------------------------
# Extraction.


def shard_name(split: str, k: int) -> str:
  return f'{split}-{k:05d}{SHARD_SUFFIX}'


class _Batch(grain.transforms.Map):
  """Batch number -> that batch of the image pipeline (a top-level class: picklable)."""

  def __init__(self, batches):
    self.batches = batches

  def map(self, i):
    return self.batches[int(i)]


def _image_batches(data_config, split: str, batch_size: int) -> tuple[grain.MapDataset, int]:
  """The batched eval pipeline of `data.make_dataset` as a `MapDataset`, and the split's length.

  `make_dataset` batches on a MapDataset and then wraps it in iterators; taking that MapDataset
  gives random access to batch i (so a restart starts at any shard without decoding the images
  before it) with exactly the images and batches `make_dataset` yields.
  """
  ds = data.make_dataset(data_config, split=split, seed=0, global_batch_size=batch_size,
                         train=False, num_epochs=1, process_index=0, process_count=1)
  while not isinstance(ds, grain.MapDataset):
    (ds,) = ds.parents
  root = ds
  while root.parents:
    (root,) = root.parents
  count = len(root)
  if len(ds) != -(-count // batch_size):
    raise AssertionError(f'{split}: {len(ds)} batches of {batch_size} for {count} records')
  return ds, count


@dataclasses.dataclass
class _Plan:
  """Everything `extract` checked before any work."""
  out_dir: pathlib.Path
  loaded: autoencoder_weights.Loaded
  settings: dict          # the manifest's fields but splits, stats and complete
  splits: tuple[str, ...]
  batches: dict           # split -> (MapDataset of image batches, record count)
  previous: Manifest | None
  opts: data.DataOptions


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise InputError(f'{name}={value!r}; allowed: a positive int')
  return int(value)


def check_arguments(*, splits, shard_size, batch_size, dtype, prefix: str = '') -> None:
  """The plain arguments of `extract`, named as the caller knows them: `prefix` '--' names
  extract.py's flags (--shard_size=...), '' the Python arguments. Raises InputError."""
  shard_size = _positive_int(f'{prefix}shard_size', shard_size)
  batch_size = _positive_int(f'{prefix}batch_size', batch_size)
  if shard_size % batch_size:
    raise InputError(f'{prefix}shard_size={shard_size} is not a multiple of {prefix}batch_size='
                     f'{batch_size}; shards must end on batch boundaries (exact restarts)')
  if dtype not in autoencoder.DTYPES:
    raise InputError(f'{prefix}dtype={dtype!r}; allowed: {", ".join(autoencoder.DTYPES)}')
  splits = tuple(splits)
  bad = [s for s in splits if not isinstance(s, str) or not _SPLIT_NAME.match(s)]
  if not splits or bad or len(set(splits)) != len(splits):
    shown = ','.join(map(str, splits)) if prefix else repr(splits)
    raise InputError(f'{prefix}splits={shown}; allowed: distinct split names of letters, digits '
                     f'and _ (e.g. train,test)')


def _plan(data_config, vae_path, out_dir, *, splits, flip, shard_size, batch_size,
          dtype, vae_statistics=None) -> _Plan:
  """Checks every input and the output directory; raises InputError, writes nothing but the
  directory and its lock."""
  check_arguments(splits=splits, shard_size=shard_size, batch_size=batch_size, dtype=dtype)
  shard_size, batch_size, splits = int(shard_size), int(batch_size), tuple(splits)
  try:
    opts = data.parse_config(data_config)
  except ValueError as e:
    raise InputError(str(e)) from None
  vae_path = pathlib.Path(vae_path).expanduser().absolute()
  if vae_path.is_dir():
    vae_path = vae_path / autoencoder_weights.WEIGHTS_NAME
  try:
    loaded = autoencoder_weights.load(vae_path)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise InputError(f'--vae: {e}') from None
  statistics = None
  if vae_statistics is not None:
    try:
      statistics = autoencoder_weights.read_statistics(vae_statistics,
                                                       loaded.config.latent_channels)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
      raise InputError(f'--vae_statistics: {e}') from None
  config = loaded.config
  if opts.image_size % config.downsampling:
    raise InputError(f'data.image_size={opts.image_size} is not divisible by the VAE\'s '
                     f'downsampling factor {config.downsampling}; allowed: a multiple of '
                     f'{config.downsampling}')
  if opts.channels != config.in_channels:
    raise InputError(f'data.channels={opts.channels}, but the VAE encodes {config.in_channels}-'
                     f'channel images; set --config.data.channels={config.in_channels}')
  size = opts.image_size // config.downsampling
  settings = {
      'format': FORMAT_VERSION,
      'vae': {'path': str(vae_path.resolve()), 'sha256': loaded.sha256,
              'config': dataclasses.asdict(config), 'scaling_factor': config.scaling_factor,
              'shift_factor': config.shift_factor,
              'statistics': None if statistics is None else {
                  'path': statistics.path, 'sha256': statistics.sha256,
                  'mean': list(statistics.mean), 'std': list(statistics.std)}},
      'source': {'name': opts.name, 'image_dir': opts.image_dir, 'image_size': opts.image_size,
                 'channels': opts.channels},
      'latent_shape': (size, size, config.latent_channels),
      'flip': bool(flip), 'dtype': dtype, 'shard_size': shard_size, 'batch_size': batch_size,
  }
  settings['vae']['config']['block_out_channels'] = list(config.block_out_channels)
  settings['vae']['config']['attention_levels'] = list(config.attention_levels)
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  try:
    files.check_names_fit(out_dir, [shard_name(split, 99999) + TMP_SUFFIX for split in splits]
                          + [PROGRESS.format(99999) + '.tmp.json', MANIFEST + DAMAGED_SUFFIX],
                          f'--output {out_dir}')
  except ValueError as e:
    raise InputError(str(e)) from None
  _check_out_dir(out_dir, settings, repair=False)
  batches = {}
  for split in splits:
    try:
      batches[split] = _image_batches(data_config, split, batch_size)
    except (ValueError, OSError) as e:
      raise InputError(f'data: {e}') from None
  _check_writable(out_dir)
  if jax.process_index() == 0:  # one writer per directory; the checks below read what it wrote
    try:
      files.DirectoryLock(out_dir, LOCK, 'extract.py').acquire(
          f'--output {out_dir}', 'wait for it to finish or stop it, or choose another --output')
    except files.InUseError as e:
      raise InputError(str(e)) from None
  previous = _check_out_dir(out_dir, settings, repair=jax.process_index() == 0)
  return _Plan(out_dir, loaded, settings, splits, batches, previous, opts)


def _check_out_dir(out_dir: pathlib.Path, settings: dict, *, repair: bool) -> Manifest | None:
  """Refuses a directory of another extraction or with foreign files; the old manifest if any.
  A damaged manifest or progress file is skipped, and with `repair` (the writer, holding the
  lock) set aside as <name>.damaged, with a warning: it is rebuilt."""
  if not out_dir.is_dir():
    return None
  foreign = sorted(p.name for p in out_dir.iterdir() if not _OWN_FILE.match(p.name))
  if foreign:
    shown = ', '.join(foreign[:5]) + (', ...' if len(foreign) > 5 else '')
    raise InputError(f'--output {out_dir} holds files that are not latents ({shown}); choose an '
                     f'empty or new directory')
  previous = None
  found = _progress_paths(out_dir)
  if (out_dir / MANIFEST).is_file():
    found.insert(0, out_dir / MANIFEST)
  for path in found:
    try:
      raw = _read_json(path, out_dir)
    except LatentsError as e:
      if 'newer than this rpe2d' in str(e):
        raise InputError(str(e)) from None
      # Our own bookkeeping, damaged (a kill mid-write, a bad disk): set aside, and rebuilt from
      # the shards (a progress file's shards are verified or encoded again; the manifest is
      # written again from the progress files).
      if repair:
        _set_aside(path, e)
      continue
    differ = _differing(raw, settings)
    if differ:
      raise InputError(f'--output {out_dir} holds latents of another extraction ({path.name} '
                       f'differs in {"; ".join(differ)}); choose another --output or remove it')
    if path.name == MANIFEST:
      try:
        previous = read_manifest(out_dir)
      except LatentsError as e:
        if repair:
          _set_aside(path, e)
  return previous


def _set_aside(path: pathlib.Path, error: Exception) -> None:
  aside = path.with_name(path.name + DAMAGED_SUFFIX)
  path.replace(aside)
  logging.warning('%s; moved it to %s (kept for inspection) and rebuilding it', error, aside.name)


def _check_writable(out_dir: pathlib.Path) -> None:
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f'.write-probe-{jax.process_index()}-*'):
      stale.unlink()  # left by a run killed between these lines
    probe = out_dir / f'.write-probe-{jax.process_index()}-{os.getpid()}'
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    raise InputError(f'--output {out_dir} is not writable ({e.strerror or e}); choose another '
                     f'--output') from None


def _progress_paths(out_dir: pathlib.Path) -> list[pathlib.Path]:
  # Not glob('progress-*.json'): that also matches atomic_path's progress-<p>.json.tmp.json.
  return sorted(p for p in out_dir.iterdir() if _PROGRESS_NAME.match(p.name))


def _progress_files(out_dir: pathlib.Path) -> dict[str, dict]:
  """Every finished shard of every progress file: name -> entry (entries of one shard agree:
  encoding is deterministic and the settings were checked)."""
  entries = {}
  for path in _progress_paths(out_dir):
    for shards in _read_json(path, out_dir)['splits'].values():
      for entry in shards:
        if entries.setdefault(entry['name'], entry) != entry:
          raise LatentsError(f'latents directory {out_dir}: {path.name} lists {entry["name"]} '
                             f'with another size or sha256 than another progress file; remove '
                             f'the directory and extract again')
  return entries


def _write_progress(path: pathlib.Path, settings: dict, done: dict[str, list]) -> None:
  with files.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(dict(settings, splits=done), indent=1) + '\n')


def _resume(plan: _Plan, process: int, processes: int) -> tuple[dict[str, list], list]:
  """Keeps this process's verified shards, removes its unfinished ones; (done, todo)."""
  out_dir, shard_size = plan.out_dir, plan.settings['shard_size']
  listed = _progress_files(out_dir)
  done, todo = {}, []
  for split in plan.splits:
    done[split] = []
    count = plan.batches[split][1]
    for k in range(-(-count // shard_size)):
      if k % processes != process:
        continue
      name = shard_name(split, k)
      path, tmp = out_dir / name, out_dir / (name + TMP_SUFFIX)
      if tmp.exists():
        logging.warning('%s: removing %s, a shard that never finished', out_dir, tmp.name)
        tmp.unlink()
      entry = listed.get(name)
      records = min(shard_size, count - k * shard_size)
      if entry is not None:
        problem = _shard_problem(path, entry, verify_sha256=True)
        if problem is None and entry['records'] == records:
          done[split].append(entry)
          continue
        logging.warning('%s: %s; encoding it again', out_dir, problem or f'{name} holds '
                        f'{entry["records"]} records, the split now needs {records}')
      if path.exists():
        if entry is None:
          logging.warning('%s: removing %s, a shard not listed as finished', out_dir, name)
        path.unlink()
      todo.append((split, k, records))
  for stale in out_dir.glob(PROGRESS.format(process) + '.tmp*'):
    stale.unlink()  # a progress file whose atomic write was cut short
  return done, todo


def _encoder(plan: _Plan):
  """(launch, finish): launch(images) starts the sharded encode (and of the flipped images) on the
  local devices without waiting; finish(launched) -> numpy [mean, logvar, (flipped pair)]."""
  mesh = autoencoder.local_mesh()
  fn = autoencoder.sharded(functools.partial(autoencoder.encode, config=plan.loaded.config,
                                             dtype=plan.settings['dtype']), mesh)
  params = jax.device_put(plan.loaded.params,
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def launch(images: np.ndarray):
    # Pad to a multiple of the devices; the padding is dropped in finish.
    pad = -len(images) % mesh.size
    padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]) \
        if pad else images
    out = [fn(params, padded)]
    if plan.settings['flip']:
      out.append(fn(params, np.ascontiguousarray(padded[:, :, ::-1])))
    return len(images), out

  def finish(launched):
    n, out = launched
    return [np.asarray(x)[:n] for pair in out for x in pair]

  return launch, finish


def _encoded(batches: Iterable[dict], launch, finish):
  """(batch, [mean, logvar, (mean_flipped, logvar_flipped)]) with one batch in flight, so the
  device encodes batch i while the host writes batch i - 1."""
  pending = None
  for batch in batches:
    launched = (batch, launch(batch['image']))
    if pending is not None:
      yield pending[0], finish(pending[1])
    pending = launched
  if pending is not None:
    yield pending[0], finish(pending[1])


def _write_shards(plan: _Plan, todo: list, done: dict, progress_path: pathlib.Path,
                  progress: bool) -> int:
  import tqdm  # pylint: disable=g-import-not-at-top
  settings, out_dir = plan.settings, plan.out_dir
  per_shard = settings['shard_size'] // settings['batch_size']
  order = [(split, k * per_shard + j) for split, k, records in todo
           for j in range(-(-records // settings['batch_size']))]
  if not order:
    return 0
  streams = []
  # One iterator per split, over this process's batches in order (threads and workers start
  # once per split, not once per shard).
  for split in dict.fromkeys(s for s, _ in order):
    ids = [i for s, i in order if s == split]
    ds = grain.MapDataset.source(ids).map(_Batch(plan.batches[split][0])).to_iter_dataset(
        grain.ReadOptions(num_threads=plan.opts.read_threads,
                          prefetch_buffer_size=plan.opts.prefetch_batches))
    if plan.opts.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=plan.opts.num_workers))
    streams.append(ds)
  launch, finish = _encoder(plan)
  stream = _encoded((b for ds in streams for b in ds), launch, finish)
  total = sum(records for *_, records in todo)
  bar = tqdm.tqdm(total=total, unit='img', desc=f'encoding {out_dir.name}', disable=not progress,
                  smoothing=0.1)
  written = 0
  try:
    for split, k, records in todo:
      name = shard_name(split, k)
      path, tmp = out_dir / name, out_dir / (name + TMP_SUFFIX)
      writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
      left = records
      while left > 0:
        batch, arrays = next(stream)
        if len(batch['image']) > left:
          raise AssertionError(f'{name}: a batch of {len(batch["image"])} for {left} records')
        for i in range(len(batch['image'])):
          writer.write(encode_record(*(a[i] for a in arrays[:2]), batch['label'][i],
                                     batch['index'][i], *(a[i] for a in arrays[2:])))
        left -= len(batch['image'])
        bar.update(len(batch['image']))
      writer.close()
      with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name says the shard is whole
      entry = {'name': name, 'records': records, 'bytes': tmp.stat().st_size,
               'sha256': files.sha256_file(tmp)}
      os.replace(tmp, path)
      done[split] = sorted(done[split] + [entry], key=lambda e: e['name'])  # as a fresh run's
      _write_progress(progress_path, settings, done)
      written += records
  finally:
    bar.close()
  return written


def _channel_stats(out_dir: pathlib.Path, manifest_splits: dict, settings: dict):
  """Per-channel mean and std (float64) of the posterior means of `train`, read from its shards;
  shards are combined with Chan et al.'s parallel variance formula."""
  if 'train' not in manifest_splits or manifest_splits['train']['count'] == 0:
    return None, None
  n, mean, m2 = 0, 0.0, 0.0
  for shard in manifest_splits['train']['shards']:
    reader = array_record_module.ArrayRecordReader(str(out_dir / shard['name']))
    try:
      records = reader.read_all()
    finally:
      reader.close()
    x = _means(records, settings['latent_shape'], settings['flip']).astype(np.float64)
    x = x.reshape(-1, x.shape[-1])
    nb, mean_b = len(x), x.mean(axis=0)
    m2_b = np.square(x - mean_b).sum(axis=0)
    delta = mean_b - mean
    mean = mean + delta * nb / (n + nb)
    m2 = m2 + m2_b + np.square(delta) * n * nb / (n + nb)
    n += nb
  return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(m2 / n))


def _write_manifest(plan: _Plan) -> Manifest:
  out_dir, settings = plan.out_dir, plan.settings
  listed = _progress_files(out_dir)
  splits = dict(plan.previous.splits) if plan.previous else {}
  for split in plan.splits:
    count, shard_size = plan.batches[split][1], settings['shard_size']
    names = [shard_name(split, k) for k in range(-(-count // shard_size))]
    missing = [n for n in names if n not in listed]
    if missing:
      raise LatentsError(f'latents directory {out_dir}: shards {missing} are not finished after '
                         f'every process ended; run extract.py again')
    splits[split] = {'count': count, 'shards': [listed[n] for n in names]}
  mean, std = _channel_stats(out_dir, splits, settings)
  manifest = Manifest(splits=splits, channel_mean=mean, channel_std=std, complete=True,
                      **settings)
  check_shards(out_dir, manifest, verify_sha256=False)
  with files.atomic_path(out_dir / MANIFEST) as tmp:
    tmp.write_text(manifest.to_json())
  return manifest


def extract(data_config, vae_path, out_dir, *, splits: Sequence[str] = ('train', 'test'),
            flip: bool = False, shard_size: int = 1024, batch_size: int = 64,
            dtype: str = 'float32', progress: bool = True, vae_statistics=None) -> Manifest:
  """Encodes `splits` of the data set of `data_config` (centre-cropped, no augmentation) with the
  VAE at `vae_path` into `out_dir` (see the module doc); resumes an unfinished extraction and
  does nothing for a finished one. Returns the manifest.

  Args:
    data_config: `config.data` of a config from `rpe2d.config.load` (which resolves
      `data.augment='auto'`; augmentation is never applied here).
    vae_path: a diffusers `diffusion_pytorch_model.safetensors` (or its folder, with
      `config.json` beside it unless the file is a known one), or an LDM-layout checkpoint such
      as the VA-VAE's `.pt` (rpe2d.autoencoder_weights.load).
    out_dir: the latents directory; created if needed.
    splits: split names of the data set.
    flip: also encode each image flipped horizontally.
    shard_size: records per shard file; a multiple of `batch_size`.
    batch_size: images per encoder call, over all local devices (padded to a multiple of them).
    dtype: the VAE's compute dtype, 'float32' or 'bfloat16'.
    progress: show a tqdm bar.
    vae_statistics: the VAE's per-channel latent statistics file (the VA-VAE's latents_stats.pt),
      recorded in the manifest: with data.latent_scaling='vae' a run normalises by it.

  Raises:
    InputError: before any work, for a bad argument, VAE file, data config, image size or
      channels not fitting the VAE, an unwritable `out_dir`, or an `out_dir` holding latents of
      other settings (naming the keys that differ).
  """
  plan = _plan(data_config, vae_path, out_dir, splits=splits, flip=flip, shard_size=shard_size,
               batch_size=batch_size, dtype=dtype, vae_statistics=vae_statistics)
  try:
    return _extract(plan, progress)
  finally:
    files.DirectoryLock(plan.out_dir, LOCK, 'extract.py').release()


def _extract(plan: _Plan, progress: bool) -> Manifest:
  if plan.previous is not None and all(s in plan.previous.splits for s in plan.splits):
    try:
      check_shards(plan.out_dir, plan.previous, verify_sha256=False)
      print(f'{plan.out_dir}: already complete ({", ".join(plan.splits)}); nothing to do')
      return plan.previous
    except LatentsError as e:  # a shard damaged since: the restart below encodes it again
      logging.warning('%s', e)
  process, processes = jax.process_index(), jax.process_count()
  done, todo = _resume(plan, process, processes)
  kept = sum(len(v) for v in done.values())
  if kept:
    print(f'{plan.out_dir}: resuming; {kept} shards already finished and verified')
  began = time.monotonic()
  count = _write_shards(plan, todo, done, plan.out_dir / PROGRESS.format(process), progress)
  seconds = time.monotonic() - began
  print(f'{plan.out_dir}: encoded {count} images in {seconds:.1f} s '
        f'({count / max(seconds, 1e-9):.1f} images/s)')
  multihost_utils.sync_global_devices('rpe2d.latents: every shard written')
  if process == 0:
    _write_manifest(plan)
  multihost_utils.sync_global_devices('rpe2d.latents: manifest written')
  return read_manifest(plan.out_dir)
