"""Smoke tests: each benchmark script runs end to end on CPU with its smallest settings and prints
its table (no timing is asserted: the numbers depend on the machine)."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / 'benchmarks'
TORCH = importlib.util.find_spec('torch') is not None


def env():
  """One CPU device (the scripts measure one), few XLA passes (compile time dominates here)."""
  import os  # pylint: disable=g-import-not-at-top
  values = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
                PYTHONPATH=str(REPO))
  values['XLA_FLAGS'] = ' '.join(f for f in values.get('XLA_FLAGS', '').split()
                                 if 'xla_force_host_platform_device_count' not in f)
  return values


def run(script, *args, timeout=240):
  done = subprocess.run([sys.executable, str(BENCH / script), *args], env=env(), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)
  return done


def table_rows(text, first_cell):
  return [l for l in text.splitlines() if l.startswith(f'| {first_cell}')]


def test_train_step_vs_pytorch_prints_both_tables():
  done = run('train_step_vs_pytorch.py', '--works=train_tiny4', '--variant=micro/4', '--batch=2',
             '--steps=1', '--rounds=1', '--threads=1', '--dtype=bfloat16')
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  assert 'compute in bfloat16' in out
  [speed] = [l for l in table_rows(out, 'train micro/4 32x32x1 (64 tokens) batch 2 | 1 |')
             if l.count('|') == 10]
  cells = [c.strip() for c in speed.strip('|').split('|')]
  assert float(cells[3]) > 0 and float(cells[6]) > 0  # rpe2d cpu-s and wall-s
  if TORCH:
    assert cells[4].endswith('x') and float(cells[2]) > 0
  else:
    assert 'rpe2d numbers only' in out and cells[2] == 'n/a'
  [flops] = [l for l in out.splitlines()
             if l.startswith('| train micro/4') and l.count('|') == 6 and ' / ' not in l]
  xla, analytic, ratio = (float(c) for c in flops.strip('|').split('|')[1:4])
  assert xla > 0 and analytic > 0 and ratio == pytest.approx(xla / analytic, rel=1e-2)
  [floor] = [l for l in out.splitlines()
             if l.startswith('| train micro/4') and l.count('|') == 6 and ' / ' in l]
  rates, seconds, target = (c.strip() for c in floor.strip('|').split('|')[2:5])
  torch_rate, rpe2d_rate = rates.split(' / ')
  assert float(rpe2d_rate) > 0
  best = max(float(rpe2d_rate), float(torch_rate) if TORCH else 0.0)
  assert float(seconds) == pytest.approx(analytic / best, abs=1.5e-3)  # rounded to 3 digits
  assert (float(target) > 0) if TORCH else target == 'n/a'


def test_train_step_vs_pytorch_refuses_an_unknown_work():
  done = run('train_step_vs_pytorch.py', '--works=train_huge')
  assert done.returncode == 2
  assert "unknown work 'train_huge'" in done.stderr and 'train_tiny4' in done.stderr


def test_throughput_with_the_data_pipeline(data_dir):
  done = run('throughput.py', '--config.model.variant=micro/4', '--config.batch_size=4',
             f'--config.data.data_dir={data_dir}', '--config.data.read_threads=1',
             '--config.data.prefetch_batches=1', '--steps=1', '--warmup=1', '--sample_steps=1',
             '--sample_batch=2', '--sample_repeats=1')
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  assert re.search(r'^devices: 1 x cpu', out, re.M)
  assert re.search(r'^compile: [\d.]+ s', out, re.M)
  assert re.search(r'^train \(synthetic, device-resident\): [\d.]+ img/s.*MFU n/a', out, re.M)
  assert re.search(r'^FLOPs per step: project .* XLA / project [\d.]+', out, re.M)
  assert re.search(r'^train with the data pipeline: [\d.]+ img/s', out, re.M)
  assert re.search(r'^loader alone \(next\(iterator\)\): [\d.]+ img/s', out, re.M)
  assert re.search(r'^peak memory: [\d.]+ GiB \(process peak RSS\)', out, re.M)
  assert re.search(r'^sampling \(euler, 1 steps, cfg 3.0, batch 2, 32x32\): [\d.]+ img/s', out,
                   re.M)


def test_throughput_names_a_bad_override():
  done = run('throughput.py', '--config.model.variant=huge/2')
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("error: unknown model variant 'huge/2'")


def test_device_check_smoke_writes_its_table(tmp_path):
  output = tmp_path / 'check.md'
  done = run('device_check.py', '--smoke', f'--output={output}', timeout=400)
  assert done.returncode == 0, done.stderr[-2000:]
  text = output.read_text()
  assert text in done.stdout
  for dtype in ('float32', 'bfloat16'):
    [row] = table_rows(text, f'{dtype}, xla, scan False')
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == '2' and float(cells[2]) > 0 and cells[4] == 'n/a'  # img/s; no CPU peak
  rows = json.loads(output.with_suffix('.json').read_text())
  assert {r['dtype'] for r in rows} == {'float32', 'bfloat16'}
  # The ImageNet latents are not there: the data rows say so, the synthetic rows still ran.
  assert all('data.latent_dir' in r['data_skipped'] for r in rows)
  # FiTv2's blocks sample at 320^2 (20x20 tokens past its 16x16 grid), static YaRN and DY-YaRN.
  fitv2 = json.loads((tmp_path / 'check_fitv2.json').read_text())
  assert [(r['resolution'], r['method']) for r in fitv2] == [('320x320', 'yarn'),
                                                             ('320x320', 'dy-yarn')]
  assert all(r['images_per_s'] > 0 and r['peak_memory_gib'] > 0 for r in fitv2)
  [row] = table_rows(text, '320x320 | dy-yarn')
  assert float(row.strip('|').split('|')[3]) > 0  # its speed relative to static YaRN


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None,
                    reason='libtpu is installed: tests/test_tpu_compile.py runs the command')
def test_tpu_compile_says_what_to_install():
  sys.path.insert(0, str(BENCH))
  import tpu_compile  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_:
    tpu_compile.main(['--config=configs/default.py', '--topology=v5e-8'])
  assert str(exit_.value) == (
      "error: topology 'v5e-8': compiling for a TPU needs libtpu, which is not installed here: "
      "pip install -e '.[tpu]' (or 'jax[tpu]')")


@pytest.mark.skipif(not TORCH, reason='torch is not importable here')
def test_torch_dit_starts_as_zero_and_trains():
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(BENCH))
  import torch_dit  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_dit.DiT(width=32, depth=2, heads=2, patch=4, channels=1, image_size=16,
                        num_classes=3)
  x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 3])
  out = model(x, t, y)
  assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero, zero final layer
  trainer = torch_dit.Trainer(model, learning_rate=1e-3)
  before = [p.detach().clone() for p in trainer.params]
  assert torch.isfinite(trainer.step(x, torch.tensor([0, 1])))
  assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
