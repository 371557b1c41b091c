"""Tests of the image_folder data set: real PNG/JPEG files in tmp dirs, prepared by its TFDS
builder, read back through rpe2d.data's grain pipeline, and a two-step training run on them.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from rpe2d import config as config_lib, data, rundir, train_loop
from rpe2d.datasets import image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
S = 16
CLASSES = ('apple', 'banana', 'cherry')


def _rng_image(rng, h, w, mode):
  rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  image = Image.fromarray(rgb)
  if mode == 'L':
    return image.convert('L')
  if mode == 'RGBA':
    alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode='RGBA')
  if mode == 'P':
    return image.quantize(colors=16)
  return image


def _jpeg_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def make_folder(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Three classes of mixed sizes, formats and modes, plus files that must be ignored."""
  rng = np.random.default_rng(seed)
  layout = {
      # (name, h, w, mode): sizes below S are upscaled, above 2S box-halved, non-square cropped.
      'apple': [('a0.png', 20, 30, 'RGB'), ('a1.png', 40, 24, 'RGB'), ('a2.png', 16, 16, 'RGB'),
                ('a3.PNG', 9, 12, 'RGB'), ('a4.png', 70, 50, 'RGB'), ('sub/a5.png', 18, 18, 'L')],
      'banana': [('b0.jpg', 24, 32, 'RGB'), ('b1.jpeg', 17, 21, 'L'), ('b2.JPG', 33, 33, 'RGB'),
                 ('b3.jpg', 16, 40, 'RGB')],
      'cherry': [('c0.png', 20, 20, 'RGBA'), ('c1.png', 25, 19, 'P')],
  }
  for cls, files in layout.items():
    for name, h, w, mode in files:
      path = root / cls / name
      path.parent.mkdir(parents=True, exist_ok=True)
      image = _rng_image(rng, h, w, mode)
      if path.suffix.lower() in ('.jpg', '.jpeg'):
        path.write_bytes(_jpeg_bytes(image))
      else:
        image.save(path, format='PNG')
  # Ignored: not an image extension, hidden files and folders.
  (root / 'apple' / 'notes.txt').write_text('not an image')
  (root / 'banana' / '._b0.jpg').write_bytes(b'AppleDouble junk')
  (root / '.ipynb_checkpoints').mkdir()
  (root / '.ipynb_checkpoints' / 'x.png').write_bytes(b'junk')
  return root


def image_files(root: pathlib.Path) -> list[str]:
  """The files the documented rules count as images, found independently of the builder."""
  out = []
  for path in root.rglob('*'):
    rel = path.relative_to(root)
    if (path.is_file() and len(rel.parts) >= 2 and path.suffix.lower() in image_folder.EXTENSIONS
        and not any(part.startswith('.') for part in rel.parts)):
      out.append(rel.as_posix())
  return sorted(out)


def cfg(image_dir, data_dir, **kw):
  """config.data of base() for the folder (a fresh object)."""
  c = config_lib.base().data
  c.update(dict(name='image_folder', image_dir=os.fspath(image_dir), data_dir=os.fspath(data_dir),
                image_size=S, channels=3, num_classes=len(CLASSES), augment='none'))
  c.update(kw)
  return c


def prepared_dirs(data_dir) -> list[pathlib.Path]:
  """Version directories and TFDS incomplete directories of every image_folder set in data_dir."""
  return sorted(pathlib.Path(data_dir).glob('image_folder/*/*'))


def read_split(config, split):
  it = data.make_iterator(config, split=split, seed=0, global_batch_size=4, train=False,
                          process_index=0, process_count=1)
  batches = list(it)
  images = np.concatenate([b['image'] for b in batches])
  return (np.rint((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8),
          np.concatenate([b['label'] for b in batches]),
          np.concatenate([b['index'] for b in batches]))


def expected_crop(path, mode):
  with Image.open(path) as image:
    arr = np.asarray(image.convert(mode))
  return data.center_crop_arr(arr[..., None] if arr.ndim == 2 else arr, S)[0]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('images') / 'fruit')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, folder):
  root = tmp_path_factory.mktemp('tfds')
  data.prepare(cfg(folder, root))
  return root


