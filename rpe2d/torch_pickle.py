"""Reading pickled tensors without torch: the one module in rpe2d that unpickles anything.

Pickles are programs: unpickling one calls whatever functions it names. Every pickle rpe2d reads
goes through an unpickler here whose `find_class` admits a fixed allow-list of names, each mapped
to rpe2d's own inert code; any other global raises `RefusedGlobalError` naming it, and the module
it names is never imported, nothing it names is called (docs/methods.md#reading-checkpoint-files).

Three readers share that machinery:

* `read` / `state_dict`: files written by `torch.save`. The zip format (torch >= 1.6) is a zip of
  uncompressed members under one folder: `<folder>/data.pkl` pickles the object tree, each tensor
  storage lives in `<folder>/data/<key>`, and `<folder>/byteorder` says 'little' or 'big' (absent:
  little). The legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`) is a run of
  pickles (magic number, protocol version 1001, system info, the object tree, the list of storage
  keys) followed by the storages, each an int64 element count and the raw little-endian bytes.
  Storages are memory-mapped, not read: a tensor is a read-only strided view of the file (copied
  only when it is not contiguous), so a 2.7 GB checkpoint needs about its own size in RAM, and
  tensors nobody touches are never read from disk.
* `read_torchscript`: the `data.pkl` of a TorchScript archive (`torch.jit.save`), whose
  `__torch__.*` module classes become inert `ScriptObject`s holding their attributes.
* `numpy_only_loads`: numpy arrays pickled by numpy (the data wheels of rpe2d.wheels).

Admitted in torch files: the tensor-rebuild functions (`torch._utils._rebuild_tensor`,
`_rebuild_tensor_v2`, `_rebuild_tensor_v3`, `_rebuild_parameter`, `_rebuild_parameter_with_state`,
`torch._tensor._rebuild_from_type_v2` with `torch.Tensor` or `torch.nn.parameter.Parameter` as the
type), the storage types (`torch.FloatStorage`, ..., `torch.storage.UntypedStorage`), the dtypes
(`torch.float32`, ...), `collections.OrderedDict` and `torch.Size`. Storage types, dtypes and tensor
types are names only: a pickle may pass them as arguments, never call them. A caller may admit more
with `extra_globals`, each mapped to an inert stand-in it supplies (`state_dict` admits
`argparse.Namespace` as a `Record`, because DiT and SiT training checkpoints carry their arguments).
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pathlib
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    'RefusedGlobalError',
    'TruncatedFileError',
    'Record',
    'ScriptObject',
    'TorchUnpickler',
    'NumpyOnlyUnpickler',
    'STATE_DICT_GLOBALS',
    'record_class',
    'read',
    'state_dict',
    'split_state_dict',
    'read_torchscript',
    'numpy_only_loads',
    'sniff',
    'describe_head',
]

# torch/serialization.py: the legacy format's first two pickles.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

PathOrBytes = str | os.PathLike[str] | bytes | bytearray | memoryview
# read_storage(key, dtype, numel) -> the storage as a 1-D array (None while still unknown).
StorageReader = Callable[[str, np.dtype, int], np.ndarray | None]

INCOMPLETE = 'the file is incomplete: download it again'


class RefusedGlobalError(pickle.UnpicklingError):
  """A pickle named a global outside the allow-list; it was not imported or called."""

  def __init__(self, module: str, name: str, allowed: str):
    self.module, self.name = module, name
    super().__init__(f'global {module}.{name} is not allowed: it was not imported or called '
                     f'({allowed})')


class TruncatedFileError(ValueError):
  """A file ends before the data its own header promises."""

  def __init__(self, source: str, missing: str):
    super().__init__(f'{source}: {missing}; {INCOMPLETE}')


class _FileError(ValueError):
  """A damaged file, found while unpickling; the message already names the file."""


# ------------------------------------------------------------------------------------------------
# Stand-ins for the admitted globals.


class _Sealed:
  """What `find_class` hands out is shared by every read in the process, so a pickle must not
  change it: `BUILD` on it (which would set attributes, e.g. a function's `__defaults__`) is
  refused."""
  __slots__ = ('qualname',)

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f'{self.qualname} cannot be given state')

  def __repr__(self):
    return self.qualname


class _Name(_Sealed):
  """A torch global admitted as a name only: a storage type, a dtype or a tensor type (`kind`)."""
  __slots__ = ('kind', 'dtype')

  def __init__(self, qualname: str, kind: str, dtype: np.dtype | None = None):
    self.qualname, self.kind, self.dtype = qualname, kind, dtype

  def __call__(self, *args, **kwargs):
    raise pickle.UnpicklingError(f'{self.qualname} is admitted as a name only and is never called')


class _Function(_Sealed):
  """An admitted global that a pickle may call: rpe2d's own function standing in for it."""
  __slots__ = ('_function',)

  def __init__(self, qualname: str, function: Callable[..., Any]):
    self.qualname, self._function = qualname, function

  def __call__(self, *args):
    return self._function(*args)


# Storage types by name (torch/storage.py), as the element dtype they hold.
_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
    'ComplexFloatStorage': np.dtype('<c8'),
    'ComplexDoubleStorage': np.dtype('<c16'),
}

