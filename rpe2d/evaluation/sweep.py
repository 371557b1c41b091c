"""Resolution sweeps: runs x resolutions x methods -> FID, KID, precision and recall.

`run(...)` is what evaluate.py calls. A method says how a run samples off its training grid:

  none | pi | ntk | yarn | tasr      static extrapolation (docs/methods.md#encodings)
  dy-pi | dy-ntk | dy-yarn           DyPE (docs/methods.md#dype)
  fit-<name>[-decouple]              FiT's sampler's --interpolation <name> [--decouple], name one
                                     of linear, dynntk, partntk, yarn, ntkpro1, ntkpro2
                                     (docs/methods.md#fits-options)
  uniform | contiguous | random      an RPE-2D inference position rule, no extrapolation
  <method>@<rule>                    both, e.g. dy-yarn@contiguous

Extrapolation methods keep the run's own position rule ('grid' for grid runs, the config's rule for
RPE-2D runs). Position rules need an RPE-2D run; for a grid run those cells are skipped. The
sampler and its settings (steps, tolerances, the SDE's), and CFG come from the run's config, with
the same overrides for every cell.

A cell (run, method, resolution) is generated from a sampling plan. Methods are exact no-ops where
the extrapolation scale is 1 on both axes (rope.axis_positions_and_frequencies returns its inputs),
and the RPE-2D rules coincide where the tokens fill the trained range, so the plan is canonicalised
first (sampler.canonical_plan, which also drops the settings the sampler does not read) and cells
with the same canonical plan share one set of samples and numbers; the table marks them. Each
computed cell is stored as <outdir>/cells/<key>.json under a key of everything that determines it
(checkpoint, the plan's sampler.key_text, resolution, N, seed, reference), so a rerun computes only
what is new.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil
import sys
import time
import zipfile

from absl import logging
import jax
import numpy as np
from PIL import Image

from rpe2d import config as config_lib, data, files, images as images_lib, inference, positions
from rpe2d import rope, sampler
from rpe2d.evaluation import batches, inception, metrics, shards

EXTRAPOLATIONS = {
    **{name: dict(extrapolation=name) for name in rope.EXTRAPOLATIONS},
    **{f'dy-{name}': dict(extrapolation=name, dype=True) for name in rope.DYPE_EXTRAPOLATIONS},
    **{f'fit-{name}' + ('-decouple' if decouple else ''): rope.fit_interpolation(name, decouple)
       for name in rope.FIT_INTERPOLATIONS for decouple in (False, True)},
}
METHODS = tuple(EXTRAPOLATIONS) + positions.INFERENCE_RULES
# What evaluate.py sweeps unless told: rpe2d's own methods, not FiT's settings (named on request).
DEFAULT_METHODS = tuple(m for m in METHODS if not m.startswith('fit-'))
RESIZE_FILTERS = {'nearest': Image.Resampling.NEAREST, 'box': Image.Resampling.BOX,
                  'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
                  'lanczos': Image.Resampling.LANCZOS}
# Below this many images the 2048-d covariance is rank deficient and FID is biased upward.
STABLE_FID_IMAGES = 2048
GRID_IMAGES_PER_CLASS = 4
MAX_SAMPLES = 2**31 - 1  # example indices are int32
LOCK = 'evaluate.lock'  # held (fcntl.flock) by the one evaluate.py writing an --outdir
DAMAGED_SUFFIX = '.damaged'  # a cache file that could not be read, kept for inspection
# Part of every cell's and reference's key: cells measured before sFID are measured again.
FEATURES_VERSION = 'pool3+mixed_6/conv'
SHARD_SIZE = 1000  # examples per shard of a cell (what a killed evaluation keeps)


def parse_method(text: str) -> tuple[str, str | None]:
  """'dy-yarn@contiguous' -> ('dy-yarn', 'contiguous'); 'uniform' -> ('none', 'uniform'). A
  sin-cos rule after the name ('pi+native', rope.SINCOS_RULES) is checked here and read by
  `sincos_rule`."""
  head, _, rule = text.strip().lower().partition('@')
  name, plus, sincos = head.partition('+')
  if name in positions.INFERENCE_RULES and not rule:
    name, rule = 'none', name
  if name not in EXTRAPOLATIONS:
    raise ValueError(f'unknown method {text!r}; allowed: {", ".join(METHODS)}, or '
                     f'<extrapolation>[+<{"|".join(rope.SINCOS_RULES)}>]'
                     f'@<{"|".join(positions.INFERENCE_RULES)}>')
  if plus and sincos not in rope.SINCOS_RULES:
    raise ValueError(f'unknown sin-cos rule {sincos!r} in method {text!r}; allowed: '
                     f'{", ".join(rope.SINCOS_RULES)}')
  if rule and rule not in positions.INFERENCE_RULES:
    raise ValueError(f'unknown position rule {rule!r} in method {text!r}; allowed: '
                     f'{", ".join(positions.INFERENCE_RULES)}')
  return name, rule or None


def distinct_methods(methods) -> list[str]:
  """--methods with repeats (and synonyms: 'uniform' is 'none@uniform') dropped, with a note; each
  is checked by parse_method."""
  seen, kept = {}, []
  for method in methods:
    key = parse_method(method)
    if key in seen:
      continue
    seen[key] = method
    kept.append(method)
  if len(kept) != len(methods):
    print(f'note: --methods lists {",".join(methods)}; each method is evaluated once: '
          f'{",".join(kept)}', flush=True)
  return kept
def sincos_rule(text: str) -> str | None:
  """The sin-cos rule a method names after a '+' ('pi+native' -> 'native'), None without one."""
  name, plus, sincos = text.strip().lower().partition('@')[0].partition('+')
  del name
  return sincos if plus else None


def method_plan(config, method: str, **overrides) -> sampler.SamplingPlan:
  """The run's sampling plan with the method's encoding (and sin-cos rule) and position rule.

  Raises ValueError when the method needs an RPE-2D run and this one is not.
  """
  name, rule = parse_method(method)
  if rule and config.positions.train != 'rpe2d':
    raise ValueError(f'method {method!r} uses the RPE-2D position rule {rule!r}; this run was '
                     f'trained with positions.train={config.positions.train!r}')
  fields = dict(EXTRAPOLATIONS[name])
  if sincos_rule(method):
    fields['sincos'] = sincos_rule(method)
  plan = dict(overrides, encoding=config_lib.encoding(config, **fields))
  if rule:
    plan['positions'] = rule
  return config_lib.sampling_plan(config, **plan)


def _key(description: dict) -> str:
  return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# References.


@dataclasses.dataclass(frozen=True)
class Reference:
  """Statistics of the real images at one resolution: pool3 (FID) and, where known, spatial
  (sFID); the pool3 features of its images when it has images (KID, precision, recall)."""
  description: dict
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  spatial: np.ndarray | None = None

  @property
  def size(self) -> int | None:
    return None if self.features is None else len(self.features)


def resize(images: np.ndarray, height: int, width: int, resize_filter: str) -> np.ndarray:
  """uint8 (N, h, w, C) -> (N, height, width, C) with a PIL filter (antialiased when shrinking)."""
  if resize_filter not in RESIZE_FILTERS:
    raise ValueError(f'resize_filter={resize_filter!r} is not known; allowed: '
                     f'{", ".join(RESIZE_FILTERS)}')
  if images.shape[1:3] == (height, width):
    return images
  out = [np.asarray(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
                    .resize((width, height), RESIZE_FILTERS[resize_filter]))
         for image in images]
  return np.stack(out).reshape(len(images), height, width, images.shape[-1])


def split_images(data_config, split: str, limit: int | None = None):
  """The first `limit` images (uint8, at data.image_size) and labels of a split, in record order."""
  dataset = data.make_dataset(data_config, split=split, seed=0, global_batch_size=256,
                              process_index=0, process_count=1, train=False, num_epochs=1)
  pixels, labels, count = [], [], 0
  for batch in dataset:
    pixels.append(images_lib.to_uint8(batch['image']))
    labels.append(batch['label'])
    count += len(batch['label'])
    if limit and count >= limit:
      break
  return np.concatenate(pixels)[:limit], np.concatenate(labels)[:limit]


def split_reference(data_config, split: str, height: int, width: int, *, resize_filter: str,
                    limit: int | None, cache_dir, feature_fn) -> Reference:
  """Inception features of a data set split resized to (height, width), cached as .npz."""
  description = dict(kind='split', data=data_config.name, image_size=data_config.image_size,
                     channels=data_config.channels, split=split, height=height, width=width,
                     resize_filter=resize_filter, limit=limit, features=FEATURES_VERSION)
  path = pathlib.Path(cache_dir) / f'{data_config.name}_{split}_{height}x{width}_' \
                                   f'{resize_filter}_{limit or "all"}_{_key(description)}.npz'
  cached = _read_reference_cache(path) if path.exists() else None
  if cached is not None:
    mu, sigma, features, spatial = cached
  else:
    pixels, _ = split_images(data_config, split, limit)
    print(f'  {len(pixels)} {split} images -> {height}x{width} ({resize_filter}) -> Inception '
          'features (compiled once per size)', flush=True)
    features, spatial = inception.extract(feature_fn,
                                          resize(pixels, height, width, resize_filter))
    mu, sigma = metrics.feature_statistics(features)
    extra = {} if spatial is None else dict(spatial=spatial)
    metrics.save_reference_npz(path, mu, sigma, features=features, **extra)
  description['size'] = len(features)
  mu_s, sigma_s = (None, None) if spatial is None else metrics.feature_statistics(spatial)
  return Reference(description, mu, sigma, features, mu_s, sigma_s, spatial)


def _set_aside(path: pathlib.Path, problem: str) -> None:
  """A damaged cache file is moved to <name>.damaged (kept for inspection), with a warning naming
  it; what it held is computed again."""
  aside = path.with_name(path.name + DAMAGED_SUFFIX)
  path.replace(aside)
  print(f'warning: the cache file {path} is damaged ({problem}): moved it to {aside.name} and '
        'computing it again', file=sys.stderr, flush=True)


def _read_reference_cache(path: pathlib.Path):
  """(mu, sigma, features, spatial or None) of a cached reference, or None (set aside, with a
  warning) when it is damaged."""
  try:
    mu, sigma = metrics.load_reference_npz(path)
    with np.load(path, allow_pickle=False) as cached:
      features = np.asarray(cached['features'])
      spatial = np.asarray(cached['spatial']) if 'spatial' in cached.files else None
    if features.ndim != 2 or features.shape[1] != mu.shape[0] or not np.isfinite(features).all():
      raise ValueError(f'features of shape {features.shape}')
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    _set_aside(path, cli_reason(e))
    return None
  return mu, sigma, features, spatial


def cli_reason(error) -> str:
  from rpe2d import cli  # pylint: disable=g-import-not-at-top
  return cli.reason(error)


def npz_reference(path) -> Reference:
  """ADM-style statistics: mu, sigma, and mu_s, sigma_s where present (FID, sFID). When the file
  also holds images (`arr_0`, ADM's reference batches), `with_batch_images` adds their features
  (KID, precision and recall, as ADM measures them)."""
  stats = batches.read_statistics(path)
  if 'mu' not in stats:
    mu, sigma = metrics.load_reference_npz(path)  # its error names the missing key
    stats.update(mu=mu, sigma=sigma)
  for key in ('sigma', 'sigma_s'):
    if key in stats:
      metrics.check_covariance(stats[key], f'{path}: key {key!r}')
  description = dict(kind='npz', path=str(pathlib.Path(path).absolute()))
  if batches.has_images(path):
    description['images'] = len(batches.image_array(path, '--reference_npz'))
  return Reference(description, stats['mu'], stats['sigma'], mu_s=stats.get('mu_s'),
                   sigma_s=stats.get('sigma_s'))


def with_batch_images(reference: Reference, network, cache_dir) -> Reference:
  """`reference` with the pool3 features of its batch's images (every process must call it)."""
  from rpe2d.evaluation import adm  # pylint: disable=g-import-not-at-top
  array = batches.image_array(reference.description['path'], '--reference_npz')
  features = adm.batch_features(array, network, cache_dir, what='reference batch')
  if features is None:  # not process 0: it measures
    return reference
  return dataclasses.replace(reference, features=features.pool)


def sample_size_warnings(num_samples: int, reference: Reference) -> list[str]:
  notes = []
  if reference.size is not None and num_samples > reference.size:
    notes.append(f'num_samples={num_samples} is larger than the reference ({reference.size} '
                 f'images at {reference.description["height"]}x{reference.description["width"]}): '
                 f'FID is then limited by the reference; use at most {reference.size}')
  smallest = min(num_samples, reference.size or num_samples)
  if smallest < STABLE_FID_IMAGES:
    notes.append(f'FID on {smallest} < {STABLE_FID_IMAGES} images is biased upward: compare only '
                 f'cells with the same N, and prefer KID, which is unbiased')
  return notes


# ------------------------------------------------------------------------------------------------
# Cells.


def image_metrics(features, reference: Reference, classifier=None,
                  distances: str = 'float16') -> dict:
  """FID; sFID where both sides have spatial features; with reference features KID, precision and
  recall; with a classifier (`rpe2d.evaluation.classifier`) the Inception Score. Raises
  ValueError rather than return a value that is not finite, so no such number is ever cached."""
  pool, spatial = inception.as_features(features)
  result = dict(fid=metrics.fid(pool, (reference.mu, reference.sigma)))
  if spatial is not None and reference.mu_s is not None:
    result['sfid'] = metrics.fid(spatial, (reference.mu_s, reference.sigma_s))
  if reference.features is not None:
    result['kid'] = metrics.kid(pool, reference.features)
    result['precision'], result['recall'] = metrics.precision_recall(
        reference.features, pool, distances=distances)
  if classifier is not None:
    result['inception_score'] = metrics.inception_score(
        metrics.class_probabilities(pool, classifier.weights))
  bad = {k: v for k, v in result.items() if not np.isfinite(v)}
  if bad:
    raise ValueError(f'metrics {bad} are not finite')
  return result


def check_inputs(runs, resolutions, *, num_samples: int, num_reference: int | None, split: str,
                 real_split: str, npz_references) -> None:
  """Everything about the sweep's inputs that can fail, before any sampling: the sample counts
  the metrics need, and the splits the references and the 'real' row read."""
  needs_features = any(r not in npz_references for r in resolutions)
  least = metrics.PR_K + 1 if needs_features else 2
  if num_samples < least:
    raise ValueError(f'--num_samples={num_samples} must be >= {least}'
                     + (f' (precision and recall use the k = {metrics.PR_K} nearest other samples)'
                        if needs_features else ' (a covariance)'))
  if num_reference is not None and num_reference < metrics.PR_K + 1:
    raise ValueError(f'--num_reference={num_reference} must be 0 (the whole split) or >= '
                     f'{metrics.PR_K + 1} (precision and recall use k = {metrics.PR_K})')
  reads = [(flag, name) for flag, name in (('--split', split if needs_features else ''),
                                            ('--real_split', real_split)) if name]
  if not reads:  # .npz references everywhere and no 'real' row: no data set is read
    return
  for data_config in {id(c): c for c in (data.source_data_config(run.config.data)
                                          for run in runs)}.values():
    for flag, name in reads:
      try:
        size = data.split_size(data_config, name)
      except ValueError as e:
        raise ValueError(f'{flag}={name}: {e}') from None
      if size < metrics.PR_K + 1:
        raise ValueError(f'{flag}={name}: {data_config.name}[{name}] holds {size} images; the '
                         f'metrics need at least {metrics.PR_K + 1} (precision and recall use '
                         f'k = {metrics.PR_K}): use a larger split'
                         + (', or --real_split= for no real row' if flag == '--real_split' else ''))
      if flag == '--split' and num_reference is not None and num_reference > size:
        print(f'note: --num_reference={num_reference} is more than {data_config.name}[{name}] '
              f'holds; the reference is all its {size} images', flush=True)


def check_memory(runs, resolutions, *, num_samples: int, batch_size: int,
                 available: int | None) -> None:
  """A cell keeps its samples in memory for the Inception network: refuses, before any work, a
  sweep whose samples (and one batch's attention) cannot fit (inference.check_memory)."""
  for run in runs:
    for height, width in resolutions:
      inference.check_memory(run.model, height, width, num_samples=num_samples,
                             batch_size=batch_size, channels=3 if run.vae else
                             run.config.data.channels, factor=inference.downsampling(run),
                             available=available,
                             flags={'num_samples': '--num_samples', 'batch_size': '--batch_size',
                                    'attention': '--attention'})


def written_names(names, resolutions, methods) -> list[str]:
  """The longest names, relative to --outdir, of the files a sweep writes (temporary names
  included), so that an --outdir too long for them is refused before any work."""
  key = '0' * 16
  out = [f'cells/{key}.json.tmp.json', f'cells/{key}.json{DAMAGED_SUFFIX}', 'results.json.tmp.json',
         f'cells/{key}/shard_00000.npz.tmp.npz',
         f'reference/{"x" * 64}_{key}.npz.tmp.npz', 'fid_vs_resolution.png.tmp.png', LOCK,
         'evaluate.log']
  out += [f'grids/{name}/{h}x{w}_{method.replace("@", "_at_")}.png' for name in names
          for h, w in resolutions for method in methods]
  return out


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., C-1, 0, 1, ...: every contiguous run of examples is balanced over the classes to
  within one, so ADM's Inception Score chunks (5,000 in file order) see every class equally."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def cell_description(run, plan, height, width, num_samples, seed, reference) -> dict:
  return dict(checkpoint=str(run.checkpoint.absolute()), step=run.step, plan=sampler.key_text(plan),
              height=height, width=width, num_samples=num_samples, seed=seed,
              reference=reference.description, features=FEATURES_VERSION)


def _is_main() -> bool:
  return jax.process_index() == 0


def _read_cell(path: pathlib.Path) -> dict | None:
  """A cached cell's record, or None (set aside, with its grid) when it or its grid is damaged."""
  try:
    record = json.loads(path.read_bytes().decode('utf-8'))
    if not isinstance(record, dict) or not isinstance(record.get('description'), dict):
      raise ValueError('not a cell record')
    if not isinstance(record.get('fid'), (int, float)):
      raise ValueError('it holds no FID')
    with Image.open(path.with_suffix('.png')) as grid:
      grid.verify()
  except (OSError, ValueError, SyntaxError) as e:  # PIL's verify raises SyntaxError too
    _set_aside(path, cli_reason(e))
    return None
  return record


def evaluate_cell(run, plan, height, width, *, num_samples, seed, reference, cell_dir,
                  feature_fn, batch_size=64, class_names=None, label=None, classifier=None,
                  shard_size: int = SHARD_SIZE, distances: str = 'float16') -> dict | None:
  """Generates, measures and stores one cell (or reads it back); returns its record (None on the
  processes other than 0, which only compute their shards). With a `label`, says what it samples
  and measures as it goes.

  The samples are made and measured in shards of `shard_size` examples (rpe2d.evaluation.shards):
  every process computes its share, a killed evaluation keeps its finished shards, and process 0
  gathers the features, computes the metrics and writes `<cell_dir>/<key>.json` and the grid."""
  description = cell_description(run, plan, height, width, num_samples, seed, reference)
  key = _key(description)
  path = pathlib.Path(cell_dir) / f'{key}.json'
  record = _read_cell(path) if path.exists() else None
  if record is not None and record['description'] == description and (
      classifier is None or record.get('classifier_sha256') == classifier.sha256):
    record['reused'] = True
    return record
  labels = balanced_labels(num_samples, run.model.num_classes)
  shown = GRID_IMAGES_PER_CLASS * run.model.num_classes
  timing = dict(compile_seconds=0.0, generate_seconds=0.0, feature_seconds=0.0, evaluations=0.0,
                generated=0)

  def produce(start, stop):
    stats = {}
    began = time.perf_counter()
    generated = inference.generate(run, height=height, width=width, labels=labels[start:stop],
                                   seed=seed, plan=plan, batch_size=batch_size, stats=stats,
                                   progress=bool(label) and _is_main(), first_index=start)
    timing['generate_seconds'] += time.perf_counter() - began - stats['compile_seconds']
    timing['compile_seconds'] += stats['compile_seconds']
    timing['evaluations'] += stats['evaluations_per_image'] * (stop - start)
    timing['generated'] += stop - start
    began = time.perf_counter()
    features = inception.extract(feature_fn, generated)
    timing['feature_seconds'] += time.perf_counter() - began
    if not all(f is None or np.all(np.isfinite(f)) for f in features):
      raise inference.SamplingError(f'the Inception features of {stop - start} samples ({start}..'
                                    f'{stop - 1}) at {height}x{width} are not finite')
    return features, ({'images': generated[:shown - start]} if start < shown else {})

  if label and _is_main():
    print(f'{label}: sampling {num_samples} images at {height}x{width} (positions='
          f'{plan.positions}, extrapolation={plan.encoding.extrapolation}'
          f'{", dype" if plan.encoding.dype else ""}, {sampler.describe(plan)}, cfg '
          f'{plan.cfg_scale})', flush=True)
  shard_dir = pathlib.Path(cell_dir) / key
  log = (lambda text: print(f'{label}: process {jax.process_index()}: {text}', flush=True)) \
      if label and jax.process_count() > 1 else None
  shards.compute(shard_dir, key, num_samples, shard_size, produce, log=log)
  shards.barrier(f'rpe2d.sweep: cell {key} sampled')
  record = None
  if _is_main():
    if label:
      print(f'{label}: Inception features of the {num_samples} samples, FID/sFID/KID/P/R'
            + ('/IS' if classifier is not None else ''), flush=True)
    features, extras = shards.gather(shard_dir, key, num_samples, shard_size, produce)
    began = time.perf_counter()
    try:
      measured = image_metrics(features, reference, classifier, distances)
    except ValueError as e:
      raise inference.SamplingError(f'measuring {num_samples} samples at {height}x{width}: {e}') \
          from e
    if classifier is not None:
      measured['classifier_sha256'] = classifier.sha256
    rate = timing['generated'] / timing['generate_seconds'] if timing['generated'] else None
    record = dict(key=key, description=description, **measured, images_per_second=rate,
                  evaluations_per_image=(timing['evaluations'] / timing['generated']
                                         if timing['generated'] else None),
                  compile_seconds=timing['compile_seconds'],
                  generate_seconds=timing['generate_seconds'],
                  feature_seconds=timing['feature_seconds'] + time.perf_counter() - began)
    images = extras['images']
    inference.save(path.with_suffix('.png'), images, labels[:len(images)], class_names)
    with files.atomic_path(path) as tmp:
      tmp.write_text(json.dumps(record, indent=1))
    shutil.rmtree(shard_dir, ignore_errors=True)  # the record holds what they were for
    record['reused'] = False
  # Every process sees the record before the next cell (a later cell may share its key).
  shards.barrier(f'rpe2d.sweep: cell {key} written')
  return record


# ------------------------------------------------------------------------------------------------
# Reports.

METRICS = ('fid', 'sfid', 'kid', 'precision', 'recall', 'inception_score')
COLUMNS = ('run', 'method', 'height', 'width', 'num_samples') + METRICS + ('same_as', 'key', 'grid')


def format_number(value, scale=1.0, digits=1) -> str:
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return '—'
  return f'{value * scale:.{digits}f}'


def markdown_table(rows: list[dict], resolutions, metric: str, scale=1.0, digits=1) -> str:
  """One row per (run, method), one column per resolution; † marks cells sharing samples."""
  head = '| run | method | ' + ' | '.join(f'{h}×{w}' for h, w in resolutions) + ' |'
  lines = [head, '|' + ' --- |' * (2 + len(resolutions))]
  by_cell = {(r['run'], r['method'], r['height'], r['width']): r for r in rows}
  for run, method in dict.fromkeys((r['run'], r['method']) for r in rows):
    cells = []
    for h, w in resolutions:
      row = by_cell.get((run, method, h, w))
      if row is None or row.get('note'):  # not requested, or cannot be sampled (the note says why)
        cells.append('n/a')
      else:
        shared = ' †' if row['same_as'] else ''
        cells.append(format_number(row.get(metric), scale, digits) + shared)
    lines.append(f'| {run} | {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_reports(outdir, rows: list[dict], resolutions, notes: list[str]) -> None:
  outdir = pathlib.Path(outdir)
  with files.atomic_path(outdir / 'results.json') as tmp:
    tmp.write_text(json.dumps(dict(rows=rows, notes=notes), indent=1))
  with files.atomic_path(outdir / 'results.csv') as tmp:
    tmp.write_text(''.join(','.join('' if row.get(c) is None else str(row[c]) for c in COLUMNS)
                           + '\n' for row in [dict(zip(COLUMNS, COLUMNS))] + rows))
  sections = [
      '# Resolution sweep', '',
      '† the same sampling as an earlier row of the run (results.csv names it in `same_as`): the '
      "method changes nothing at this size (scale 1 on both axes), or it is the run's own "
      'position rule.', '',
      '## FID (lower is better)', '', markdown_table(rows, resolutions, 'fid'), '',
      '## sFID (spatial features; lower is better)', '',
      markdown_table(rows, resolutions, 'sfid'), '',
      '## KID ×10³ (unbiased; lower is better)', '',
      markdown_table(rows, resolutions, 'kid', 1e3, 2), '',
      '## Precision (k = 3)', '', markdown_table(rows, resolutions, 'precision', 1.0, 2), '',
      '## Recall (k = 3)', '', markdown_table(rows, resolutions, 'recall', 1.0, 2), '']
  if any(r.get('inception_score') is not None for r in rows):
    sections += ['## Inception Score (higher is better)', '',
                 markdown_table(rows, resolutions, 'inception_score', 1.0, 2), '']
  notes = notes + [f'{r["run"]} {r["method"]} at {r["height"]}x{r["width"]} is n/a: {r["note"]}'
                   for r in rows if r.get('note')]
  if notes:
    sections += ['## Notes', ''] + [f'- {n}' for n in notes] + ['']
  with files.atomic_path(outdir / 'results.md') as tmp:
    tmp.write_text('\n'.join(sections))
  with files.atomic_path(outdir / 'fid_vs_resolution.png') as tmp:
    plot(tmp, rows, resolutions)


def plot(path, rows: list[dict], resolutions) -> None:
  """FID against resolution: one panel per run, one line per method, real images dashed.

  Methods whose every cell shares another's sampling (†) would only redraw that line: left out.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [r for r in dict.fromkeys(row['run'] for row in rows) if r != 'real']
  figure, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4.2),
                              sharey=True, squeeze=False)
  labels = [f'{h}×{w}' for h, w in resolutions]
  measured = [r for r in rows if r.get('fid') is not None]
  real = {(r['height'], r['width']): r['fid'] for r in measured if r['run'] == 'real'}
  for axis, run in zip(axes[0], runs):
    methods = list(dict.fromkeys(r['method'] for r in measured if r['run'] == run
                                 and not r['same_as']))
    axis.set_prop_cycle(color=plt.get_cmap('tab10').colors[:len(methods)] if len(methods) <= 10
                        else plt.get_cmap('tab20').colors)
    for method in methods:
      points = {(r['height'], r['width']): r['fid'] for r in measured
                if r['run'] == run and r['method'] == method}
      xs = [i for i, res in enumerate(resolutions) if res in points]
      axis.plot(xs, [points[resolutions[i]] for i in xs], marker='o', label=method,
                linestyle=':' if method.startswith('dy-') else '-')
    if real:
      xs = [i for i, res in enumerate(resolutions) if res in real]
      axis.plot(xs, [real[resolutions[i]] for i in xs], 'k--', label='real images')
    axis.set_title(run)
    axis.set_xticks(range(len(resolutions)), labels)
    axis.set_xlabel('resolution')
    axis.set_yscale('log')
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  axes[0][0].set_ylabel('FID')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


# ------------------------------------------------------------------------------------------------
# The sweep.


def parse_resolutions(texts, patch_sizes) -> list[tuple[int, int]]:
  """'64' (square) or 'HxW' -> (height, width) pixels, checked against every run's patch size
  (an int, or (patch, VAE downsampling) for a latent run)."""
  resolutions = []
  for text in texts:
    text = text if 'x' in text.lower() else f'{text}x{text}'
    for patch in patch_sizes:
      resolution = inference.parse_resolution(text, *(patch if isinstance(patch, tuple) else
                                                       (patch,)))
    resolutions.append(resolution)
  return resolutions


def parse_reference_npz(entries, resolutions=None) -> dict:
  """['HxW:path.npz', ...] -> {(height, width): Reference}. Two entries for one size, or (given
  the evaluated `resolutions`) an entry for a size not evaluated, are refused before any file is
  read."""
  paths = {}
  for entry in entries:
    size, sep, path = entry.partition(':')
    if not sep:
      raise ValueError(f'--reference_npz entry {entry!r} must be HxW:path.npz')
    size = size if 'x' in size.lower() else f'{size}x{size}'
    height, width = inference.parse_resolution(size, 1)
    if (height, width) in paths:
      raise ValueError(f'--reference_npz names two references for {height}x{width}; give one')
    if resolutions is not None and (height, width) not in resolutions:
      raise ValueError(f'--reference_npz entry {entry!r} is for {height}x{width}, which is not '
                       f'evaluated (--resolutions: {", ".join(f"{h}x{w}" for h, w in resolutions)}'
                       '); add the size to --resolutions or drop the entry')
    paths[(height, width)] = path
  return {size: npz_reference(path) for size, path in paths.items()}


def _reason(error) -> str:
  if isinstance(error, inference.SamplingError):
    return str(error)
  from rpe2d import cli  # pylint: disable=g-import-not-at-top
  return cli.reason(error)


def _class_names(run) -> list[str] | None:
  """The label names of the grids: those of the run's source data set when it is at hand; None
  (label ids) when it is not, e.g. an imported model evaluated against .npz references only."""
  try:
    return data.class_names(data.source_data_config(run.config.data))
  except (ValueError, OSError):
    return None


def plan_cells(runs, names, resolutions, methods, overrides):
  """[(run name, method, (h, w), plan or None, note)] for every requested cell, before any work."""
  cells = []
  for name, run in zip(names, runs):
    for method in methods:
      try:
        plan = method_plan(run.config, method, **overrides)
      except ValueError as e:
        if parse_method(method)[1] is None:
          raise
        logging.warning('skipping %s for %s: %s', method, name, e)
        continue
      for height, width in resolutions:
        try:
          size = inference.model_size(run, height, width)  # latents for a latent run
          sampler.check_resolution(run.model, plan, *size)
        except ValueError as e:  # e.g. random positions that do not fit: an n/a cell
          cells.append((name, method, (height, width), None, str(e)))
          continue
        cells.append((name, method, (height, width),
                      sampler.canonical_plan(run.model, plan, *size), ''))
  if not cells:
    raise ValueError(f'no method in --methods={",".join(methods)} applies to these runs')
  return cells


def run(runs, names, resolutions, cells, *, outdir, feature_fn, num_samples: int,
        num_reference: int | None = None, split: str = 'test', real_split: str = 'train',
        resize_filter: str = 'bicubic', npz_references=None, seed: int = 0,
        batch_size: int = 64, classifier=None, shard_size: int = SHARD_SIZE,
        distances: str = 'float16') -> list[dict] | None:
  """Computes (or reuses) every cell of `plan_cells`, writes the reports; returns the rows.

  Under the distributed runtime every process calls it with the same arguments: each samples its
  shards of every cell, process 0 measures and writes everything (and returns the rows; the
  others return None). `outdir` must then be shared by the processes."""
  outdir = pathlib.Path(outdir)
  npz_references = npz_references or {}
  references = {}
  main = _is_main()
  say = print if main else (lambda *args, **kwargs: None)

  def reference_for(run, resolution):
    if resolution in npz_references:
      return npz_references[resolution]
    # A latent run is compared with the real images its latents were made from.
    data_config = data.source_data_config(run.config.data)
    key = (data_config.name, data_config.image_size, resolution)
    if key not in references:
      say(f'reference: {split} split of {key[0]} at {resolution[0]}x{resolution[1]} '
          f'({resize_filter})', flush=True)
      references[key] = split_reference(
          data_config, split, *resolution, resize_filter=resize_filter, limit=num_reference,
          cache_dir=outdir / 'reference', feature_fn=feature_fn)
    return references[key]

  def real_reference(resolution):
    return split_reference(
        data.source_data_config(runs[0].config.data), real_split, *resolution,
        resize_filter=resize_filter, limit=num_samples, cache_dir=outdir / 'reference',
        feature_fn=feature_fn)

  by_name = dict(zip(names, runs))
  # ADM batches' images are measured by every process; splits by process 0, the others then read
  # its cache.
  for resolution, reference in list(npz_references.items()):
    if reference.description.get('images'):
      npz_references[resolution] = with_batch_images(reference, feature_fn, outdir / 'reference')
  for turn in ((0,) if jax.process_count() == 1 else (0, 1)):
    if main == (turn == 0):
      for name in names:
        for resolution in resolutions:
          reference_for(by_name[name], resolution)
          if real_split:
            real_reference(resolution)
    shards.barrier(f'rpe2d.sweep: references {turn}')
  class_names = {name: _class_names(run) for name, run in by_name.items()}
  notes = sorted({note for name in names for resolution in resolutions
                  for note in sample_size_warnings(num_samples,
                                                   reference_for(by_name[name], resolution))})
  notes += sorted({f'{name}: {note}' for name, _, _, plan, _ in cells if plan is not None
                   for note in rope.legacy_notes(plan.encoding)})
  if classifier is None:
    notes.append(f'no Inception Score: it needs the classifier file, '
                 f'--inception_classifier=<inception-2015-12-05.pt or '
                 f'pt_inception-2015-12-05-6726825d.pth>')
  for note in notes if main else ():  # once, on stderr (absl's logging would print it twice)
    print(f'warning: {note}', file=sys.stderr, flush=True)

  rows, first_method = [], {}
  unique = len({(n, r, p) for n, _, r, p, _ in cells if p is not None})
  say(f'{len(cells)} cells, {unique} distinct samplings of {num_samples} images', flush=True)
  for index, (name, method, (height, width), plan, note) in enumerate(cells, 1):
    label = f'[{index}/{len(cells)}] {name} {height}x{width} {method}'
    row = dict(run=name, method=method, height=height, width=width, num_samples=num_samples,
               same_as=None, note=note)
    if plan is None:
      say(f'{label}: n/a ({note})', flush=True)
      rows.append(row)
      continue
    first = first_method.setdefault((name, (height, width), plan), method)
    row['same_as'] = None if first == method else first
    try:
      record = evaluate_cell(
          by_name[name], plan, height, width, num_samples=num_samples, seed=seed,
          reference=reference_for(by_name[name], (height, width)), cell_dir=outdir / 'cells',
          feature_fn=feature_fn, batch_size=batch_size, class_names=class_names[name],
          label=label, classifier=classifier, shard_size=shard_size, distances=distances)
    except (inference.SamplingError, MemoryError, RuntimeError, OSError) as e:
      done = sum(1 for r in rows if r.get('key'))
      raise inference.SamplingError(
          f'{name} {method} at {height}x{width}: {_reason(e)}; no number is kept for it. The '
          f'{done} cells computed before it are kept in {outdir / "cells"}, and its finished '
          'shards: rerun the command to compute only the rest') from e
    if not main:
      continue
    row.update({k: record.get(k) for k in METRICS + ('key',)})
    grid = outdir / 'grids' / name / f'{height}x{width}_{method.replace("@", "_at_")}.png'
    grid.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outdir / 'cells' / f'{record["key"]}.png', grid)
    row['grid'] = str(grid.relative_to(outdir))
    rows.append(row)
    how = 'reused' if record['reused'] else (
        f'{record["images_per_second"]:.2f} images/s' if record['images_per_second'] else
        'sampled by the other processes')
    print(f'{label}: FID {format_number(row["fid"], 1, 2)}'
          f'  sFID {format_number(row["sfid"], 1, 2)}'
          f'  KID {format_number(row["kid"], 1, 4)}'
          f'  P {format_number(row["precision"], 1, 2)}'
          f'  R {format_number(row["recall"], 1, 2)}'
          + (f'  IS {format_number(row["inception_score"], 1, 2)}' if classifier else '')
          + f'  ({how})', flush=True)
  if not main:
    return None

  if real_split:
    for resolution in resolutions:
      print(f"real: {real_split} split at {resolution[0]}x{resolution[1]} against the reference "
            '(the floor at this N)', flush=True)
      real = real_reference(resolution)
      measured = image_metrics(inception.Features(real.features, real.spatial),
                               reference_for(runs[0], resolution), classifier, distances)
      rows.append(dict(run='real', method=f'{real_split} split', height=resolution[0],
                       width=resolution[1], num_samples=len(real.features), same_as=None,
                       **measured))
  write_reports(outdir, rows, resolutions, notes)
  print(f'results: {outdir / "results.md"}, {outdir / "results.csv"}, '
        f'{outdir / "fid_vs_resolution.png"}', flush=True)
  return rows
