"""ADM-format `.npz` batches: uint8 images under `arr_0`, read in pieces; statistics; merging parts.

A sample batch (what DiT's, SiT's, ADM's and rpe2d's samplers write) holds `arr_0`, uint8
(N, H, W, 3) RGB, and often labels. A reference batch (ADM's `VIRTUAL_imagenet256_labeled.npz`)
also holds the whole data set's statistics: `mu` (2048,), `sigma` (2048, 2048) of pool3 and
`mu_s` (2023,), `sigma_s` (2023, 2023) of sFID's spatial features. Nothing is unpickled
(`allow_pickle=False`), and 50,000 images at 256x256 (9.8 GB) are never held at once: `read_rows`
memory-maps an uncompressed `arr_0` and decompresses a compressed one in order.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from rpe2d import files

IMAGES = 'arr_0'
STATISTICS = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}


@dataclasses.dataclass(frozen=True)
class ImageArray:
  """Where `arr_0` lies in an .npz: its shape, and the byte offset of its data if it is stored
  uncompressed (None when deflated)."""
  path: pathlib.Path
  shape: tuple[int, ...]
  offset: int | None

  def __len__(self):
    return self.shape[0]


def _member(path: pathlib.Path, zf: zipfile.ZipFile, key: str) -> zipfile.ZipInfo:
  try:
    return zf.getinfo(f'{key}.npy')
  except KeyError:
    keys = sorted(n[:-4] for n in zf.namelist() if n.endswith('.npy'))
    raise ValueError(f'{path} has no {key!r}; its keys are {keys}') from None


def _read_header(f):
  """(shape, fortran_order, dtype) of the .npy stream `f`, left at the start of the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f'.npy format version {version} is not supported (1.0 and 2.0 are)')


def has_images(path) -> bool:
  """Whether the .npz at `path` has an `arr_0` member (without reading it)."""
  try:
    with zipfile.ZipFile(path) as zf:
      return f'{IMAGES}.npy' in zf.namelist()
  except (zipfile.BadZipFile, OSError):
    return False