# dtypes as torch pickles them (`GLOBAL torch <name>`), for `_rebuild_tensor_v3`.
_TORCH_DTYPES = {
    'float64': np.dtype('<f8'),
    'float32': np.dtype('<f4'),
    'float16': np.dtype('<f2'),
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
    'int64': np.dtype('<i8'),
    'int32': np.dtype('<i4'),
    'int16': np.dtype('<i2'),
    'int8': np.dtype('i1'),
    'uint64': np.dtype('<u8'),
    'uint32': np.dtype('<u4'),
    'uint16': np.dtype('<u2'),
    'uint8': np.dtype('u1'),
    'bool': np.dtype('?'),
    'complex64': np.dtype('<c8'),
    'complex128': np.dtype('<c16'),
}

_UNTYPED = _Name('torch.storage.UntypedStorage', 'storage', np.dtype('u1'))  # numel counts bytes
_TENSOR_TYPES = {('torch', 'Tensor'), ('torch.nn.parameter', 'Parameter')}


class _StateDict(collections.OrderedDict):
  """`collections.OrderedDict` as unpickled here: the attributes torch attaches to a state dict
  (`_metadata`, per-module version numbers) are dropped, so a pickle sets nothing on it."""

  def __setstate__(self, state):
    del state

  def __reduce__(self):  # pickles (and copies) as a plain OrderedDict
    return collections.OrderedDict, (), None, None, iter(self.items())


def _size(values=()) -> tuple[int, ...]:
  """`torch.Size`: a tuple of ints."""
  if not all(isinstance(v, int) for v in values):
    raise pickle.UnpicklingError(f'torch.Size of {values!r}')
  return tuple(values)


def _tensor_view(storage: np.ndarray | None, storage_offset, size, stride) -> np.ndarray | None:
  """The tensor `(storage_offset, size, stride)` (in elements) of a 1-D storage: a view of it when
  contiguous, else a contiguous copy."""
  if storage is None:  # legacy format, first pass: storages are not located yet
    return None
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError('tensor rebuilt from a non-storage object')
  size, stride = tuple(size), tuple(stride)
  offset = storage_offset
  if (not all(isinstance(v, int) for v in (offset,) + size + stride) or len(size) != len(stride)
      or offset < 0 or any(v < 0 for v in size + stride)):
    raise pickle.UnpicklingError(
        f'bad tensor geometry size={size} stride={stride} offset={offset}')
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(
        f'tensor size={size} stride={stride} offset={offset} reaches element {last} of a storage '
        f'of {storage.size}')
  contiguous, step = True, 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != step:
      contiguous = False
    step *= n
  if contiguous:  # a view of the mapped file: nothing is read until it is used
    return storage[offset:offset + numel].reshape(size)
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.ascontiguousarray(view)


def _with_metadata(tensor: np.ndarray | None, metadata) -> np.ndarray | None:
  """Applies the lazy negation / conjugation bits torch may record (`get_tensor_metadata`)."""
  if not metadata or tensor is None:
    return tensor
  if not isinstance(metadata, dict) or not set(metadata) <= {'neg', 'conj'}:
    raise pickle.UnpicklingError(f'tensor metadata {metadata!r}; allowed keys: neg, conj')
  if metadata.get('neg'):
    tensor = np.negative(tensor)
  if metadata.get('conj'):
    tensor = np.conj(tensor)
  return tensor


