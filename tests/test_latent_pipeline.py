"""The papers' setting end to end, offline: a folder of images -> the (tiny, random) SD-VAE
fixture -> extracted latents -> an RPE-2D DiT trained on them -> samples at two resolutions,
decoded -> FID with the real Inception network. Plus the bad inputs of the latent path."""

import json
import pathlib
import shutil
import time

import chex
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from conftest import REPO, edit_run_config, host, read_jsonl, step_dirs, tiny_config
from rpe2d import autoencoder_weights, config as config_lib, data, files, inference, latents, rundir
from rpe2d import train_loop
from rpe2d.evaluation import inception, sweep

VAE_DIR = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
VAE_FILE = VAE_DIR / autoencoder_weights.WEIGHTS_NAME
SIZE = 64  # images; 8x8x4 latents through the f8 fixture VAE
CLASSES = ('disc', 'ring')

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')


def _picture(rng, kind):
  yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1) * 2 - 1
  r = np.hypot(yy - rng.uniform(-0.2, 0.2), xx - rng.uniform(-0.2, 0.2))
  shape = r < 0.5 if kind == 'disc' else np.abs(r - 0.5) < 0.15
  color = rng.integers(60, 255, 3)
  return (shape[..., None] * color).astype(np.uint8)


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
  """(data config of the folder, latents directory, seconds the extraction took)."""
  root = tmp_path_factory.mktemp('latent_pipeline')
  rng = np.random.default_rng(0)
  for kind in CLASSES:
    (root / 'images' / kind).mkdir(parents=True)
    for i in range(12):
      Image.fromarray(_picture(rng, kind)).save(root / 'images' / kind / f'{i}.png')
  images = config_lib.base().data
  images.update(dict(name='image_folder', image_dir=str(root / 'images'),
                     data_dir=str(root / 'tfds'), image_size=SIZE, channels=3,
                     num_classes=len(CLASSES), augment='none'))
  began = time.perf_counter()
  latents.extract(images, VAE_FILE, root / 'latents', flip=True, shard_size=8, batch_size=8,
                  progress=False)
  return images, root / 'latents', time.perf_counter() - began


def latent_config(images, latent_dir, **overrides):
  values = dict(data__name='latents', data__latent_dir=str(latent_dir), data__channels=4,
                data__image_size=SIZE // 8, data__num_classes=len(CLASSES),
                data__data_dir=images.data_dir, data__flip=True, model__variant='micro/2',
                positions__train='rpe2d', positions__max_grid=(8, 8), data__augment='auto',
                model__micro_conditioning=None, sampling__resolutions=((SIZE, SIZE),))
  values.update(overrides)
  config = tiny_config(images.data_dir, **values)
  return config_lib.resolve(config)


def test_folder_to_fid_through_latents(extracted, tmp_path):
  images, latent_dir, extract_seconds = extracted
  began = time.perf_counter()
  manifest = latents.read_manifest(latent_dir)
  assert manifest.latent_shape == (8, 8, 4) and manifest.flip
  assert manifest.vae['sha256'] == files.sha256_file(VAE_FILE)

  workdir = tmp_path / 'run'
  config = latent_config(images, latent_dir, total_steps=3)
  assert config.data.augment == 'rpe2d_crop' and config.model.micro_conditioning
  state = host(train_loop.train(config, workdir))
  assert int(state.step) == 3
  saved = rundir.RunDir(workdir).read_config()
  # The run records its VAE and its source images: sampling needs them after the latents are gone.
  assert saved.data.vae_sha256 == manifest.vae['sha256']
  assert pathlib.Path(saved.data.vae_path) == VAE_FILE.absolute()
  assert (saved.data.source_name, saved.data.source_image_size) == ('image_folder', SIZE)
  assert all(np.isfinite(r['loss']) for r in read_jsonl(workdir / 'metrics.jsonl'))
  with Image.open(rundir.RunDir(workdir).sample_grid(3, SIZE, SIZE)) as grid:
    assert grid.mode == 'RGB' and grid.size[1] == len(CLASSES) * (SIZE + 2) + 2  # decoded images

  run = inference.load_run(workdir)
  plan = config_lib.sampling_plan(run.config, steps=2)
  for size in (SIZE, 2 * SIZE):  # 2x: 16x16 latents, 8x8 tokens, the edge of the trained range
    out = inference.generate(run, height=size, width=size, labels=[0, 1, 0, 1], plan=plan)
    assert out.shape == (4, size, size, 3) and out.dtype == np.uint8 and out.std() > 0

  try:
    network = inception.InceptionV3(batch_size=6)
  except inception.WeightsUnavailableError as e:
    pytest.skip(f'the FID network is unavailable here: {e}')
  cells = sweep.plan_cells([run], ['run'], [(SIZE, SIZE)], ['none'], dict(steps=2))
  rows = sweep.run([run], ['run'], [(SIZE, SIZE)], cells, outdir=tmp_path / 'eval',
                   feature_fn=network, num_samples=6, num_reference=8, split='train',
                   real_split='')  # the folder's test split holds 2 images
  assert np.isfinite(rows[0]['fid']) and rows[0]['fid'] > 0
  print(f'\nextraction {extract_seconds:.1f} s, train + sample + FID '
        f'{time.perf_counter() - began:.1f} s')


