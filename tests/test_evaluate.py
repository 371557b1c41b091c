"""evaluate.py and rpe2d.evaluation: methods, shared and reused cells, references, reports."""

import csv
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, edit_run_config, subprocess_env, tiny_config
from rpe2d import config as config_lib, rope, sampler
from rpe2d.evaluation import metrics, sweep



def test_parse_method():
  assert sweep.parse_method('yarn') == ('yarn', None)
  assert sweep.parse_method('DY-NTK') == ('dy-ntk', None)
  assert sweep.parse_method('uniform') == ('none', 'uniform')
  assert sweep.parse_method('dy-yarn@contiguous') == ('dy-yarn', 'contiguous')
  with pytest.raises(ValueError, match="unknown method 'linear'; allowed: none, pi"):
    sweep.parse_method('linear')
  with pytest.raises(ValueError, match="unknown position rule 'spiral'"):
    sweep.parse_method('pi@spiral')
  # A sin-cos rule for models with an absolute table (rope+sincos, sincos) after a '+'.
  assert sweep.parse_method('dy-yarn+interpolate@contiguous') == ('dy-yarn', 'contiguous')
  assert [sweep.sincos_rule(m) for m in ('pi+native', 'PI+Interpolate@uniform', 'pi')] == [
      'native', 'interpolate', None]
  with pytest.raises(ValueError, match="unknown sin-cos rule 'ei' in method 'pi\\+ei'; allowed: "
                                       'method, native, interpolate'):
    sweep.parse_method('pi+ei')


def test_method_plans(synthetic_animals):
  rpe = tiny_config(synthetic_animals)
  plan = sweep.method_plan(rpe, 'dy-yarn@contiguous', steps=3)
  assert plan.positions == 'contiguous' and plan.steps == 3
  assert plan.encoding.extrapolation == 'yarn' and plan.encoding.dype
  assert sweep.method_plan(rpe, 'ntk').positions == rpe.positions.inference
  grid = tiny_config(synthetic_animals)
  grid.positions.train = 'grid'
  assert sweep.method_plan(grid, 'tasr').positions == 'grid'
  assert sweep.method_plan(grid, 'pi+native').encoding.sincos == 'native'
  assert sweep.method_plan(grid, 'pi').encoding.sincos == 'method'
  with pytest.raises(ValueError, match="RPE-2D position rule 'uniform'.*positions.train='grid'"):
    sweep.method_plan(grid, 'uniform')


def test_canonical_plan_merges_exactly_the_no_op_methods(micro_model):
  # micro_model: patch 2, train grid 4x4, position range 8x8 -> scale 1 up to 16x16 pixels.
  yarn = sweep.method_plan(config_lib.base(), 'dy-yarn')
  assert sampler.canonical_plan(micro_model, yarn, 16, 16).encoding == rope.Encoding()
  assert sampler.canonical_plan(micro_model, yarn, 16, 24) == yarn  # 12 tokens > 8 on x
  log_n = sampler.SamplingPlan(encoding=rope.Encoding(attention_scale='log_n'))
  assert sampler.canonical_plan(micro_model, log_n, 16, 16) == log_n
  # Tokens filling the 8x8 range: uniform, random and contiguous all give 0..7 on each axis.
  keys = sampler.example_keys(jax.random.key(0), jnp.arange(2))
  for rule in ('uniform', 'random'):
    plan = sampler.SamplingPlan(positions=rule)
    assert sampler.canonical_plan(micro_model, plan, 16, 16).positions == 'contiguous'
    np.testing.assert_array_equal(
        sampler.sampling_positions(micro_model, plan, 16, 16, keys),
        sampler.sampling_positions(micro_model, sampler.SamplingPlan(positions='contiguous'), 16,
                                   16, keys))
    assert sampler.canonical_plan(micro_model, plan, 16, 12).positions == rule


def test_fit_methods_set_every_field_of_their_encoding(micro_model):
  """fit-<name>[-decouple] is FiT's sampler option whatever the run's own encoding says."""
  config = config_lib.base()
  config.encoding.update(yarn_form='paper', attention_scale='log_n', axis_scale='shared',
                         temperature='logits', dype=True, extrapolation='ntk')
  assert sweep.method_plan(config, 'fit-yarn-decouple').encoding == rope.Encoding(
      'yarn', yarn_form='index', temperature='rope_max', axis_scale='per_axis')
  ntkpro2 = sweep.method_plan(config, 'FiT-ntkpro2')
  assert ntkpro2.encoding == rope.Encoding('ntk', attention_scale='fit_tokens', axis_scale='shared')
  # FiT's attention scale is not 1 at the native size: never merged with 'none' there.
  assert sampler.canonical_plan(micro_model, ntkpro2, 8, 8) == ntkpro2
  assert 'fit-linear' in sweep.METHODS and 'fit-linear' not in sweep.DEFAULT_METHODS


