"""LightningDiT imported through convert (rpe2d.importing, --family=lightningdit) on its VA-VAE,
against LightningDiT's own code.

The fixtures (tests/fixtures/lightningdit_tiny/ and vavae_tiny/, written by
tests/fixtures/make_lightningdit_fixtures.py with hustvl/LightningDiT at 2725fed) are a
LightningDiT with XL/1's options (RMSNorm with weights, fused-w12 SwiGLU, RoPE and the sin-cos
table, patch 1 on 32 channels) at width 80, 2 heads, depth 2, 10 classes, trained grid 16 x 16,
with random weights; its forward at 16 x 16 and at 24 x 24 (the tables rebuilt by the reference's
own functions: plain, PI, and the table resized bilinearly), and an 8-step Euler trajectory of the
reference's sampler with the published shift, guidance interval and 3-channel guidance. Everything
here reads the files through convert and the run directory it writes, as a user would.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from rpe2d import config as config_lib, importing, inference, positions, rope, sampler
from rpe2d import tensor_files
from rpe2d.families import lightningdit
from test_tensor_files import tensor, write_torch_zip

FIXTURES = REPO / 'tests' / 'fixtures' / 'lightningdit_tiny'
VAE = REPO / 'tests' / 'fixtures' / 'vavae_tiny'
SD_VAE = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
WEIGHTS = FIXTURES / 'model.pt'
FORWARD_TOLERANCE, EULER_TOLERANCE = 1e-4, 1e-3

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')


@pytest.fixture
def optimised_xla():
  """conftest turns most XLA optimisations off; the sampler's 8 guided steps run ~15x faster on,
  which outweighs its longer compile (not so for the forward passes)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  lines = []
  made = importing.convert('lightningdit', WEIGHTS, vae=VAE / 'vavae.pt',
                           vae_statistics=VAE / 'latents_stats.pt',
                           workdir=tmp_path_factory.mktemp('ldit') / 'run', log=lines.append)
  return made, lines


@pytest.fixture(scope='module')
def run(imported):
  return inference.load_run(imported[0].workdir)


def _convert(tmp_path, weights=WEIGHTS, vae=VAE / 'vavae.pt',
             statistics=VAE / 'latents_stats.pt', family='lightningdit'):
  return importing.convert(family, weights, vae=vae, vae_statistics=statistics,
                           workdir=tmp_path / 'run', log=lambda line: None)


def test_the_import_is_lightningdit_with_its_blocks_and_sampler(imported, run):
  made, lines = imported
  c = made.config
  m, s, d = c.model, c.sampling, c.data
  assert (made.family, made.weights.format, made.tensors) == ('lightningdit', 'torch_zip', 39)
  assert (m.variant, m.mlp, m.norm, m.adaln, m.qk_norm) == (
      'mini/1', 'swiglu', 'rmsnorm', 'full', 'none')
  assert (m.position_embedding, m.sincos_order, m.time_scale, m.prediction) == (
      'rope+sincos', 'xy', 1.0, 'velocity')
  assert run.model.position_range == run.model.train_grid == (16, 16)
  assert (d.image_size, d.channels, d.source_image_size) == (16, 32, 256)
  # The published sampler in rpe2d's time: Euler on 250 points, shift 1/0.3, guidance for
  # t <= 1 - 0.125 on 3 of 32 channels at 6.7.
  assert (s.sampler, s.steps, s.cfg_scale, s.cfg_channels) == ('euler', 249, 6.7, 3)
  assert s.time_shift == pytest.approx(1 / 0.3) and tuple(s.cfg_interval) == (0.0, 0.875)
  # The VA-VAE and its statistics are recorded; the model sees (z - mean) / std.
  stats = tensor_files.read_tensors(VAE / 'latents_stats.pt').tensors
  assert d.vae_statistics_sha256 == tensor_files.sha256_file(VAE / 'latents_stats.pt')
  np.testing.assert_allclose(d.latent_mean, stats['mean'].reshape(-1), rtol=1e-6)
  np.testing.assert_allclose(d.latent_std, stats['std'].reshape(-1), rtol=1e-6)
  text = '\n'.join(lines)
  assert 'as lightningdit: torch_zip, 39 tensors' in text
  assert '2D RoPE and a sin-cos table on its 16x16 token grid' in text
  assert 'normalised by' in text and 'for t in [0, 0.875], time shift 3.333' in text


