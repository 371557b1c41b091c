"""Imported DiT and SiT checkpoints against their own code, and convert.py's run directory through
every command.

The fixtures (tests/fixtures/dit_sit/, written by tests/fixtures/make_dit_sit_fixtures.py with the
reference repositories) are reduced-width SiT and DiT models (width 32, depth 2, 2 heads, patch 2,
8x8x4 latents, 4 classes) built and saved by the reference code with torch.save, every weight
drawn at random, and the reference outputs: forwards at the native grid and at twice it, SiT's
ODE through its transport code, DiT's DDIM and ancestral DDPM through its diffusion code, SiT's
training loss. Everything here reads the .pt files through convert (rpe2d.importing) and the run
directory it writes, as a user would.
"""

import dataclasses
import functools
import json
import pathlib
import pickle
import shutil
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, host, random_image_folder, read_jsonl, step_dirs
from rpe2d import checkpoints, config as config_lib, ddpm, families, flow, importing, inference
from rpe2d import latents, model as model_lib, positions, rundir, sampler, train_loop, training
from rpe2d.evaluation import sweep

FIXTURES = REPO / 'tests' / 'fixtures' / 'dit_sit'
VAE_DIR = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
FINETUNE = REPO / 'configs' / 'finetune.py'
NULL = 4  # the fixtures' 4 classes: the null class is 4

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')


@pytest.fixture(scope='module')
def reference():
  return {name: dict(np.load(FIXTURES / f'{name}_tiny.npz')) for name in ('sit', 'dit')}


@pytest.fixture(scope='module')
def imports(tmp_path_factory):
  """convert's run directories: 'sit' and 'dit' from their state dicts, 'sit_train' from the
  checkpoint SiT's train.py writes ({'model', 'ema', 'opt', 'args'}) unwrapped at 'ema'."""
  root = tmp_path_factory.mktemp('imports')
  lines = []
  made = {}
  for name, family, file, unwrap in (('sit', 'sit', 'sit_tiny.pt', None),
                                     ('dit', 'dit', 'dit_tiny.pt', None),
                                     ('sit_train', 'sit', 'sit_tiny_train.pt', 'ema')):
    made[name] = importing.convert(family, FIXTURES / file, vae=VAE_DIR, workdir=root / name,
                                   unwrap=unwrap, log=lines.append)
  return made, lines


@pytest.fixture(scope='module')
def runs(imports):
  return {name: inference.load_run(i.workdir) for name, i in imports[0].items()}


def grid(size, batch=4):
  return positions.grid(size // 2, size // 2, batch)


# ------------------------------------------------------------------------------------------------
# The network against the reference forward.


def test_sit_forward_matches_the_reference_at_the_native_and_twice_the_grid(runs, reference):
  run, ref = runs['sit'], reference['sit']
  apply = jax.jit(run.model.apply)
  t = 1.0 - jnp.asarray(ref['t'])  # SiT's time runs the other way; folded into the weights
  for x, out in ((ref['x'], ref['out']), (ref['x2'], ref['out2'])):
    v = apply(run.params, jnp.asarray(x), t, jnp.asarray(ref['y']), grid(x.shape[1]))
    error = float(jnp.max(jnp.abs(v + out)))  # and its velocity sign
    assert error <= 1e-4, (x.shape, error)
  # The same weights from SiT's train.py checkpoint, unwrapped at its EMA entry.
  chex.assert_trees_all_equal(host(runs['sit_train'].params), host(run.params))


def test_dit_network_matches_the_reference_with_its_learned_variance(runs, reference):
  run, ref = runs['dit'], reference['dit']
  network = jax.jit(functools.partial(run.model.apply, method=model_lib.DiT.network))
  n = jnp.asarray(ref['n'], jnp.float32)
  t = jnp.asarray(ddpm.flow_times()[ref['n']], jnp.float32)  # for the encoding only
  for x, out in ((ref['x'], ref['out']), (ref['x2'], ref['out2'])):
    raw = network(run.params, jnp.asarray(x), n, t, jnp.asarray(ref['y']), grid(x.shape[1]))
    assert raw.shape[-1] == 8  # epsilon and the variance channels
    error = float(jnp.max(jnp.abs(raw - out)))
    assert error <= 1e-4, (x.shape, error)
  # Through the parameterisation: at the flow time of an index the network sees that index and
  # the VP state, and the velocity is (eps - z) / (1 - t).
  x_vp, z_scale = jnp.asarray(ref['x']), jnp.sqrt((1 - t) ** 2 + t ** 2)[:, None, None, None]
  v = jax.jit(run.model.apply)(run.params, x_vp * z_scale, t, jnp.asarray(ref['y']), grid(8))
  expected = (ref['out'][..., :4] - x_vp * z_scale) / (1 - t)[:, None, None, None]
  np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-4 / (1 - float(t.max())))


