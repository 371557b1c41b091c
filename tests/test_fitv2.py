"""FiTv2 imported through convert (rpe2d.importing, --family=fitv2) against FiT's own code.

The fixtures (tests/fixtures/fitv2_tiny/, written by tests/fixtures/make_fitv2_fixtures.py with
whlzy/FiT at b22b7b0) are a FiTv2 with XL/2's structure at width 80 (2 heads, depth 2, LoRA rank
16, 10 classes), every weight drawn at random and saved as safetensors (and by torch.save), with
FiT.forward at 16x16, 20x20, 24x24 and 14x28 tokens under each of its sampler's interpolation
options, decoupled and not, and two 8-step Euler trajectories of its transport sampler with cfg 1.5
on the first 3 latent channels. Everything here reads the files through convert and the run
directory it writes, as a user would.
"""

import dataclasses
import functools
import pathlib
import pickle
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO, host
from rpe2d import importing, inference, positions, rope, sampler
from rpe2d.evaluation import sweep
from rpe2d.families import fitv2
from test_tensor_files import _call_pickle, write_torch_zip

FIXTURES = REPO / 'tests' / 'fixtures' / 'fitv2_tiny'
VAE_DIR = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
SIT_FILE = REPO / 'tests' / 'fixtures' / 'dit_sit' / 'sit_tiny.pt'
GRIDS = ((16, 16), (20, 20), (24, 24), (14, 28))
# FiTv2-XL/2 (configs/fitv2/config_fitv2_xl.yaml) as the family reads it from its file's shapes.
XL = fitv2.FiTArchitecture(width=1152, depth=36, patch=2, num_classes=1000, mlp_hidden=3072,
                           adaln_rank=288)

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """convert's run of the safetensors file, and of the torch.save copy named .safetensors."""
  root = tmp_path_factory.mktemp('fitv2')
  shutil.copy(FIXTURES / 'model_ema_torch.pt', root / 'model_ema.safetensors')
  lines = []
  made = {name: importing.convert('fitv2', file, vae=VAE_DIR, workdir=root / name,
                                  log=lines.append)
          for name, file in (('safetensors', FIXTURES / 'model_ema.safetensors'),
                             ('torch', root / 'model_ema.safetensors'))}
  return made, lines


@pytest.fixture(scope='module')
def run(imported):
  return inference.load_run(imported[0]['safetensors'].workdir)


@functools.cache
def _apply(model, encoding):
  return jax.jit(functools.partial(model.apply, encoding=encoding))


def encoding_of(key: str) -> rope.Encoding:
  """The rpe2d encoding of a fixture's out_<interpolation>[_decouple]."""
  name = key.removeprefix('out_')
  interpolation, decouple = name.removesuffix('_decouple'), name.endswith('_decouple')
  return rope.Encoding(**({} if interpolation == 'no' else
                          rope.fit_interpolation(interpolation, decouple)))


def fit_forwards(run, saved, keys, height, width) -> dict:
  """FiT.forward's output for each key, in its token layout, computed by rpe2d with the matching
  encoding: rpe2d's t is 1 - FiT's and its velocity the negative (both folded into the weights).
  One compiled program for all the keys: each encoding is a static argument, and one compile per
  encoding would cost more than the whole forward passes."""
  encodings = [encoding_of(key) for key in keys]
  forwards = jax.jit(lambda *args: [run.model.apply(*args, encoding=e) for e in encodings])
  x = fitv2.latents_from_tokens(saved['x'], 2 * height, 2 * width)
  outputs = forwards(run.params, jnp.asarray(x), 1.0 - jnp.asarray(saved['t']),
                     jnp.asarray(saved['y']), positions.grid(height, width, 2))
  return {key: -fitv2.tokens_from_latents(np.asarray(v)) for key, v in zip(keys, outputs)}