def test_the_published_xl1_is_read_from_its_shapes():
  shapes = {k: tuple(v) for k, v in json.loads(
      (FIXTURES / 'lightningdit_xl1_shapes.json').read_text()).items()}
  arch = lightningdit.architecture(shapes)
  assert (arch.variant, arch.heads, arch.head_dim, arch.channels, arch.mlp_hidden) == (
      'XL/1', 16, 72, 32, 3072)
  assert lightningdit.expected_shapes(arch) == shapes  # every key of the reference's state dict
  stored = sum(np.prod(s) for s in shapes.values())
  tables = np.prod(shapes['pos_embed']) + 2 * np.prod(shapes['feat_rope.freqs_cos'])
  assert round(stored / 1e6, 2) == 675.29 and round((stored - tables) / 1e6, 2) == 674.96


# The 24 x 24 forwards: the fixture's, and PI on RoPE alone (the table at the native positions).
ENCODINGS_24 = {'out24_none': rope.Encoding(), 'out24_pi': rope.Encoding(extrapolation='pi'),
                'out24_ei': rope.Encoding(sincos='interpolate'),
                'pi_native_table': rope.Encoding(extrapolation='pi', sincos='native')}


@pytest.fixture(scope='module')
def forwards(run):
  """LightningDiT's forward of the fixture's inputs, computed by rpe2d (its t is 1 - LightningDiT's
  and its velocity the negative: both folded into the weights): out16 at the native grid and each
  of ENCODINGS_24 at 24 x 24, in one compiled program (a compile per encoding would cost more
  than the passes)."""
  saved = dict(np.load(FIXTURES / 'forward.npz'))
  t, y = 1.0 - jnp.asarray(saved['t']), jnp.asarray(saved['y'])

  def all_forwards(params, x16, x24):
    outputs = {'out16': run.model.apply(params, x16, t, y, positions.grid(16, 16, 2))}
    for key, encoding in ENCODINGS_24.items():
      outputs[key] = run.model.apply(params, x24, t, y, positions.grid(24, 24, 2),
                                     encoding=encoding)
    return outputs

  outputs = jax.jit(all_forwards)(run.params, jnp.asarray(saved['x16']), jnp.asarray(saved['x24']))
  return saved, {key: -np.asarray(v) for key, v in outputs.items()}


def test_forward_matches_lightningdit_at_its_grid_and_beyond(forwards):
  saved, ours = forwards
  # 24 x 24: both tables rebuilt by LightningDiT's functions for integer positions (rpe2d's
  # 'none'), for PI's positions (both parts follow the method), and with the native sin-cos table
  # resized bilinearly while RoPE extrapolates (encoding.sincos='interpolate', "EI").
  for key in ('out16', 'out24_none', 'out24_pi', 'out24_ei'):
    error = float(np.abs(ours[key] - saved[key]).max())
    assert error <= FORWARD_TOLERANCE, (key, error)
  assert np.abs(saved['out24_pi'] - saved['out24_ei']).max() > 1e-2  # the rules differ
  assert np.std(saved['out16']) > 0.1