def test_the_ddpm_schedule_in_flow_time(reference):
  ref = reference['dit']
  assert ddpm.respaced_indices(8) == ref['ddim_indices'].tolist()
  assert ddpm.respaced_indices(250) == ref['indices_250'].tolist()
  t_min, t_max = ddpm.time_range()
  assert (round(t_min, 5), round(t_max, 5)) == (0.0099, 0.99369)
  times = np.asarray(ddpm.flow_times(), np.float32)
  mid = 0.5 * (times[500] + times[501])
  index = np.asarray(jax.jit(ddpm.fractional_index)(
      np.concatenate([times, [mid, 0.0, 1e-4, 0.9999, 1.0]]).astype(np.float32)))
  np.testing.assert_array_equal(index[:1000], np.arange(1000))  # exact at the nodes
  # Between nodes: linear in the log-SNR; outside the range: clamped, never NaN.
  assert 500 < index[1000] < 501
  np.testing.assert_array_equal(index[1001:], [0, 0, 999, 999])
  # The same SNR: z = x / (a + s) at t = s / (a + s).
  _, abar = ddpm._tables()  # pylint: disable=protected-access
  a, s = np.sqrt(abar[600]), np.sqrt(1 - abar[600])
  np.testing.assert_allclose(ddpm.network_input(jnp.ones((1, 1)) / (a + s),
                                                jnp.array([s / (a + s)])), [[1.0]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Samplers against the reference samplers.


def _guided(run, labels, cfg, cfg_channels):
  return functools.partial(sampler.guided_velocity, run.model.apply, run.params,
                           labels=jnp.asarray(labels), positions=grid(8), crop=None,
                           null_class=NULL, cfg_scale=cfg, cfg_channels=cfg_channels)


def test_sit_euler_matches_its_transport_ode_with_guidance_on_three_channels(runs, reference):
  run, ref = runs['sit'], reference['sit']
  plan = sampler.SamplingPlan(sampler='euler', steps=8, cfg_scale=float(ref['ode_cfg']),
                              cfg_channels=3)
  images = sampler.sample_jit(run.model, run.params, jax.random.key(0),
                              jnp.asarray(ref['ode_labels']), height=8, width=8, plan=plan,
                              noise=jnp.asarray(ref['ode_noise']))
  error = float(jnp.max(jnp.abs(images - ref['ode_states'][-1])))
  assert error <= 1e-3, error
  # Guiding every channel is another trajectory: the quirk is what reproduces SiT.
  all_channels = sampler.sample_jit(run.model, run.params, jax.random.key(0),
                                    jnp.asarray(ref['ode_labels']), height=8, width=8,
                                    plan=dataclasses.replace(plan, cfg_channels=0),
                                    noise=jnp.asarray(ref['ode_noise']))
  assert float(jnp.max(jnp.abs(all_channels - ref['ode_states'][-1]))) > 1e-2


def test_dit_euler_on_its_ddpm_indices_is_its_ddim(runs, reference):
  run, ref = runs['dit'], reference['dit']
  velocity = _guided(run, ref['ddim_labels'], float(ref['ddim_cfg']), 3)
  times = jnp.asarray(ddpm.flow_times()[ref['ddim_indices'][::-1]], jnp.float32)
  assert float(times[0]) == pytest.approx(run.model.time_range[1])
  assert float(times[-1]) == pytest.approx(run.model.time_range[0])
  # DiT's x_T as rpe2d's state at t_max, rpe2d's Euler down to t_min, its last step to 0.
  z = jnp.asarray(ref['ddim_noise']) * jnp.sqrt((1 - times[0]) ** 2 + times[0] ** 2)

  @jax.jit
  def euler(z):
    z, _ = sampler.fixed_grid(velocity, z, times, 'euler')
    return z - times[-1] * velocity(z, jnp.full((4,), times[-1]))

  out = euler(z)
  scale = float(np.abs(ref['ddim_states'][-1]).max())  # x0 of a random model: values ~ 900
  error = float(jnp.max(jnp.abs(out - ref['ddim_states'][-1])))
  assert error <= 1e-3 * max(1.0, scale) and error / scale < 1e-5, (error, scale)


def test_dit_ancestral_sampler_matches_its_p_sample_loop(runs, reference):
  run, ref = runs['dit'], reference['dit']

  def network(params, x, t, labels, positions_, crop):
    return run.model.apply(params, x, ddpm.fractional_index(t), t, labels, positions_, crop,
                           method=model_lib.DiT.network)

  guided = functools.partial(sampler.guided_velocity, network, run.params,
                             labels=jnp.asarray(ref['ddpm_labels']), positions=grid(8), crop=None,
                             null_class=NULL, cfg_scale=float(ref['ddpm_cfg']), cfg_channels=3)
  noise = jnp.asarray(ref['ddpm_step_noise'])  # in DiT's order: from the noisiest step down
  out = jax.jit(lambda x: sampler.ddpm_ancestral(guided, x, lambda k: noise[7 - k], 8))(
      jnp.asarray(ref['ddpm_noise']))
  scale = float(np.abs(ref['ddpm_states'][-1]).max())
  error = float(jnp.max(jnp.abs(out - ref['ddpm_states'][-1])))
  assert error <= 1e-3 * max(1.0, scale) and error / scale < 1e-5, (error, scale)
  # Through the plan, with its own noise: finite latents, and refused for a velocity model.
  plan = sampler.SamplingPlan(sampler='ddpm', steps=4, cfg_scale=1.5, cfg_channels=3)
  images = sampler.sample_jit(run.model, run.params, jax.random.key(0), jnp.arange(4) % 4,
                              height=8, width=8, plan=plan)
  assert images.shape == (4, 8, 8, 4) and bool(jnp.all(jnp.isfinite(images)))
  with pytest.raises(ValueError, match=r"sampler='ddpm' is DiT's ancestral sampler"):
    sampler.check_resolution(runs['sit'].model, plan, 8, 8)
  with pytest.raises(ValueError, match="walks DiT's respaced DDPM indices"):
    sampler.SamplingPlan(sampler='ddpm', time_shift=2.0)


def test_cfg_channels_guide_the_first_channels_and_keep_the_conditional_rest():
  def apply_fn(params, x, t, labels, positions_, crop):
    return x + (labels == NULL)[:, None] * 10.0  # the unconditional branch is 10 more
  x, where = jnp.ones((2, 3)), jnp.zeros((2, 1, 2))
  out = sampler.guided_velocity(apply_fn, None, x, jnp.zeros(2), jnp.array([0, 1]), where, None,
                                null_class=NULL, cfg_scale=2.0, cfg_channels=2)
  np.testing.assert_allclose(out, [[-9.0, -9.0, 1.0]] * 2)  # 11 + 2 (1 - 11); cond
  out = sampler.guided_velocity(apply_fn, None, x, jnp.zeros(2), jnp.array([0, 1]), where, None,
                                null_class=NULL, cfg_scale=2.0)
  np.testing.assert_allclose(out, [[-9.0] * 3] * 2)


# ------------------------------------------------------------------------------------------------
# convert's run directory.


def test_convert_writes_a_run_directory_with_its_provenance(imports, runs, tmp_path):
  made, lines = imports
  sit = made['sit']
  config = json.loads((sit.workdir / 'config.json').read_text())
  assert config['imported'] == {'family': 'sit', 'weights': str((FIXTURES / 'sit_tiny.pt')
                                                                 .resolve()),
                                'sha256': sit.weights.sha256, 'known': '', 'unwrapped': ''}
  assert config['model']['variant'] == 'micro/2' and config['model']['time_scale'] == 1.0
  assert config['model']['sincos_order'] == 'xy' and config['model']['prediction'] == 'velocity'
  assert config['data']['image_size'] == 8 and config['data']['source_image_size'] == 64
  assert config['data']['vae_sha256'] == runs['sit'].vae.sha256
  assert config['sampling']['cfg_scale'] == 1.5 and config['sampling']['cfg_channels'] == 3
  dit = json.loads((made['dit'].workdir / 'config.json').read_text())
  assert (dit['model']['prediction'], dit['model']['learned_variance']) == ('ddpm_epsilon', True)
  assert (dit['sampling']['sampler'], dit['sampling']['steps']) == ('ddpm', 250)
  assert runs['dit'].model.time_range == pytest.approx(ddpm.time_range())
  assert made['sit_train'].config.imported.unwrapped == 'ema'
  assert "unwrapped 'ema'" in '\n'.join(lines)
  # Printed: the file, its hash and that it is not a known public file, what was written.
  text = '\n'.join(lines)
  assert f'sha256    {sit.weights.sha256} (not a known public file' in text
  assert f'wrote     {sit.workdir}/config.json and checkpoints/0' in text
  # One checkpoint, written by the project's code: a manifest, weights only (params = EMA).
  step_dir = sit.workdir / 'checkpoints' / '0'
  assert checkpoints.damage(step_dir) is None and (step_dir / checkpoints.MANIFEST).is_file()
  assert not checkpoints.holds_training_state(step_dir)
  raw = inference.load_run(sit.workdir, use_ema=False)
  chex.assert_trees_all_equal(host(raw.params), host(runs['sit'].params))
  # Sampling decodes with the VAE the import recorded: another file is refused by its sha256.
  other = tmp_path / 'other_vae'
  shutil.copytree(VAE_DIR, other)
  with open(other / 'diffusion_pytorch_model.safetensors', 'r+b') as f:
    f.seek(-4, 2)
    f.write(b'\x00\x00\x80\x3f')  # the last float32 of the last tensor becomes 1.0
  with pytest.raises(ValueError, match='is not the VAE of this run'):
    inference.load_run(sit.workdir, vae=other)


def test_an_import_samples_with_sample_py_and_plans_its_evaluation(imports, runs, tmp_path,
                                                                    warm_scripts):
  made, _ = imports
  out = tmp_path / 'sit.png'
  done = warm_scripts.run([REPO / 'sample.py', f'--workdir={made["sit"].workdir}',
                           '--sampler=euler', '--steps=2', '--labels=0,1', '--num_samples=2',
                           f'--output={out}'], cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  with Image.open(out) as picture:
    assert picture.mode == 'RGB'  # decoded by the VAE the import recorded
  # evaluate.py's plan: static extrapolation and PI apply; RPE-2D rules need an RPE-2D run.
  cells = sweep.plan_cells([runs['sit']], ['sit'], [(64, 64), (128, 128)],
                           ['none', 'pi', 'uniform'], dict(steps=2))
  assert {(c[1], c[2]) for c in cells if c[3] is not None} == {
      ('none', (64, 64)), ('pi', (64, 64)), ('none', (128, 128)), ('pi', (128, 128))}
  # Against .npz references without a 'real' row it reads no data set: the import's source (here
  # unknown: 4 classes are not ImageNet's) need not be at hand, and its grids show label ids.
  assert runs['sit'].config.data.source_name is None
  sweep.check_inputs([runs['sit']], [(64, 64)], num_samples=4, num_reference=None, split='test',
                     real_split='', npz_references={(64, 64): None})
  assert sweep._class_names(runs['sit']) is None  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# Bad input: one line, before anything is written.


def _crafted_pickle(path, marker):
  """A torch-style zip whose data.pkl calls os.system to create `marker` when unpickled."""
  class Payload:
    def __reduce__(self):
      import os  # pylint: disable=g-import-not-at-top
      return (os.system, (f'touch {marker}',))
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'pos_embed': Payload()}, protocol=2))
    archive.writestr('archive/byteorder', 'little')