def image_array(path, what: str = 'batch', channels: tuple[int, ...] = (3,)) -> ImageArray:
  """Checks that `path` is an .npz whose `arr_0` is uint8 (N, H, W, 3) NHWC RGB (or another of
  `channels`), from its header alone; raises ValueError naming what it found otherwise."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f'{what} {path} does not exist')
  try:
    with zipfile.ZipFile(path) as zf:
      info = _member(path, zf, IMAGES)
      with zf.open(info) as f:
        shape, fortran, dtype = _read_header(f)
        header = f.tell()
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f'{what} {path} is not a readable .npz ({e})') from None
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in channels or fortran:
    order = ' (Fortran order)' if fortran else ''
    raise ValueError(f'{what} {path}: arr_0 is {dtype} {shape}{order}; ADM batches hold uint8 '
                     '(N, H, W, 3) NHWC RGB images in C order')
  if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
    raise ValueError(f'{what} {path}: arr_0 has shape {shape}, with no images')
  offset = None
  if info.compress_type == zipfile.ZIP_STORED:
    with open(path, 'rb') as raw:  # the local header's own name and extra lengths
      raw.seek(info.header_offset + 26)
      name_length, extra_length = np.frombuffer(raw.read(4), '<u2')
    offset = info.header_offset + 30 + int(name_length) + int(extra_length) + header
  return ImageArray(path, tuple(int(s) for s in shape), offset)


def read_rows(array: ImageArray, start: int, stop: int) -> np.ndarray:
  """Images [start, stop) of `array` as uint8 (stop - start, H, W, 3)."""
  row = int(np.prod(array.shape[1:]))
  if array.offset is not None:
    data = np.memmap(array.path, np.uint8, 'r', offset=array.offset + start * row,
                     shape=((stop - start) * row,))
    return np.array(data).reshape((stop - start,) + array.shape[1:])
  with zipfile.ZipFile(array.path) as zf, zf.open(f'{IMAGES}.npy') as f:
    _read_header(f)
    skip = start * row
    while skip:
      skip -= len(f.read(min(skip, 1 << 26)))
    data = f.read((stop - start) * row)
  if len(data) != (stop - start) * row:
    raise ValueError(f'{array.path}: arr_0 ends before image {stop}')
  return np.frombuffer(data, np.uint8).reshape((stop - start,) + array.shape[1:])


def read_statistics(path, keys=('mu', 'sigma', 'mu_s', 'sigma_s')) -> dict[str, np.ndarray]:
  """The statistics among `keys` that the batch holds, float64, each checked for its shape and
  finiteness (a missing key is simply absent from the result; `mu` without `sigma` is an error)."""
  path = pathlib.Path(path)
  found = {}
  with np.load(path, allow_pickle=False) as npz:
    for key in keys:
      if key not in npz.files:
        continue
      try:
        value = npz[key]
      except ValueError as e:
        raise ValueError(f'{path}: key {key!r} cannot be read without pickle ({e})') from None
      if value.shape != STATISTICS[key]:
        raise ValueError(f'{path}: key {key!r} has shape {value.shape}, expected '
                         f'{STATISTICS[key]}')
      if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f'{path}: key {key!r} has dtype {value.dtype}, expected floating point')
      value = value.astype(np.float64)
      if not np.all(np.isfinite(value)):
        raise ValueError(f'{path}: key {key!r} contains NaN or inf')
      found[key] = value
  for mean, cov in (('mu', 'sigma'), ('mu_s', 'sigma_s')):
    if (mean in found) != (cov in found):
      raise ValueError(f'{path} holds {mean if mean in found else cov!r} without '
                       f'{cov if mean in found else mean!r}')
  return found


# ------------------------------------------------------------------------------------------------
# Per-process parts of one sampled batch.


def part_path(output, process_index: int, process_count: int) -> pathlib.Path:
  """Where process p of P writes its share of `output`: `<stem>.part<p>-of-<P>.npz`."""
  output = pathlib.Path(output)
  return output.with_name(f'{output.stem}.part{process_index}-of-{process_count}{output.suffix}')


def write_part(path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
  """One process's images, their labels and global example indices, written atomically."""
  with files.atomic_path(path) as tmp:
    np.savez(tmp, arr_0=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64),
             indices=np.asarray(indices, np.int64))


def merge_parts(output, process_count: int) -> int:
  """Writes the parts of `output` as one ADM batch in example order (arr_0, labels), streaming
  them into the archive so no more than one part is in memory; returns the image count. The parts
  stay where they are: they are removed by the caller once the merge has succeeded."""
  output = pathlib.Path(output)
  parts = [part_path(output, p, process_count) for p in range(process_count)]
  missing = [str(p) for p in parts if not p.is_file()]
  if missing:
    raise FileNotFoundError(f'cannot merge {output}: missing parts {", ".join(missing)}')
  shape, expected, labels = None, 0, []
  for part in parts:
    with np.load(part, allow_pickle=False) as npz:
      indices = npz['indices']
      labels.append(npz['labels'])
    if not np.array_equal(indices, np.arange(expected, expected + len(indices))):
      raise ValueError(f'{part} holds examples {indices[:1]}..{indices[-1:]}, not from {expected}')
    array = image_array(part, 'part', (1, 3))
    if shape is not None and array.shape[1:] != shape:
      raise ValueError(f'{part} holds images of {array.shape[1:]}, the others {shape}')
    shape = array.shape[1:]
    expected += len(indices)
  with files.atomic_path(output) as tmp:
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
      with zf.open(f'{IMAGES}.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': '|u1', 'fortran_order': False, 'shape': (expected,) + shape})
        for part in parts:
          array = image_array(part, 'part', (1, 3))
          for start in range(0, len(array), 1024):
            f.write(read_rows(array, start, min(start + 1024, len(array))).tobytes())
      with zf.open('labels.npy', 'w') as f:
        np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
  return expected


def remove_parts(output, process_count: int) -> None:
  for p in range(process_count):
    os.remove(part_path(output, p, process_count))