def test_the_sin_cos_rules_and_the_rope_layout_matter(run, forwards):
  saved, ours = forwards
  # PI with the table kept at the native positions (only RoPE interpolates) is another model
  # than PI on both and than no method (differences 10x the parity tolerance and more: in this
  # random model the table weighs far more than RoPE's positions).
  assert np.abs(ours['pi_native_table'] - saved['out24_pi']).max() > 1e-1
  assert np.abs(ours['pi_native_table'] - saved['out24_none']).max() > 1e-3
  def tables(grid_size, t, encodings):
    grid, geometry = positions.grid(grid_size, grid_size, 2), run.model.geometry(
        grid_size, grid_size)
    return [rope.sincos_embedding(grid, t, width=80, geometry=geometry, encoding=e, order='xy')
            for e in encodings]

  @jax.jit
  def all_tables():
    native = tables(16, jnp.zeros(2), [rope.Encoding(extrapolation='pi', sincos=rule)
                                       for rule in rope.SINCOS_RULES])
    dype = rope.Encoding(extrapolation='yarn', dype=True)
    timed = [tables(24, jnp.full((2,), t), [dype, rope.Encoding(extrapolation='yarn'),
                                            rope.Encoding()]) for t in (0.0, 1.0)]
    return native, timed

  native, ((dype_0, _, none_0), (dype_1, yarn_1, none_1)) = all_tables()
  # At the native grid every rule gives the native table.
  for table in native[1:]:
    np.testing.assert_allclose(table, native[0], atol=1e-6)
  # With DyPE the table follows the method's time dependence, as RoPE does: native positions and
  # frequencies at t = 0 (data), static YaRN's at t = 1 (noise).
  np.testing.assert_allclose(dype_0, none_0, atol=1e-6)
  np.testing.assert_allclose(dype_1, yarn_1, atol=1e-6)
  assert np.abs(dype_1 - none_1).max() > 1e-2


@pytest.mark.usefixtures('optimised_xla')
def test_euler_with_the_published_settings_matches_lightningdits_sampler(run):
  saved = np.load(FIXTURES / 'euler.npz')
  plan = config_lib.sampling_plan(run.config, steps=8)
  # The shifted grid: rpe2d's t = 1 - LightningDiT's at every point.
  times = np.asarray(sampler.time_grid(plan.steps, plan.time_shift))
  np.testing.assert_allclose(times, 1.0 - saved['grid'], atol=1e-6)
  assert plan.cfg_scale == pytest.approx(float(saved['cfg_scale']))  # 6.7
  assert (plan.cfg_channels, plan.cfg_interval) == (3, (0.0, 0.875))
  draw = functools.partial(sampler.sample_jit, run.model, run.params, jax.random.key(0),
                           jnp.asarray(saved['y']), height=16, width=16,
                           noise=jnp.asarray(saved['noise']))
  end = np.asarray(draw(plan=plan))
  error = float(np.abs(end - saved['trajectory'][-1]).max())
  assert error <= EULER_TOLERANCE, error
  # Each setting matters in the reference's trajectory (more than 10x the tolerance).
  for name in ('end_no_interval', 'end_no_shift'):
    assert np.abs(saved[name] - saved['trajectory'][-1]).max() > 1e-2, name


def test_the_guidance_interval_and_channels_are_lightningdits():
  # LightningDiT guides while its t >= 0.125 (t is 1 at data), rpe2d while t <= 0.875, on the
  # first 3 channels; the others, and every channel outside the interval, are conditional.
  def apply_fn(params, x, t, labels, positions, crop):
    del params, t, positions, crop
    return jnp.where(labels[:, None, None, None] == 9, 0.0, 1.0) * x  # null class 9: 0
  x = jnp.ones((2, 1, 1, 32))
  velocity = functools.partial(sampler.guided_velocity, apply_fn, None, labels=jnp.array([1, 2]),
                               positions=jnp.zeros((2, 1, 2)), crop=None, null_class=9,
                               cfg_scale=6.7,
                               cfg_interval=(0.0, 0.875), cfg_channels=3)
  velocity = jax.jit(velocity)
  inside = np.asarray(velocity(x, jnp.array([0.875, 0.1])))   # LightningDiT's t 0.125 and 0.9
  outside = np.asarray(velocity(x, jnp.array([0.876, 1.0])))
  np.testing.assert_allclose(inside[..., :3], 6.7, rtol=1e-6)
  np.testing.assert_allclose(inside[..., 3:], 1.0)
  np.testing.assert_allclose(outside, 1.0)