def _rebuild_tensor(storage, storage_offset, size, stride):
  """`torch._utils._rebuild_tensor` (torch < 1.0 files)."""
  return _tensor_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """`torch._utils._rebuild_tensor_v2`: a tensor of a typed storage."""
  del requires_grad, backward_hooks
  return _with_metadata(_tensor_view(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  """`torch._utils._rebuild_tensor_v3`: a tensor of an untyped (byte) storage and a dtype, as torch
  writes the dtypes older storage types cannot name (uint16, float8, ...)."""
  del requires_grad, backward_hooks
  if not isinstance(dtype, _Name) or dtype.kind != 'dtype':
    raise pickle.UnpicklingError(f'_rebuild_tensor_v3 with dtype {dtype!r}')
  if storage is not None:
    if not isinstance(storage, np.ndarray) or storage.dtype != np.uint8:
      raise pickle.UnpicklingError('_rebuild_tensor_v3 of a typed storage')
    if storage.size % dtype.dtype.itemsize:
      raise pickle.UnpicklingError(
          f'a storage of {storage.size} bytes does not hold whole {dtype.qualname} elements')
    storage = storage.view(dtype.dtype)
  return _with_metadata(_tensor_view(storage, storage_offset, size, stride), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  """`torch._utils._rebuild_parameter`: an `nn.Parameter` is its data."""
  del requires_grad, backward_hooks
  return _tensor_or_pending(data, '_rebuild_parameter')


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  """`torch._utils._rebuild_parameter_with_state`: the data; Python attributes are dropped."""
  del requires_grad, backward_hooks, state
  return _tensor_or_pending(data, '_rebuild_parameter_with_state')


def _rebuild_from_type_v2(func, new_type, args, state):
  """`torch._tensor._rebuild_from_type_v2`: `func(*args)` for a plain tensor or parameter type;
  the Python attributes in `state` are dropped."""
  del state
  if func not in _REBUILD_FUNCTIONS:
    raise pickle.UnpicklingError(f'_rebuild_from_type_v2 with function {func!r}')
  if not isinstance(new_type, _Name) or new_type.kind != 'type':
    raise pickle.UnpicklingError(f'_rebuild_from_type_v2 with type {new_type!r}; allowed: '
                                 'torch.Tensor, torch.nn.parameter.Parameter')
  if not isinstance(args, tuple):
    raise pickle.UnpicklingError(f'_rebuild_from_type_v2 with arguments {args!r}')
  return func(*args)


def _tensor_or_pending(data, what):
  if data is not None and not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f'{what} of a {type(data).__name__}, not a tensor')
  return data


_REBUILD_FUNCTIONS = tuple(
    _Function(f'torch._utils.{f.__name__}', f) for f in (
        _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
        _rebuild_parameter_with_state))

_TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): _StateDict,
    ('torch', 'Size'): _Function('torch.Size', _size),
    **{tuple(f.qualname.rsplit('.', 1)): f for f in _REBUILD_FUNCTIONS},
    ('torch._tensor', '_rebuild_from_type_v2'): _Function('torch._tensor._rebuild_from_type_v2',
                                                          _rebuild_from_type_v2),
    ('torch.storage', 'UntypedStorage'): _UNTYPED,
    ('torch', 'UntypedStorage'): _UNTYPED,
    **{t: _Name('.'.join(t), 'type') for t in _TENSOR_TYPES},
    **{('torch', n): _Name(f'torch.{n}', 'storage', d) for n, d in _STORAGE_DTYPES.items()},
    **{('torch', n): _Name(f'torch.{n}', 'dtype', d) for n, d in _TORCH_DTYPES.items()},
}
_TORCH_ALLOWED = ('allowed: torch tensor-rebuild functions, storage types and dtypes, '
                  'collections.OrderedDict, torch.Size')


class Record:
  """Inert stand-in for an object of a class a caller admits by name (e.g. `argparse.Namespace`):
  it only keeps the arguments and the state the pickle hands it. `qualname` names the class."""
  qualname = ''

  def __new__(cls, *args):
    obj = super().__new__(cls)
    obj.args, obj.state = args, None
    return obj

  def __init__(self, *args):
    del args  # kept by __new__

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'<{self.qualname} args={self.args!r} state={self.state!r}>'


@functools.lru_cache(maxsize=None)
def record_class(module: str, name: str) -> type[Record]:
  """The `Record` subclass standing in for `module.name` (one per name)."""
  return type(name, (Record,), {'qualname': f'{module}.{name}', '__module__': __name__})


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes objects: `str -> bytes` in latin-1."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'_codecs.encode of {type(text).__name__} as {encoding!r}')
  return text.encode('latin-1')


