"""The programs a TPU user runs, compiled by the real TPU compiler (XLA:TPU, Mosaic for splash) for
a v5e:2x2 slice on this CPU host, with rpe2d/aot.py: every attention kernel in the train step and
the sampler, the memory rules of mesh.fsdp, and the ImageNet XL/2 recipe fitting a v5e chip.

Needs libtpu (`pip install -e '.[tpu]'`); skipped where it is not installed. `.ci/run` runs this
file in its own environment after the main suite (libtpu is about 700 MB).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip('libtpu', reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'")

from conftest import REPO  # noqa: E402
from rpe2d import aot, config as config_lib, training  # noqa: E402

TOPOLOGY = 'v5e:2x2'
HBM_V5E = training.TPU_HBM['TPU v5 lite']


@pytest.fixture(scope='module')
def optimized():
  """The compiler at its usual settings (conftest turns most optimisations off for CPU speed):
  memory is measured as a user's run would compile."""
  before = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


@pytest.fixture(scope='module')
def v5e():
  devices = aot.topology_devices(TOPOLOGY)
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v5 lite'
  return devices


def small_config(kernel: str):
  """configs/default.py's tiny/4 DiT (64 tokens: splash pads them to 128), batch 8 over a
  data x fsdp = 2 x 2 mesh, blocks under nn.scan, CFG and 2 Heun steps when sampling."""
  return config_lib.load('configs/default.py', [
      f'--config.model.attention_implementation={kernel}', '--config.model.scan_layers=True',
      '--config.model.dtype=bfloat16', '--config.batch_size=8', '--config.mesh.fsdp=2',
      '--config.sampling.sampler=heun', '--config.sampling.steps=2'])


@pytest.mark.parametrize('kernel', ['xla', 'splash', 'chunked'])
def test_kernels_compile_for_a_tpu_slice(v5e, kernel):
  """The train step and the sampler (one step and the whole scan, at 1x and 2x) compile for a
  4-chip v5e slice with each kernel; splash is a Mosaic kernel, partitioned by shard_map."""
  programs = aot.programs(small_config(kernel), v5e, which=('train', 'sample_step', 'sampler'),
                          resolutions=[(32, 32), (64, 64)], sample_batch=4)
  assert [p.name for p in programs] == ['train'] + ['sample_step', 'sampler'] * 2
  for program in programs:
    lowered = program.lower()
    if kernel == 'splash':  # the Mosaic kernel is in the program, inside a shard_map
      text = lowered.as_text()
      assert '@tpu_custom_call' in text and 'sdy.manual_computation' in text, program.name
    report = aot.compile_program(program)
    assert report.error is None, f'{program.name}: {report.error}'
    assert report.fits and 0 < report.peak < report.hbm == HBM_V5E


def test_compiler_refusal_is_reported(v5e, optimized):
  """A program over the chip's memory is refused by the compiler; the report says how much it
  needed (tiny/4 at batch 2**17 per chip, unrolled, no remat)."""
  config = config_lib.load('configs/default.py', ['--config.batch_size=524288'])
  report = aot.compile_program(aot.train_program(config, v5e))
  assert report.error == 'out of memory' and not report.fits
  assert report.peak > report.hbm == HBM_V5E


def test_fsdp_auto_and_refusal(v5e):
  """mesh.fsdp=0 picks the fewest fsdp chips whose share of the XL/2 train state (parameters,
  AdamW moments, EMA and gradients: 20 bytes a parameter, 12.6 GiB) is at most half a v5e chip's
  memory; an fsdp whose share exceeds the chip's memory is refused before anything compiles, with
  the fsdp that fits. (That never happens on v5e for XL/2: shown on a v2-8, 7.5 GiB a core.)"""
  config = config_lib.load('configs/imagenet.py:XL,256,rpe2d')
  model, plan, _ = aot.build(config, 'tpu')
  assert training.resolve_fsdp(0, model, plan, v5e) == 2
  assert training.resolve_fsdp(1, model, plan, v5e) == 1  # 12.6 GiB fit; the compiler decides
  v2 = aot.topology_devices('v2:2x2')
  with pytest.raises(ValueError, match=r'^mesh\.fsdp=1: the train state and gradients alone take '
                     r'12\.6 GiB per device, more than the 7\.48 GiB of a TPU v2; set '
                     r'--config\.mesh\.fsdp=4 \(3\.2 GiB\) or 0 \(auto\)$'):
    training.resolve_fsdp(1, model, plan, v2)


def test_imagenet_xl_recipe_fits_v5e(v5e, optimized):
  """configs/imagenet.py:XL,256,rpe2d with its defaults (global batch 256, mesh.fsdp auto) fits a
  v5e chip: XLA:TPU's peak per chip is under its HBM (minutes of CPU: the largest test here)."""
  config = config_lib.load('configs/imagenet.py:XL,256,rpe2d')
  model, plan, _ = aot.build(config, 'tpu')
  fsdp = training.resolve_fsdp(config.mesh.fsdp, model, plan, v5e)
  report = aot.compile_program(aot.train_program(config, v5e, fsdp=fsdp))
  assert report.error is None, report.error
  assert report.fits, f'{report.peak / 2**30:.2f} GiB per chip of {report.hbm / 2**30:.2f}'


def test_command_reports_each_program(tmp_path):
  """benchmarks/tpu_compile.py as a user runs it: a config, a slice, overrides; per program one
  report of compile time, memory per chip against the chip's HBM and FLOPs, and a JSON file."""
  out = tmp_path / 'reports.json'
  done = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'tpu_compile.py'), '--config=configs/default.py',
       '--topology=v5e-4', '--programs=train,sample_step,sampler', '--resolutions=32',
       '--sample_batch=4', f'--json={out}', '--config.model.variant=micro/4'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  text = done.stdout
  assert 'on v5e-4: 4 x TPU v5 lite' in text
  assert text.count('of 15.75 GiB: fits') == 3
  assert 'train: train step, batch 32, 32x32x1, mesh data x fsdp = 4 x 1' in text
  assert 'sampler: euler x 32, CFG, batch 4, 32x32x1' in text
  reports = json.loads(out.read_text())
  assert [r['name'] for r in reports] == ['train', 'sample_step', 'sampler']
  for r in reports:
    assert r['fits'] and r['error'] is None and r['compile_s'] > 0 and r['xla_flops'] > 0
    # Each loop body once: XLA's count is the analytic one's peer (attention's softmax and the
    # optimizer are not in the analytic count; tiny widths make them visible).
    assert 0.8 < r['xla_flops'] / r['visible_flops'] < 1.6
  step, whole = reports[1], reports[2]
  assert whole['flops'] == pytest.approx(32 * step['flops'])  # the scan hides 31 of 32 steps
  assert whole['xla_flops'] == pytest.approx(step['xla_flops'], rel=0.05)