def test_latent_training_resumes_bit_identically(extracted, tmp_path):
  images, latent_dir, _ = extracted
  config = lambda steps: latent_config(images, latent_dir, total_steps=steps,
                                       checkpoint_every_steps=2)
  straight = host(train_loop.train(config(4), tmp_path / 'a'))
  train_loop.train(config(2), tmp_path / 'b')
  resumed = host(train_loop.train(config(4), tmp_path / 'b'))
  assert step_dirs(tmp_path / 'b') == [2, 4]
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.opt_state, resumed.opt_state)


def test_posterior_draws_scaling_and_latent_crops(extracted):
  images, latent_dir, _ = extracted
  config = latent_config(images, latent_dir)
  source = latents.LatentSource(latent_dir, 'train')
  manifest = latents.read_manifest(latent_dir)
  scale = manifest.vae['scaling_factor']
  # The mean, scaled: what a 'mean' draw without augmentation gives, exactly.
  batch = next(data.make_iterator(dict(config.data, latent_sample='mean', augment='none',
                                       flip=False),
                                  split='train', seed=0, global_batch_size=8, process_index=0,
                                  process_count=1))
  for z, index in zip(batch['image'], batch['index']):
    np.testing.assert_allclose(z, source[int(index)]['mean'] * scale, rtol=1e-6)
  # Posterior draws differ from the mean by about the posterior's std, and vary with the step.
  draws = next(data.make_iterator(dict(config.data, augment='none', flip=False), split='train',
                                  seed=0, global_batch_size=8, process_index=0, process_count=1))
  means = np.stack([source[int(i)]['mean'] * scale for i in draws['index']])
  stds = np.stack([np.exp(0.5 * source[int(i)]['logvar']) * scale for i in draws['index']])
  ratio = np.std((draws['image'] - means) / stds)
  assert 0.8 < ratio < 1.2, ratio
  # RPE-2D crops on latents: windows inside the resized latent, reported to the model.
  crops = next(data.make_iterator(dict(config.data, crop_prob=1.0, crop_max_scale=2.0),
                                  split='train', seed=0, global_batch_size=8, process_index=0,
                                  process_count=1))
  assert crops['image'].shape == (8, 8, 8, 4) and crops['image'].dtype == np.float32
  window = crops['crop']
  assert np.sum(window[:, 2] < 1.0) >= 4  # resized to R = round(r 8) > 8 latent pixels, mostly
  assert np.all(window[:, :2] >= 0) and np.all(window[:, :2] + window[:, 2:] <= 1 + 1e-6)


@pytest.mark.parametrize('overrides, message', [
    (dict(data__channels=3), r"holds latents with 4 channels; data.channels=3 must equal it"),
    (dict(data__image_size=16), r'holds 8x8 latents; data.image_size=16 must be their size'),
    (dict(data__vae_sha256='0' * 64), r"data.vae_sha256='0000.*was made by the VAE with sha256"),
    (dict(data__latent_dir=None), r"data.name='latents' needs data.latent_dir"),
], ids=['channels', 'size', 'vae', 'no_latents'])
def test_latent_data_that_disagrees_with_the_config_fails_fast(extracted, tmp_path, overrides,
                                                               message):
  images, latent_dir, _ = extracted
  config = latent_config(images, latent_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    train_loop.train(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_sampling_a_latent_run_without_its_vae_or_with_another(extracted, tmp_path):
  images, latent_dir, _ = extracted
  workdir = tmp_path / 'run'
  train_loop.train(latent_config(images, latent_dir, total_steps=1), workdir)
  other = tmp_path / 'other_vae'
  shutil.copytree(VAE_DIR, other)
  tensors = safetensors.numpy.load_file(str(other / autoencoder_weights.WEIGHTS_NAME))
  name = sorted(tensors)[0]
  tensors[name] = tensors[name] + 1.0
  safetensors.numpy.save_file(tensors, str(other / autoencoder_weights.WEIGHTS_NAME))
  # On a trained run (test_decode.py checks the same through sample.py's command line).
  with pytest.raises(ValueError, match='is not the VAE of this run'):
    inference.load_run(workdir, vae=other)
  with pytest.raises(FileNotFoundError, match='does not exist; pass --vae'):
    inference.load_run(workdir, vae=tmp_path / 'missing.safetensors')
  # The run's own VAE moved away: named, with what to pass.
  gone = str(tmp_path / 'gone' / autoencoder_weights.WEIGHTS_NAME)
  edit_run_config(workdir, lambda config: config['data'].update(vae_path=gone))
  with pytest.raises(FileNotFoundError, match=r"the run's VAE \(data.vae_path\) .* does not exist"):
    inference.load_run(workdir)


def test_a_vae_whose_scaling_disagrees_with_the_extraction_is_refused(extracted, tmp_path):
  images, latent_dir, _ = extracted
  other = tmp_path / 'sdxl_scaled'  # the same weights (so the same sha256), another config.json
  shutil.copytree(VAE_DIR, other)
  settings = json.loads((other / 'config.json').read_text())
  settings['scaling_factor'] = 0.13025
  (other / 'config.json').write_text(json.dumps(settings))
  config = latent_config(images, latent_dir, data__vae_path=str(other / VAE_FILE.name))
  with pytest.raises(ValueError, match=r'has \(scaling_factor, shift_factor\) = \(0.13025, None\); '
                                       r'the extraction .* was made with \(0.18215, None\)'):
    train_loop.train(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  workdir = tmp_path / 'good'
  train_loop.train(latent_config(images, latent_dir, total_steps=1), workdir)
  with pytest.raises(ValueError, match=r'has scaling_factor 0.13025; the run trained on latents '
                                       r'scaled by 0.18215'):
    inference.load_run(workdir, vae=other)