def test_resize():
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  up = sweep.resize(images, 16, 24, 'nearest')
  assert up.shape == (3, 16, 24, 1) and up.dtype == np.uint8
  np.testing.assert_array_equal(up[:, ::2, ::3], images)
  assert sweep.resize(images, 8, 8, 'bicubic') is images
  assert sweep.resize(images, 4, 4, 'box').shape == (3, 4, 4, 1)
  with pytest.raises(ValueError, match="resize_filter='cubic' is not known; allowed: nearest"):
    sweep.resize(images, 4, 4, 'cubic')


def test_sample_size_warnings():
  features = np.random.default_rng(0).normal(size=(100, 4))
  reference = sweep.Reference(dict(height=32, width=32), *metrics.feature_statistics(features),
                                   features)
  too_many, small = sweep.sample_size_warnings(200, reference)
  assert 'num_samples=200 is larger than the reference (100 images at 32x32)' in too_many
  assert 'FID on 100 < 2048 images is biased upward' in small
  assert sweep.sample_size_warnings(50, reference) == [
      'FID on 50 < 2048 images is biased upward: compare only cells with the same N, and prefer '
      'KID, which is unbiased']


def test_markdown_table_marks_shared_and_missing_cells():
  rows = [dict(run='a', method='none', height=8, width=8, fid=10.0, same_as=None),
          dict(run='a', method='pi', height=8, width=8, fid=10.0, same_as='none'),
          dict(run='a', method='pi', height=16, width=16, fid=float('nan'), same_as=None)]
  table = sweep.markdown_table(rows, [(8, 8), (16, 16)], 'fid').splitlines()
  assert table[0] == '| run | method | 8×8 | 16×16 |'
  assert table[2] == '| a | none | 10.0 | n/a |'
  assert table[3] == '| a | pi | 10.0 † | — |'


# ------------------------------------------------------------------------------------------------
# The command, end to end with the real Inception network.


@pytest.fixture(scope='module')
def runs(tiny_run, tmp_path_factory):
  """conftest's tiny_run (a 2-step micro/4 RPE-2D run, 16x16, range 8x8 tokens) and the same
  weights as a grid run."""
  root = tmp_path_factory.mktemp('runs')
  shutil.copytree(tiny_run, root / 'rpe')
  shutil.copytree(tiny_run, root / 'grid')
  edit_run_config(root / 'grid', lambda config: config['positions'].update(train='grid'))
  return root