# What `state_dict` admits on top of the torch globals: the entries a training checkpoint keeps
# beside its tensors (DiT's and SiT's train.py save their argparse arguments).
STATE_DICT_GLOBALS: Mapping[tuple[str, str], Any] = {
    ('argparse', 'Namespace'): record_class('argparse', 'Namespace'),
    ('_codecs', 'encode'): _Function('_codecs.encode', _latin1_encode),
}


class ScriptObject:
  """Inert stand-in for a pickled `__torch__.*` TorchScript module: holds its attributes.

  `NEWOBJ` creates it with no arguments and `BUILD` hands it the attribute dict; nothing else
  is ever called. `qualname` is the TorchScript class name, e.g.
  `__torch__.inceptionv3.Conv2dLayer`.
  """
  qualname = ''

  def __init__(self):
    self.attrs: dict[str, Any] = {}

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f'{self.qualname} got non-dict state {type(state).__name__}')
    self.attrs = dict(state)

  def __repr__(self):
    return f'<{self.qualname} {sorted(self.attrs)}>'


@functools.lru_cache(maxsize=None)
def _script_class(module: str, name: str) -> type:
  return type(name, (ScriptObject,), {'qualname': f'{module}.{name}', '__module__': __name__})


def _build_list(name: str, kind: type) -> _Function:
  def build(values):
    if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
      raise pickle.UnpicklingError(f'torch.jit._pickle.{name} of {values!r}')
    return list(values)
  return _Function(f'torch.jit._pickle.{name}', build)


_TORCHSCRIPT_GLOBALS = {
    ('torch.jit._pickle', name): _build_list(name, kind)
    for name, kind in (('build_intlist', int), ('build_doublelist', float),
                       ('build_boollist', bool))
}
_IDENT_PATH = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
_IDENT = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_STORAGE_KEY = re.compile(r'^[0-9]+$')


# ------------------------------------------------------------------------------------------------
# The unpicklers.


class TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch `data.pkl` (or a legacy object pickle) into numpy, never importing torch.

  Globals resolve to the allow-list of the module doc (plus `extra_globals`, plus with
  `torchscript=True` the `__torch__.*` module classes as `ScriptObject`s and the
  `torch.jit._pickle` list builders); anything else raises `RefusedGlobalError`. Persistent ids
  must be `('storage', <storage type>, '<key>', location, numel)`, or in the legacy format the
  same with a sixth element, a storage view `(view_key, offset, numel)` or None; the storage
  comes from `read_storage(key, dtype, numel)`, once per key.
  """

  def __init__(self, file, read_storage: StorageReader, *,
               extra_globals: Mapping[tuple[str, str], Any] | None = None,
               torchscript: bool = False):
    super().__init__(file)
    self._read_storage = read_storage
    self._extra = dict(extra_globals or {})
    self._torchscript = torchscript
    self._storages: dict[str, tuple[np.dtype, np.ndarray | None]] = {}

  def find_class(self, module: str, name: str) -> Any:
    key = (module, name)
    if key in self._extra:
      return self._extra[key]
    if key in _TORCH_GLOBALS:
      return _TORCH_GLOBALS[key]
    if self._torchscript:
      if key in _TORCHSCRIPT_GLOBALS:
        return _TORCHSCRIPT_GLOBALS[key]
      if ((module == '__torch__' or module.startswith('__torch__.')) and _IDENT_PATH.match(module)
          and _IDENT.match(name)):
        return _script_class(module, name)
    allowed = _TORCH_ALLOWED
    if self._torchscript:
      allowed += ', torch.jit._pickle list builders, __torch__.* module classes'
    elif module.startswith('__torch__'):
      allowed += '; this is a TorchScript archive: read it with read_torchscript'
    if self._extra:
      allowed += ', ' + ', '.join(sorted('.'.join(k) for k in self._extra))
    raise RefusedGlobalError(module, name, allowed)

  def persistent_load(self, pid: Any) -> Any:
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage'
        or not isinstance(pid[1], _Name) or pid[1].kind != 'storage'
        or not isinstance(pid[2], str) or not _STORAGE_KEY.match(pid[2])
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise pickle.UnpicklingError(f'persistent id {pid!r} is not allowed (only torch storages)')
    storage_type, key, numel = pid[1], pid[2], pid[4]
    view = pid[5] if len(pid) == 6 else None
    if key in self._storages:
      dtype, storage = self._storages[key]
      if dtype != storage_type.dtype:
        raise pickle.UnpicklingError(f'storage {key} is read as {dtype} and as {storage_type}')
    else:
      storage = self._read_storage(key, storage_type.dtype, numel)
      self._storages[key] = storage_type.dtype, storage
    if view is None:
      return storage
    # Legacy files of torch < 0.4 could pickle a view of a storage: (view key, offset, numel).
    if (not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[1], int)
        or not isinstance(view[2], int) or view[1] < 0 or view[2] < 0):
      raise pickle.UnpicklingError(f'storage view {view!r} is not allowed')
    if storage is None:
      return None
    if view[1] + view[2] > storage.size:
      raise pickle.UnpicklingError(f'storage view {view!r} reaches past storage {key} of '
                                   f'{storage.size} elements')
    return storage[view[1]:view[1] + view[2]]


_NUMPY_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
})


def _multiarray():
  try:
    from numpy._core import multiarray  # numpy >= 2  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray


class NumpyOnlyUnpickler(pickle.Unpickler):
  """An unpickler that admits only numpy's array/scalar reconstruction globals.

  Admitted: `numpy.ndarray`, `numpy.dtype`, and `_reconstruct` / `scalar` from
  `numpy.core.multiarray` (numpy 1's name) or `numpy._core.multiarray` (numpy 2's); both resolve
  to the same objects. Plain containers, numbers and strings need no globals. Anything else
  (`os.system`, `builtins.eval`, `_codecs.encode`, ...) raises `RefusedGlobalError`; persistent
  ids are refused too.
  """

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _NUMPY_GLOBALS:
      if module == 'numpy':
        return {'ndarray': np.ndarray, 'dtype': np.dtype}[name]
      return getattr(_multiarray(), name)
    raise RefusedGlobalError(module, name, 'only numpy array reconstruction globals are: '
                             + ', '.join(sorted('.'.join(g) for g in _NUMPY_GLOBALS)))

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(f'persistent id {pid!r} is not allowed')


def numpy_only_loads(data: bytes, *, encoding: str = 'ASCII') -> Any:
  """`pickle.loads` through `NumpyOnlyUnpickler`.

  `encoding='latin1'` is what Python-2 numpy pickles need (their str objects hold raw bytes).
  """
  return NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()


class _NoGlobalsUnpickler(pickle.Unpickler):
  """For the legacy format's plain pickles (numbers, a dict, a list of keys)."""

  def find_class(self, module: str, name: str) -> Any:
    raise RefusedGlobalError(module, name, 'this pickle may hold only plain values')

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(f'persistent id {pid!r} is not allowed')