def test_the_import_is_fitv2_with_its_blocks_and_conventions(imported, run):
  made, lines = imported
  i = made['safetensors']
  assert (i.family, i.weights.format, len(i.weights.tensors)) == ('fitv2', 'safetensors', 41)
  m, s, e = i.config.model, i.config.sampling, i.config.encoding
  assert (m.variant, m.mlp, m.adaln, m.adaln_rank, m.qk_norm, m.norm) == (
      'mini/2', 'swiglu', 'lora', 16, 'layernorm', 'layernorm')
  assert (m.position_embedding, m.time_scale, m.prediction) == ('rope', 1.0, 'velocity')
  assert run.model.position_range == run.model.train_grid == (16, 16)  # FiT's ori_max_pe_len
  assert (s.cfg_scale, s.cfg_channels) == (1.5, 3)
  assert (e.yarn_form, e.temperature) == ('index', 'rope_max')  # FiT's YaRN for 'yarn', 'dy-yarn'
  assert 'fitv2: safetensors, 41 tensors' in lines[0] and '2D RoPE on its 16x16 token grid' in \
      '\n'.join(lines)
  # The published XL/2: 517 tensors, 671 M parameters (FiTv2 paper, Table I).
  shapes = fitv2.expected_shapes(XL)
  assert len(shapes) == 517 and XL.variant == 'FiTv2-XL/2' and XL.heads == 16
  assert round(sum(np.prod(s) for s in shapes.values()) / 1e6) == 671
  assert fitv2.architecture(shapes) == XL


@pytest.mark.parametrize('height,width', GRIDS, ids=lambda v: str(v))
def test_forward_matches_fit_under_each_of_its_options(run, height, width):
  saved = np.load(FIXTURES / f'forward_{height}x{width}.npz')
  keys = [k for k in saved.files if k.startswith('out_')]
  if height == width:
    # One scale for both axes or one per axis is the same thing on a square grid, in FiT's code
    # as in ours (rope.axis_scales): compare each option once.
    for key in keys:
      if key.endswith('_decouple'):
        np.testing.assert_array_equal(saved[key], saved[key.removesuffix('_decouple')])
    keys = [k for k in keys if not k.endswith('_decouple')]
  if (height, width) == (16, 16):
    # At the native grid only FiT's attention scales change anything.
    for key in keys:
      if 'ntkpro' not in key:
        np.testing.assert_array_equal(saved[key], saved['out_no'])
    keys = ['out_no', 'out_ntkpro1', 'out_ntkpro2']
  for key, out in fit_forwards(run, saved, keys, height, width).items():
    error = float(np.abs(out - saved[key]).max())
    assert error <= 1e-4, (key, error)
    if key != 'out_no':
      assert np.abs(saved[key] - saved['out_no']).max() > 1e-2, key  # the option matters here


def test_the_rope_layout_and_fits_yarn_temperature_are_what_reproduce_it(run):
  saved = np.load(FIXTURES / 'forward_14x28.npz')
  # FiT's VisionYaRN puts tau of the longer side on both axes ('rope_max'): the per-axis tau
  # (rpe2d's default 'rope') is another model on a non-square grid.
  per_axis_tau = rope.Encoding(**dict(rope.fit_interpolation('yarn', True), temperature='rope'))
  x = fitv2.latents_from_tokens(saved['x'], 28, 56)
  args = (jnp.asarray(x), 1.0 - jnp.asarray(saved['t']), jnp.asarray(saved['y']),
          positions.grid(14, 28, 2))
  v = _apply(run.model, per_axis_tau)(run.params, *args)
  assert np.abs(-fitv2.tokens_from_latents(np.asarray(v)) - saved['out_yarn_decouple']).max() > 1e-3
  # Without the permutation of q and k (FiT's interleaved pairs) RoPE rotates other channels.
  assert fitv2.rope_permutation(8).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
  params = jax.tree.map(np.array, host(run.params))
  rows = fitv2.qkv_rows(80, 2)
  inverse = np.argsort(rows)
  for i in (0, 1):
    qkv = params['params'][f'block_{i}']['Attention_0']['qkv']
    qkv['kernel'], qkv['bias'] = qkv['kernel'][:, inverse], qkv['bias'][inverse]
  v = _apply(run.model, rope.Encoding())(params, *args)
  assert np.abs(-fitv2.tokens_from_latents(np.asarray(v)) - saved['out_no']).max() > 1e-2


@pytest.mark.parametrize('name,method', [('euler_16x16_no', 'none'),
                                         ('euler_20x20_ntkpro2_decouple', 'fit-ntkpro2-decouple')])
