"""FID, KID, precision and recall of trained runs across resolutions and position methods.

  python evaluate.py --runs=runs/grid,runs/rpe2d --resolutions=16,32,64,96 --outdir=runs/eval
  python evaluate.py --runs=runs/rpe2d --resolutions=64x128 --methods=uniform,yarn,dy-yarn
  python evaluate.py --runs=runs/in256 --resolutions=256 \
      --reference_npz=256x256:VIRTUAL_imagenet256_labeled.npz

Writes <outdir>/results.{json,csv,md}, fid_vs_resolution.png and grids/<run>/<HxW>_<method>.png.
Methods are listed in rpe2d/evaluation.py. The reference at each resolution is the --split of the
run's data set resized with --resize_filter (or an ADM .npz); a 'real' row measures --real_split
images against it, the floor a model can reach at this N. Cells already computed are reused.
"""

import pathlib
import shutil
import sys

from absl import app, flags, logging
from rpe2d import data, evaluation, inception, inference, sampler

_RUNS = flags.DEFINE_list('runs', None, 'Training run directories.', required=True)
_RESOLUTIONS = flags.DEFINE_list('resolutions', None, 'Sizes: 64 (square) or HxW.', required=True)
_METHODS = flags.DEFINE_list('methods', list(evaluation.METHODS),
                             'Methods; position rules apply to RPE-2D runs only.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Generated images per cell.')
_NUM_REFERENCE = flags.DEFINE_integer('num_reference', 0, 'Reference images (0: the whole split).')
_SPLIT = flags.DEFINE_string('split', 'test', 'The held-out split the reference is made from.')
_REAL_SPLIT = flags.DEFINE_string('real_split', 'train',
                                  "Real images for the 'real' row (empty: no such row).")
_RESIZE_FILTER = flags.DEFINE_enum('resize_filter', 'bicubic', list(evaluation.RESIZE_FILTERS),
                                   'How real images are resized to each resolution (PIL).')
_REFERENCE_NPZ = flags.DEFINE_list('reference_npz', [],
                                   'HxW:path of ADM-style mu/sigma statistics, instead of a split.')
_OUTDIR = flags.DEFINE_string('outdir', 'runs/evaluation', 'Results, grids and the cell cache.')
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed; every cell of a run uses the same noise.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per sampling batch.')
_INCEPTION_BATCH_SIZE = flags.DEFINE_integer('inception_batch_size', 50,
                                             'Images per Inception batch.')
_STEPS = flags.DEFINE_integer('steps', None, "Sampler steps (default: each run's config).")
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, "Guidance scale (default: each run's config).")
_SAMPLER = flags.DEFINE_enum('sampler', None, list(sampler.SAMPLERS), 'ODE solver.')
_NOEMA = flags.DEFINE_bool('noema', False, 'Use the raw weights instead of the EMA weights.')


def parse_resolutions(texts, patch_sizes) -> list[tuple[int, int]]:
  resolutions = []
  for text in texts:
    text = text if 'x' in text.lower() else f'{text}x{text}'
    for patch in patch_sizes:
      resolution = inference.parse_resolution(text, patch)
    resolutions.append(resolution)
  return resolutions


def parse_reference_npz(entries) -> dict:
  references = {}
  for entry in entries:
    size, sep, path = entry.partition(':')
    if not sep:
      raise ValueError(f'--reference_npz entry {entry!r} must be HxW:path.npz')
    height, width = inference.parse_resolution(size, 1)
    references[(height, width)] = evaluation.npz_reference(path)
  return references


