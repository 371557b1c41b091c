"""ADM-format batches and `evaluate.py --sample_npz`: reading arr_0 in pieces, merging per-process
parts, the evaluator of any sample batch, and its refusals of bad input before any work."""

import hashlib
import json
import pathlib
import zipfile

import numpy as np
import pytest

from conftest import REPO, subprocess_env
from rpe2d.evaluation import batches


def images(n, size=8, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize('save', [np.savez, np.savez_compressed])
def test_read_rows_of_stored_and_deflated_batches(tmp_path, save):
  path = tmp_path / 'batch.npz'
  arr = images(10, size=6)
  save(path, arr_0=arr, labels=np.arange(10))
  array = batches.image_array(path)
  assert array.shape == (10, 6, 6, 3) and (array.offset is None) == (save is np.savez_compressed)
  np.testing.assert_array_equal(batches.read_rows(array, 3, 7), arr[3:7])
  np.testing.assert_array_equal(batches.read_rows(array, 0, 10), arr)


@pytest.mark.parametrize('arr, message', [
    (np.zeros((2, 8, 8, 3), np.float32),
     r'arr_0 is float32 \(2, 8, 8, 3\); ADM batches hold uint8'),
    (np.zeros((2, 3, 8, 8), np.uint8), r'arr_0 is uint8 \(2, 3, 8, 8\); ADM batches hold uint8 '
     r'\(N, H, W, 3\) NHWC RGB'),
    (np.zeros((2, 8, 8, 1), np.uint8), r'arr_0 is uint8 \(2, 8, 8, 1\)'),
    (np.zeros((0, 8, 8, 3), np.uint8), 'with no images'),
])
def test_image_array_refuses_what_is_not_uint8_nhwc_rgb(tmp_path, arr, message):
  path = tmp_path / 'bad.npz'
  np.savez(path, arr_0=arr)
  with pytest.raises(ValueError, match=message):
    batches.image_array(path)
  np.savez(path, images=images(2))
  with pytest.raises(ValueError, match=r"has no 'arr_0'; its keys are \['images'\]"):
    batches.image_array(path)


def test_parts_merge_into_one_batch_in_example_order(tmp_path):
  output = tmp_path / 'samples.npz'
  arr, labels = images(7, channels=1), np.arange(7) % 3
  for p, (start, stop) in enumerate(((0, 3), (3, 7))):
    batches.write_part(batches.part_path(output, p, 2), arr[start:stop], labels[start:stop],
                       np.arange(start, stop))
  assert batches.part_path(output, 1, 2).name == 'samples.part1-of-2.npz'
  assert batches.merge_parts(output, 2) == 7
  with np.load(output) as merged:
    np.testing.assert_array_equal(merged['arr_0'], arr)
    np.testing.assert_array_equal(merged['labels'], labels)
  with zipfile.ZipFile(output) as zf:  # stored, so evaluate.py memory-maps it
    assert zf.getinfo('arr_0.npy').compress_type == zipfile.ZIP_STORED
  batches.remove_parts(output, 2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['samples.npz']
  with pytest.raises(FileNotFoundError, match=r'missing parts .*samples.part0-of-2.npz'):
    batches.merge_parts(output, 2)


def test_statistics_are_checked(tmp_path):
  path = tmp_path / 'ref.npz'
  np.savez(path, arr_0=images(2), mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(7))
  with pytest.raises(ValueError, match=r"key 'mu_s' has shape \(7,\), expected \(2023,\)"):
    batches.read_statistics(path)
  np.savez(path, mu=np.zeros(2048))
  with pytest.raises(ValueError, match=r"holds 'mu' without 'sigma'"):
    batches.read_statistics(path)


# ------------------------------------------------------------------------------------------------
# evaluate.py --sample_npz


@pytest.fixture(scope='module')
def adm_files(tmp_path_factory):
  """A sample batch (12 images 32x32) and a reference batch (10 images, no statistics)."""
  root = tmp_path_factory.mktemp('adm')
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (4, 4, 4, 3))
  up = lambda x, n: np.clip(np.repeat(np.repeat(x, 8, 0), 8, 1)[None]
                            + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
  samples = np.concatenate([up(base[i % 4], 1) for i in range(12)])
  reference = np.concatenate([up(base[i % 3], 1) for i in range(10)])
  np.savez(root / 'samples.npz', arr_0=samples, arr_1=np.arange(12))
  np.savez_compressed(root / 'reference.npz', arr_0=reference)
  return root


def evaluate_batch(warm_scripts, *args):
  return warm_scripts.run([REPO / 'evaluate.py', *map(str, args)], cwd=REPO, timeout=600)


def test_sample_batch_is_measured_and_written_as_json(adm_files, warm_scripts, tmp_path):
  out = tmp_path / 'out'
  result = evaluate_batch(warm_scripts, f'--sample_npz={adm_files / "samples.npz"}',
                          f'--reference_npz={adm_files / "reference.npz"}', f'--outdir={out}',
                          '--shard_size=5', '--inception_batch_size=6')
  assert result.returncode == 0, result.stderr[-3000:]
  for line in ('Inception Score: unavailable', 'FID: ', 'sFID: ', 'Precision: ', 'Recall: '):
    assert line in result.stdout, result.stdout
  assert '--inception_classifier=' in result.stdout  # how to get IS
  results = json.loads((out / 'samples_vs_reference.json').read_text())
  assert results['num_samples'] == 12 and results['num_reference_images'] == 10
  assert results['reference_statistics'] == 'its images'
  for key in ('fid', 'sfid', 'precision', 'recall', 'kid'):
    assert np.isfinite(results[key]), key
  assert results['fid'] > 0 and results['sfid'] > 0 and results['inception_score'] is None
  assert f'FID: {results["fid"]:.5f}' in result.stdout
  # Features are kept in shards of 5 (3 for the samples, 2 for the reference, the deflated one
  # read in order); a rerun reads them (tests below resume a killed evaluation).
  assert len(list((out / 'features').glob('*/*/shard_*.npz'))) == 5


@pytest.mark.parametrize('setup, args, message', [
    ('float', [], r'--sample_npz .*samples.npz: arr_0 is float32 \(4, 8, 8, 3\); ADM batches hold '
     r'uint8'),
    ('gray', [], r'arr_0 is uint8 \(4, 8, 8, 1\)'),
    ('', ['--runs=runs/default'], 'takes no --runs or --resolutions'),
    ('no_mu_s', [], None),  # not an error: FID is still reported (checked below)
    ('few', ['--inception_classifier=classifier.pt'],
     r'4 samples are fewer than one Inception Score split \(5000'),
    ('many', ['--inception_classifier=classifier.pt'], r'--inception_classifier=.*classifier.pt: '
     r'not a TorchScript archive or a torch state dict \(first bytes 6e 6f'),
    ('', ['--reference_npz=256x256:ref.npz'], 'needs --reference_npz=<path of one ADM reference'),
    ('bad_sigma', [], r"ref.npz: key 'sigma' is not a covariance"),
])
def test_bad_batches_are_refused_before_any_work(warm_scripts, tmp_path, setup, args, message):
  samples, ref = tmp_path / 'samples.npz', tmp_path / 'ref.npz'
  np.savez(samples, arr_0={'float': images(4).astype(np.float32), 'gray': images(4, channels=1),
                           'many': np.zeros((5000, 2, 2, 3), np.uint8)}.get(setup, images(4)))
  # Statistics only where they are the point: checking a 2048 x 2048 covariance takes seconds.
  stats = dict(mu=np.zeros(2048), sigma=-np.eye(2048) if setup == 'bad_sigma' else np.eye(2048)) \
      if setup in ('no_mu_s', 'bad_sigma') else {}
  np.savez(ref, arr_0=images(6), **stats)
  (tmp_path / 'classifier.pt').write_text('not a network')
  args = [a.replace('classifier.pt', str(tmp_path / 'classifier.pt')) for a in args]
  if not any(a.startswith('--reference_npz') for a in args):
    args.append(f'--reference_npz={ref}')
  if setup == 'no_mu_s':  # --outdir unwritable: the run stops there, after the checks
    (tmp_path / 'file').write_text('')
    args.append(f'--outdir={tmp_path / "file" / "out"}')
  result = evaluate_batch(warm_scripts, f'--sample_npz={samples}', *args,
                          *([] if setup == 'no_mu_s' else [f'--outdir={tmp_path / "out"}']))
  assert result.returncode == 2, result.stderr[-2000:]
  if message is None:
    warning, error = result.stderr.strip().splitlines()
    assert 'ref.npz holds mu and sigma but no mu_s / sigma_s: sFID is unavailable' in warning
    assert error.startswith('error: --results_json directory') and 'not writable' in error
  else:
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert pytest.importorskip('re').search(message, result.stderr), result.stderr
  assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------
# evaluate.py on two processes x 4 CPU devices: the numbers of one process, and a SIGKILL resumed.

CELL_ARGS = ['--resolutions=16', '--methods=none', '--num_samples=12', '--shard_size=2',
             '--num_reference=8', '--real_split=', '--steps=2', '--inception_batch_size=4']


def launch_evaluation(run_dir, outdir, processes, env, logs):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(processes):
    process_env = dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // processes}')
    flags = ([f'--coordinator_address=localhost:{port}', f'--num_processes={processes}',
              f'--process_id={i}'] if processes > 1 else [])
    log = open(f'{logs}.{i}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / 'evaluate.py'), f'--runs={run_dir}', f'--outdir={outdir}',
         *CELL_ARGS, *flags], env=process_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
  return procs


def wait(procs, logs, timeout=300):
  for p in procs:
    p.wait(timeout=timeout)
  outputs = [open(f'{logs}.{i}.log').read() for i in range(len(procs))]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def cell_numbers(outdir):
  import csv  # pylint: disable=g-import-not-at-top
  with open(outdir / 'results.csv', encoding='utf-8') as f:
    (row,) = list(csv.DictReader(f))
  return {k: float(row[k]) for k in ('fid', 'sfid', 'kid', 'precision', 'recall')}


def test_two_processes_give_one_process_numbers_and_resume_after_sigkill(
    tiny_run, jax_cache_dir, tmp_path):
  import re  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = subprocess_env(jax_cache_dir, optimized=True)
  two = tmp_path / 'two'
  procs = launch_evaluation(tiny_run, two, 2, env, tmp_path / 'killed')
  deadline = time.monotonic() + 300
  while not list((two / 'cells').glob('*/shard_*.npz')) if (two / 'cells').exists() else True:
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
        open(f'{tmp_path / "killed"}.0.log').read()[-3000:]
    time.sleep(0.01)
  for p in procs:  # a scheduler's restart: every process killed at once
    p.send_signal(signal.SIGKILL)
    p.wait()
  kept = sorted(p.name for p in (two / 'cells').glob('*/shard_*.npz'))
  assert kept and len(kept) < 6, kept  # some shards done, the cell not
  resumed = wait(launch_evaluation(tiny_run, two, 2, env, tmp_path / 'resumed'),
                 tmp_path / 'resumed')
  assert 'distributed: process 0 of 2, 4 local of 8 devices (cpu)' in resumed[0]
  redone = {f'shard_{int(k) - 1:05d}.npz' for out in resumed
            for k in re.findall(r'process \d: shard (\d+) of 6', out)}
  assert redone and not redone & set(kept), (redone, kept)
  assert len(redone) + len(kept) == 6
  assert not (two / 'results.csv').exists() or cell_numbers(two)
  one = tmp_path / 'one'
  wait(launch_evaluation(tiny_run, one, 1, env, tmp_path / 'one'), tmp_path / 'one')
  assert cell_numbers(two) == cell_numbers(one)


# ------------------------------------------------------------------------------------------------
# The Inception Score's classifier files (tests/fixtures/make_inception_fixtures.py made them with
# torch: every large tensor a strided view of a short storage, which torch saves as it is).

CLASSIFIERS = pathlib.Path(__file__).parent / 'fixtures' / 'inception'


@pytest.fixture(scope='module')
def synthetic_network():
  """(the convolutions the synthetic files hold, by TF name; their W (2048, 1008))."""
  strided = lambda s, shape: np.lib.stride_tricks.as_strided(s, tuple(shape),
                                                             (s.itemsize,) * len(shape))
  with np.load(CLASSIFIERS / 'classifier_storages.npz') as f:
    v = {k: f[k] for k in f.files}
  convs = {name: dict(weight=strided(v[name], v[f'{name}/shape']), beta=v[f'{name}/beta'],
                      mean=v[f'{name}/mean'], var=v[f'{name}/var'])
           for name in v if name + '/shape' in v}
  return convs, strided(v['fc_storage'], (1008, 2048)).T


@pytest.mark.parametrize('name, fmt', [('nvidia.pt', 'torchscript'),
                                       ('pytorch_fid.pth', 'torch_zip'),
                                       ('pytorch_fid_legacy.pth', 'torch_legacy')])
def test_classifier_files_of_each_format(synthetic_network, name, fmt):
  from rpe2d.evaluation import classifier  # pylint: disable=g-import-not-at-top
  convs, weights = synthetic_network
  assert len(convs) == 94
  loaded = classifier.load(CLASSIFIERS / name, reference=convs)
  assert loaded.format == fmt and loaded.weights.shape == (2048, 1008)
  np.testing.assert_array_equal(loaded.weights, weights)  # fc.weight transposed, no bias
  assert loaded.sha256 == hashlib.sha256((CLASSIFIERS / name).read_bytes()).hexdigest()


def test_classifier_of_another_network_or_shape_is_refused(synthetic_network, tmp_path):
  from rpe2d.evaluation import classifier  # pylint: disable=g-import-not-at-top
  convs, _ = synthetic_network
  with pytest.raises(ValueError, match=r'wrong_conv.pth: mixed_6/conv weight differs from the FID '
                     r"Inception's \(max \|difference\| 0.5\): another network"):
    classifier.load(CLASSIFIERS / 'wrong_conv.pth', reference=convs)
  with pytest.raises(ValueError, match=r'the classifier weight is float32 \(1000, 2048\); the '
                     r"2015-12-05 Inception's is float32 \(1008, 2048\)"):
    classifier.load(CLASSIFIERS / 'wrong_shape.pth', reference=convs)
  # The synthetic network is not the FID network rpe2d ships: refused against the real one.
  with pytest.raises(ValueError, match=r'nvidia.pt: conv weight differs'):
    classifier.load(CLASSIFIERS / 'nvidia.pt')
  text = tmp_path / 'inception.pt'
  text.write_text('not a network')
  with pytest.raises(ValueError, match='not a TorchScript archive or a torch state dict'):
    classifier.load(text, reference=convs)


def test_a_reference_batch_gives_the_sweep_its_statistics_and_images(tmp_path):
  from rpe2d.evaluation import sweep  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'VIRTUAL_tiny.npz'
  np.savez(path, arr_0=images(7, size=4), mu=np.ones(2048), sigma=np.eye(2048),
           mu_s=np.zeros(2023), sigma_s=np.eye(2023) * 0.01)
  reference = sweep.npz_reference(path)
  assert reference.description['images'] == 7 and reference.features is None
  assert reference.mu_s.shape == (2023,) and reference.sigma_s.shape == (2023, 2023)
  # Its images' pool3 features (KID, precision, recall), computed in shards and cached.
  network = lambda x: x.reshape(len(x), -1)[:, :5].astype(np.float32)
  with_images = sweep.with_batch_images(reference, network, tmp_path / 'cache')
  np.testing.assert_array_equal(with_images.features, network(images(7, size=4)))
  assert with_images.mu is reference.mu


def test_shards_are_checked_when_read_and_damaged_ones_computed_again(tmp_path, capsys):
  from rpe2d.evaluation import inception, shards  # pylint: disable=g-import-not-at-top
  calls = []

  def produce(start, stop):
    calls.append(start)
    x = np.arange(start, stop, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return inception.Features(x, x[:, :2]), {'images': images(stop - start, size=2)}

  assert shards.compute(tmp_path, 'k', 7, 3, produce) == 3 and calls == [0, 3, 6]
  assert shards.compute(tmp_path, 'k', 7, 3, produce) == 0  # all kept
  path = shards.path(tmp_path, 1)
  path.write_bytes(path.read_bytes()[:-40])  # a truncated write, as a kill mid-copy leaves
  assert shards.read(path, 'k', 3, 6) is None
  assert 'shard_00001.npz is damaged' in capsys.readouterr().err
  assert shards.read(shards.path(tmp_path, 0), 'other', 0, 3) is None  # another evaluation's
  calls.clear()
  features, extras = shards.gather(tmp_path, 'k', 7, 3, produce)
  assert calls == [3] and features.pool[:, 0].tolist() == list(range(7))
  assert features.spatial.shape == (7, 2) and extras['images'].shape == (7, 2, 2, 3)