def test_samples_decode_through_the_va_vae_and_its_statistics(run):
  # LightningDiT's decoding: z = sample * std / multiplier + mean, then the VA-VAE's decode. The
  # VA-VAE fixture's latents in the model's space decode to the reference's images.
  assert run.vae.config.attention_levels == (4,) and run.vae.layout == 'ldm'
  with np.load(VAE / 'inputs_outputs.npz') as saved:
    latents, decoded = saved['latents'], saved['decoded']
  d = run.config.data
  x = (latents - np.asarray(d.latent_mean, np.float32)) / np.asarray(d.latent_std, np.float32)
  images = inference.decode(run, np.concatenate([x] * 4))  # a batch over the 8 devices
  assert float(np.abs(images - np.concatenate([decoded] * 4)).max()) <= FORWARD_TOLERANCE


# ------------------------------------------------------------------------------------------------
# Bad input: one line each, before anything is written.


def test_a_lightningdit_import_on_the_sd_vae_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r'--vae=.*sd_vae_tiny makes 4-channel latents; this '
                                       r'lightningdit model takes 32 \(its VAE: the VA-VAE '
                                       r'f16d32, vavae-imagenet256-f16d32-dinov2.pt, with its '
                                       r'latents_stats.pt\)'):
    _convert(tmp_path, vae=SD_VAE, statistics=None)
  with pytest.raises(ValueError, match='lightningdit was trained on latents normalised per '
                                       'channel .*: pass --vae_statistics'):
    _convert(tmp_path, statistics=None)
  with pytest.raises(ValueError, match=r'--vae_statistics given, but sit was trained on latents '
                                       r'scaled by 0.18215, not normalised per channel'):
    _convert(tmp_path, weights=REPO / 'tests' / 'fixtures' / 'dit_sit' / 'sit_tiny.pt',
             vae=SD_VAE, family='sit', statistics=_write(tmp_path / 'stats.pt', {
                 'mean': np.zeros((1, 4, 1, 1), np.float32),
                 'std': np.ones((1, 4, 1, 1), np.float32)}))
  assert not (tmp_path / 'run').exists()


def _state_dict():
  return {k: np.array(v) for k, v in tensor_files.read_tensors(WEIGHTS).tensors.items()}


def _write(path, state):
  return write_torch_zip(path, {k: tensor(str(i), np.ascontiguousarray(v))
                                for i, (k, v) in enumerate(state.items())})


def test_files_not_of_this_layout_are_refused_naming_every_key(tmp_path):
  state = _state_dict()
  del state['blocks.1.mlp.w3.bias'], state['feat_rope.freqs_sin']
  state['blocks.0.attn.q_norm.weight'] = np.ones(40, np.float32)
  state['blocks.0.norm2.weight'] = np.ones(40, np.float32)
  with pytest.raises(ValueError) as info:
    _convert(tmp_path, weights=_write(tmp_path / 'broken.pt', state))
  message = str(info.value)
  assert '\n' not in message
  for part in ('is not a lightningdit checkpoint', '2 missing: blocks.1.mlp.w3.bias, '
               'feat_rope.freqs_sin', '1 unexpected: blocks.0.attn.q_norm.weight',
               '1 misshapen: blocks.0.norm2.weight (40,) (expected (80,))'):
    assert part in message, message
  with pytest.raises(ValueError, match=r'is not a lightningdit checkpoint .*it lacks the keys the '
                                       r'LightningDiT layout is read from'):
    _convert(tmp_path, weights=REPO / 'tests' / 'fixtures' / 'dit_sit' / 'sit_tiny.pt')
  # Tables that are not the ones rpe2d recomputes: the model would not be the file's.
  state = _state_dict()
  state['feat_rope.freqs_cos'] = state['feat_rope.freqs_cos'][::-1].copy()
  with pytest.raises(ValueError, match=r'feat_rope.freqs_cos differs from the 2D RoPE table'):
    _convert(tmp_path, weights=_write(tmp_path / 'tables.pt', state))
  assert not (tmp_path / 'run').exists()
