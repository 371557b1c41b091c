"""Latent extraction (rpe2d.latents, extract.py) with the tiny SD-VAE fixture on real files:
exact records, the manifest, SIGKILLs at random moments, truncated shards, bad input, reruns."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from conftest import REPO, subprocess_env, tiny_config
from rpe2d import autoencoder, autoencoder_weights, data, files, latents

pytestmark = pytest.mark.usefixtures('eight_devices', 'compilation_cache')

EXTRACT_PY = REPO / 'extract.py'
VAE = REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'
SHARD_SIZE, BATCH_SIZE = 16, 8   # 12 train shards (180 records) and 2 test shards (20)
SETTINGS = dict(flip=True, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)


def data_config(data_dir, **overrides):
  overrides = dict(dict(data__channels=3, data__image_size=32), **overrides)
  return tiny_config(data_dir, **overrides).data


def file_contents(path) -> dict[str, bytes]:
  """Every file of a latents directory but its lock (which names its last holder)."""
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(path).iterdir())
          if p.name != latents.LOCK}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """An uninterrupted extraction, with flips, in this process."""
  out = tmp_path_factory.mktemp('reference') / 'latents'
  began = time.monotonic()
  manifest = latents.extract(data_config(data_dir), VAE, out, **SETTINGS)
  seconds = time.monotonic() - began
  print(f'\nreference extraction: 200 images (and their flips) in {seconds:.1f} s with '
        f'compilation, {200 / seconds:.1f} images/s')
  return out, manifest


def source_images(data_dir, split):
  batches = list(data.make_dataset(data_config(data_dir), split=split, seed=0,
                                   global_batch_size=64, train=False, num_epochs=1))
  return {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label', 'index')}


def test_records_are_exactly_the_encoder_output(reference, data_dir):
  out, _ = reference
  loaded = autoencoder_weights.load(VAE)
  for split in ('train', 'test'):
    source = latents.LatentSource(out, split)
    images = source_images(data_dir, split)
    assert len(source) == len(images['image'])
    records = [source[i] for i in range(len(source))]
    np.testing.assert_array_equal([r['label'] for r in records], images['label'])
    np.testing.assert_array_equal([r['index'] for r in records], images['index'])
    # One image per device, as extraction runs it with a batch of 8 over 8 devices.
    for i, record in enumerate(records):
      for suffix, image in (('', images['image'][i]), ('_flipped', images['image'][i][:, ::-1])):
        mean, logvar = autoencoder.encode(loaded.params, image[None], config=loaded.config)
        np.testing.assert_array_equal(record['mean' + suffix], np.asarray(mean)[0])
        np.testing.assert_array_equal(record['logvar' + suffix], np.asarray(logvar)[0])
        assert record['mean' + suffix].dtype == np.float32
  # The flipped latents are of the flipped image, not the flipped latents of the image.
  assert not np.array_equal(records[0]['mean_flipped'], records[0]['mean'][:, ::-1])


def test_manifest(reference):
  out, manifest = reference
  assert manifest == latents.read_manifest(out)
  assert manifest.complete and manifest.format == latents.FORMAT_VERSION
  assert manifest.latent_shape == (4, 4, 4) and manifest.flip
  assert manifest.vae['sha256'] == files.sha256_file(
      VAE / autoencoder_weights.WEIGHTS_NAME)
  assert manifest.vae['path'] == str((VAE / autoencoder_weights.WEIGHTS_NAME).resolve())
  assert manifest.vae['scaling_factor'] == 0.18215 and manifest.vae['shift_factor'] is None
  assert manifest.vae['config']['block_out_channels'] == [16, 16, 32, 32]
  assert manifest.source == {'name': 'animal_mnist', 'image_dir': None, 'image_size': 32,
                             'channels': 3}
  assert {k: v['count'] for k, v in manifest.splits.items()} == {'train': 180, 'test': 20}
  assert [s['records'] for s in manifest.splits['test']['shards']] == [16, 4]
  assert [s['name'] for s in manifest.splits['train']['shards']] == [
      f'train-{k:05d}.array_record' for k in range(12)]
  for info in manifest.splits.values():
    for shard in info['shards']:
      path = out / shard['name']
      assert path.stat().st_size == shard['bytes']
      assert files.sha256_file(path) == shard['sha256']
  latents.check_shards(out, manifest, verify_sha256=True)
  source = latents.LatentSource(out, 'train')
  means = np.stack([source[i]['mean'] for i in range(len(source))]).astype(np.float64)
  np.testing.assert_allclose(manifest.channel_mean, means.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(manifest.channel_std, means.std(axis=(0, 1, 2)), rtol=1e-12)
  assert json.loads((out / 'manifest.json').read_text())['complete'] is True
  # Picklable for grain's worker processes, after a read opened its files too.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[7]['mean'], source[7]['mean'])
  assert [r['index'] for r in clone.__getitems__([3, 170])] == [3, 170]
  with pytest.raises(IndexError):
    source[180]


def test_rerunning_a_complete_extraction_does_nothing(reference, data_dir, tmp_path, capsys):
  out = tmp_path / 'latents'
  shutil.copytree(reference[0], out)
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != latents.LOCK}
  manifest = latents.extract(data_config(data_dir), VAE, out, **SETTINGS)
  assert manifest == reference[1]
  assert 'already complete (train, test); nothing to do' in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != latents.LOCK} == before


def test_truncated_shard_is_refused_and_encoded_again(reference, data_dir, tmp_path):
  out = tmp_path / 'latents'
  shutil.copytree(reference[0], out)
  shard = out / 'train-00003.array_record'
  size = shard.stat().st_size
  with open(shard, 'r+b') as f:
    f.truncate(size - 100)
  manifest = latents.read_manifest(out)
  message = (f'latents directory {out}: shard train-00003.array_record has {size - 100} bytes, '
             f'the manifest says {size} (truncated or changed); extract it again')
  with pytest.raises(latents.LatentsError) as error:
    latents.check_shards(out, manifest, verify_sha256=False)
  assert str(error.value) == message
  with pytest.raises(latents.LatentsError, match='truncated'):
    latents.LatentSource(out, 'test')  # any split: the directory is damaged
  shard.write_bytes(b'')
  with pytest.raises(latents.LatentsError, match='has 0 bytes'):
    latents.check_shards(out, manifest)
  # A rerun takes nothing damaged as complete: it encodes that shard again, exactly.
  latents.extract(data_config(data_dir), VAE, out, **SETTINGS)
  assert file_contents(out) == file_contents(reference[0])


def test_damaged_manifest_and_progress_files_are_set_aside_and_rebuilt(reference, data_dir,
                                                                        tmp_path, caplog):
  """The project's own bookkeeping, cut short (issue 24, class 5): the reader names the manifest
  and says what rebuilds it; extract.py sets the damaged file aside (kept) and rebuilds it, to
  the same bytes."""
  out = tmp_path / 'latents'
  shutil.copytree(reference[0], out)
  (out / latents.MANIFEST).write_bytes((out / latents.MANIFEST).read_bytes()[:60])
  with pytest.raises(latents.LatentsError, match=r'cannot read manifest.json .*; run extract.py '
                                                 r'again with the same flags: it verifies the '
                                                 r'shards and writes the manifest again'):
    latents.LatentSource(out, 'train')
  with caplog.at_level('WARNING'):
    assert latents.extract(data_config(data_dir), VAE, out, **SETTINGS) == reference[1]
  assert 'moved it to manifest.json.damaged (kept for inspection) and rebuilding it' in caplog.text
  aside = {'manifest.json.damaged'}
  assert {k: v for k, v in file_contents(out).items() if k not in aside} == \
      file_contents(reference[0])
  # An unfinished extraction (no manifest yet) whose progress file is damaged: its shards are
  # verified against nothing, so encoded again, to the same bytes.
  (out / latents.MANIFEST).unlink()
  progress = out / 'progress-00000.json'
  progress.write_bytes(progress.read_bytes()[:60])
  caplog.clear()
  with caplog.at_level('WARNING'):
    assert latents.extract(data_config(data_dir), VAE, out, **SETTINGS) == reference[1]
  assert 'moved it to progress-00000.json.damaged' in caplog.text
  aside.add('progress-00000.json.damaged')
  assert {k: v for k, v in file_contents(out).items() if k not in aside} == \
      file_contents(reference[0])


def test_unreadable_manifests_are_refused(reference, tmp_path):
  out = tmp_path / 'latents'
  with pytest.raises(latents.LatentsError, match=f'latents directory {out}: no manifest.json'):
    latents.read_manifest(out)
  shutil.copytree(reference[0], out)
  raw = json.loads((out / 'manifest.json').read_text())
  (out / 'manifest.json').write_text(json.dumps(dict(raw, complete=False)))
  with pytest.raises(latents.LatentsError, match='says the extraction is not complete'):
    latents.LatentSource(out, 'train')
  (out / 'manifest.json').write_text(json.dumps(dict(raw, format=latents.FORMAT_VERSION + 1)))
  with pytest.raises(latents.LatentsError, match='newer than this rpe2d reads'):
    latents.read_manifest(out)


def test_records_round_trip():
  rng = np.random.default_rng(0)
  mean, logvar = rng.standard_normal((2, 3, 5, 4), dtype=np.float32)
  record = latents.encode_record(mean, logvar, 7, 2**40)
  assert len(record) == latents.record_bytes((3, 5, 4), False) == 2 * 60 * 4 + 12
  out = latents.decode_record(record, (3, 5, 4), False)
  assert out['label'] == 7 and out['index'] == 2**40 and set(out) == {'mean', 'logvar', 'label',
                                                                      'index'}
  np.testing.assert_array_equal(out['logvar'], logvar)
  with pytest.raises(latents.LatentsError, match='expected 972'):
    latents.decode_record(record, (3, 5, 4), True)


# ------------------------------------------------------------------------------------------------
# Bad input: refused before any work, nothing written.


def other_vae(folder: pathlib.Path) -> pathlib.Path:
  tensors = safetensors_numpy.load_file(str(VAE / autoencoder_weights.WEIGHTS_NAME))
  tensors['encoder.conv_in.bias'] = tensors['encoder.conv_in.bias'] + 1.0
  folder.mkdir()
  safetensors_numpy.save_file(tensors, str(folder / autoencoder_weights.WEIGHTS_NAME))
  shutil.copy(VAE / 'config.json', folder / 'config.json')
  return folder


def test_bad_input_is_refused_before_any_work(reference, data_dir, tmp_path):
  out = tmp_path / 'new'
  pickled = tmp_path / 'model.ckpt'
  pickled.write_bytes(pickle.dumps({'state_dict': {}}))
  (tmp_path / 'a_file').write_text('')
  cases = [
      (dict(vae_path=tmp_path / 'missing.safetensors'), f'--vae: {tmp_path}/missing.safetensors: '
       'no such file'),
      (dict(vae_path=pickled), 'model.ckpt is neither safetensors nor a torch file: first bytes '
       '80 04 95'),
      (dict(config=dict(data__image_size=36)), "data.image_size=36 is not divisible by the VAE's "
       'downsampling factor 8'),
      (dict(config=dict(data__channels=1)), 'data.channels=1, but the VAE encodes 3-channel '
       'images'),
      (dict(shard_size=12), 'shard_size=12 is not a multiple of batch_size=8'),
      (dict(splits=('train', 'validation')), "split='validation' is not readable"),
      (dict(out_dir=tmp_path / 'a_file' / 'latents'), f'--output {tmp_path}/a_file/latents is '
       'not writable'),
      (dict(out_dir=tmp_path / 'a_file'), f'--output {tmp_path}/a_file is not writable'),
  ]
  for case, message in cases:
    kwargs = dict(SETTINGS, **{k: v for k, v in case.items() if k != 'config'})
    kwargs.setdefault('vae_path', VAE)
    kwargs.setdefault('out_dir', out)
    with pytest.raises(latents.InputError) as error:
      latents.extract(data_config(data_dir, **case.get('config', {})), **kwargs)
    assert message in str(error.value), (case, str(error.value))
    assert '\n' not in str(error.value)
    assert not out.exists()
  # An --output holding another extraction: the differing settings are named, nothing changes.
  done = tmp_path / 'done'
  shutil.copytree(reference[0], done)
  before = file_contents(done)
  vae2 = other_vae(tmp_path / 'vae2')
  with pytest.raises(latents.InputError) as error:
    latents.extract(data_config(data_dir), vae2, done, **dict(SETTINGS, flip=False))
  assert str(error.value).startswith(f'--output {done} holds latents of another extraction '
                                     '(manifest.json differs in vae.sha256 (')
  assert "; flip (True there, False asked)); choose another --output" in str(error.value)
  with pytest.raises(latents.InputError, match=r'differs in source.image_size \(32 there, 64'):
    latents.extract(data_config(data_dir, data__image_size=64), VAE, done, **SETTINGS)
  (tmp_path / 'foreign').mkdir()
  (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
  with pytest.raises(latents.InputError, match=r'holds files that are not latents \(notes.txt\)'):
    latents.extract(data_config(data_dir), VAE, tmp_path / 'foreign', **SETTINGS)
  assert file_contents(done) == before


def run_extract(args, env, timeout=120):
  return subprocess.run([sys.executable, str(EXTRACT_PY), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_command_line_bad_input_exits_2(data_dir, tmp_path, compilation_cache):
  pickled = tmp_path / 'diffusion_pytorch_model.ckpt'
  pickled.write_bytes(pickle.dumps({'state_dict': {}}))
  out = tmp_path / 'latents'
  result = run_extract([f'--vae={pickled}', f'--output={out}',
                        f'--config={config_file(tmp_path, data_dir)}'],
                       subprocess_env(compilation_cache))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f'error: --vae: {pickled} is neither safetensors nor a torch file'
                             ), lines
  assert 'a pickle, not a torch archive; it is never unpickled' in lines[-1]
  assert 'Traceback' not in result.stderr
  assert not out.exists()
  result = run_extract(['--help'], subprocess_env(compilation_cache))
  assert result.returncode == 0 and '--vae: The VAE (required)' in result.stdout, \
      result.stderr[-3000:]
  assert '--vae_statistics:' in result.stdout
  assert '--config.data.image_size=32' in result.stdout


# ------------------------------------------------------------------------------------------------
# Hard kills.


def config_file(tmp_path, data_dir) -> pathlib.Path:
  path = tmp_path / 'latents_config.py'
  if not path.exists():
    path.write_text(
        'import sys\n'
        f'sys.path.insert(0, {str(REPO / "tests")!r})\n'
        'from conftest import tiny_config\n\n'
        'def get_config():\n'
        f'  return tiny_config({data_dir!r}, data__channels=3, data__image_size=32)\n')
  return path


def _listed(out: pathlib.Path) -> int:
  try:
    progress = json.loads((out / 'progress-00000.json').read_text())
  except (FileNotFoundError, ValueError):
    return 0
  return sum(len(v) for v in progress['splits'].values())


def _writing(out: pathlib.Path) -> set[str]:
  return {p.name for p in out.glob('*.array_record.tmp')} if out.is_dir() else set()


def test_sigkill_at_random_moments_gives_identical_files(reference, data_dir, tmp_path,
                                                         compilation_cache):
  seed = int(os.environ.get('RPE2D_KILL_SEED', random.randrange(1 << 30)))
  rng = random.Random(seed)
  out, logs = tmp_path / 'latents', tmp_path / 'logs'
  logs.mkdir()
  args = [f'--config={config_file(tmp_path, data_dir)}', f'--vae={VAE}', f'--output={out}',
          '--flip', f'--shard_size={SHARD_SIZE}', f'--batch_size={BATCH_SIZE}']
  env = dict(subprocess_env(compilation_cache), PYTHONUNBUFFERED='1')  # a killed run's lines too
  # Twice while a shard file is being written, once just after a shard is listed as finished,
  # once at a random time after launch (imports, compilation or encoding).
  plans = ['during_write', 'after_shard', 'during_write', 'after_launch']
  kills = []
  for n, plan in enumerate(plans):
    listed = _listed(out)
    with open(logs / f'{n}.err', 'w') as err, open(logs / f'{n}.out', 'w') as stdout:
      process = subprocess.Popen([sys.executable, str(EXTRACT_PY), *args], cwd=REPO, env=env,
                                 stdout=stdout, stderr=err)
      launched, delay = time.monotonic(), rng.uniform(0.0, 0.2)
      launch_delay = rng.uniform(1.0, 8.0)
      writing = set()
      try:
        while process.poll() is None and time.monotonic() < launched + 120:
          writing = _writing(out)
          if plan == 'during_write' and writing:
            break
          if plan == 'after_shard' and _listed(out) > listed:
            time.sleep(delay)
            break
          if plan == 'after_launch' and time.monotonic() - launched >= launch_delay:
            break
          time.sleep(0.001)
        if process.poll() is not None:  # finished before this kill: no more kills
          assert process.returncode == 0, (logs / f'{n}.err').read_text()[-3000:]
          break
        process.send_signal(signal.SIGKILL)
        process.wait()
      finally:
        if process.poll() is None:
          process.kill()
          process.wait()
    kills.append(dict(plan=plan, listed=_listed(out), cut=sorted(writing & _writing(out))))
  final = run_extract(args, env)
  assert final.returncode == 0, final.stderr[-3000:]
  print(f'\nsurvived {len(kills)} SIGKILLs (seed {seed}, RPE2D_KILL_SEED repeats it): {kills}')
  assert len(kills) >= 3, f'the extraction finished after {len(kills)} kills; seed {seed}'
  cut = [k for k in kills if k['cut']]
  assert cut, f'no kill landed inside a shard write: {kills}; seed {seed}'
  stderr = ''.join(p.read_text() for p in sorted(logs.glob('*.err'))) + final.stderr
  assert 'a shard that never finished' in stderr
  # A later launch resumed (the final one, unless the last kill came after the manifest).
  stdout = ''.join(p.read_text() for p in sorted(logs.glob('*.out'))) + final.stdout
  assert 'resuming;' in stdout
  assert file_contents(out) == file_contents(reference[0])
  rerun = run_extract(args, env)
  assert rerun.returncode == 0 and 'nothing to do' in rerun.stdout, rerun.stderr[-3000:]


def test_restart_removes_unfinished_and_unlisted_files(reference, data_dir, tmp_path, caplog):
  """What a kill leaves between the steps of a shard's commit, made by hand."""
  out = tmp_path / 'latents'
  shutil.copytree(reference[0], out)
  (out / 'manifest.json').unlink()                       # killed before the manifest
  progress = json.loads((out / 'progress-00000.json').read_text())
  progress['splits']['test'] = progress['splits']['test'][:1]
  (out / 'progress-00000.json').write_text(json.dumps(progress))  # renamed, not yet listed
  (out / 'train-00005.array_record').rename(out / 'train-00005.array_record.tmp')  # mid-write
  (out / 'progress-00000.json.tmp.json').write_text('{"cut sh')  # a progress write cut short
  (out / '.write-probe-0-1').write_bytes(b'')
  latents.extract(data_config(data_dir), VAE, out, **SETTINGS)
  assert 'removing train-00005.array_record.tmp, a shard that never finished' in caplog.text
  assert 'removing test-00001.array_record, a shard not listed as finished' in caplog.text
  assert file_contents(out) == file_contents(reference[0])
