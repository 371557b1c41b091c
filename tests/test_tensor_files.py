"""Reading torch and safetensors files without torch: rpe2d.torch_pickle and rpe2d.tensor_files.

The torch files in tests/fixtures/torch_files/ were written by real torch.save / torch.jit.save
(tests/fixtures/make_torch_files.py, which also wrote the expected bits next to them); these tests
need no torch. Files that torch cannot be made to write (crafted pickles, big-endian data, storage
views of torch < 0.4, a 200 MB archive) are written here in torch's layout by `write_torch_zip` and
`write_torch_legacy`, whose pickles name the same globals torch's do (torch 2.14.1's torch.load
reads their files, big-endian and legacy storage views included, to the same values).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from rpe2d import tensor_files, torch_pickle

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'torch_files'
EXPECTED = json.loads((FIXTURES / 'expected.json').read_text())
FORMATS = {'dtypes': 'torch_zip', 'views': 'torch_zip', 'state_dict': 'torch_zip',
           'wrapped': 'torch_zip', 'legacy': 'torch_legacy', 'legacy_wrapped': 'torch_legacy'}
# torch dtype names -> numpy, written out here rather than taken from the module under test.
NUMPY_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'int64': np.int64,
    'int32': np.int32, 'uint8': np.uint8, 'uint16': np.uint16, 'bool': np.bool_,
}
INCOMPLETE = 'the file is incomplete: download it again'


def expected_bits(name: str) -> dict[str, tuple[np.ndarray, str]]:
  with np.load(FIXTURES / f'{name}.npz') as npz:
    return {k: (npz[k], str(npz[f'dtype:{k}'])) for k in npz.files if not k.startswith('dtype:')}


def flatten(obj, prefix='') -> dict[str, np.ndarray]:
  """{path: array} of the arrays in nested dicts and TorchScript modules, paths joined by '/'."""
  if isinstance(obj, np.ndarray):
    return {prefix.rstrip('/'): obj}
  if isinstance(obj, torch_pickle.ScriptObject):
    obj = obj.attrs
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten(v, f'{prefix}{k}/'))
  return out


def assert_bit_exact(actual: dict[str, np.ndarray], expected: dict[str, tuple[np.ndarray, str]]):
  assert sorted(actual) == sorted(expected)
  for key, (bits, dtype_name) in expected.items():
    array = actual[key]
    assert array.dtype == NUMPY_DTYPES[dtype_name], (key, array.dtype, dtype_name)
    assert array.shape == bits.shape, (key, array.shape, bits.shape)
    np.testing.assert_array_equal(np.ascontiguousarray(array).view(bits.dtype), bits, err_msg=key)


# ------------------------------------------------------------------------------------------------
# Writing files in torch's layout (for what torch cannot be made to write).

_STORAGE_NAMES = {np.dtype('<f4'): 'FloatStorage', np.dtype('<f2'): 'HalfStorage',
                  np.dtype('<i8'): 'LongStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage'}
for _name in _STORAGE_NAMES.values():  # stand-ins pickled by name, renamed to torch.<X>Storage
  globals()[_name] = type(_name, (), {})


def _rebuild_tensor_v2(*args):  # stand-in pickled by name, renamed to torch._utils.*
  raise AssertionError('never called')


class Storage:
  """A storage to pickle as torch does: a persistent id naming its type, key and size."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


class Tensor:
  """A tensor to pickle as `_rebuild_tensor_v2(storage, offset, size, stride, False, hooks)`."""

  def __init__(self, storage: Storage, offset=0, shape=None, strides=None):
    self.storage, self.offset = storage, offset
    self.shape = tuple(storage.array.shape if shape is None else shape)
    self.strides = tuple(strides) if strides is not None else tuple(
        int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))

  def __reduce__(self):
    return _rebuild_tensor_v2, (self.storage, self.offset, self.shape, self.strides, False,
                                collections.OrderedDict())


def tensor(key: str, array: np.ndarray) -> Tensor:
  return Tensor(Storage(key, array), 0, array.shape)


