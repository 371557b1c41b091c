"""LightningDiT's VA-VAE (an LDM-layout AutoencoderKL with attention inside its deepest level) and
its latent statistics, against LightningDiT's own code; and the VAE as a first-class choice of the
latent path (extraction, the run's record).

The fixtures (tests/fixtures/vavae_tiny/, written by tests/fixtures/make_lightningdit_fixtures.py
with hustvl/LightningDiT at 2725fed) are a VA-VAE f16d32 at ch 8 with random weights saved as the
published file is laid out ({'state_dict': ...} with other networks' tensors beside the
autoencoder's), a statistics file of LightningDiT's layout, the reference's encode and decode, and
the full-size model's state-dict shapes. No torch needed.
"""

import dataclasses
import json
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from conftest import REPO, random_image_folder
from rpe2d import autoencoder, autoencoder_weights, config as config_lib, data, latents
from rpe2d import tensor_files, train_loop
from test_tensor_files import _call_pickle, tensor, write_torch_zip

FIXTURE = REPO / 'tests' / 'fixtures' / 'vavae_tiny'
WEIGHTS, STATISTICS = FIXTURE / 'vavae.pt', FIXTURE / 'latents_stats.pt'
TINY = autoencoder.Config(block_out_channels=(8, 8, 16, 16, 32), latent_channels=32,
                          norm_num_groups=4, scaling_factor=1.0, attention_levels=(4,))
FLOAT32_TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def loaded():
  return autoencoder_weights.load(WEIGHTS, statistics=STATISTICS)


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE / 'inputs_outputs.npz') as saved:
    return dict(saved)


def _state_dict() -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in tensor_files.read_tensors(
      WEIGHTS, unwrap='state_dict').tensors.items()}


def _save_torch(path: pathlib.Path, tensors: dict[str, np.ndarray], wrap='state_dict'):
  """A torch.save zip of `tensors` (wrapped in {wrap: ...} unless wrap is None)."""
  entries = {name: tensor(str(i), np.ascontiguousarray(array))
             for i, (name, array) in enumerate(tensors.items())}
  return write_torch_zip(path, {wrap: entries} if wrap else entries)


def test_the_published_layout_is_read_and_the_rest_left_unread(loaded):
  # config.json beside the file gives the architecture (GroupNorm's 4 groups are in no shape).
  assert loaded.config == TINY
  assert (loaded.layout, loaded.format, loaded.unwrapped) == ('ldm', 'torch_zip', 'state_dict')
  assert loaded.left_unread == (('foundation_model', 2), ('linear_proj', 1), ('loss', 3))
  assert ('left unread: 2 tensors of foundation_model.*, 1 tensors of linear_proj.*, 3 tensors '
          'of loss.*') in loaded.describe()
  # LDM's names map one to one onto the tree init creates, and back (1x1-conv attention).
  back = autoencoder_weights.to_diffusers(loaded.params, loaded.config, layout='ldm')
  state = _state_dict()
  assert set(back) == {k for k in state if k.startswith(autoencoder_weights.AUTOENCODER_PREFIXES)}
  for name, array in back.items():
    np.testing.assert_array_equal(array, state[name], err_msg=name)
  assert 'encoder.down.4.attn.1.q.weight' in back and 'decoder.up.4.attn.2.proj_out.bias' in back
  assert 'decoder.up.1.block.0.nin_shortcut.weight' in back  # 16 -> 8 channels at level 1


def test_encode_and_decode_match_lightningdits_autoencoder(loaded, reference):
  mean, logvar = autoencoder.encode(loaded.params, reference['images'], config=loaded.config)
  decoded = autoencoder.decode(loaded.params, reference['latents'], config=loaded.config)
  errors = {'mean': float(np.abs(mean - reference['mean']).max()),
            'logvar': float(np.abs(logvar - reference['logvar']).max()),
            'decoded': float(np.abs(decoded - reference['decoded']).max())}
  assert all(e <= FLOAT32_TOLERANCE for e in errors.values()), errors
  assert mean.shape == (2, 4, 3, 32) and decoded.shape == (2, 64, 48, 3)
  assert np.std(reference['mean']) > 0.1 and np.std(reference['decoded']) > 0.1
  # With the in-level attention blocks made identities (their output projection zero) it is
  # another function: they are exercised. (Same shapes: nothing compiles again.)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: np.zeros_like(v) if '_attentions_' in jax.tree_util.keystr(path)
      and 'to_out_0' in jax.tree_util.keystr(path) else v, loaded.params)
  other = autoencoder.decode(params, reference['latents'], config=loaded.config)
  assert float(np.abs(other - reference['decoded']).max()) > 1e-2