def plan_cells(runs, names, resolutions, methods, overrides):
  """[(run name, method, (h, w), plan or None, note)] for every requested cell, before any work."""
  cells = []
  for name, run in zip(names, runs):
    for method in methods:
      try:
        plan = evaluation.method_plan(run.config, method, **overrides)
      except ValueError as e:
        if evaluation.parse_method(method)[1] is None:
          raise
        logging.warning('skipping %s for %s: %s', method, name, e)
        continue
      for height, width in resolutions:
        try:
          sampler.check_resolution(run.model, plan, height, width)
        except ValueError as e:  # e.g. random positions that do not fit: an n/a cell
          cells.append((name, method, (height, width), None, str(e)))
          continue
        cells.append((name, method, (height, width),
                      evaluation.canonical_plan(run.model, plan, height, width), ''))
  if not cells:
    raise ValueError(f'no method in --methods={",".join(methods)} applies to these runs')
  return cells


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    if _NUM_SAMPLES.value < 2:
      raise ValueError(f'--num_samples={_NUM_SAMPLES.value} must be >= 2 (a covariance)')
    if _NUM_REFERENCE.value < 0:
      raise ValueError(f'--num_reference={_NUM_REFERENCE.value} must be >= 0')
    for method in _METHODS.value:
      evaluation.parse_method(method)
    names = [pathlib.Path(r).name for r in _RUNS.value]
    if len(set(names)) != len(names):
      raise ValueError(f'--runs={_RUNS.value}: run directories need distinct names')
    runs = [inference.load_run(r, use_ema=not _NOEMA.value) for r in _RUNS.value]
    resolutions = parse_resolutions(_RESOLUTIONS.value, {run.model.patch_size for run in runs})
    npz_references = parse_reference_npz(_REFERENCE_NPZ.value)
    overrides = {k: v for k, v in (('steps', _STEPS.value), ('cfg_scale', _CFG_SCALE.value),
                                   ('sampler', _SAMPLER.value)) if v is not None}
    cells = plan_cells(runs, names, resolutions, _METHODS.value, overrides)
    network = inception.InceptionV3(batch_size=_INCEPTION_BATCH_SIZE.value)
  except (ValueError, FileNotFoundError, inception.WeightsUnavailableError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  outdir = pathlib.Path(_OUTDIR.value)
  limit = _NUM_REFERENCE.value or None
  references = {}

  def reference_for(run, resolution):
    if resolution in npz_references:
      return npz_references[resolution]
    key = (run.config.data.name, run.config.data.image_size, resolution)
    if key not in references:
      print(f'reference: {_SPLIT.value} split of {key[0]} at {resolution[0]}x{resolution[1]} '
            f'({_RESIZE_FILTER.value})', flush=True)
      references[key] = evaluation.split_reference(
          run.config.data, _SPLIT.value, *resolution, resize_filter=_RESIZE_FILTER.value,
          limit=limit, cache_dir=outdir / 'reference', feature_fn=network)
    return references[key]

  by_name = dict(zip(names, runs))
  class_names = {name: data.class_names(run.config.data) for name, run in by_name.items()}
  notes = sorted({note for name in names for resolution in resolutions
                  for note in evaluation.sample_size_warnings(
                      _NUM_SAMPLES.value, reference_for(by_name[name], resolution))})
  for note in notes:
    logging.warning('%s', note)
    print(f'warning: {note}', file=sys.stderr, flush=True)

  rows, first_method = [], {}
  unique = len({(n, r, p) for n, _, r, p, _ in cells if p is not None})
  print(f'{len(cells)} cells, {unique} distinct samplings of {_NUM_SAMPLES.value} images',
        flush=True)
  for name, method, (height, width), plan, note in cells:
    row = dict(run=name, method=method, height=height, width=width,
               num_samples=_NUM_SAMPLES.value, same_as=None, note=note)
    if plan is None:
      print(f'{name} {height}x{width} {method}: n/a ({note})', flush=True)
      rows.append(row)
      continue
    run = by_name[name]
    first = first_method.setdefault((name, (height, width), plan), method)
    row['same_as'] = None if first == method else first
    record = evaluation.evaluate_cell(
        run, plan, height, width, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        reference=reference_for(run, (height, width)), cell_dir=outdir / 'cells',
        feature_fn=network, batch_size=_BATCH_SIZE.value, class_names=class_names[name])
    row.update({k: record.get(k) for k in ('fid', 'kid', 'precision', 'recall', 'key')})
    grid = outdir / 'grids' / name / f'{height}x{width}_{method.replace("@", "_at_")}.png'
    grid.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outdir / 'cells' / f'{record["key"]}.png', grid)
    row['grid'] = str(grid.relative_to(outdir))
    rows.append(row)
    how = 'reused' if record['reused'] else f'{record["images_per_second"]:.2f} images/s'
    print(f'{name} {height}x{width} {method}: FID {evaluation.format_number(row["fid"], 1, 2)}'
          f'  KID {evaluation.format_number(row["kid"], 1, 4)}'
          f'  P {evaluation.format_number(row["precision"], 1, 2)}'
          f'  R {evaluation.format_number(row["recall"], 1, 2)}  ({how})', flush=True)

  if _REAL_SPLIT.value:
    real_config = runs[0].config.data
    for resolution in resolutions:
      reference = reference_for(runs[0], resolution)
      real = evaluation.split_reference(
          real_config, _REAL_SPLIT.value, *resolution, resize_filter=_RESIZE_FILTER.value,
          limit=_NUM_SAMPLES.value, cache_dir=outdir / 'reference', feature_fn=network)
      rows.append(dict(run='real', method=f'{_REAL_SPLIT.value} split', height=resolution[0],
                       width=resolution[1], num_samples=len(real.features), same_as=None,
                       **evaluation.image_metrics(real.features, reference)))
  evaluation.write_reports(outdir, rows, resolutions, notes)
  print(f'results: {outdir / "results.md"}, {outdir / "results.csv"}, '
        f'{outdir / "fid_vs_resolution.png"}', flush=True)


if __name__ == '__main__':
  app.run(main)