def _state_dict_without(tmp_path, *drop, reshape=None):
  """A safetensors file of the SiT fixture's tensors with keys dropped or one reshaped."""
  from rpe2d import tensor_files  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = {k: np.array(v) for k, v in
             tensor_files.read_tensors(FIXTURES / 'sit_tiny.pt').tensors.items() if k not in drop}
  if reshape:
    name, shape = reshape
    tensors[name] = np.zeros(shape, np.float32)
  path = tmp_path / 'edited.safetensors'
  safetensors.numpy.save_file(tensors, str(path))
  return path


def test_convert_refuses_bad_input_in_one_line_before_writing(tmp_path, warm_scripts):
  marker = tmp_path / 'executed'
  crafted = tmp_path / 'crafted.pt'
  _crafted_pickle(crafted, marker)
  truncated = tmp_path / 'truncated.pt'
  truncated.write_bytes((FIXTURES / 'sit_tiny.pt').read_bytes()[:100_000])
  other_vae = tmp_path / 'sdxl_scaled'
  shutil.copytree(VAE_DIR, other_vae)
  settings = json.loads((other_vae / 'config.json').read_text())
  settings['scaling_factor'] = 0.13025
  (other_vae / 'config.json').write_text(json.dumps(settings))
  taken = tmp_path / 'taken'
  (taken / 'checkpoints').mkdir(parents=True)
  sit = FIXTURES / 'sit_tiny.pt'
  cases = [
      (dict(weights=crafted), pickle.UnpicklingError, r'global posix\.system is not allowed'),
      (dict(weights=truncated), ValueError, r'the file is incomplete: download it again'),
      (dict(weights=FIXTURES / 'sit_tiny_train.pt'), ValueError,
       r"wraps its tensors in .*'model', 'ema'.*--unwrap="),
      (dict(weights=VAE_DIR / 'diffusion_pytorch_model.safetensors'), ValueError,
       r'is not a sit checkpoint .*: it lacks the keys the DiT layout is read from'),
      (dict(weights=_state_dict_without(tmp_path, 'blocks.1.mlp.fc2.bias',
                                        reshape=('blocks.0.attn.qkv.weight', (96, 16)))),
       ValueError, r'is not a sit checkpoint \(\d+ tensors\): 1 missing: '
                   r'blocks\.1\.mlp\.fc2\.bias; '
                   r'1 misshapen: blocks\.0\.attn\.qkv\.weight \(96, 16\) \(expected \(96, 32\)\)'),
      (dict(family='unet'), ValueError, r"--family='unet' is not a known checkpoint family"),
      (dict(vae=tmp_path / 'missing'), FileNotFoundError, r'--vae=.*missing: no such file'),
      (dict(vae=other_vae), ValueError, r'scales latents by 0.13025 .*trained on latents scaled '
                                        r'by 0.18215'),
      (dict(workdir=taken), ValueError, r'already holds a run .* never overwrites'),
  ]
  for i, (change, error, message) in enumerate(cases):
    args = dict(family='sit', weights=sit, vae=VAE_DIR, workdir=tmp_path / f'run_{i}') | change
    with pytest.raises(error, match=message) as raised:
      importing.convert(args.pop('family'), args.pop('weights'), **args, log=None)
    assert '\n' not in str(raised.value), str(raised.value)
    assert not (tmp_path / f'run_{i}').exists()
  assert not marker.exists()  # the crafted pickle's call never ran
  # The command: exit 2, one error line.
  done = warm_scripts.run([REPO / 'convert.py', '--family=dit', f'--weights={crafted}',
                           f'--vae={VAE_DIR}', f'--workdir={tmp_path / "cli"}'], cwd=REPO)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1].startswith('error: ') and not marker.exists()
  assert not (tmp_path / 'cli').exists()