# ------------------------------------------------------------------------------------------------
# Sources: a file (memory-mapped once) or bytes.


class _Source:
  """The bytes of a file or buffer as one read-only uint8 array (a memory map for files)."""

  def __init__(self, path_or_bytes: PathOrBytes):
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
      self.path, self.name, self._bytes = None, '<bytes>', path_or_bytes
      self.buffer = np.frombuffer(path_or_bytes, np.uint8)
    else:
      self.path = pathlib.Path(path_or_bytes)
      self.name = str(self.path)
      if not self.path.is_file():
        raise FileNotFoundError(f'{self.path}: no such file')
      empty = self.path.stat().st_size == 0  # mmap refuses empty files
      self.buffer = (np.zeros(0, np.uint8) if empty else
                     np.asarray(np.memmap(self.path, np.uint8, mode='r')))
    self.size = self.buffer.size

  def open(self):
    return io.BytesIO(self._bytes) if self.path is None else open(self.path, 'rb')

  def zip(self) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(self._bytes) if self.path is None else self.path)

  def head(self, n: int = 64) -> bytes:
    return self.buffer[:n].tobytes()

  def span(self, start: int, nbytes: int, what: str) -> np.ndarray:
    if start + nbytes > self.size:
      raise TruncatedFileError(self.name, f'{what} needs bytes {start}..{start + nbytes}, the '
                                          f'file has {self.size}')
    return self.buffer[start:start + nbytes]


def _typed(raw: np.ndarray, dtype: np.dtype, big_endian: bool = False) -> np.ndarray:
  """Raw bytes as a 1-D array of `dtype` (a view; a byte-swapped copy for big-endian data)."""
  if big_endian and dtype.itemsize > 1:
    part = dtype.itemsize // 2 if dtype.kind == 'c' else dtype.itemsize  # complex: each half
    return raw.view(f'u{part}').byteswap().view(dtype)
  return raw.view(dtype)


# ------------------------------------------------------------------------------------------------
# Telling formats apart.

_LEGACY_MAGIC_PICKLE = pickle.dumps(MAGIC_NUMBER, protocol=2)  # what torch writes first