def test_euler_with_guidance_on_three_channels_matches_fits_sampler(run, name, method):
  saved = np.load(FIXTURES / f'{name}.npz')
  height, width = (int(v) for v in name.split('_')[1].split('x'))
  encoding = rope.Encoding(**sweep.EXTRAPOLATIONS[method])  # evaluate.py's --methods names
  plan = sampler.SamplingPlan(sampler='euler', steps=8, cfg_scale=float(saved['cfg_scale']),
                              cfg_channels=3, encoding=encoding)
  noise = jnp.asarray(fitv2.latents_from_tokens(saved['noise'], 2 * height, 2 * width))
  images = sampler.sample_jit(run.model, run.params, jax.random.key(0), jnp.asarray(saved['y']),
                              height=2 * height, width=2 * width, plan=plan, noise=noise)
  expected = saved['trajectory'][-1]
  error = float(np.abs(fitv2.tokens_from_latents(np.asarray(images)) - expected).max())
  assert error <= 1e-3, error
  if method == 'none':  # guiding all 4 channels is another trajectory
    all_channels = sampler.sample_jit(
        run.model, run.params, jax.random.key(0), jnp.asarray(saved['y']), height=2 * height,
        width=2 * width, plan=dataclasses.replace(plan, cfg_channels=0), noise=noise)
    assert np.abs(fitv2.tokens_from_latents(np.asarray(all_channels)) - expected).max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Files that are not what they say.


def test_a_torch_archive_named_safetensors_is_read_through_the_allow_list(imported, tmp_path):
  made, _ = imported
  assert made['torch'].weights.format == 'torch_zip'
  chex.assert_trees_all_equal(host(inference.load_run(made['torch'].workdir).params),
                              host(inference.load_run(made['safetensors'].workdir).params))
  # One that pickles anything else is refused by name before anything is written.
  marker = tmp_path / 'executed'
  evil = write_torch_zip(tmp_path / 'model_ema.safetensors',
                         pickled=_call_pickle('os', 'system', (f'touch {marker}',)))
  with pytest.raises(pickle.UnpicklingError, match=r'global os\.system is not allowed: it was not '
                                                   'imported or called'):
    importing.convert('fitv2', evil, vae=VAE_DIR, workdir=tmp_path / 'run')
  assert not marker.exists() and not (tmp_path / 'run').exists()


def _state_dict():
  from rpe2d import tensor_files  # pylint: disable=g-import-not-at-top
  return {k: np.array(v) for k, v in
          tensor_files.read_tensors(FIXTURES / 'model_ema.safetensors').tensors.items()}


def test_files_of_another_family_or_with_wrong_keys_are_refused_naming_all(tmp_path):
  convert = lambda family, file: importing.convert(family, file, vae=VAE_DIR,
                                                   workdir=tmp_path / 'run')
  with pytest.raises(ValueError, match=r"sit_tiny.pt is not a fitv2 checkpoint .*it lacks the "
                                       r"keys the FiTv2 layout is read from .*those of a sit or "
                                       r"dit checkpoint: --family=sit"):
    convert('fitv2', SIT_FILE)
  with pytest.raises(ValueError, match=r'is not a sit checkpoint .*those of a fitv2 checkpoint: '
                                       r'--family=fitv2'):
    convert('sit', FIXTURES / 'model_ema.safetensors')
  state = _state_dict()
  del state['blocks.1.mlp.fc2.bias'], state['t_embedder.mlp.2.weight']
  state['blocks.0.attn.proj.weight'] = state['blocks.0.attn.proj.weight'][:, :40].copy()
  state['blocks.0.extra'] = np.zeros(3, np.float32)
  save_file(state, tmp_path / 'broken.safetensors')
  with pytest.raises(ValueError) as info:
    convert('fitv2', tmp_path / 'broken.safetensors')
  message = str(info.value)
  assert '\n' not in message
  for part in ('2 missing: blocks.1.mlp.fc2.bias, t_embedder.mlp.2.weight',
               '1 unexpected: blocks.0.extra',
               '1 misshapen: blocks.0.attn.proj.weight (80, 40) (expected (80, 80))'):
    assert part in message, message
  state = _state_dict()
  for i in (0, 1):
    for name in ('fc1_g', 'fc1_x'):
      state[f'blocks.{i}.mlp.{name}.weight'] = np.zeros((320, 80), np.float32)
      state[f'blocks.{i}.mlp.{name}.bias'] = np.zeros(320, np.float32)
    state[f'blocks.{i}.mlp.fc2.weight'] = np.zeros((80, 320), np.float32)
  save_file(state, tmp_path / 'large.safetensors')
  with pytest.raises(ValueError, match=r"fc1_g.weight has 320 rows; FiTv2's SwiGLU at width 80 "
                                       r'has 213'):
    convert('fitv2', tmp_path / 'large.safetensors')
  assert not (tmp_path / 'run').exists()
