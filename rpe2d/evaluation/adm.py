"""ADM's evaluation of a sample batch against a reference batch, for files written by any codebase.

  results = adm.evaluate(sample_npz, reference_npz, network, classifier=None, cache_dir=...)

The numbers are those of openai/guided-diffusion's evaluations/evaluator.py
(docs/methods.md#evaluation):

  * Inception features (pool3 and mixed_6/conv[..., :7]) of both batches' `arr_0` images;
  * FID and sFID: the sample side from its features, the reference side from the batch's stored
    `mu`, `sigma`, `mu_s`, `sigma_s` when it has `mu` (ADM then ignores its images for FID), else
    from its images. A batch with `mu` but no `mu_s` still gives FID; sFID is then reported
    unavailable, before any work. (As ADM, a sample batch holding `mu` is read the same way.)
  * precision and recall: the reference batch's images (10,000 in ADM's) against every sample,
    k = 3, squared distances rounded as ADM's float16 path;
  * Inception Score: with a classifier file, softmax(pool3 . W) in contiguous chunks of 5,000 in
    file order.

Features are computed in shards spread over every process (rpe2d.evaluation.shards) and kept in
`cache_dir`, so a killed evaluation resumes, and a reference batch is read once.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

import jax
import numpy as np

from rpe2d.evaluation import batches, inception, metrics, shards

SHARD_SIZE = 1000


def _fingerprint(array: batches.ImageArray) -> str:
  """What identifies a batch file's images for the feature cache: its absolute path, size, mtime
  and image shape (rewriting the file changes its mtime)."""
  stat = array.path.stat()
  text = json.dumps([str(array.path.absolute()), stat.st_size, stat.st_mtime_ns, array.shape,
                     inception.ARCHIVE_SHA1, 'pool3+mixed_6/conv'])
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def batch_features(array: batches.ImageArray, network, cache_dir, *,
                   shard_size: int = SHARD_SIZE, what: str = 'batch') -> inception.Features | None:
  """Features of every image of `array`, in file order, computed in shards by every process and
  cached in `cache_dir/<fingerprint>/`; returned on process 0 (None on the others)."""
  key = _fingerprint(array)
  directory = pathlib.Path(cache_dir) / key
  count = len(array)

  def produce(start, stop):
    return inception.extract(network, batches.read_rows(array, start, stop)), {}

  began = time.perf_counter()

  def log(text):
    print(f'{what}: process {jax.process_index()}: {text}', flush=True)

  computed = shards.compute(directory, key, count, shard_size, produce, log=log)
  shards.barrier(f'rpe2d.adm: features of {key}')
  if jax.process_index() != 0:
    return None
  features, _ = shards.gather(directory, key, count, shard_size, produce)
  if computed:
    seconds = time.perf_counter() - began
    print(f'{what}: {count} images {array.shape[1]}x{array.shape[2]} -> Inception features in '
          f'{seconds:.1f} s on this process ({computed} of {-(-count // shard_size)} shards)',
          flush=True)
  return features


def check(sample_npz, reference_npz, *, want_sfid: bool = True) -> tuple[
    batches.ImageArray, batches.ImageArray, dict, list[str]]:
  """Everything about the two files that can fail, from their headers and statistics alone:
  (sample images, reference images, reference statistics, notes to print)."""
  samples = batches.image_array(sample_npz, '--sample_npz')
  reference = batches.image_array(reference_npz, '--reference_npz')
  stats = batches.read_statistics(reference_npz)
  for key in ('sigma', 'sigma_s'):
    if key in stats:
      metrics.check_covariance(stats[key], f'{reference_npz}: key {key!r}')
  notes = []
  if 'mu' in stats and 'mu_s' not in stats and want_sfid:
    notes.append(f'{reference_npz} holds mu and sigma but no mu_s / sigma_s: sFID is unavailable '
                 '(ADM reads sFID\'s reference statistics from the batch; FID is reported)')
  if len(samples) < metrics.PR_K + 1 or len(reference) < metrics.PR_K + 1:
    raise ValueError(f'precision and recall use the k = {metrics.PR_K} nearest other images: '
                     f'{sample_npz} holds {len(samples)} and {reference_npz} {len(reference)}; '
                     f'each needs at least {metrics.PR_K + 1}')
  return samples, reference, stats, notes


def evaluate(samples: batches.ImageArray, reference: batches.ImageArray, stats: dict, network, *,
             cache_dir, classifier=None, distances: str = 'float16',
             shard_size: int = SHARD_SIZE) -> dict | None:
  """ADM's numbers for the sample batch against the reference batch (see the module doc), as a
  dict ready for JSON; None on processes other than 0."""
  ref = batch_features(reference, network, pathlib.Path(cache_dir) / 'reference',
                       shard_size=shard_size, what='reference batch')
  sample_stats = batches.read_statistics(samples.path)
  out = batch_features(samples, network, pathlib.Path(cache_dir) / 'samples',
                       shard_size=shard_size, what='sample batch')
  if jax.process_index() != 0:
    return None
  began = time.perf_counter()
  results = dict(sample_npz=str(samples.path), reference_npz=str(reference.path),
                 num_samples=len(samples), num_reference_images=len(reference),
                 sample_shape=list(samples.shape[1:]), reference_shape=list(reference.shape[1:]))
  sample_mu = (sample_stats['mu'], sample_stats['sigma']) if 'mu' in sample_stats else \
      metrics.feature_statistics(out.pool)
  ref_mu = (stats['mu'], stats['sigma']) if 'mu' in stats else metrics.feature_statistics(ref.pool)
  results['fid'] = metrics.frechet_distance(*sample_mu, *ref_mu)
  if 'mu' in stats and 'mu_s' not in stats:
    results['sfid'] = None
  else:
    sample_s = (sample_stats['mu_s'], sample_stats['sigma_s']) if 'mu_s' in sample_stats else \
        metrics.feature_statistics(out.spatial)
    ref_s = (stats['mu_s'], stats['sigma_s']) if 'mu_s' in stats else \
        metrics.feature_statistics(ref.spatial)
    results['sfid'] = metrics.frechet_distance(*sample_s, *ref_s)
  results['precision'], results['recall'] = metrics.precision_recall(ref.pool, out.pool,
                                                                     distances=distances)
  results['distances'] = distances
  results['kid'] = metrics.kid(out.pool, ref.pool)
  if classifier is not None:
    results['inception_score'] = metrics.inception_score(
        metrics.class_probabilities(out.pool, classifier.weights))
    results['inception_score_splits'] = -(-len(samples) // metrics.IS_SPLIT)
    results['classifier'] = dict(path=str(classifier.path), format=classifier.format,
                                 sha256=classifier.sha256)
  else:
    results['inception_score'] = None
  results['reference_statistics'] = 'stored mu/sigma' + ('/mu_s/sigma_s' if 'mu_s' in stats else
                                                         '') if 'mu' in stats else 'its images'
  results['metric_seconds'] = time.perf_counter() - began
  return results
