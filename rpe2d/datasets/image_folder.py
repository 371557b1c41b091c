"""TFDS builder `image_folder`: the user's own images, one subfolder per class.

Layout: `<image_dir>/<class name>/**/<image>`. Class names are the sorted names of the
subfolders (label i is the i-th name); files anywhere below a class folder belong to it (a class
folder may be a symlink, and so may files; symlinked folders inside a class folder are not
followed). Names starting with '.' (`.ipynb_checkpoints`, macOS `._x.jpg`) are ignored, and so
is every file whose extension (any case) is not one of `EXTENSIONS`; images lying directly in
`image_dir` next to class folders are ignored with a warning.

Images: any size and PIL mode. The EXIF orientation is applied, then the image is converted to
`channels`: 1 = PIL 'L' (luma), 3 = PIL 'RGB'. Alpha is dropped, not composited (RGBA, LA and
transparent palette images keep their colour values under transparent pixels); 16-bit grayscale is
scaled to 8 bits. Then ADM's `center_crop_arr` (`rpe2d.data.center_crop_arr`) to
`image_size`: images whose short side is smaller than `image_size` are upscaled by its bicubic
resize (counted in the metadata as `upscaled`), not refused. Records hold the S x S result,
PNG-encoded with PIL (no TensorFlow needed), in ArrayRecord files.

Bad images: every file is decoded once before TFDS starts writing. A file PIL cannot decode
(corrupt, truncated, not an image despite its extension) raises `ImageFolderError` naming it and
PIL's error (`bad_images='error'`, the default, `data.bad_records`); with `'skip'` such files
are left out of both splits, logged, and listed in the metadata as `skipped`. The policy is not
part of the data set's identity: a set prepared with `'skip'` is reused as it is by later runs
with either setting. Preparing decodes every image twice (check, then write), in one process.

Split: `test` takes round(10%) of every class, at least one image of each class that has two or
more, chosen by `rpe2d.datasets._common.stratified_split` (salt `image_folder/v1`) over
the sorted file list; `train` the rest. Record i of a split is the file `files.json[split][i]`
(relative to `image_dir`, written next to the records).

Identity and staleness: the builder config's name is the folder's basename, the size, the channels
and a hash of (absolute path with symlinks resolved, size, channels), so two folders or sizes never
share a prepared set: `<data_dir>/image_folder/<config name>/1.0.0/`.
The metadata (`metadata.json`) records the source path, the file count and a fingerprint of the
file list (relative names, sizes, mtimes). Every later use lists the folder again and raises
`ImageFolderError` if the fingerprint differs, saying which directory to delete.

Nothing half-built is used: TFDS writes into an `incomplete.*` sibling directory and renames it
to the version directory only when every split and `dataset_info.json` are written, deleting it
on any error (`tfds.core.utils.file_utils.incomplete_dir`); `is_prepared` looks for the
version directory's `dataset_info.json`. A file that changes, disappears or stops decoding
between the check and the writing makes the preparation fail. A killed preparation leaves its
`incomplete.*` directory, which nothing reads (delete it at will); the next run starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Iterator

from absl import logging
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from rpe2d import data
from rpe2d.datasets import _common

EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.webp')
BAD_IMAGES = ('error', 'skip')
CHANNEL_MODES = {1: 'L', 3: 'RGB'}
SPLIT_SALT = 'image_folder/v1'
TEST_FRACTION = 0.1
FILES_JSON = 'files.json'


class ImageFolderError(ValueError):
  """An image folder that cannot be prepared or no longer matches its prepared data set."""


@dataclasses.dataclass(frozen=True)
class Listing:
  """The image files of a folder: `files[i]` (relative, '/'-separated) has label `labels[i]`."""
  root: pathlib.Path
  classes: tuple[str, ...]
  files: tuple[str, ...]
  labels: tuple[int, ...]
  stats: tuple[tuple[int, int], ...]  # (size, mtime_ns) of each file when listed
  fingerprint: str


def _visible(path: pathlib.Path) -> bool:
  return not path.name.startswith('.')


def _is_image(path: pathlib.Path) -> bool:
  return path.suffix.lower() in EXTENSIONS and _visible(path) and path.is_file()


def _stat(path: pathlib.Path) -> tuple[int, int]:
  st = path.stat()
  return st.st_size, st.st_mtime_ns


def _fingerprint(files, stats) -> str:
  digest = hashlib.sha256()
  for rel, (size, mtime_ns) in zip(files, stats):
    digest.update(f'{rel}\t{size}\t{mtime_ns}\n'.encode())
  return digest.hexdigest()


def scan(folder: os.PathLike | str) -> Listing:
  """Lists a class-per-subfolder image folder; raises a one-line error naming what is wrong."""
  root = pathlib.Path(folder).expanduser()
  if not root.exists():
    raise FileNotFoundError(f'data.image_dir={os.fspath(folder)!r} does not exist')
  if not root.is_dir():
    raise NotADirectoryError(f'data.image_dir={os.fspath(folder)!r} is not a directory')
  root = root.resolve()
  entries = sorted(p for p in root.iterdir() if _visible(p))
  if not entries:
    raise ImageFolderError(f'data.image_dir={os.fspath(root)!r} is empty; it needs one subfolder '
                           'of images per class')
  class_dirs = [p for p in entries if p.is_dir()]
  loose = [p.name for p in entries if _is_image(p)]
  if not class_dirs:
    raise ImageFolderError(
        f'data.image_dir={os.fspath(root)!r} has no class subfolders'
        + (f' ({len(loose)} images lie directly in it, e.g. {loose[0]!r})' if loose else '')
        + '; put the images of each class in a subfolder named after the class')
  if loose:
    logging.warning('image_folder: ignoring %d images directly in %s (not in a class subfolder), '
                    'e.g. %s', len(loose), root, loose[0])
  files, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):  # links to folders could loop
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for name in filenames:
        path = pathlib.Path(dirpath) / name
        if _is_image(path):
          found.append(path.relative_to(root).as_posix())
    if not found:
      raise ImageFolderError(f'class folder {os.fspath(class_dir)!r} holds no images (extensions '
                             f'{", ".join(EXTENSIONS)}); add some or remove the folder')
    found.sort()
    files.extend(found)
    labels.extend([label] * len(found))
  stats = tuple(_stat(root / rel) for rel in files)
  return Listing(root=root, classes=tuple(p.name for p in class_dirs), files=tuple(files),
                 labels=tuple(labels), stats=stats, fingerprint=_fingerprint(files, stats))


def load_image(path: os.PathLike | str, channels: int) -> np.ndarray:
  """Decodes an image file fully into a uint8 (h, w, channels) array (see the module doc)."""
  with Image.open(path) as image:
    image.load()  # decodes everything now: a truncated file fails here, not later
    image = ImageOps.exif_transpose(image)
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
      # PIL's own I -> L conversion clips at 255, which turns 16-bit pictures white.
      wide = np.asarray(image, dtype=np.int64)
      image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), mode='L')
    arr = np.asarray(image.convert(CHANNEL_MODES[channels]), dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def config_name(root: pathlib.Path, image_size: int, channels: int) -> str:
  digest = hashlib.sha256(f'{root}\n{image_size}\n{channels}'.encode()).hexdigest()[:12]
  base = re.sub(r'[^a-z0-9]+', '_', root.name.lower()).strip('_')[:40] or 'root'
  return f'{base}_{image_size}px_c{channels}_{digest}'


def from_options(opts: data.DataOptions, **kwargs: Any) -> ImageFolder:
  """The builder of `config.data`: its image_dir, image_size, channels, bad_records, data_dir."""
  return ImageFolder(data_dir=opts.data_dir, folder=opts.image_dir, image_size=opts.image_size,
                     channels=opts.channels, bad_images=opts.bad_records, **kwargs)


class ImageFolder(_common.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """A class-per-subfolder image folder, centre-cropped to `image_size` (see the module doc).

  ``tfds.builder('image_folder', data_dir=..., folder=..., image_size=..., channels=...,
  bad_images='error')``; the folder is listed (and, if prepared, checked for changes) here.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Class-per-subfolder images, ADM centre crop, stratified 10% test.'}

  def __init__(self, *, folder: os.PathLike | str | None = None, image_size: int = 32,
               channels: int = 3, bad_images: str = 'error', **kwargs: Any):
    if folder is None:
      raise ValueError('the image_folder builder needs folder=<a folder with one subfolder of '
                       'images per class> (data.image_dir)')
    if channels not in CHANNEL_MODES:
      raise ValueError(f'channels={channels!r} is not supported; allowed: {tuple(CHANNEL_MODES)}')
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
      raise ValueError(f'image_size={image_size!r} must be a positive integer')
    if bad_images not in BAD_IMAGES:
      raise ValueError(f'bad_images={bad_images!r} is not known; allowed: {BAD_IMAGES}')
    self.listing = scan(folder)
    self.image_size, self.channels, self.bad_images = image_size, channels, bad_images
    kwargs.setdefault('config', tfds.core.BuilderConfig(
        name=config_name(self.listing.root, image_size, channels),
        description=f'{self.listing.root} at {image_size}x{image_size}x{channels}'))
    if kwargs.get('file_format') is None:
      kwargs['file_format'] = 'array_record'
    super().__init__(**kwargs)
    if self.is_prepared():
      self._check_unchanged()

  def _info(self) -> tfds.core.DatasetInfo:
    s, c = self.image_size, self.channels
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Images of {self.listing.root}, one class per subfolder, ADM centre crop to '
                    f'{s}x{s}x{c}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, c), dtype=np.uint8, encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(self.listing.classes)),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _check_unchanged(self) -> None:
    recorded = self.info.metadata.get('fingerprint')
    if recorded == self.listing.fingerprint:
      return
    then, now = self.info.metadata.get('num_files'), len(self.listing.files)
    how = f'{then} image files then, {now} now' if then != now else \
        f'{now} image files, but names, sizes or modification times differ'
    raise ImageFolderError(
        f'data.image_dir={os.fspath(self.listing.root)!r} changed after it was prepared into '
        f'{os.fspath(self.data_dir)} ({how}); delete that directory to prepare it again, or set '
        'data.data_dir to another directory')

  def download_and_prepare(self, *args, **kwargs):
    # Decode every image before TFDS creates its incomplete directory, so a bad folder leaves
    # nothing behind; _split_generators uses the result.
    if not self.is_prepared():
      self._checked = self._check_images()
    return super().download_and_prepare(*args, **kwargs)

  def _check_images(self) -> dict[str, Any]:
    listing, bad, upscaled, kept = self.listing, [], 0, []
    for i, rel in enumerate(listing.files):
      try:
        h, w = load_image(listing.root / rel, self.channels).shape[:2]
      except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad files
        bad.append((rel, f'{type(e).__name__}: {e}'))
        continue
      upscaled += min(h, w) < self.image_size
      kept.append(i)
    if bad and self.bad_images == 'error':
      rel, problem = bad[0]
      more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
      raise ImageFolderError(
          f'{os.fspath(listing.root / rel)} is not a readable image ({problem}){more}; fix or '
          'remove it, or set --config.data.bad_records=skip to leave such files out')
    for rel, problem in bad:
      logging.warning('image_folder: skipping %s (%s)', listing.root / rel, problem)
    labels = np.asarray(listing.labels, dtype=np.int64)[kept]
    empty = sorted(set(range(len(listing.classes))) - set(labels.tolist()))
    if empty:
      raise ImageFolderError(f'class folder {os.fspath(listing.root / listing.classes[empty[0]])!r}'
                             ' holds no readable images')
    return dict(kept=np.asarray(kept, dtype=np.int64), labels=labels, upscaled=int(upscaled),
                skipped=[{'file': rel, 'error': problem} for rel, problem in bad])

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    checked = getattr(self, '_checked', None) or self._check_images()
    listing = self.listing
    train_idx, test_idx = _common.stratified_split(
        checked['labels'], test_fraction=TEST_FRACTION, salt=SPLIT_SALT, min_test_per_class=1)
    splits = {'train': checked['kept'][train_idx], 'test': checked['kept'][test_idx]}
    files = {name: [listing.files[i] for i in idx] for name, idx in splits.items()}
    self.info.metadata.update(
        source=os.fspath(listing.root), num_files=len(listing.files),
        fingerprint=listing.fingerprint, image_size=self.image_size, channels=self.channels,
        classes=list(listing.classes), upscaled=checked['upscaled'], skipped=checked['skipped'],
        split_sizes={name: len(idx) for name, idx in splits.items()})
    # self.data_dir is TFDS' incomplete directory here, so files.json is renamed with the records.
    (pathlib.Path(os.fspath(self.data_dir)) / FILES_JSON).write_text(json.dumps(files))
    return {name: self._generate_examples(idx) for name, idx in splits.items()}

  def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    listing = self.listing
    for key, i in enumerate(indices):
      path = listing.root / listing.files[i]
      try:
        image = load_image(path, self.channels)
      except Exception as e:  # pylint: disable=broad-except
        raise _changed_while_preparing(path, f'{type(e).__name__}: {e}') from e
      image, _ = data.center_crop_arr(image, self.image_size)
      yield key, {'image': _common.png_bytes(image), 'label': int(listing.labels[i])}
    # A file rewritten since it was listed may still decode; its records would not match the
    # fingerprint in the metadata.
    for rel, stat in zip(listing.files, listing.stats):
      try:
        now = _stat(listing.root / rel)
      except OSError as e:
        raise _changed_while_preparing(listing.root / rel, f'{type(e).__name__}: {e}') from e
      if now != stat:
        raise _changed_while_preparing(listing.root / rel, 'its size or modification time differs')


def _changed_while_preparing(path: pathlib.Path, problem: str) -> ImageFolderError:
  return ImageFolderError(f'{os.fspath(path)} changed while its folder was being prepared '
                          f'({problem}); nothing was kept, run again')