def prepared_builder(config):
  """The builder make_dataset reads from (prepared already, so this only lists and checks)."""
  return data._prepared_builder(data.parse_config(config))  # pylint: disable=protected-access


def _files_json(config) -> dict:
  path = pathlib.Path(os.fspath(prepared_builder(config).data_dir)) / image_folder.FILES_JSON
  return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Preparing and reading back.


@pytest.mark.parametrize('channels', [3, 1])
def test_records_are_center_crops_with_labels_and_disjoint_splits(folder, data_dir, channels):
  config = cfg(folder, data_dir, channels=channels)
  data.prepare(config)
  files = _files_json(config)
  assert set(files) == {'train', 'test'}
  assert not set(files['train']) & set(files['test'])
  assert sorted(files['train'] + files['test']) == image_files(folder)
  assert data.class_names(config) == list(CLASSES)
  for split in ('train', 'test'):
    images, labels, indices = read_split(config, split)
    assert images.shape == (len(files[split]), S, S, channels)
    np.testing.assert_array_equal(indices, np.arange(len(files[split])))
    for image, label, rel in zip(images, labels, files[split]):
      assert CLASSES[label] == rel.split('/')[0], rel
      np.testing.assert_array_equal(
          image, expected_crop(folder / rel, 'RGB' if channels == 3 else 'L'), err_msg=rel)
    if split == 'test':  # every class with >= 2 images is held out at least once
      assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_identity_depends_on_folder_size_and_channels(folder, data_dir, tmp_path):
  data.prepare(cfg(folder, data_dir, channels=1))
  copy = shutil.copytree(folder, tmp_path / 'fruit')
  data.prepare(cfg(copy, data_dir))
  data.prepare(cfg(folder, data_dir, image_size=8))
  names = [p.parent.name for p in prepared_dirs(data_dir)]
  assert len(names) == len(set(names)) == 4, names
  assert all(p.name == '1.0.0' for p in prepared_dirs(data_dir))


def test_metadata_records_the_source(folder, data_dir):
  meta = prepared_builder(cfg(folder, data_dir)).info.metadata
  assert meta['source'] == os.fspath(folder.resolve())
  assert meta['num_files'] == len(image_files(folder)) == 12
  assert meta['upscaled'] == 1  # a3.PNG, 9 x 12
  assert meta['skipped'] == []
  assert meta['split_sizes'] == {'train': 9, 'test': 3}


def test_num_classes_smaller_than_the_folder_is_refused(folder, data_dir):
  with pytest.raises(ValueError, match=r'data.num_classes=2, but image_folder has 3 classes'):
    data.prepare(cfg(folder, data_dir, num_classes=2))


def test_image_dir_is_required(tmp_path):
  with pytest.raises(ValueError, match=r"data.name='image_folder' needs data.image_dir"):
    data.parse_config(cfg('', tmp_path))


def test_two_training_steps(folder, data_dir, tmp_path):
  config = tiny_config(os.fspath(data_dir), data__name='image_folder',
                       data__image_dir=os.fspath(folder), data__num_classes=len(CLASSES),
                       data__channels=3)
  state = train_loop.train(config, tmp_path / 'run')
  assert int(np.asarray(state.step)) == 2
  metrics = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text()
             .splitlines() if line.strip()]
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert len(losses) == 2 and np.all(np.isfinite(losses))


# ------------------------------------------------------------------------------------------------
# Bad folders: one clear error, nothing prepared.


def _png(path, h=20, w=20):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _two_classes(root):
  for cls in ('x', 'y'):
    for i in range(3):
      _png(root / cls / f'{i}.png')
  return root


def _missing(root):
  return root / 'nope', r'does not exist'


def _a_file(root):
  root.mkdir()
  (root / 'f.png').write_bytes(b'')
  return root / 'f.png', r'is not a directory'


def _empty(root):
  root.mkdir()
  return root, r'is empty'


def _loose_images(root):
  for i in range(3):
    _png(root / f'{i}.png')
  return root, r'has no class subfolders \(3 images lie directly in it'


def _class_without_images(root):
  _two_classes(root)
  (root / 'z').mkdir()
  (root / 'z' / 'readme.txt').write_text('no images here')
  return root, r"class folder '.*/z' holds no images"


