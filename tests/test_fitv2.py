"""FiTv2 imported through convert (rpe2d.importing, --family=fitv2) against FiT's own code.

The fixtures (tests/fixtures/fitv2_tiny/, written by tests/fixtures/make_fitv2_fixtures.py with
whlzy/FiT at b22b7b0) are a FiTv2 with XL/2's structure at width 80 (2 heads, depth 2, LoRA rank
16, 10 classes), every weight drawn at random and saved as safetensors (and by torch.save), with
FiT.forward at 16x16, 20x20, 24x24 and 14x28 tokens under each of its sampler's interpolation
options, decoupled and not, and an 8-step Euler trajectory of its transport sampler with cfg 1.5
on the first 3 latent channels at 20x20 under its attention-scaled NTK. Everything here reads
the files through convert and the run directory it writes, as a user would.
"""

import functools
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


def grid_encodings(height: int, width: int) -> dict[str, rope.Encoding]:
  """The rpe2d encoding of each FiT output compared at a grid (out_<interpolation>[_decouple]).

  On a square grid one scale for both axes and one per axis are the same thing, in FiT's code as
  in ours (rope.axis_scales), so each option is compared once; at the native grid only FiT's
  attention scales change anything. At 14x28 one more: VisionYaRN with rpe2d's default per-axis
  tau, which is not what FiT computes."""
  options = ['no'] + [o for o in rope.FIT_INTERPOLATIONS
                      if (height, width) != (16, 16) or o.startswith('ntkpro')]
  names = [o + suffix for o in options for suffix in ('', '_decouple')
           if not (suffix and (o == 'no' or height == width))]
  encodings = {f'out_{name}': rope.Encoding(**({} if name == 'no' else rope.fit_interpolation(
      name.removesuffix('_decouple'), name.endswith('_decouple')))) for name in names}
  if (height, width) == (14, 28):
    encodings['yarn_decouple_per_axis_tau'] = rope.Encoding(**dict(
        rope.fit_interpolation('yarn', True), temperature='rope'))
  return encodings


@functools.cache
def _forwards(model, encodings: tuple):
  """One compiled program for every encoding: each is a static argument, and one compile per
  encoding would cost more than all the forward passes."""
  return jax.jit(lambda *args: [model.apply(*args, encoding=e) for e in encodings])


def fit_forwards(run, params, height: int, width: int) -> dict:
  """grid_encodings' outputs in FiT's token layout, on the fixture's inputs at that grid: rpe2d's
  t is 1 - FiT's and its velocity the negative (both folded into the weights)."""
  saved = np.load(FIXTURES / f'forward_{height}x{width}.npz')
  encodings = grid_encodings(height, width)
  x = fitv2.latents_from_tokens(saved['x'], 2 * height, 2 * width)
  outputs = _forwards(run.model, tuple(encodings.values()))(
      params, jnp.asarray(x), 1.0 - jnp.asarray(saved['t']), jnp.asarray(saved['y']),
      positions.grid(height, width, 2))
  return {key: -fitv2.tokens_from_latents(np.asarray(v)) for key, v in zip(encodings, outputs)}


def test_the_import_is_fitv2_with_its_blocks_and_conventions(imported, run):
  made, lines = imported
  i = made['safetensors']
  assert (i.family, i.weights.format) == ('fitv2', 'safetensors')
  m, s, e = i.config.model, i.config.sampling, i.config.encoding
  assert (m.variant, m.mlp, m.adaln, m.adaln_rank, m.qk_norm, m.norm) == (
      'mini/2', 'swiglu', 'lora', 16, 'layernorm', 'layernorm')
  assert (m.position_embedding, m.time_scale, m.prediction) == ('rope', 1.0, 'velocity')
  assert run.model.position_range == run.model.train_grid == (16, 16)  # FiT's ori_max_pe_len
  assert (s.sampler, s.atol, s.rtol, s.cfg_scale, s.cfg_channels) == ('dopri5', 1e-6, 1e-3, 1.5, 3)
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
  for key in saved.files:  # what grid_encodings leaves out is FiT's own no-op
    if key.endswith('_decouple') and height == width:
      np.testing.assert_array_equal(saved[key], saved[key.removesuffix('_decouple')])
    if key.startswith('out_') and (height, width) == (16, 16) and 'ntkpro' not in key:
      np.testing.assert_array_equal(saved[key], saved['out_no'])
  outputs = fit_forwards(run, run.params, height, width)
  compared = [key for key in outputs if key in saved.files]
  assert len(compared) == {16: 3, 20: 7, 24: 7, 14: 13}[height]
  for key in compared:
    error = float(np.abs(outputs[key] - saved[key]).max())
    assert error <= 1e-4, (key, error)
    if key != 'out_no':
      assert np.abs(saved[key] - saved['out_no']).max() > 1e-2, key  # the option matters here
  if (height, width) == (14, 28):
    # FiT's VisionYaRN puts tau of the longer side on both axes ('rope_max'): the per-axis tau
    # (rpe2d's default 'rope') is another model on a non-square grid.
    wrong = outputs['yarn_decouple_per_axis_tau'] - saved['out_yarn_decouple']
    assert np.abs(wrong).max() > 1e-3


def test_without_the_rope_permutation_the_forward_is_another(run):
  """FiT rotates interleaved pairs; the import permutes q and k to rpe2d's pairs. Undone, RoPE
  rotates other channels together."""
  assert fitv2.rope_permutation(8).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
  params = jax.tree.map(np.array, host(run.params))
  inverse = np.argsort(fitv2.qkv_rows(80, 2))
  for i in (0, 1):
    qkv = params['params'][f'block_{i}']['Attention_0']['qkv']
    qkv['kernel'], qkv['bias'] = qkv['kernel'][:, inverse], qkv['bias'][inverse]
  # Placed as the run's parameters are, so the compiled forward passes serve them.
  params = jax.tree.map(lambda a, ref: jax.device_put(a, ref.sharding), params, run.params)
  saved = np.load(FIXTURES / 'forward_16x16.npz')
  assert np.abs(fit_forwards(run, params, 16, 16)['out_no'] - saved['out_no']).max() > 1e-2


def test_euler_with_guidance_on_three_channels_matches_fits_sampler(run):
  """FiT's 8 Euler steps at 320^2 with --interpolation ntkpro2 --decouple and cfg 1.5 on 3
  latent channels, through rpe2d's sampler with evaluate.py's method of that name."""
  saved = np.load(FIXTURES / 'euler_20x20_ntkpro2_decouple.npz')
  plan = sampler.SamplingPlan(
      sampler='euler', steps=8, cfg_scale=float(saved['cfg_scale']), cfg_channels=3,
      encoding=rope.Encoding(**sweep.EXTRAPOLATIONS['fit-ntkpro2-decouple']))
  noise = jnp.asarray(fitv2.latents_from_tokens(saved['noise'], 40, 40))
  images = sampler.sample_jit(run.model, run.params, jax.random.key(0), jnp.asarray(saved['y']),
                              height=40, width=40, plan=plan, noise=noise)
  error = float(np.abs(fitv2.tokens_from_latents(np.asarray(images))
                       - saved['trajectory'][-1]).max())
  assert error <= 1e-3, error


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
