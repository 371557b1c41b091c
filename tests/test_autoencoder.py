"""The SD autoencoder against diffusers (a fixture written by tests/fixtures/make_vae_fixture.py),
and the safetensors loader's refusals. No torch needed."""

import functools
import json
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from rpe2d import autoencoder, autoencoder_weights

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'sd_vae_tiny'
FLOAT32_TOLERANCE = 1e-4
# bfloat16 keeps 8 mantissa bits: measured 0.014 (mean, logvar) and 0.08 (decode, |x| <= 2.3).
BFLOAT16_TOLERANCE = {'mean': 0.05, 'logvar': 0.05, 'decoded': 0.25}


@pytest.fixture(scope='module')
def loaded():
  return autoencoder_weights.load(FIXTURE)


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE / 'inputs_outputs.npz') as data:
    return dict(data)


@pytest.fixture(scope='module')
def tensors():
  return safetensors_numpy.load_file(str(FIXTURE / autoencoder_weights.WEIGHTS_NAME))


def write_weights(folder: pathlib.Path, tensors, config=True) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / autoencoder_weights.WEIGHTS_NAME
  safetensors_numpy.save_file(tensors, str(path))
  if config:
    shutil.copy(FIXTURE / autoencoder_weights.CONFIG_NAME, folder / autoencoder_weights.CONFIG_NAME)
  return path