def test_the_full_size_architecture_is_the_preset_and_read_from_shapes():
  shapes = {k: tuple(v) for k, v in json.loads(
      (FIXTURE / 'vavae_f16d32_shapes.json').read_text()).items()}
  preset = autoencoder.PRESETS['vavae-f16d32']
  expected = autoencoder_weights.expected_tensors(preset, layout='ldm')
  assert {k: v[1] for k, v in expected.items()} == shapes  # every key and shape of the reference
  assert autoencoder_weights.config_from_ldm_shapes(shapes) == preset
  assert autoencoder_weights.preset_name(preset) == 'vavae-f16d32'
  assert preset.downsampling == 16 and autoencoder_weights.param_count(preset) == 69_836_067
  # The tiny one's shapes give its architecture but for GroupNorm's groups, which no shape holds.
  tiny = {k: v.shape for k, v in _state_dict().items()}
  assert autoencoder_weights.config_from_ldm_shapes(tiny, norm_num_groups=4) == TINY
  with pytest.raises(ValueError, match='norm_num_groups=32 does not divide every entry of '
                                       r'block_out_channels=\(8, 8, 16, 16, 32\)'):
    autoencoder_weights.config_from_ldm_shapes(tiny)
  del tiny['encoder.conv_in.weight'], tiny['encoder.down.0.block.0.conv1.weight']
  with pytest.raises(ValueError, match=r'cannot be read from its shapes: it lacks '
                                       r'encoder.conv_in.weight; its encoder levels are '
                                       r'\[1, 2, 3, 4\]'):
    autoencoder_weights.config_from_ldm_shapes(tiny)


def test_the_same_weights_in_diffusers_layout_load_the_same(loaded, tmp_path):
  folder = tmp_path / 'diffusers'
  folder.mkdir()
  safetensors_numpy.save_file(autoencoder_weights.to_diffusers(loaded.params, loaded.config),
                              str(folder / autoencoder_weights.WEIGHTS_NAME))
  (folder / 'config.json').write_text(json.dumps(
      autoencoder_weights.to_diffusers_config(loaded.config)))
  again = autoencoder_weights.load(folder)
  assert again.config == loaded.config and again.layout == 'diffusers'
  assert 'encoder.down_blocks.4.attentions.1.to_q.weight' in autoencoder_weights.to_diffusers(
      again.params, again.config)
  np.testing.assert_equal(again.params, loaded.params)
  raw = autoencoder_weights.to_diffusers_config(loaded.config)
  assert raw['up_block_types'][0] == 'AttnUpDecoderBlock2D'  # up blocks run from the deepest
  with pytest.raises(ValueError, match='put attention at other levels'):
    autoencoder_weights.config_from_diffusers(dict(raw, up_block_types=['UpDecoderBlock2D'] * 5))


def test_a_file_without_the_expected_keys_names_them_all_at_once(tmp_path):
  state = _state_dict()
  del state['decoder.up.4.attn.2.q.weight'], state['encoder.mid.attn_1.norm.bias']
  del state['post_quant_conv.bias']
  state['encoder.down.4.attn.2.q.weight'] = np.zeros((32, 32, 1, 1), np.float32)
  state['decoder.conv_in.weight'] = state['decoder.conv_in.weight'][:, :16].copy()
  path = _save_torch(tmp_path / 'broken.pt', state)
  with pytest.raises(ValueError) as info:
    autoencoder_weights.load(path, config=TINY)
  message = str(info.value)
  assert '\n' not in message
  for part in ('3 missing keys: decoder.up.4.attn.2.q.weight, encoder.mid.attn_1.norm.bias, '
               'post_quant_conv.bias',
               '1 unexpected keys: encoder.down.4.attn.2.q.weight',
               'decoder.conv_in.weight has shape (32, 16, 3, 3), expected (32, 32, 3, 3)'):
    assert part in message, message
  # The other networks' tensors are never "unexpected": they are left unread.
  assert 'loss.' not in message and 'foundation_model' not in message
  # A file of no autoencoder at all (here a generator's state dict) says so.
  generator = REPO / 'tests' / 'fixtures' / 'lightningdit_tiny' / 'model.pt'
  with pytest.raises(ValueError, match=r'holds no autoencoder: none of its \d+ tensors is an '
                                       'encoder or decoder block'):
    autoencoder_weights.load(generator)


def test_a_torch_file_naming_another_global_is_refused_unread(tmp_path):
  marker = tmp_path / 'executed'
  evil = write_torch_zip(tmp_path / 'vavae.pt',
                         pickled=_call_pickle('os', 'system', (f'touch {marker}',)))
  with pytest.raises(pickle.UnpicklingError, match=r'global os\.system is not allowed: it was '
                                                   'not imported or called'):
    autoencoder_weights.load(evil, config=TINY)
  assert not marker.exists()


def test_latent_statistics(loaded):
  stats = loaded.statistics
  raw = tensor_files.read_tensors(STATISTICS).tensors
  assert raw['mean'].shape == raw['std'].shape == (1, 32, 1, 1)
  np.testing.assert_allclose(stats.mean, raw['mean'].reshape(-1), rtol=1e-7)
  np.testing.assert_allclose(stats.std, raw['std'].reshape(-1), rtol=1e-7)
  assert stats.sha256 == tensor_files.sha256_file(STATISTICS)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 32)), jnp.float32)
  x = autoencoder.latents_to_model(z, loaded.config, stats)
  expected = (np.asarray(z) - raw['mean'].reshape(-1)) / raw['std'].reshape(-1)  # LightningDiT's
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(autoencoder.latents_from_model(x, loaded.config, stats), z,
                             atol=1e-5)