def evaluate(*args, env, cwd=REPO):
  return subprocess.run([sys.executable, str(REPO / 'evaluate.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def test_sweep_writes_every_report_and_reuses_cells(runs, jax_cache_dir, tmp_path):
  # XLA's optimisations on: the Inception features of its 18 rows are most of the time.
  env = subprocess_env(jax_cache_dir, optimized=True)
  args = [f'--runs={runs / "rpe"},{runs / "grid"}', '--resolutions=16,48',
          '--methods=none,yarn,dy-yarn,uniform,random', '--num_samples=5', '--num_reference=4',
          '--steps=2', '--inception_batch_size=5', f'--outdir={tmp_path / "out"}']
  first = evaluate(*args, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stderr.count('num_samples=5 is larger than the reference (4 images at 16x16)') == 1
  assert first.stderr.count('FID on 4 < 2048 images is biased upward') == 1
  # Progress per cell: what is sampled, then measured, before its numbers.
  for line in ('[1/16] rpe 16x16 none: sampling 5 images at 16x16 (positions=',
               '[1/16] rpe 16x16 none: Inception features of the 5 samples',
               '[1/16] rpe 16x16 none: FID ', '[16/16] grid 48x48 dy-yarn: FID '):
    assert line in first.stdout, (line, first.stdout[-3000:])
  out = tmp_path / 'out'
  with open(out / 'results.csv', encoding='utf-8') as f:
    rows = {(r['run'], r['method'], r['height']): r for r in csv.DictReader(f)}
  # rpe: 5 methods x 2 sizes; grid: 3 methods (no position rules) x 2; real: 2 sizes.
  assert len(rows) == 10 + 6 + 2
  # 12 tokens do not fit 8 distinct random positions: n/a, said in the table.
  assert rows[('rpe', 'random', '48')]['fid'] == ''
  for key, row in rows.items():
    if key != ('rpe', 'random', '48'):
      assert np.isfinite(float(row['fid'])) and 0 <= float(row['precision']) <= 1, key
  # Scale 1 (RPE-2D at 16 and grid at 16): yarn and dy-yarn are 'none'. Beyond it they differ.
  for run in ('rpe', 'grid'):
    assert rows[(run, 'yarn', '16')]['same_as'] == 'none'
    assert rows[(run, 'yarn', '16')]['fid'] == rows[(run, 'none', '16')]['fid']
    assert rows[(run, 'yarn', '48')]['same_as'] == ''
    # A 2-step model barely depends on positions, so compare the samplings, not the scores.
    assert len({rows[(run, m, '48')]['key'] for m in ('none', 'yarn', 'dy-yarn')}) == 3
  assert rows[('rpe', 'uniform', '48')]['same_as'] == 'none'  # the run's own rule
  assert rows[('rpe', 'random', '16')]['same_as'] == ''
  markdown = (out / 'results.md').read_text()
  assert '| rpe | random | ' in markdown and '## KID' in markdown
  assert "rpe random at 48x48 is n/a: positions='random' draws distinct positions" in markdown
  assert (out / 'fid_vs_resolution.png').stat().st_size > 10_000
  for row in rows.values():
    if row['grid']:
      assert (out / row['grid']).is_file()
  assert (out / 'grids' / 'grid' / '48x48_dy-yarn.png').is_file()

  cells = {p: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')}
  assert len(cells) == 5 + 4  # distinct samplings generated: rpe 2 + 3, grid 1 + 3
  second = evaluate(*args, env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count('(reused)') == 15 and 'images/s' not in second.stdout
  assert {p: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')} == cells


@pytest.mark.parametrize('args,message', [
    (['--runs={missing}'], 'has no config.json: not a training run'),
    (['--methods=none,linear'], "unknown method 'linear'"),
    (['--runs={grid}', '--methods=uniform,random'],
     "no method in --methods=uniform,random applies to these runs"),
    (['--resolutions=18'], 'not divisible by the patch size 4'),
    (['--reference_npz=16x16:{bad_npz}'], "key 'mu' has shape (10,), expected (2048,)"),
    (['--num_samples=1'], '--num_samples=1 must be >= 4'),
    # tests/test_faults.py: what could once fail only after the sampling, or give a false number
    (['--num_samples=3'], '--num_samples=3 must be >= 4 (precision and recall use the k = 3'),
    (['--num_reference=2'], '--num_reference=2 must be 0 (the whole split) or >= 4'),
    (['--real_split=nosuch'], "--real_split=nosuch: split='nosuch' is not readable"),
    (['--split=nosuch'], "--split=nosuch: split='nosuch' is not readable"),
    (['--cfg_scale=nan'], '--cfg_scale=nan must be a finite number in [0.0, 100.0]'),
    (['--steps=0'], '--steps=0 must be a positive integer'),
    (['--sampler=dopri5', '--rtol=-1'], '--rtol=-1.0 must be a finite number in (0.0, 1.0]'),
    (['--seed=-1'], '--seed=-1 must be an integer in [0, 2**64)'),
    (['--batch_size=0'], '--batch_size=0 must be a positive integer'),
    (['--reference_npz=16x16:{negative_npz}'], "is not a covariance: it has a negative eigenvalue"),
    (['--reference_npz=16x16:{asymmetric_npz}'], 'is not a covariance: it is not symmetric'),
])
def test_bad_input_exits_2_before_any_work(runs, warm_scripts, tmp_path, args, message):
  # Each refusal is its own process, forked from conftest's warm_scripts (no re-imports).
  bad_npz = tmp_path / 'bad.npz'
  np.savez(bad_npz, mu=np.zeros(10), sigma=np.eye(10))
  values = dict(missing=tmp_path / 'missing', grid=runs / 'grid', bad_npz=bad_npz)
  for name, sigma in (('negative_npz', lambda: -np.eye(2048)),
                      ('asymmetric_npz', lambda: np.eye(2048) + np.triu(np.ones((2048, 2048))))):
    if '{' + name + '}' in ' '.join(args):
      values[name] = tmp_path / f'{name}.npz'
      np.savez(values[name], mu=np.zeros(2048), sigma=sigma())
  args = [a.format(**values) for a in args]
  if not any(a.startswith('--runs') for a in args):
    args.append(f'--runs={runs / "rpe"}')
  if not any(a.startswith('--resolutions') for a in args):
    args.append('--resolutions=16')
  result = warm_scripts.run([REPO / 'evaluate.py', *args, f'--outdir={tmp_path / "out"}'],
                            cwd=REPO)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'out').exists()