def test_a_table_that_is_not_the_sincos_grid_is_refused(tmp_path):
  from rpe2d import tensor_files  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = {k: np.array(v) for k, v in
             tensor_files.read_tensors(FIXTURES / 'sit_tiny.pt').tensors.items()}
  tensors['pos_embed'] = tensors['pos_embed'][:, ::-1].copy()  # the tokens in another order
  path = tmp_path / 'shuffled.safetensors'
  safetensors.numpy.save_file(tensors, str(path))
  with pytest.raises(ValueError, match=r"pos_embed differs from the 2D sin-cos table \(layout "
                                       r"'xy'.*by up to 1\.\d+"):
    importing.convert('sit', path, vae=VAE_DIR, workdir=tmp_path / 'run', log=None)
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------------------------
# Fine-tuning with RPE-2D from the imported SiT.


@pytest.fixture(scope='module')
def latents_dir(tmp_path_factory):
  """The tiny VAE's latents (8x8x4) of a folder of 64x64 images in 2 classes (the import has 4)."""
  root = tmp_path_factory.mktemp('finetune_latents')
  images = random_image_folder(root, size=64, per_class=6)
  latents.extract(images, VAE_DIR, root / 'latents', shard_size=8, batch_size=8, progress=False)
  return root


def finetune_config(import_dir, latents_root, *overrides):
  return config_lib.load(f'{FINETUNE}:{import_dir}', [
      f'--config.data.latent_dir={latents_root / "latents"}',
      f'--config.data.data_dir={latents_root / "tfds"}', '--config.data.flip=False',
      '--config.data.num_workers=0', '--config.data.read_threads=2',
      '--config.data.prefetch_batches=2', '--config.batch_size=8', '--config.total_steps=2',
      '--config.log_every_steps=1', '--config.sampling.resolutions=()', *overrides])