def max_error(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


def test_config_json_picks_the_architecture(loaded):
  assert loaded.config == autoencoder.Config(block_out_channels=(16, 16, 32, 32),
                                             layers_per_block=2, norm_num_groups=8)
  assert loaded.known is None


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_matches_diffusers(loaded, reference, dtype):
  mean, logvar = autoencoder.encode(loaded.params, reference['images'], config=loaded.config,
                                    dtype=dtype)
  decoded = autoencoder.decode(loaded.params, reference['latents'], config=loaded.config,
                               dtype=dtype)
  assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
  errors = {'mean': max_error(mean, reference['mean']),
            'logvar': max_error(logvar, reference['logvar']),
            'decoded': max_error(decoded, reference['decoded'])}
  tolerance = (dict.fromkeys(errors, FLOAT32_TOLERANCE) if dtype == 'float32'
               else BFLOAT16_TOLERANCE)
  assert all(errors[k] <= tolerance[k] for k in errors), errors
  # The reference is informative: not constant, so agreement is not trivial.
  assert np.std(reference['mean']) > 0.1 and np.std(reference['decoded']) > 0.1


def test_posterior_and_scaling():
  mean = jnp.linspace(-1.0, 1.0, 2 * 2 * 3 * 4).reshape(2, 2, 3, 4)
  posterior = autoencoder.DiagonalGaussian.from_moments(mean, jnp.full_like(mean, 50.0))
  assert float(posterior.logvar.max()) == 20.0  # clipped as diffusers clips
  posterior = autoencoder.DiagonalGaussian.from_moments(mean, jnp.full_like(mean, np.log(0.25)))
  np.testing.assert_allclose(posterior.std, 0.5, rtol=1e-6)
  a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert 0.1 < float(jnp.std(a - mean)) < 1.0
  assert posterior.mode() is mean
  config = autoencoder.PRESETS['sdxl']
  np.testing.assert_allclose(autoencoder.latents_to_model(mean, config), 0.13025 * mean)
  shifted = autoencoder.Config(scaling_factor=2.0, shift_factor=0.5)
  np.testing.assert_allclose(autoencoder.latents_to_model(mean, shifted), 2.0 * (mean - 0.5))
  np.testing.assert_allclose(
      autoencoder.latents_from_model(autoencoder.latents_to_model(mean, shifted), shifted), mean,
      atol=1e-6)


def test_param_names_round_trip(loaded, tensors):
  # Every diffusers name lands on one leaf of the tree init creates, and maps back to itself.
  init_tree = jax.tree.structure(autoencoder.param_shapes(loaded.config))
  assert jax.tree.structure(loaded.params) == init_tree
  back = autoencoder_weights.to_diffusers(loaded.params, loaded.config)
  assert set(back) == set(tensors)
  for name, array in tensors.items():
    np.testing.assert_array_equal(back[name], array, err_msg=name)
  assert autoencoder_weights.param_count(autoencoder.PRESETS['sd']) == 83_653_863


def test_legacy_attention_names_and_conv_weights(loaded, tensors, tmp_path):
  legacy = {}
  for name, array in tensors.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      if f'.attentions.0.{new}.' in name:
        name = name.replace(f'.{new}.', f'.{old}.')
        if array.ndim == 2:
          array = array[:, :, None, None]  # stored as a 1x1 conv
    legacy[name] = array
  assert 'decoder.mid_block.attentions.0.proj_attn.weight' in legacy
  params = autoencoder_weights.load(write_weights(tmp_path, legacy)).params
  jax.tree.map(np.testing.assert_array_equal, params, loaded.params)


def test_missing_unexpected_and_misshapen_keys_are_named(tensors, tmp_path):
  bad = dict(tensors)
  del bad['encoder.conv_in.weight']
  del bad['decoder.mid_block.attentions.0.to_v.bias']
  bad['decoder.extra_block.weight'] = np.zeros(3, np.float32)
  bad['quant_conv.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    autoencoder_weights.load(write_weights(tmp_path, bad))
  message = str(error.value)
  assert ('2 missing keys: decoder.mid_block.attentions.0.to_v.bias, encoder.conv_in.weight'
          in message)
  assert '1 unexpected keys: decoder.extra_block.weight' in message
  assert 'quant_conv.weight has shape (8, 8, 3, 3), expected (8, 8, 1, 1)' in message
  assert 'not a known file' in message


def test_file_identity_by_sha256(loaded, tmp_path):
  with pytest.raises(ValueError, match=r'is not sd-vae-ft-mse: its sha256 [0-9a-f]{64} is not a '
                                       r'known file'):
    autoencoder_weights.load(FIXTURE, expected='sd-vae-ft-mse')
  with pytest.raises(ValueError, match="expected='sd-vae'; allowed: .*sd-vae-ft-mse"):
    autoencoder_weights.load(FIXTURE, expected='sd-vae')
  known = dict(autoencoder_weights.KNOWN_FILES)
  known[loaded.sha256] = autoencoder_weights.KnownFile('tiny fixture', 'sd', 'this test')
  with pytest.raises(ValueError, match=f'is not sdxl-vae: it is tiny fixture \\(sha256 '
                                       f'{loaded.sha256}\\)'):
    autoencoder_weights.load(FIXTURE, expected='sdxl-vae', known=known)
  assert autoencoder_weights.load(FIXTURE, expected='tiny fixture', known=known).known.name == (
      'tiny fixture')
  # Without config.json the architecture of an unknown file cannot be guessed.
  path = tmp_path / 'alone.safetensors'
  shutil.copy(FIXTURE / autoencoder_weights.WEIGHTS_NAME, path)
  with pytest.raises(ValueError, match='no config.json beside it and its sha256 .* put the config.json of its diffusers'):
    autoencoder_weights.load(path)


class _TouchOnLoad:
  """Unpickling this creates `marker`: proof that a file was unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize('name', ['vae.ckpt', 'diffusion_pytorch_model.bin',
                                  'diffusion_pytorch_model.safetensors'])
def test_plain_pickles_are_refused_unread(tmp_path, name):
  # torch files are read through the allow-listed unpickler (tests/test_vavae.py); a plain
  # pickle is no torch file, whatever its name, and is never unpickled.
  marker = tmp_path / 'unpickled'
  (tmp_path / name).write_bytes(pickle.dumps(_TouchOnLoad(marker), protocol=4))
  with pytest.raises(ValueError, match='neither safetensors nor a torch file: .*a pickle, not a '
                                       'torch archive; it is never unpickled'):
    autoencoder_weights.load(tmp_path / name, config='sd')
  assert not marker.exists()
  (tmp_path / 'zipped.safetensors').write_bytes(b'PK\x03\x04' + bytes(32))  # torch.save's zip, cut
  with pytest.raises(ValueError, match='zip central directory is missing or damaged'):
    autoencoder_weights.load(tmp_path / 'zipped.safetensors', config='sd')


def test_config_json_is_validated():
  raw = json.loads((FIXTURE / autoencoder_weights.CONFIG_NAME).read_text())
  assert autoencoder_weights.config_from_diffusers(raw).norm_num_groups == 8
  for change, message in [
      ({'act_fn': 'gelu'}, "act_fn='gelu' is not supported; allowed: 'silu'"),
      ({'norm_groups': 8}, r"unsupported keys \['norm_groups'\]"),
      ({'up_block_types': ['UpDecoderBlock2D'] * 3}, 'up_block_types=.*allowed: 4 x'),
      ({'norm_num_groups': 5}, 'norm_num_groups=5 does not divide'),
      ({'_class_name': 'AutoencoderTiny'}, "allowed: AutoencoderKL"),
  ]:
    with pytest.raises(ValueError, match=message):
      autoencoder_weights.config_from_diffusers({**raw, **change})


def test_bad_shapes_are_refused(loaded):
  with pytest.raises(ValueError, match='not divisible by the downsampling factor 8'):
    autoencoder.encode(loaded.params, jnp.zeros((1, 12, 16, 3)), config=loaded.config)
  with pytest.raises(ValueError, match='dtype=.float16.; allowed: float32, bfloat16'):
    autoencoder.encode(loaded.params, jnp.zeros((1, 8, 8, 3)), config=loaded.config,
                       dtype='float16')


def test_sharded_encode_equals_single_device(loaded):
  assert jax.device_count() == 8
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
  encode = functools.partial(autoencoder.encode, config=loaded.config)
  sharded = autoencoder.sharded(encode)
  mean, logvar = sharded(loaded.params, images)
  assert len(mean.sharding.device_set) == 8
  single_mean, single_logvar = encode(loaded.params, images)
  np.testing.assert_allclose(mean, single_mean, atol=1e-6)
  np.testing.assert_allclose(logvar, single_logvar, atol=1e-6)
  with pytest.raises(ValueError, match='batch of 4 does not split over 8 devices'):
    sharded(loaded.params, images[:4])