def _is_legacy(head: bytes) -> bool:
  if len(head) < len(_LEGACY_MAGIC_PICKLE):  # a cut-short legacy file still starts the same way
    return len(head) >= 4 and _LEGACY_MAGIC_PICKLE.startswith(head)
  try:
    return _NoGlobalsUnpickler(io.BytesIO(head)).load() == MAGIC_NUMBER
  except Exception:  # pylint: disable=broad-except  # any bytes: only "is it the magic" matters
    return False


def _is_safetensors(head: bytes) -> bool:
  # An 8-byte little-endian header length (the format caps headers at 100 MB), then the JSON '{'.
  return (len(head) >= 9 and head[8:9] == b'{'
          and 2 <= struct.unpack('<Q', head[:8])[0] <= 100_000_000)


def _zip_root(src: _Source) -> tuple[zipfile.ZipFile, str] | None:
  """(the open zip, '<folder>/') if it is a torch archive, None if it is another zip."""
  try:
    zf = src.zip()
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise TruncatedFileError(src.name,
                             f'the zip central directory is missing or damaged ({e})') from None
  pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    zf.close()
    return None
  return zf, pkls[0][:-len('data.pkl')]


def _sniff(src: _Source) -> str:
  head = src.head()
  if head[:4] == b'PK\x03\x04':
    try:
      found = _zip_root(src)
    except TruncatedFileError:  # no directory: go by the first member's name
      name_len = struct.unpack('<H', head[26:28])[0] if len(head) >= 30 else 0
      return 'torch_zip' if head[30:30 + name_len].endswith(b'data.pkl') else 'zip'
    if found is None:
      return 'zip'
    found[0].close()
    return 'torch_zip'
  if _is_legacy(head):
    return 'torch_legacy'
  if _is_safetensors(head):
    return 'safetensors'
  return 'unknown'


def sniff(path: str | os.PathLike[str]) -> str:
  """'torch_zip', 'torch_legacy', 'safetensors', 'zip' (another zip) or 'unknown', from the first
  bytes (and a zip's directory), whatever the file's name."""
  return _sniff(_Source(path))


def describe_head(path: str | os.PathLike[str] | None = None, head: bytes | None = None) -> str:
  """'first bytes 80 04 95 ... (a pickle)' and the like, for refusals."""
  if head is None:
    with open(path, 'rb') as f:
      head = f.read(512)
  shown = ' '.join(f'{b:02x}' for b in head[:8]) or 'none: the file is empty'
  if len(head) >= 262 and head[257:262] == b'ustar':
    kind = ' (a tar archive: the format of the first torch releases? ' + _RESAVE + ')'
  elif head[:1] == b'\x80':
    kind = ' (a pickle, not a torch archive; it is never unpickled)'
  elif head[:2] == b'\x1f\x8b':
    kind = ' (gzip)'
  else:
    kind = ''
  return f'first bytes {shown}{kind}'


_RESAVE = ('re-save it with torch where you trust the file: '
           'torch.save(torch.load(old, weights_only=False), new)')


# ------------------------------------------------------------------------------------------------
# Reading torch files.


def _unpickle(unpickler: pickle.Unpickler, source: str) -> Any:
  """`unpickler.load()`, with every failure one line naming the source."""
  try:
    return unpickler.load()
  except RefusedGlobalError as e:
    e.args = (f'{source}: {e.args[0]}',)
    raise
  except (TruncatedFileError, _FileError):
    raise
  except EOFError:
    raise TruncatedFileError(source, 'a pickle ends early') from None
  except pickle.UnpicklingError as e:
    if 'truncated' in str(e):
      raise TruncatedFileError(source, f'a pickle ends early ({e})') from None
    raise pickle.UnpicklingError(f'{source}: {e}') from None
  except (TypeError, ValueError, AttributeError, KeyError, IndexError, struct.error,
          RecursionError, MemoryError, UnicodeDecodeError) as e:
    raise pickle.UnpicklingError(f'{source}: malformed pickle ({type(e).__name__}: {e})') from None