def _corrupt(root):
  _two_classes(root)
  (root / 'y' / 'bad.png').write_bytes(b'this is not a png')
  return root, r'y/bad.png is not a readable image \(UnidentifiedImageError'


def _truncated(root):
  _two_classes(root)
  blob = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (64, 64, 3), dtype=np.uint8)))
  (root / 'x' / 'cut.jpg').write_bytes(blob[:len(blob) // 2])
  return root, r'x/cut.jpg is not a readable image \(OSError: image file is truncated'


@pytest.mark.parametrize('make', [_missing, _a_file, _empty, _loose_images, _class_without_images,
                                  _corrupt, _truncated])
def test_bad_folder_one_line_error_nothing_prepared(tmp_path, make):
  image_dir, message = make(tmp_path / 'imgs')
  data_dir = tmp_path / 'tfds'
  with pytest.raises((ValueError, OSError), match=message) as info:
    data.prepare(cfg(image_dir, data_dir))
  assert '\n' not in str(info.value)
  assert os.fspath(image_dir.name) in str(info.value)
  assert prepared_dirs(data_dir) == []


def test_bad_image_skipped_with_bad_records_skip(tmp_path):
  image_dir = _corrupt(tmp_path / 'imgs')[0]
  config = cfg(image_dir, tmp_path / 'tfds', num_classes=2, bad_records='skip')
  data.prepare(config)
  files = _files_json(config)
  assert sorted(files['train'] + files['test']) == [f'{c}/{i}.png' for c in 'xy' for i in range(3)]
  meta = prepared_builder(config).info.metadata
  assert [s['file'] for s in meta['skipped']] == ['y/bad.png']
  assert len(read_split(config, 'train')[0]) == len(files['train'])


# ------------------------------------------------------------------------------------------------
# Failures while writing, and folders that change after preparing.


class _ChangesAfterTheCheck(image_folder.ImageFolder, skip_registration=True):
  """The real builder, with the folder changed by `change` right after every image was checked
  (as another process might), so the failure happens while TFDS is writing records."""

  name = 'image_folder'

  def __init__(self, *, change, **kwargs):
    self._change = change
    super().__init__(**kwargs)

  def _check_images(self):
    checked = super()._check_images()
    self._change()
    return checked


def _delete(path):
  saved = path.read_bytes()
  return lambda: path.unlink(), lambda: path.write_bytes(saved)


def _truncate(path):
  # Every image of the class, so one of them is in train and is read before the final check.
  saved = {p: p.read_bytes() for p in path.parent.glob('*.png')}
  return (lambda: [p.write_bytes(b[:40]) for p, b in saved.items()],
          lambda: [p.write_bytes(b) for p, b in saved.items()])


def _touch(path):
  return lambda: os.utime(path, ns=(1, 1)), lambda: None  # the new mtime is the new state


@pytest.mark.parametrize('change, message', [
    (_delete, r'y/2.png changed while its folder was being prepared \(FileNotFoundError'),
    (_truncate, r'y/\d.png changed while its folder was being prepared \((OSError|Unidentified)'),
    (_touch, r'y/2.png changed while its folder was being prepared \(its size or modification'),
])
def test_failure_while_writing_leaves_nothing_and_the_next_run_prepares(tmp_path, change, message):
  image_dir = _two_classes(tmp_path / 'imgs')
  data_dir = tmp_path / 'tfds'
  config = cfg(image_dir, data_dir, num_classes=2)
  break_it, fix_it = change(image_dir / 'y' / '2.png')
  builder = _ChangesAfterTheCheck(change=break_it, data_dir=os.fspath(data_dir),
                                  folder=image_dir, image_size=S, channels=3)
  with pytest.raises(image_folder.ImageFolderError, match=message):
    builder.download_and_prepare()
  assert prepared_dirs(data_dir) == []
  fix_it()
  data.prepare(config)
  assert [p.name for p in prepared_dirs(data_dir)] == ['1.0.0']
  images, labels, _ = read_split(config, 'train')
  assert len(images) == len(labels) == 4


def test_changed_folder_is_detected_on_the_next_use(tmp_path):
  image_dir = _two_classes(tmp_path / 'imgs')
  data_dir = tmp_path / 'tfds'
  config = cfg(image_dir, data_dir, num_classes=2)
  data.prepare(config)
  [prepared] = prepared_dirs(data_dir)
  _png(image_dir / 'x' / 'new.png')
  with pytest.raises(image_folder.ImageFolderError,
                     match=r'changed after it was prepared into .*6 image files then, 7 now.*'
                           r'delete that directory'):
    data.make_iterator(config, split='train', seed=0, global_batch_size=2, process_index=0,
                       process_count=1)
  shutil.rmtree(prepared)  # what the error says to do
  data.prepare(config)
  assert sum(len(f) for f in _files_json(config).values()) == 7
  os.utime(image_dir / 'x' / 'new.png', ns=(1, 1))  # same files, one rewritten
  with pytest.raises(image_folder.ImageFolderError,
                     match=r'7 image files, but names, sizes or modification times differ'):
    data.class_names(config)


def test_load_image_modes(tmp_path):
  """16-bit grayscale is scaled, not clipped; CMYK becomes RGB; EXIF orientation is applied;
  alpha is dropped (the colour under it is kept)."""
  wide = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
  Image.fromarray(wide).save(tmp_path / 'g16.png')
  np.testing.assert_array_equal(image_folder.load_image(tmp_path / 'g16.png', 1)[..., 0],
                                (wide >> 8).astype(np.uint8))
  Image.new('CMYK', (20, 10)).save(tmp_path / 'cmyk.jpg')
  assert image_folder.load_image(tmp_path / 'cmyk.jpg', 3).shape == (10, 20, 3)
  rotated = Image.new('RGB', (20, 10))
  exif = rotated.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
  rotated.save(tmp_path / 'exif.jpg', exif=exif)
  assert image_folder.load_image(tmp_path / 'exif.jpg', 3).shape == (20, 10, 3)
  rgba = np.dstack([np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)])
  Image.fromarray(rgba, mode='RGBA').save(tmp_path / 'clear.png')
  np.testing.assert_array_equal(image_folder.load_image(tmp_path / 'clear.png', 3), rgba[..., :3])


_KILLED_MIDWAY = '''
import os, signal, sys
from rpe2d.datasets import image_folder

class KilledMidway(image_folder.ImageFolder, skip_registration=True):
  name = 'image_folder'

  def _generate_examples(self, indices):
    for n, example in enumerate(super()._generate_examples(indices)):
      if n == 2:  # records are in TFDS' writer, on their way to disk
        os.kill(os.getpid(), signal.SIGKILL)
      yield example

KilledMidway(data_dir=sys.argv[1], folder=sys.argv[2], image_size=int(sys.argv[3]),
             channels=3).download_and_prepare()
'''


def test_a_killed_preparation_is_never_read(tmp_path):
  """SIGKILL while records are written leaves only TFDS' incomplete directory, which no reader
  uses; the next run prepares the set in full."""
  image_dir = _two_classes(tmp_path / 'imgs')
  data_dir = tmp_path / 'tfds'
  proc = subprocess.run([sys.executable, '-c', _KILLED_MIDWAY, os.fspath(data_dir),
                         os.fspath(image_dir), str(S)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  [leftover] = prepared_dirs(data_dir)
  assert leftover.name.startswith('incomplete.'), leftover
  assert (leftover / image_folder.FILES_JSON).is_file()  # the kill came after writing started
  config = cfg(image_dir, data_dir, num_classes=2)
  data.prepare(config)
  assert (leftover.parent / '1.0.0' / 'dataset_info.json').is_file()
  images, labels, _ = read_split(config, 'train')
  files = _files_json(config)
  assert len(images) == len(files['train']) == 4
  assert ['xy'.index(f.split('/')[0]) for f in files['train']] == labels.tolist()


def test_resuming_with_another_image_dir_is_refused(tmp_path):
  config = tiny_config(os.fspath(tmp_path), data__name='image_folder', data__image_dir='/a/cats')
  run = rundir.RunDir(tmp_path)
  run.write_config(config)
  rundir.check_compatible(run, config)
  other = tiny_config(os.fspath(tmp_path), data__name='image_folder', data__image_dir='/a/dogs')
  with pytest.raises(ValueError, match=r"data.image_dir: saved '/a/cats', now '/a/dogs'"):
    rundir.check_compatible(run, other)
