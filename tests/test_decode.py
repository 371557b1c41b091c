"""Latent runs sample decoded images: sample.py, rpe2d.inference and the sweep on a run directory
of random weights whose VAE is tests/fixtures/sd_vae_tiny; autoencoder.decode_tiled against the
whole decode."""

import pathlib
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import REPO, CompileCounter, perturb, subprocess_env, tiny_config
from rpe2d import autoencoder, autoencoder_weights, checkpoints, config as config_lib, data, files
from rpe2d import inference
from rpe2d import rundir, training
from rpe2d.evaluation import metrics, sweep

VAE_DIR = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
VAE_FILE = VAE_DIR / autoencoder_weights.WEIGHTS_NAME


@pytest.fixture(scope='module')
def vae():
  return autoencoder_weights.load(VAE_DIR)


def latent_config(**overrides):
  """A micro/2 run on 8x8x4 latents (64x64 images through the f8 fixture VAE)."""
  values = dict(model__variant='micro/2', data__name='latents', data__channels=4,
                data__image_size=8, data__vae_path=str(VAE_FILE),
                data__vae_sha256=files.sha256_file(VAE_FILE),
                data__source_name='animal_mnist', data__source_image_size=64,
                sampling__resolutions=((8, 8),))
  values.update(overrides)
  return tiny_config(None, **values)


def write_run(workdir, config):
  """A run directory as training leaves it: config.json and a step-1 checkpoint, here of random
  (perturbed, so not zero-output) weights saved by the project's checkpoint code."""
  trainer = training.Trainer(config_lib.build_model(config), config_lib.training_plan(config),
                             training.make_mesh(1))
  state = trainer.init_state()
  weights = jax.jit(perturb, static_argnums=2)(state.params, jax.random.key(1), 0.2)
  state = state.replace(params=weights, ema_params=weights)
  manager = checkpoints.manager(workdir, config)
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())  # save() records a data position
  checkpoints.save(manager, 1, state, iterator, config, force=True)
  checkpoints.close(manager, 1)
  rundir.RunDir(workdir).write_config(config)
  return workdir


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return write_run(tmp_path_factory.mktemp('latent_run'), latent_config())


@pytest.fixture(scope='module')
def run(run_dir):
  return inference.load_run(run_dir)


@pytest.fixture(scope='module')
def other_vae(tmp_path_factory):
  """A copy of the fixture VAE with one tensor changed: same architecture, another sha256."""
  folder = tmp_path_factory.mktemp('other_vae')
  shutil.copy(VAE_DIR / 'config.json', folder)
  tensors = autoencoder_weights.to_diffusers(autoencoder_weights.load(VAE_DIR).params,
                                             autoencoder_weights.load(VAE_DIR).config)
  tensors['decoder.conv_out.bias'] = tensors['decoder.conv_out.bias'] + 0.5
  save_file(tensors, str(folder / autoencoder_weights.WEIGHTS_NAME))
  return folder / autoencoder_weights.WEIGHTS_NAME