def _read_zip(src: _Source, *, extra_globals=None, torchscript: bool = False) -> Any:
  found = _zip_root(src)
  if found is None:
    with src.zip() as zf:
      names = zf.namelist()
    raise ValueError(f'{src.name} is a zip but not a torch archive: no <folder>/data.pkl among '
                     f'its {len(names)} members {names[:5]}')
  zf, root = found
  with zf:
    infos = {i.filename: i for i in zf.infolist()}
    byteorder = b'little'
    if f'{root}byteorder' in infos:
      byteorder = zf.read(f'{root}byteorder').strip()
      if byteorder not in (b'little', b'big'):
        raise ValueError(f'{src.name}: byteorder record {byteorder!r}; allowed: little, big')

    def member(name: str) -> np.ndarray:
      info = infos.get(name)
      if info is None:  # only storages can be missing: data.pkl was found in the directory
        raise _FileError(f'{src.name}: the pickle names {name}, which the archive does not hold')
      local = src.span(info.header_offset, 30, f'the local header of {name}')
      if local[:4].tobytes() != b'PK\x03\x04':
        raise _FileError(f'{src.name}: {name} has no local header at {info.header_offset}')
      name_len, extra_len = struct.unpack('<HH', local[26:30].tobytes())
      start = info.header_offset + 30 + name_len + extra_len
      data = src.span(start, info.compress_size, name)
      if info.compress_type != zipfile.ZIP_STORED:  # torch stores; a re-zipped copy may not
        return np.frombuffer(zf.read(name), np.uint8)
      return data

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      raw = member(f'{root}data/{key}')
      nbytes = numel * dtype.itemsize
      if raw.size < nbytes:
        raise TruncatedFileError(src.name, f'storage data/{key} holds {raw.size} bytes, the '
                                           f'pickle says {numel} x {dtype.itemsize}')
      return _typed(raw[:nbytes], dtype, byteorder == b'big')

    pickled = member(f'{root}data.pkl').tobytes()
    unpickler = TorchUnpickler(io.BytesIO(pickled), read_storage, extra_globals=extra_globals,
                               torchscript=torchscript)
    return _unpickle(unpickler, f'{src.name}:{root}data.pkl')


def _read_legacy(src: _Source, *, extra_globals=None) -> Any:
  """The legacy format: the object pickle is read twice, first to learn each storage's dtype and
  size (its bytes come after it, unlabelled), then with the storages mapped."""
  with src.open() as f:
    for expected, what in ((MAGIC_NUMBER, 'magic number'),
                           (LEGACY_PROTOCOL_VERSION, 'protocol version')):
      found = _unpickle(_NoGlobalsUnpickler(f), src.name)
      if found != expected:
        raise ValueError(f'{src.name}: legacy torch file with {what} {found!r}; allowed: '
                         f'{expected!r}')
    _unpickle(_NoGlobalsUnpickler(f), src.name)  # sys_info: storages are little-endian anyway
    object_start = f.tell()
    sizes: dict[str, tuple[np.dtype, int]] = {}

    def note_storage(key: str, dtype: np.dtype, numel: int) -> None:
      sizes[key] = dtype, numel

    _unpickle(TorchUnpickler(f, note_storage, extra_globals=extra_globals), src.name)
    keys = _unpickle(_NoGlobalsUnpickler(f), src.name)
    if not isinstance(keys, list) or set(keys) != set(sizes):
      raise ValueError(f'{src.name}: the storage list {keys!r} does not match the storages the '
                       f'pickle uses {sorted(sizes)}')
    storages, offset = {}, f.tell()
    for key in keys:
      dtype, numel = sizes[key]
      (count,) = struct.unpack('<q', src.span(offset, 8, f'storage {key}').tobytes())
      if count != numel:
        raise _FileError(f'{src.name}: storage {key} holds {count} elements, the pickle says '
                         f'{numel}')
      storages[key] = _typed(src.span(offset + 8, numel * dtype.itemsize, f'storage {key}'), dtype)
      offset += 8 + numel * dtype.itemsize
    f.seek(object_start)
    return _unpickle(TorchUnpickler(f, lambda key, dtype, numel: storages[key],
                                    extra_globals=extra_globals), src.name)