def test_the_first_finetune_loss_is_sits_own(imports, reference, latents_dir):
  ref = reference['sit']
  import_dir = imports[0]['sit'].workdir
  config = finetune_config(import_dir, latents_dir)  # grid positions, no augmentation
  built = config_lib.validate(config)
  assert config.data.augment == 'none' and not config.model.micro_conditioning
  assert config.flow.time_sampling == 'uniform'  # SiT's
  # The weights init_from loads (train_loop.start_from; no module is new here).
  init_dir = checkpoints.check_init_from(config.init_from, config)
  params = checkpoints.restore_weights(
      init_dir, training.abstract_saved_params(built.model, training.make_mesh(1)))['params']
  # SiT's loss at its time t_SiT is rpe2d's at t = 1 - t_SiT: its target x - eps is the negative
  # of rpe2d's eps - x, the squared error the same.
  loss = jax.jit(functools.partial(flow.velocity_loss, built.model.apply))(
      params, jnp.asarray(ref['loss_x1']), jnp.asarray(ref['loss_x0']),
      1.0 - jnp.asarray(ref['loss_t']), jnp.asarray(ref['loss_y']), grid(8))
  assert float(loss) == pytest.approx(float(ref['loss']), rel=1e-5)


def test_an_rpe2d_finetune_runs_and_resumes_bit_identically(imports, latents_dir, tmp_path,
                                                            capsys):
  import_dir = imports[0]['sit'].workdir
  config = lambda steps: finetune_config(import_dir, latents_dir, '--config.positions.train=rpe2d',
                                         f'--config.total_steps={steps}')
  straight = host(train_loop.train(config(2), tmp_path / 'a'))
  out = capsys.readouterr().out
  assert f'Starting from the weights in {import_dir}' in out
  assert 'new in this model, initialised here: crop_embed' in out
  train_loop.train(config(1), tmp_path / 'b')
  resumed = host(train_loop.train(config(2), tmp_path / 'b'))
  assert step_dirs(tmp_path / 'b') == [1, 2]
  chex.assert_trees_all_equal(straight.params, resumed.params)
  saved = rundir.RunDir(tmp_path / 'a').read_config()
  assert saved.positions.train == 'rpe2d' and saved.model.micro_conditioning
  assert tuple(saved.positions.max_grid) == (8, 8) and saved.imported.family == 'sit'
  assert all(np.isfinite(r['loss']) for r in read_jsonl(tmp_path / 'a' / 'metrics.jsonl'))


def test_finetunes_that_cannot_be_are_refused_before_compiling(imports, latents_dir, tmp_path):
  made, _ = imports
  config = finetune_config(made['sit'].workdir, latents_dir, '--config.model.qk_norm=rmsnorm')
  with pytest.raises(ValueError, match=r'holds weights of another model; differing keys:\n  '
                                       r"model.qk_norm: saved 'none', now 'rmsnorm'"):
    train_loop.train(config, tmp_path / 'qk')
  config = finetune_config(made['dit'].workdir, latents_dir)
  with pytest.raises(ValueError, match=r"model.prediction='ddpm_epsilon': training fits velocity"):
    train_loop.train(config, tmp_path / 'dit')
  # The import itself is not a training run to resume.
  config = finetune_config(made['sit'].workdir, latents_dir, '--config.init_from=')
  with pytest.raises(ValueError, match=r'holds weights only .*--config.init_from='):
    train_loop.train(config, made['sit'].workdir)
  assert step_dirs(made['sit'].workdir) == [0]
  for name in ('qk', 'dit'):
    assert not (tmp_path / name / 'checkpoints').exists()
