"""Inception features of N images computed in shards by every process, kept across a kill.

The N examples of an evaluation (a cell's samples, or the images of an ADM batch) are cut into
shards of `shard_size` consecutive indices; shard k is computed by process k % P and written to
`<directory>/shard_<k>.npz` atomically (a temporary file, then a rename), holding its features,
the range it covers and the key of what it measures. A rerun, with any number of processes, keeps
every shard that reads back whole with that key and range and finite features, and computes the
rest; a shard that is truncated or damaged is computed again, with a warning. Process 0 then reads
every shard (the directory must be shared by the processes, as a training run's workdir) and is
the one that computes the metrics and writes the results.
"""

from __future__ import annotations

import pathlib
import sys
import zipfile
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from rpe2d import files
from rpe2d.evaluation import inception

Features = inception.Features


def ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard of `count` examples."""
  return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def path(directory, index: int) -> pathlib.Path:
  return pathlib.Path(directory) / f'shard_{index:05d}.npz'


def read(file, key: str, start: int, stop: int) -> tuple[Features, dict] | None:
  """The shard's features and extra arrays, or None if it is missing; a shard that does not read
  back whole (truncated, damaged, another key or range, non-finite) is None too, with a warning."""
  file = pathlib.Path(file)
  if not file.exists():
    return None
  try:
    with np.load(file, allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}  # reading checks each member's CRC
    if (str(arrays.pop('key')) != key or int(arrays.pop('start')) != start
        or int(arrays.pop('stop')) != stop):
      raise ValueError('it belongs to another evaluation')
    pool, spatial = arrays.pop('pool'), arrays.pop('spatial')
    if pool.ndim != 2 or spatial.ndim != 2 or not len(pool) == len(spatial) == stop - start:
      raise ValueError(f'its features have shapes {pool.shape} and {spatial.shape}')
    if not (np.all(np.isfinite(pool)) and np.all(np.isfinite(spatial))):
      raise ValueError('its features are not finite')
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    print(f'warning: {file} is damaged ({e}); computing it again', file=sys.stderr, flush=True)
    return None
  return Features(pool, spatial), arrays


def write(file, key: str, start: int, stop: int, features: Features, **extra) -> None:
  """Writes a shard atomically; features without spatial ones (None) are kept as (n, 0)."""
  pool = np.asarray(features.pool, np.float32)
  spatial = np.zeros((len(pool), 0), np.float32) if features.spatial is None else features.spatial
  with files.atomic_path(file) as tmp:
    np.savez(tmp, key=np.str_(key), start=np.int64(start), stop=np.int64(stop), pool=pool,
             spatial=np.asarray(spatial, np.float32), **extra)


Produce = Callable[[int, int], tuple[Features, dict]]


def compute(directory, key: str, count: int, shard_size: int, produce: Produce, *,
            log: Callable[[str], None] | None = None) -> int:
  """Computes this process's missing shards (k % P == p) with `produce(start, stop)` -> (features,
  extra arrays to keep); returns how many it computed. Every process must call it."""
  process, processes = jax.process_index(), jax.process_count()
  computed = 0
  for index, (start, stop) in enumerate(ranges(count, shard_size)):
    if index % processes != process:
      continue
    file = path(directory, index)
    if read(file, key, start, stop) is not None:
      continue
    features, extra = produce(start, stop)
    write(file, key, start, stop, features, **extra)
    computed += 1
    if log:
      log(f'shard {index + 1} of {-(-count // shard_size)} (examples {start}..{stop - 1})')
  return computed


def gather(directory, key: str, count: int, shard_size: int,
           produce: Produce) -> tuple[Features, dict[str, np.ndarray]]:
  """Every shard's features in example order, and their extra arrays concatenated by name; a
  shard that is missing or damaged by now is computed here."""
  parts, extras = [], {}
  for index, (start, stop) in enumerate(ranges(count, shard_size)):
    found = read(path(directory, index), key, start, stop)
    if found is None:
      found = produce(start, stop)
      write(path(directory, index), key, start, stop, found[0], **found[1])
    parts.append(found[0])
    for name, value in found[1].items():
      extras.setdefault(name, []).append(value)
  pool, spatial = (np.concatenate([getattr(p, f) for p in parts]) for f in Features._fields)
  features = Features(pool, spatial if spatial.shape[1] else None)
  return features, {name: np.concatenate(values) for name, values in extras.items()}


def barrier(name: str) -> None:
  """Waits for every process (nothing to wait for in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