def cli(*args, cwd, env):
  return subprocess.run([sys.executable, str(REPO / 'sample.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def env(jax_cache_dir):
  return subprocess_env(jax_cache_dir)


# ------------------------------------------------------------------------------------------------
# The run and its VAE.


def test_load_run_loads_the_vae(run, vae):
  assert inference.is_latent(run.config) and run.vae.sha256 == vae.sha256
  assert inference.downsampling(run) == 8 and inference.model_size(run, 32, 48) == (4, 6)
  pixel = tiny_config(None)
  assert not inference.is_latent(pixel) and data.source_data_config(pixel.data) is pixel.data


def test_generate_decodes_whole_and_tiled(run):
  plan = config_lib.sampling_plan(run.config, steps=2)
  stats = {}
  whole = inference.generate(run, height=64, width=64, labels=[0, 3, 9], plan=plan,
                             decode_tile=0, stats=stats)
  assert whole.shape == (3, 64, 64, 3) and whole.dtype == np.uint8 and whole.std() > 5
  assert stats['decode_seconds'] > 0
  # 4x4-latent tiles sharing 2, decoded over the 8 devices: close to the whole decode.
  tiled = inference.generate(run, height=64, width=64, labels=[0, 3, 9], plan=plan, decode_tile=4)
  assert tiled.shape == whole.shape
  assert np.abs(tiled.astype(int) - whole).mean() < 40
  # The decode is of the model's samples: unscaled, then decoded as autoencoder.decode does.
  samples = np.random.default_rng(0).normal(size=(8, 4, 6, 4)).astype(np.float32)
  expected = autoencoder.decode(run.vae.params, jnp.asarray(samples / 0.18215),
                                config=run.vae.config)
  np.testing.assert_allclose(inference.decode(run, samples), expected, atol=1e-4)
  assert inference.decode_tiling(run, 64, 64, None) == 0
  assert inference.decode_tiling(run, 2048, 2048, None) == inference.DECODE_TILE


@pytest.mark.parametrize('height,width,message', [
    (60, 64, "60x64 is not divisible by the VAE's downsampling factor 8"),
    (72, 72, '72x72 is 9x9 latents, not divisible by the patch size 2; use multiples of 16'),
])
def test_pixel_sizes_must_divide(run, height, width, message):
  with pytest.raises(ValueError, match=message):
    inference.generate(run, height=height, width=width, labels=[0])
  with pytest.raises(ValueError, match=message):
    inference.parse_resolution(f'{height}x{width}', 2, 8)


def test_load_run_refuses_another_or_a_missing_vae(run_dir, other_vae, tmp_path):
  with pytest.raises(ValueError, match="the run's latents were made by [0-9a-f]{64}; .* is "
                                       f'{files.sha256_file(other_vae)}'):
    inference.load_run(run_dir, vae=other_vae)
  with pytest.raises(FileNotFoundError, match='--vae'):
    inference.load_run(run_dir, vae=tmp_path / 'nowhere.safetensors')
  pixel_run = write_run(tmp_path / 'pixels', tiny_config(None))
  with pytest.raises(ValueError, match='not a latent run'):
    inference.load_run(pixel_run, vae=VAE_FILE)


def test_source_data_config_is_the_source(run):
  source = data.source_data_config(run.config.data)
  assert (source.name, source.image_size, source.channels) == ('animal_mnist', 64, 3)
  assert run.config.data.name == 'latents'  # a copy: the run's config is unchanged
  unknown = latent_config(data__source_name=None)
  with pytest.raises(ValueError, match='data.source_name=None'):
    data.source_data_config(unknown.data)


def test_sweep_cells_on_a_latent_run(run, tmp_path):
  cells = sweep.plan_cells([run], ['latent'], [(64, 64), (32, 48)], ['none', 'yarn'], {})
  assert len(cells) == 4 and all(plan is not None for *_, plan, _ in cells)
  assert sweep.parse_resolutions(['64', '32x48'], {(2, 8), 4}) == [(64, 64), (32, 48)]
  with pytest.raises(ValueError, match='downsampling factor 8'):
    sweep.parse_resolutions(['36'], {(2, 8)})
  features = lambda images: images.reshape(len(images), -1)[:, :8].astype(np.float64)
  rng = np.random.default_rng(0)
  real = rng.integers(0, 256, (16, 64, 64, 3)).astype(np.uint8)
  reference = sweep.Reference(dict(kind='test'), *metrics.feature_statistics(features(real)),
                              features(real))
  plan = config_lib.sampling_plan(run.config, steps=2)
  record = sweep.evaluate_cell(run, plan, 64, 64, num_samples=4, seed=0, reference=reference,
                               cell_dir=tmp_path, feature_fn=features)
  assert np.isfinite(record['fid']) and (tmp_path / f'{record["key"]}.png').is_file()


# ------------------------------------------------------------------------------------------------
# sample.py.


def test_cli_writes_decoded_pngs_and_npz(run_dir, env, tmp_path):
  result = cli(f'--workdir={run_dir}', '--resolution=64x64,32x48', '--labels=0,1',
               f'--output={tmp_path / "grid.png"}', cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'decoded by the VAE' in result.stdout and 'decode' in result.stdout
  for name, (height, width) in (('grid_64x64.png', (64, 64)), ('grid_32x48.png', (32, 48))):
    picture = Image.open(tmp_path / name)
    assert picture.mode == 'RGB'
    # Two titled rows of two images each, 2 px padding, 64 px titles.
    assert picture.size == (64 + 2 + 2 * (width + 2), 2 + 2 * (height + 2))
  result = cli(f'--workdir={run_dir}', '--labels=4', '--num_samples=3', '--decode_tile=4',
               f'--output={tmp_path / "batch.npz"}', cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'in 4x4-latent tiles' in result.stdout
  with np.load(tmp_path / 'batch.npz') as batch:  # default: the 64x64 source images' size
    assert batch['arr_0'].dtype == np.uint8 and batch['arr_0'].shape == (3, 64, 64, 3)


def test_cli_refuses_another_vae_a_missing_one_and_bad_sizes(run_dir, other_vae, env, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  result = cli(f'--workdir={run_dir}', f'--vae={other_vae}', f'--output={out / "a.png"}',
               cwd=out, env=env)
  assert result.returncode == 2
  assert (f"the run's latents were made by {files.sha256_file(VAE_FILE)}; {other_vae} "
          f'is {files.sha256_file(other_vae)}') in result.stderr, result.stderr[-2000:]
  result = cli(f'--workdir={run_dir}', f'--vae={tmp_path / "gone"}', f'--output={out / "a.png"}',
               cwd=out, env=env)
  assert result.returncode == 2 and 'gone does not exist; pass --vae=' in result.stderr
  result = cli(f'--workdir={run_dir}', '--resolution=64x60', f'--output={out / "a.png"}',
               cwd=out, env=env)
  assert result.returncode == 2 and "downsampling factor 8" in result.stderr
  assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Tiled decoding.


@pytest.mark.parametrize('height,width,tile,overlap', [
    (16, 16, 8, 4), (13, 21, 8, 3), (5, 30, 8, 7), (9, 9, 4, 0), (3, 3, 8, 2)])
def test_tiles_cover_every_pixel_with_one_shape(height, width, tile, overlap):
  windows = autoencoder.tile_windows(height, width, tile, overlap)
  assert len({(th, tw) for *_, th, tw in windows}) == 1
  covered = np.zeros((height, width), int)
  for top, left, th, tw in windows:
    covered[top:top + th, left:left + tw] += 1
  assert covered.min() >= 1
  total = np.zeros((height * 8, width * 8))
  for (top, left, th, tw), weight in autoencoder.tile_blend_weights(height, width, tile,
                                                                    overlap, 8):
    assert weight.shape == (th * 8, tw * 8) and weight.min() > 0
    total[top * 8:(top + th) * 8, left * 8:(left + tw) * 8] += weight
  assert total.min() > 0


@pytest.mark.parametrize('height,width', [(16, 16), (13, 21)])
def test_blending_is_exact_for_a_local_decoder(height, width):
  """Where a decoder's output pixel depends on its latent pixel alone, the normalised ramps
  reassemble the whole decode exactly: every output pixel is covered and weighted to one."""
  local = lambda params, z: jnp.repeat(jnp.repeat(jnp.tanh(z[..., :3]) * params, 8, 1), 8, 2)
  latents = np.random.default_rng(0).normal(size=(2, height, width, 4)).astype(np.float32)
  config = autoencoder.Config(block_out_channels=(8, 8, 8, 8), norm_num_groups=8)
  tiled = autoencoder.decode_tiled(2.0, latents, config=config, tile=8, overlap=3,
                                   decode_fn=local)
  np.testing.assert_allclose(tiled, local(2.0, latents), atol=1e-6)


def test_tiled_decode_approaches_the_whole_decode(vae):
  """The decoder's GroupNorm statistics and attention are per tile, so tiles only approximate the
  whole decode; on the tiny random-weight fixture (pixel std 0.34) the error shrinks as the tiles
  grow, and one tile covering everything is the whole decode."""
  latents = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 24, 4)), jnp.float32)
  whole = np.asarray(autoencoder.decode(vae.params, latents, config=vae.config))
  errors = []
  for tile, overlap in ((8, 4), (16, 12)):
    with CompileCounter() as counter:
      tiled = autoencoder.decode_tiled(vae.params, latents, config=vae.config, tile=tile,
                                       overlap=overlap)
    assert counter.count <= 2  # one lowering and one compilation: every tile has one shape
    assert tiled.shape == whole.shape and np.isfinite(tiled).all()
    errors.append(np.abs(tiled - whole).mean())
  assert errors[0] > errors[1] and errors[1] < 0.05, errors
  one = autoencoder.decode_tiled(vae.params, latents, config=vae.config, tile=24, overlap=4)
  np.testing.assert_allclose(one, whole, atol=1e-5)
  with pytest.raises(ValueError, match=r'overlap=8; allowed: an int in \[0, tile=8\)'):
    autoencoder.decode_tiled(vae.params, latents, config=vae.config, tile=8, overlap=8)