def read(path_or_bytes: PathOrBytes, *,
         extra_globals: Mapping[tuple[str, str], Any] | None = None) -> Any:
  """The object tree `torch.save` wrote, with tensors as numpy arrays and torch never imported.

  Reads the zip format (any folder name) and the legacy format, from a path or from bytes. dicts
  come back as dicts, `OrderedDict`s as an `OrderedDict` subclass, lists, tuples, numbers and
  strings as themselves; tensors as read-only numpy arrays (bfloat16 and float8 as ml_dtypes),
  views of the memory-mapped file unless not contiguous. `extra_globals` maps (module, name) to an
  inert stand-in for that global (see `STATE_DICT_GLOBALS`): a class such as `record_class(...)`,
  or a callable a pickle cannot change (no attributes it could set through `BUILD`).

  Raises:
    RefusedGlobalError: the pickle names a global outside the allow-list (nothing was imported).
    TruncatedFileError: the file ends before its data does.
    ValueError, pickle.UnpicklingError: anything else malformed, or not a torch file; one line.
  """
  src = _Source(path_or_bytes)
  kind = _sniff(src)
  if kind in ('torch_zip', 'zip'):
    return _read_zip(src, extra_globals=extra_globals)
  if kind == 'torch_legacy':
    return _read_legacy(src, extra_globals=extra_globals)
  if kind == 'safetensors':
    raise ValueError(f'{src.name} is a safetensors file, not a torch archive; read it with '
                     'rpe2d.tensor_files.read_tensors')
  raise ValueError(f'{src.name} is not a torch file: {describe_head(head=src.head(512))}')


def read_torchscript(path_or_bytes: PathOrBytes) -> ScriptObject:
  """The module tree pickled in a TorchScript archive (`torch.jit.save`), tensors as numpy.

  `__torch__.*` classes become inert `ScriptObject`s holding their attribute dicts; the code in the
  archive is never read.
  """
  src = _Source(path_or_bytes)
  if src.head(4) != b'PK\x03\x04':
    raise ValueError(f'{src.name} is not a TorchScript archive (a zip): '
                     f'{describe_head(head=src.head(512))}')
  obj = _read_zip(src, torchscript=True)
  if not isinstance(obj, ScriptObject):
    raise ValueError(f'{src.name}: the TorchScript archive pickles a {type(obj).__name__}, not a '
                     'module')
  return obj


def _is_tensor_dict(value) -> bool:
  return (isinstance(value, dict) and bool(value)
          and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()))


def split_state_dict(obj: Any, source: str,
                     unwrap: str | None = None) -> tuple[dict[str, np.ndarray], str, str | None]:
  """(tensors, description, the key unwrapped or None) of an object tree `read` returned."""
  if _is_tensor_dict(obj):
    if unwrap not in (None, 'none'):
      raise ValueError(f'{source}: unwrap={unwrap!r}, but the file is a plain state dict of '
                       f"{len(obj)} tensors; pass no unwrap (or 'none')")
    return dict(obj), f'the whole file: a state dict of {len(obj)} tensors', None
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f'{source} holds a {type(obj).__name__}, not a dict of tensors')
  holding = [k for k, v in obj.items() if _is_tensor_dict(v)]
  keys = ', '.join(repr(k) for k in obj)
  if unwrap in (None, 'none'):
    if not holding:
      raise ValueError(f'{source} holds {{{keys}}}: none of them is a dict of tensors')
    raise ValueError(f'{source} wraps its tensors in {{{keys}}}; the entries holding tensors are '
                     f'{", ".join(map(repr, holding))}: pass --unwrap=<key> (e.g. '
                     f'--unwrap={holding[0]})')
  if unwrap not in obj:
    raise ValueError(f'{source}: unwrap={unwrap!r} is not one of its keys; allowed: '
                     f'{", ".join(map(repr, holding)) or "none (no entry holds tensors)"}')
  if not _is_tensor_dict(obj[unwrap]):
    raise ValueError(f'{source}: entry {unwrap!r} is not a dict of tensors; allowed: '
                     f'{", ".join(map(repr, holding)) or "none (no entry holds tensors)"}')
  others = [repr(k) for k in obj if k != unwrap]
  tensors = dict(obj[unwrap])
  return (tensors, f"unwrapped '{unwrap}': {len(tensors)} tensors (left aside: "
          f"{', '.join(others) or 'nothing'})", unwrap)


def state_dict(path: str | os.PathLike[str], *,
               unwrap: str | None = None) -> tuple[dict[str, np.ndarray], str]:
  """(name -> array, a one-line description of what was taken) of a torch checkpoint.

  A dict whose values are all tensors is returned as is (`unwrap` must be None or 'none'). A
  wrapper such as {'model': {...}, 'ema': {...}, 'opt': ..., 'args': Namespace} needs `unwrap` to
  name the entry to take; without it a ValueError lists the entries holding tensors. The other
  entries are read as inert objects (`STATE_DICT_GLOBALS`) and their tensors stay unread on disk.
  """
  obj = read(path, extra_globals=STATE_DICT_GLOBALS)
  tensors, description, _ = split_state_dict(obj, str(path), unwrap)
  return tensors, description