class _Pickler(pickle.Pickler):

  def __init__(self, file, legacy: bool, storage_views: dict | None = None):
    super().__init__(file, protocol=2)
    self.legacy, self.storages, self.views = legacy, {}, storage_views or {}

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    pid = ('storage', globals()[_STORAGE_NAMES[obj.array.dtype]], obj.key, 'cpu', obj.array.size)
    return pid + (self.views.get(obj.key),) if self.legacy else pid


def torch_pickle_bytes(obj, *, legacy=False, storage_views=None) -> tuple[bytes, dict]:
  """(the pickle torch would write for `obj`, its storages by key)."""
  buf = io.BytesIO()
  pickler = _Pickler(buf, legacy, storage_views)
  pickler.dump(obj)
  torch_module = {'_rebuild_tensor_v2': b'torch._utils'}
  data = re.sub(re.escape(b'c' + __name__.encode() + b'\n') + rb'(\w+)\n',
                lambda m: b'c' + torch_module.get(m[1].decode(), b'torch') + b'\n' + m[1] + b'\n',
                buf.getvalue())
  return data, pickler.storages


def write_torch_zip(path, obj=None, *, pickled: bytes | None = None, storages=None,
                    folder='archive', byteorder='little') -> pathlib.Path:
  """A torch.save zip: <folder>/data.pkl, byteorder, data/<key> aligned to 64 bytes, version."""
  storages = storages or {}
  if pickled is None:
    pickled, storages = torch_pickle_bytes(obj)
  records = [('data.pkl', pickled), ('byteorder', byteorder.encode())]
  for key, storage in storages.items():
    array = storage.array.byteswap() if byteorder == 'big' else storage.array
    records.append((f'data/{key}', memoryview(array.view(np.uint8))))
  records.append(('version', b'3\n'))
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    for name, data in records:
      info = zipfile.ZipInfo(f'{folder}/{name}')
      # torch pads the local header's extra field so that every record starts on 64 bytes.
      start = zf.fp.tell() + 30 + len(info.filename) + 4
      pad = -start % 64
      info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad
      info.file_size = len(data)
      with zf.open(info, 'w') as member:
        member.write(data)
  return pathlib.Path(path)


