"""The front door for checkpoint files: safetensors and torch files as name -> numpy array.

`read_tensors(path)` tells the format from the first bytes, never from the name, and reads:

* safetensors: an 8-byte little-endian header length N, N bytes of JSON mapping each name to
  {dtype, shape, data_offsets [begin, end)} relative to the data section that follows, then the
  raw little-endian data. Read here from the header with each tensor a read-only view of the
  memory-mapped file (bfloat16 and float8 as ml_dtypes); nothing is unpickled.
* torch files (`torch.save`, zip or legacy format): through the allow-listed unpickler of
  rpe2d.torch_pickle, also memory-mapped. A wrapped checkpoint ({'model': ..., 'ema': ...}) needs
  `unwrap=<key>`, and `TensorFile.unwrapped` says what was taken.

A `.safetensors` file that is really a torch archive is read through the allow-listed path with a
warning saying so; a file that is neither is refused, naming its first bytes. A file cut short is
one line naming it, what is missing and "the file is incomplete: download it again"
(docs/methods.md#reading-checkpoint-files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct

import ml_dtypes
import numpy as np
from absl import logging

from rpe2d import torch_pickle
from rpe2d.files import sha256_file
from rpe2d.torch_pickle import TruncatedFileError

__all__ = ['TensorFile', 'read_tensors', 'read_safetensors', 'sha256_file', 'TruncatedFileError']

# Safetensors dtype names (the format's `Dtype`), as numpy dtypes.
SAFETENSORS_DTYPES = {
    'F64': np.dtype('<f8'),
    'F32': np.dtype('<f4'),
    'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'F8_E8M0': np.dtype(ml_dtypes.float8_e8m0fnu),
    'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'),
    'U64': np.dtype('<u8'),
    'U32': np.dtype('<u4'),
    'U16': np.dtype('<u2'),
    'U8': np.dtype('u1'),
    'BOOL': np.dtype('?'),
    'C64': np.dtype('<c8'),
}
_MAX_HEADER = 100_000_000  # the format's own limit


@dataclasses.dataclass(frozen=True)
class TensorFile:
  """The tensors of one checkpoint file and where they came from."""
  path: pathlib.Path
  format: str                      # 'safetensors', 'torch_zip' or 'torch_legacy'
  tensors: dict[str, np.ndarray]   # read-only views of the memory-mapped file where possible
  sha256: str                      # of the whole file
  unwrapped: str | None            # what `unwrap` took ("unwrapped 'ema': 130 tensors ..."); None


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """name -> read-only array view of a memory-mapped safetensors file (`__metadata__` skipped)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise TruncatedFileError(str(path), f'the 8-byte header length is cut at {len(head)} bytes')
    (n,) = struct.unpack('<Q', head)
    if n > _MAX_HEADER:
      raise ValueError(f'{path}: safetensors header length {n} is over the limit of '
                       f'{_MAX_HEADER} bytes: not a safetensors file')
    if 8 + n > size:
      raise TruncatedFileError(str(path), f'the header says {n} bytes of JSON, {size - 8} follow')
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: the safetensors header is not JSON ({e})') from None
  if not isinstance(header, dict):
    raise ValueError(f'{path}: the safetensors header is a {type(header).__name__}, not an object')
  start = 8 + n
  # mmap refuses empty ranges; a file of zero-size tensors has no data section to map.
  data = (np.asarray(np.memmap(path, np.uint8, mode='r', offset=start)) if size > start
          else np.zeros(0, np.uint8))
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype_name = info['dtype']
      shape = tuple(int(d) for d in info['shape'])
      begin, end = (int(o) for o in info['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f'{path}: tensor {name!r} has a malformed header entry {info!r}') from None
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has dtype {dtype_name!r}; allowed: '
                       f'{", ".join(SAFETENSORS_DTYPES)}')
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != nbytes or any(d < 0 for d in shape):
      raise ValueError(f'{path}: tensor {name!r} of shape {shape} and {dtype_name} needs '
                       f'{nbytes} bytes, its data_offsets {[begin, end]} span {end - begin}')
    if end > data.size:
      raise TruncatedFileError(str(path), f'tensor {name!r} needs the data section to reach byte '
                                          f'{end}, it has {data.size}')
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
  return tensors


def _holds_tensors(value) -> bool:
  return (isinstance(value, dict) and bool(value)
          and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()))


def read_tensors(path: str | os.PathLike[str], *,
                 unwrap: str | tuple[str, ...] | None = None,
                 sha256: str | None = None) -> TensorFile:
  """The tensors of a safetensors or torch checkpoint file, whatever its name says.

  Args:
    path: the file.
    unwrap: for a torch checkpoint wrapping its state dicts ({'model': ..., 'ema': ...}), the key
      to take; None (or 'none') for a plain state dict or a safetensors file. A tuple of keys
      names wrappers a file may or may not have (a Lightning checkpoint's ('state_dict',)): the
      first of them that holds tensors is taken, and a file without any is read as it is.
    sha256: the file's sha256 when the caller has just computed it (it is not hashed again).

  Raises:
    FileNotFoundError: no such file.
    ValueError: neither safetensors nor a torch file (its first bytes are named), a wrapped
      checkpoint without `unwrap`, malformed headers; `TruncatedFileError` for a file cut short;
      `torch_pickle.RefusedGlobalError` (a `pickle.UnpicklingError`) for a pickle naming a global
      outside the allow-list (nothing was imported or called).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file')
  kind = torch_pickle.sniff(path)
  optional = unwrap if isinstance(unwrap, tuple) else ()
  if kind == 'safetensors':
    if optional:
      unwrap = None
    if unwrap not in (None, 'none'):
      raise ValueError(f"{path}: unwrap={unwrap!r}, but safetensors files hold one flat set of "
                       "tensors; pass no unwrap (or 'none')")
    tensors, unwrapped = read_safetensors(path), None
  elif kind in ('torch_zip', 'torch_legacy', 'zip'):  # 'zip': read() names what it lacks
    if path.suffix.lower() == '.safetensors' and kind != 'zip':
      logging.warning('%s is named .safetensors but is a torch %s archive; reading it through '
                      'the allow-listed unpickler', path, kind.removeprefix('torch_'))
    obj = torch_pickle.read(path, extra_globals=torch_pickle.STATE_DICT_GLOBALS)
    if optional:
      unwrap = next((k for k in optional if isinstance(obj, dict) and k in obj
                     and _holds_tensors(obj[k])), None)
    tensors, description, key = torch_pickle.split_state_dict(obj, str(path), unwrap)
    kind, unwrapped = 'torch_zip' if kind == 'zip' else kind, (
        description if key is not None else None)
  else:
    raise ValueError(f'{path} is neither safetensors nor a torch file: '
                     f'{torch_pickle.describe_head(path)}; it is not read')
  return TensorFile(path=path, format=kind, tensors=tensors, sha256=sha256 or sha256_file(path),
                    unwrapped=unwrapped)