@pytest.mark.parametrize('change,message', [
    ({'mean': np.zeros((1, 16, 1, 1), np.float32)},
     r'mean has shape \(1, 16, 1, 1\) \(float32\); expected float \(1, 32, 1, 1\) or \(32,\): '
     'one value per latent channel of the VAE'),
    ({'extra': np.zeros(32, np.float32)}, r"holds \['extra', 'mean', 'std'\]; expected exactly "
                                          'mean and std'),
    ({'std': np.linspace(-1.0, 1.0, 32).astype(np.float32)}, 'std is not positive and finite'),
])
def test_statistics_of_the_wrong_shape_are_refused_in_one_line(tmp_path, change, message):
  good = {k: np.array(v) for k, v in tensor_files.read_tensors(STATISTICS).tensors.items()}
  path = _save_torch(tmp_path / 'latents_stats.pt', {**good, **change}, wrap=None)
  with pytest.raises(ValueError, match=message) as info:
    autoencoder_weights.load(WEIGHTS, statistics=path)
  assert '\n' not in str(info.value) and 'latents_stats.pt' in str(info.value)


# ------------------------------------------------------------------------------------------------
# The latent path: extraction and the run's record.


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
  """A folder of 8 RGB images, 32 x 32, encoded by the tiny VA-VAE with its statistics."""
  root = tmp_path_factory.mktemp('vavae_latents')
  images = random_image_folder(root, size=32, per_class=4)
  manifest = latents.extract(images, WEIGHTS, root / 'latents', splits=('train',), shard_size=8,
                             batch_size=8, progress=False, vae_statistics=STATISTICS)
  return images, root, manifest


def test_an_extraction_records_the_vae_and_its_statistics(extracted, loaded):
  images, root, manifest = extracted
  assert manifest.latent_shape == (2, 2, 32)
  vae = manifest.vae
  assert vae['sha256'] == loaded.sha256 and vae['config']['attention_levels'] == [4]
  assert vae['statistics']['sha256'] == loaded.statistics.sha256
  assert vae['statistics']['mean'] == list(loaded.statistics.mean)
  # What a run with data.latent_scaling='vae' (the default) sees: LightningDiT's normalisation.
  config = config_lib.base()
  config.data.update(dict(name='latents', latent_dir=str(root / 'latents'), channels=32,
                          image_size=2, num_classes=2, augment='none'))
  scale, shift = data.manifest_scale_shift(data.parse_config(config.data), manifest)
  np.testing.assert_allclose(scale, 1.0 / np.asarray(loaded.statistics.std), rtol=1e-6)
  np.testing.assert_allclose(shift, loaded.statistics.mean, rtol=1e-6)
  # The run records the VAE, its statistics file and the normalisation it trains with.
  config.model.variant = 'micro/1'
  config.sampling.resolutions = ((32, 32),)
  vae_loaded = train_loop.record_latents(config)
  d = config.data
  assert (d.vae_sha256, d.vae_statistics_sha256) == (loaded.sha256, loaded.statistics.sha256)
  assert d.vae_statistics == str(STATISTICS.resolve())
  np.testing.assert_allclose(d.latent_mean, loaded.statistics.mean, rtol=1e-6)
  np.testing.assert_allclose(d.latent_std, loaded.statistics.std, rtol=1e-6)
  assert vae_loaded.config == TINY
  # Mismatched statistics are refused before any work; so is another extraction's directory.
  bad = _save_torch(root / 'bad_stats.pt', {'mean': np.zeros((1, 4, 1, 1), np.float32),
                                            'std': np.ones((1, 4, 1, 1), np.float32)}, wrap=None)
  with pytest.raises(latents.InputError, match=r'--vae_statistics: latent statistics .*mean has '
                                               r'shape \(1, 4, 1, 1\)'):
    latents.extract(images, WEIGHTS, root / 'other', splits=('train',), shard_size=8,
                    batch_size=8, progress=False, vae_statistics=bad)
  assert not (root / 'other').exists()


def test_extractions_from_before_attention_levels_still_resume():
  # A progress file written before vae.config had attention_levels reads as the SD layout.
  old = {'vae': {'sha256': 'x', 'config': dataclasses.asdict(autoencoder.PRESETS['sd'])}}
  del old['vae']['config']['attention_levels']
  new = {'vae': {'sha256': 'x', 'config': dict(dataclasses.asdict(autoencoder.PRESETS['sd']),
                                               attention_levels=[]), 'statistics': None}}
  assert latents._differing(old, new) == []  # pylint: disable=protected-access