def write_torch_legacy(path, obj=None, *, pickled: bytes | None = None,
                       storage_views=None) -> pathlib.Path:
  """The legacy format: magic, protocol, sys_info, the object, the storage keys, the storages."""
  storages = {}
  if pickled is None:
    pickled, storages = torch_pickle_bytes(obj, legacy=True, storage_views=storage_views)
  sys_info = {'protocol_version': 1001, 'little_endian': True,
              'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
  with open(path, 'wb') as f:
    for value in (torch_pickle.MAGIC_NUMBER, 1001, sys_info):
      f.write(pickle.dumps(value, protocol=2))
    f.write(pickled)
    keys = sorted(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for key in keys:
      f.write(struct.pack('<q', storages[key].array.size) + storages[key].array.tobytes())
  return pathlib.Path(path)


# ------------------------------------------------------------------------------------------------
# Files torch wrote.


@pytest.mark.parametrize('name', sorted(FORMATS))
def test_every_fixture_reads_bit_exactly(name):
  path = FIXTURES / f'{name}.pt'
  assert torch_pickle.sniff(path) == FORMATS[name]
  obj = torch_pickle.read(path, extra_globals=torch_pickle.STATE_DICT_GLOBALS)
  assert_bit_exact(flatten(obj), expected_bits(name))
  if name in EXPECTED:
    assert list(obj) == EXPECTED[name]['keys']
    assert obj['args'].qualname == 'argparse.Namespace'
    assert obj['args'].state == EXPECTED[name]['args']
  # from bytes too
  assert_bit_exact(flatten(torch_pickle.read(path.read_bytes(),
                                             extra_globals=torch_pickle.STATE_DICT_GLOBALS)),
                   expected_bits(name))


@pytest.mark.parametrize('name', ['views', 'legacy'])
def test_tensors_are_views_of_the_mapped_file(name):
  out = torch_pickle.read(FIXTURES / f'{name}.pt')
  base, row, block = out['base'], out['row'], out['block']
  assert np.shares_memory(base, row) and np.shares_memory(base, block)  # one storage, not copied
  for array in (base, row, block):
    assert not array.flags.owndata and not array.flags.writeable
    assert isinstance(array.base, np.ndarray)  # ... of the file's memory map
  assert out['transposed'].flags.c_contiguous and not np.shares_memory(base, out['transposed'])
  np.testing.assert_array_equal(out['transposed'], base.T)
  np.testing.assert_array_equal(out['expanded'], np.broadcast_to(base[0, :2], (3, 2)))


def test_state_dicts_keep_their_order_and_nothing_torch_attaches():
  sd = torch_pickle.read(FIXTURES / 'state_dict.pt')
  assert isinstance(sd, collections.OrderedDict)
  assert list(sd) == ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
  assert not hasattr(sd, '_metadata')  # the pickle's BUILD set nothing
  tensors, description = torch_pickle.state_dict(FIXTURES / 'state_dict.pt')
  assert type(tensors) is dict and list(tensors) == list(sd)
  assert description == 'the whole file: a state dict of 6 tensors'


def test_torchscript_archive():
  net = torch_pickle.read_torchscript(FIXTURES / 'script.pt')
  assert net.qualname == '__torch__.Net'
  conv = net.attrs['conv']
  assert conv.qualname.endswith('.Conv')
  assert {k: conv.attrs[k] for k in ('stride', 'padding')} == EXPECTED['script']['conv']
  assert_bit_exact({k: v for k, v in flatten(net).items()}, expected_bits('script'))
  with pytest.raises(torch_pickle.RefusedGlobalError,
                     match=r'global __torch__\.Net is not allowed.*read_torchscript'):
    torch_pickle.read(FIXTURES / 'script.pt')


def test_wrapped_checkpoints_need_an_explicit_unwrap():
  wrapped = FIXTURES / 'wrapped.pt'
  with pytest.raises(ValueError, match=r"wraps its tensors in \{'model', 'ema', 'opt', 'args'\}; "
                                       r"the entries holding tensors are 'model', 'ema': pass "
                                       r'--unwrap=<key>'):
    torch_pickle.state_dict(wrapped)
  tensors, description = torch_pickle.state_dict(wrapped, unwrap='ema')
  ema = {k.removeprefix('ema/'): v for k, v in expected_bits('wrapped').items()
         if k.startswith('ema/')}
  assert_bit_exact(tensors, ema)
  assert description == "unwrapped 'ema': 6 tensors (left aside: 'model', 'opt', 'args')"
  with pytest.raises(ValueError, match=r"entry 'opt' is not a dict of tensors; allowed: 'model', "
                                       r"'ema'"):
    torch_pickle.state_dict(wrapped, unwrap='opt')
  with pytest.raises(ValueError, match=r"unwrap='emma' is not one of its keys; allowed: 'model'"):
    torch_pickle.state_dict(wrapped, unwrap='emma')
  with pytest.raises(ValueError, match=r"unwrap='ema', but the file is a plain state dict of 6 "
                                       r'tensors'):
    torch_pickle.state_dict(FIXTURES / 'state_dict.pt', unwrap='ema')
  assert len(torch_pickle.state_dict(FIXTURES / 'state_dict.pt', unwrap='none')[0]) == 6
  tensors, _ = torch_pickle.state_dict(FIXTURES / 'legacy_wrapped.pt', unwrap='ema')
  assert sorted(tensors) == sorted(k.removeprefix('ema/') for k in expected_bits('legacy_wrapped'))
  # Without the state-dict stand-ins, the argparse arguments are refused like any other global.
  for name in ('wrapped', 'legacy_wrapped'):
    with pytest.raises(torch_pickle.RefusedGlobalError, match=r'argparse\.Namespace'):
      torch_pickle.read(FIXTURES / f'{name}.pt')


def test_read_tensors_front_door(tmp_path):
  for name, unwrap in (('state_dict', None), ('legacy', None), ('wrapped', 'model')):
    path = FIXTURES / f'{name}.pt'
    out = tensor_files.read_tensors(path, unwrap=unwrap)
    assert out.format == FORMATS[name] and out.path == path
    assert out.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out.unwrapped is None) == (unwrap is None)
    prefix = f'{unwrap}/' if unwrap else ''
    assert_bit_exact(out.tensors, {k.removeprefix(prefix): v for k, v in
                                   expected_bits(name).items() if k.startswith(prefix)})
  assert 'unwrapped \'model\': 4 tensors' in tensor_files.read_tensors(
      FIXTURES / 'wrapped.pt', unwrap='model').unwrapped


def test_safetensors_are_read_without_the_library_and_mapped(tmp_path):
  arrays = {'f32': np.arange(6, dtype=np.float32).reshape(2, 3), 'f16': np.float16([1.5, -2]),
            'i64': np.arange(-2, 2, dtype=np.int64), 'u8': np.uint8([0, 255]),
            'flag': np.array([True, False]), 'none': np.zeros((0, 4), np.float32)}
  path = tmp_path / 'w.safetensors'
  safetensors.numpy.save_file(arrays, str(path), metadata={'format': 'np'})
  out = tensor_files.read_tensors(path)
  assert out.format == 'safetensors' and out.unwrapped is None
  assert out.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  assert sorted(out.tensors) == sorted(arrays)
  for name, array in arrays.items():
    assert out.tensors[name].dtype == array.dtype and out.tensors[name].shape == array.shape
    np.testing.assert_array_equal(out.tensors[name], array)
  assert not out.tensors['f32'].flags.writeable and not out.tensors['f32'].flags.owndata
  # bfloat16 and float8, as the safetensors library itself writes them.
  bf16 = np.float32([1, -2.5, 3e38, 1e-3]).astype(ml_dtypes.bfloat16).reshape(2, 2)
  f8 = np.float32([0.5, -448]).astype(ml_dtypes.float8_e4m3fn)
  specs = {n: safetensors.TensorSpec(dtype=d, shape=list(a.shape), data_ptr=a.ctypes.data,
                                     data_len=a.nbytes)
           for n, d, a in (('bf16', 'bfloat16', bf16), ('f8', 'float8_e4m3fn', f8))}
  safetensors.serialize_file(specs, str(tmp_path / 'low.safetensors'))
  low = tensor_files.read_tensors(tmp_path / 'low.safetensors').tensors
  assert low['bf16'].dtype == ml_dtypes.bfloat16 and low['f8'].dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(low['bf16'].view(np.uint16), bf16.view(np.uint16))
  np.testing.assert_array_equal(low['f8'].view(np.uint8), f8.view(np.uint8))
  for entry, message in (({'dtype': 'F4', 'shape': [2], 'data_offsets': [0, 1]}, "dtype 'F4'"),
                         ({'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}, 'span 8'),
                         ({'dtype': 'F32', 'shape': 'x'}, 'malformed header entry')):
    header = json.dumps({'t': entry}).encode()
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(struct.pack('<Q', len(header)) + header + bytes(16))
    with pytest.raises(ValueError, match=f"bad\\.safetensors: tensor 't' .*{message}"):
      tensor_files.read_tensors(bad)
  with pytest.raises(ValueError, match=r"unwrap='ema', but safetensors files hold one flat set"):
    tensor_files.read_tensors(path, unwrap='ema')
  with pytest.raises(ValueError, match=r'is a safetensors file, not a torch archive'):
    torch_pickle.read(path)


def test_sniff_goes_by_the_first_bytes(tmp_path):
  for name, kind in FORMATS.items():
    renamed = tmp_path / f'{name}.safetensors'
    shutil.copy(FIXTURES / f'{name}.pt', renamed)
    assert torch_pickle.sniff(renamed) == kind
  safetensors.numpy.save_file({'x': np.zeros(2, np.float32)}, str(tmp_path / 'x.bin'))
  assert torch_pickle.sniff(tmp_path / 'x.bin') == 'safetensors'
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  assert torch_pickle.sniff(tmp_path / 'other.zip') == 'zip'
  (tmp_path / 'plain.pkl').write_bytes(pickle.dumps({'w': [1.0]}))
  assert torch_pickle.sniff(tmp_path / 'plain.pkl') == 'unknown'


def test_mislabelled_safetensors_files(tmp_path, caplog):
  # A torch archive named .safetensors: read through the allow-listed path, with a warning.
  for name in ('state_dict', 'legacy'):
    renamed = tmp_path / f'{name}.safetensors'
    shutil.copy(FIXTURES / f'{name}.pt', renamed)
    caplog.clear()
    with caplog.at_level('WARNING'):
      out = tensor_files.read_tensors(renamed)
    assert out.format == FORMATS[name]
    assert_bit_exact(out.tensors, expected_bits(name))
    assert f'{renamed} is named .safetensors but is a torch' in caplog.text
  # A bare pickle named .safetensors is refused by its first bytes and never unpickled.
  marker = tmp_path / 'executed'
  evil = tmp_path / 'model.safetensors'
  evil.write_bytes(_call_pickle('builtins', 'exec', (f'open({str(marker)!r}, "w")',), protocol=4))
  with pytest.raises(ValueError, match=r'model\.safetensors is neither safetensors nor a torch file: '
                                       r'first bytes 80 04 95 .*\(a pickle, not a torch archive; '
                                       r'it is never unpickled\)'):
    tensor_files.read_tensors(evil)
  assert not marker.exists()
  with zipfile.ZipFile(tmp_path / 'other.safetensors', 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match=r'a zip but not a torch archive.*readme\.txt'):
    tensor_files.read_tensors(tmp_path / 'other.safetensors')
  (tmp_path / 'empty.safetensors').write_bytes(b'')
  with pytest.raises(ValueError, match=r'first bytes none: the file is empty'):
    tensor_files.read_tensors(tmp_path / 'empty.safetensors')


# ------------------------------------------------------------------------------------------------
# Crafted pickles: refused by name, nothing imported or executed.


def _call_pickle(module: str, name: str, args: tuple, protocol: int = 2) -> bytes:
  """A pickle that calls module.name(*args) when loaded freely (GLOBAL + REDUCE)."""
  body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple's opcodes, without PROTO and STOP
  if protocol == 2:
    return b'\x80\x02c' + f'{module}\n{name}\n'.encode() + body + b'R.'
  # protocol 4: STACK_GLOBAL, in a frame, as pickle.dumps(protocol=4) writes it
  def unicode(s):
    return b'\x8c' + bytes([len(s)]) + s.encode()
  payload = unicode(module) + unicode(name) + b'\x93' + body + b'R.'
  return b'\x80\x04\x95' + struct.pack('<Q', len(payload)) + payload


@pytest.fixture(scope='module')
def evil_module(tmp_path_factory):
  """A module on sys.path whose import would create a marker file."""
  where = tmp_path_factory.mktemp('evil')
  marker = where / 'imported'
  (where / 'rpe2d_evil_payload.py').write_text(
      f'open({str(marker)!r}, "w").close()\n\ndef run(*args):\n  pass\n')
  sys.path.insert(0, str(where))
  yield marker
  sys.path.remove(str(where))


def _payloads(marker: pathlib.Path):
  touch = str(marker)
  return [
      ('os', 'system', (f'touch {touch}',), 2),
      ('posix', 'system', (f'touch {touch}',), 2),
      ('posix', 'system', (f'touch {touch}',), 4),
      ('builtins', 'eval', (f'open({touch!r}, "w")',), 2),
      ('subprocess', 'Popen', (['touch', touch],), 2),
      ('rpe2d_evil_payload', 'run', (touch,), 2),
      ('torch', 'load', (touch,), 2),
      ('torch._utils', '_rebuild_qtensor', (touch,), 2),  # in torch's allow-list, not ours
  ]


def test_crafted_pickles_are_refused_by_name_and_nothing_runs(tmp_path, evil_module):
  marker = tmp_path / 'executed'
  for module, name, args, protocol in _payloads(marker):
    payload = _call_pickle(module, name, args, protocol)
    where = tmp_path / f'{module}.{name}.{protocol}'
    where.mkdir()
    files = {
        'zip': write_torch_zip(where / 'model.pt', pickled=payload),
        'zip named .safetensors': write_torch_zip(where / 'model.safetensors', pickled=payload),
        'legacy': write_torch_legacy(where / 'legacy.pt', pickled=payload),
    }
    for kind, path in files.items():
      for read in (torch_pickle.read, torch_pickle.state_dict, tensor_files.read_tensors):
        with pytest.raises(torch_pickle.RefusedGlobalError) as info:
          read(path)
        message = str(info.value)
        assert '\n' not in message
        assert (f'{path}' in message and f'global {module}.{name} is not allowed: it was not '
                'imported or called') in message, (kind, message)
        assert (info.value.module, info.value.name) == (module, name)
    with pytest.raises(torch_pickle.RefusedGlobalError, match=f'global {module}.{name}'):
      torch_pickle.read_torchscript(files['zip'])
    with pytest.raises(torch_pickle.RefusedGlobalError, match=f'global {module}.{name}'):
      torch_pickle.numpy_only_loads(payload)
  assert not marker.exists()
  assert not evil_module.exists() and 'rpe2d_evil_payload' not in sys.modules
  # A real pickle of an object whose __reduce__ calls os.system (STACK_GLOBAL, protocol 5).
  class Evil:
    def __reduce__(self):
      return os.system, (f'touch {marker}',)
  with pytest.raises(torch_pickle.RefusedGlobalError, match=r'global (posix|os)\.system'):
    torch_pickle.read(write_torch_zip(tmp_path / 'evil5.pt',
                                      pickled=pickle.dumps(Evil(), protocol=5)))
  assert not marker.exists()


def test_crafted_pickles_cannot_misuse_admitted_names(tmp_path):
  def load(payload):
    storages = {'0': Storage('0', np.zeros(4, np.float32))}
    return torch_pickle.read(write_torch_zip(tmp_path / 'x.pt', pickled=payload,
                                             storages=storages))

  storage = b'(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ'
  cases = {
      # a storage type called as a function
      b'\x80\x02ctorch\nFloatStorage\n)R.': 'admitted as a name only',
      # a dtype used as a storage type
      storage.replace(b'FloatStorage', b'float32'): 'persistent id',
      # another kind of persistent id
      b'\x80\x02X\x03\x00\x00\x00abcQ.': 'persistent id',
      # _rebuild_from_type_v2 with a type that is not a tensor type
      (b'\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ctorch._utils\n_rebuild_parameter\n'
       b'ctorch\nFloatStorage\n)}tR.'): 'allowed: torch.Tensor',
      # a tensor reaching past its storage
      (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(' + storage
       + b'K\x02K\x03\x85K\x01\x85\x89}t R.').replace(b' ', b''): 'reaches element',
  }
  for payload, message in cases.items():
    with pytest.raises(pickle.UnpicklingError, match=re.escape(message)):
      load(payload)
  # BUILD on an admitted global would change it for every later read (a function's defaults).
  def text(s):
    return b'X' + struct.pack('<I', len(s)) + s.encode()
  for target in (b'ctorch._utils\n_rebuild_tensor_v2\n', b'ctorch\nFloatStorage\n',
                 b'ctorch\nSize\n'):
    with pytest.raises(pickle.UnpicklingError, match='cannot be given state'):
      load(b'\x80\x02' + target + b'N}' + text('__defaults__') + b'(\x89N}' + text('neg')
           + b'\x88sts\x86b.')
  assert_bit_exact(torch_pickle.read(FIXTURES / 'state_dict.pt'), expected_bits('state_dict'))
  missing = storage.replace(b'X\x01\x00\x00\x000', b'X\x01\x00\x00\x007')
  with pytest.raises(ValueError, match=r'x\.pt: the pickle names archive/data/7, which the '
                                       r'archive does not hold$'):
    load(b'\x80\x02' + missing + b'.')


# ------------------------------------------------------------------------------------------------
# Files cut short.


def _cuts(size: int) -> list[int]:
  return sorted({16, 64, size // 3, size // 2, size - 100, size - 9, size - 1})


@pytest.mark.parametrize('name', sorted(FORMATS) + ['script', 'safetensors'])
def test_truncated_files_are_one_clear_line(name, tmp_path):
  if name == 'safetensors':
    source = tmp_path / 'whole.safetensors'
    safetensors.numpy.save_file({'a': np.arange(200, dtype=np.float32),
                                 'b': np.ones((3, 5), np.int64)}, str(source))
  else:
    source = FIXTURES / f'{name}.pt'
  data = source.read_bytes()
  for cut in _cuts(len(data)):
    path = tmp_path / f'cut{cut}{source.suffix}'
    path.write_bytes(data[:cut])
    read = (torch_pickle.read_torchscript if name == 'script' else
            lambda p: tensor_files.read_tensors(p, unwrap='ema' if 'wrapped' in name else None))
    with pytest.raises(tensor_files.TruncatedFileError) as info:
      read(path)
    message = str(info.value)
    assert message.startswith(f'{path}: ') and message.endswith(INCOMPLETE), (cut, message)
    assert '\n' not in message


# ------------------------------------------------------------------------------------------------
# What torch cannot be made to write here.


def test_big_endian_archives(tmp_path):
  arrays = {'w': np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
            'h': np.float16([1, 2.5]), 'i': np.int64([-1, 2**40]),
            'b': np.float32([1, -3.5]).astype(ml_dtypes.bfloat16)}
  obj = {k: tensor(str(i), a) for i, (k, a) in enumerate(arrays.items())}
  for byteorder in ('little', 'big'):
    out = torch_pickle.read(write_torch_zip(tmp_path / f'{byteorder}.pt', obj, byteorder=byteorder,
                                            folder=f'any_{byteorder}_name'))
    for k, a in arrays.items():
      assert out[k].dtype == a.dtype
      np.testing.assert_array_equal(out[k], a)


def test_legacy_storage_views(tmp_path):
  # torch < 0.4 pickled views of a storage as (view key, offset, numel) in the persistent id.
  base = np.arange(10, dtype=np.float32)
  root = Storage('140', base)
  obj = {'whole': Tensor(root, 0, (5,)), 'part': Tensor(root, 1, (2, 2), (2, 1))}
  out = torch_pickle.read(write_torch_legacy(tmp_path / 'old.pt', obj,
                                             storage_views={'140': ('141', 4, 5)}))
  np.testing.assert_array_equal(out['whole'], base[4:9])
  np.testing.assert_array_equal(out['part'], base[5:9].reshape(2, 2))
  bad = write_torch_legacy(tmp_path / 'bad.pt', obj, storage_views={'140': ('141', 8, 5)})
  with pytest.raises(pickle.UnpicklingError, match=r'storage view .* reaches past storage 140'):
    torch_pickle.read(bad)


def test_the_oldest_tar_format_says_how_to_resave(tmp_path):
  path = tmp_path / 'ancient.pt'
  with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as tar:
    info = tarfile.TarInfo('storages')
    info.size = 3
    tar.addfile(info, io.BytesIO(b'abc'))
  with pytest.raises(ValueError, match=r'a tar archive.*re-save it with torch'):
    tensor_files.read_tensors(path)


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads VmHWM (Linux)')
def test_reading_maps_the_file_rather_than_copying_it(tmp_path):
  # Peak RSS from /proc, not getrusage: Linux carries ru_maxrss over exec from the forking process
  # (this one, with its own arrays), which would hide the child's own peak.
  # ~200 MB in 25 float32 tensors, laid out as torch.save lays them out.
  arrays = {f'block{i}.weight': np.full((1024, 2048), i, np.float32) for i in range(25)}
  path = write_torch_zip(tmp_path / 'big.pt', {k: tensor(str(i), a)
                                               for i, (k, a) in enumerate(arrays.items())})
  size = path.stat().st_size
  del arrays
  script = textwrap.dedent(f"""
      import json, sys
      import numpy as np
      from rpe2d import torch_pickle
      def peak():  # VmHWM: the peak RSS of this process's memory since exec
        status = dict(line.split(':', 1) for line in open('/proc/self/status'))
        return int(status['VmHWM'].split()[0]) * 1024
      before = peak()
      out = torch_pickle.read({str(path)!r})
      opened = peak() - before
      total = sum(float(a.sum(dtype=np.float64)) for a in out.values())
      print(json.dumps({{'opened': opened, 'touched': peak() - before, 'total': total}}))
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          check=True, env={**os.environ, 'PYTHONPATH': str(pathlib.Path(
                              __file__).resolve().parent.parent)})
  numbers = json.loads(result.stdout.strip().splitlines()[-1])
  assert numbers['total'] == sum(i * 1024 * 2048 for i in range(25))
  # Opening maps the file: nothing like its size is resident yet.
  assert numbers['opened'] < 0.1 * size, numbers
  # Reading every tensor brings the file's pages in once (so the measure sees them); a reader that
  # copied would need twice the file.
  assert 0.8 * size < numbers['touched'] < 1.2 * size, numbers
