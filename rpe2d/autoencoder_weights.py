"""AutoencoderKL weights from a diffusers `diffusion_pytorch_model.safetensors`, without torch.

The file is read with safetensors' numpy API; nothing is ever unpickled, so `.ckpt`, `.bin`,
`.pt` and `.pth` files (pickles, or zips of pickles) are refused before they are opened beyond
their first bytes. Every diffusers name maps to one leaf of `autoencoder.AutoencoderKL`'s
parameter tree:

  `encoder.down_blocks.0.resnets.1.conv1.weight` (O, I, kh, kw)
      -> params['encoder']['down_blocks_0_resnets_1']['conv1']['kernel'] (kh, kw, I, O)
  `*.norm1.weight` / `.bias` (C,) -> ['norm1']['scale'] / ['bias']
  `*.attentions.0.to_q.weight` (out, in) or (out, in, 1, 1) -> ['to_q']['kernel'] (in, out)

The attention may be stored under the names of current diffusers (`to_q`, `to_k`, `to_v`,
`to_out.0`) or of checkpoints written before diffusers 0.14 (`query`, `key`, `value`,
`proj_attn`), as Linear (2-D) or 1x1 conv (4-D) weights; all are accepted. Every key and shape
is checked against the architecture, and one ValueError names every missing key, every unexpected
key and every shape mismatch.

The architecture comes, in order, from the `config=` argument, a diffusers `config.json` next
to the weights (validated), or the preset of a known file (by sha256). KNOWN_FILES records the
sha256 of the public files; `load(..., expected='sd-vae-ft-mse')` refuses any other file and
says which known file it is, or that it is unknown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import safe_open

from rpe2d import autoencoder, files

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CONFIG_NAME = 'config.json'
PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl', '.pickle')


@dataclasses.dataclass(frozen=True)
class KnownFile:
  name: str         # what the user would call it
  preset: str       # key of autoencoder.PRESETS
  source: str       # where the sha256 was read


# sha256 of public diffusers-layout VAE files, each as published in a Git LFS pointer or pinned by
# a project that downloads it. sd-vae-ft-ema's is not recorded: no source for it was found.
KNOWN_FILES = {
    'a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815': KnownFile(
        'sd-vae-ft-mse', 'sd',
        'stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors at revision 31f26fde, '
        'pinned in finegrain-ai/refiners (src/refiners/conversion/models/autoencoder_sd15.py); '
        'the same oid is the vae/ of stabilityai/stable-diffusion-2 and -2-base (LFS pointers)'),
    '1598f3d24932bcfe6634e8b618ea1e30ab1d57f5aad13a6d2de446d2199f2341': KnownFile(
        'sdxl-vae', 'sdxl',
        'huggingface.co/thingthatis/sdxl-vae (a duplicate of stabilityai/sdxl-vae), Git LFS '
        'details of diffusion_pytorch_model.safetensors; the same file is the vae/ of '
        'stabilityai/stable-diffusion-xl-base-1.0 at 91704abb (refiners autoencoder_sdxl.py)'),
    'a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c': KnownFile(
        'stable-diffusion-v1-5 vae', 'sd',
        'stable-diffusion-v1-5/stable-diffusion-v1-5/vae/diffusion_pytorch_model.safetensors at '
        'f03de327, pinned in finegrain-ai/refiners (autoencoder_sd15.py)'),
    '1b909373b28f2137098b0fd9dbc6f97f8410854f31f84ddc9fa04b077b0ace2c': KnownFile(
        'sdxl-vae-fp16-fix', 'sdxl',
        'madebyollin/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors at 6d107346, pinned in '
        'finegrain-ai/refiners (autoencoder_sdxl.py)'),
}

# Keys of a diffusers config.json of AutoencoderKL that carry no architecture we implement.
_IGNORED_CONFIG_KEYS = ('_class_name', '_diffusers_version', '_name_or_path', 'sample_size',
                        'force_upcast', '_use_default_values')
# Keys whose only supported value is diffusers' default.
_FIXED_CONFIG_KEYS = {'act_fn': 'silu', 'use_quant_conv': True, 'use_post_quant_conv': True,
                      'mid_block_add_attention': True, 'latents_mean': None, 'latents_std': None}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(autoencoder.Config))

# Attention names of checkpoints written before diffusers 0.14 -> current names.
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LEGACY_PATTERN = re.compile(r'^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')


# ------------------------------------------------------------------------------------------------
# Names and shapes.

def _module_name(flax_name: str) -> str:
  """'down_blocks_0_resnets_1' -> 'down_blocks.0.resnets.1'; 'to_out_0' -> 'to_out.0'."""
  return re.sub(r'_(\d+)(_|$)', lambda m: '.' + m[1] + ('.' if m[2] else ''), flax_name)


def expected_tensors(config: autoencoder.Config) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """diffusers name -> (path in our param tree, torch-layout shape), for every parameter."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(autoencoder.param_shapes(config))[0]:
    keys = tuple(k.key for k in path)
    *modules, leaf_name = keys
    shape = tuple(leaf.shape)
    if leaf_name == 'kernel' and len(shape) == 4:    # conv HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif leaf_name == 'kernel':                      # dense (in, out) -> (out, in)
      shape = shape[::-1]
    torch_leaf = 'bias' if leaf_name == 'bias' else 'weight'
    out['.'.join(_module_name(m) for m in modules) + '.' + torch_leaf] = (keys, shape)
  return out


def _canonical(name: str) -> str:
  m = _LEGACY_PATTERN.match(name)
  return f'{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}' if m else name


def _to_flax(array: np.ndarray, flax_path: tuple[str, ...]) -> np.ndarray:
  if flax_path[-1] != 'kernel':
    return array
  if array.ndim == 4 and flax_path[-2].startswith(('to_q', 'to_k', 'to_v', 'to_out')):
    array = array[:, :, 0, 0]                        # 1x1 conv attention weights
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)               # OIHW -> HWIO
  return array.T                                     # (out, in) -> (in, out)


def _shape_ok(name: str, found: tuple, expected: tuple) -> bool:
  if found == expected:
    return True
  # Attention projections saved as 1x1 convs (out, in, 1, 1).
  return '.attentions.' in name and len(expected) == 2 and found == (*expected, 1, 1)


# ------------------------------------------------------------------------------------------------
# Files.

def identify(digest: str, known: Mapping[str, KnownFile] = KNOWN_FILES) -> str:
  """A phrase saying which known file a sha256 belongs to, or that it is unknown."""
  if digest in known:
    return f'it is {known[digest].name} (sha256 {digest})'
  return f'its sha256 {digest} is not a known file'


def _refuse_pickles(path: pathlib.Path):
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise ValueError(f'{path}: {path.suffix} checkpoints are pickles and are never loaded '
                     f'(unpickling can run code); use the diffusers {WEIGHTS_NAME} file instead')
  with open(path, 'rb') as f:
    head = f.read(9)
  # safetensors: an 8-byte little-endian header length, then the JSON header.
  if len(head) < 9 or head[8:9] != b'{':
    kind = ('a pickle' if head[:1] == b'\x80' else
            'a zip (torch.save) archive' if head[:4] == b'PK\x03\x04' else 'not safetensors')
    raise ValueError(f'{path} is {kind}, not a safetensors file; it is not loaded: use the '
                     f'diffusers {WEIGHTS_NAME} file')


def config_from_diffusers(raw: Mapping[str, Any]) -> autoencoder.Config:
  """A diffusers AutoencoderKL config.json (as a dict) -> autoencoder.Config, validated."""
  if raw.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
    raise ValueError(f'config _class_name={raw["_class_name"]!r}; allowed: AutoencoderKL')
  allowed = set(_IGNORED_CONFIG_KEYS) | set(_FIXED_CONFIG_KEYS) | set(_CONFIG_FIELDS) | {
      'down_block_types', 'up_block_types'}
  unknown = sorted(set(raw) - allowed)
  if unknown:
    raise ValueError(f'config has unsupported keys {unknown}; allowed: {sorted(allowed)}')
  for key, value in _FIXED_CONFIG_KEYS.items():
    if key in raw and raw[key] != value:
      raise ValueError(f'config {key}={raw[key]!r} is not supported; allowed: {value!r}')
  levels = len(raw.get('block_out_channels', ()))
  for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                     ('up_block_types', 'UpDecoderBlock2D')):
    types = list(raw.get(key, [block] * levels))
    if types != [block] * levels:
      raise ValueError(f'config {key}={types!r}; allowed: {levels} x {block!r} (one per entry of '
                       f'block_out_channels)')
  fields = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
  if 'block_out_channels' in fields:
    fields['block_out_channels'] = tuple(fields['block_out_channels'])
  return autoencoder.Config(**fields)


def read_config(path) -> autoencoder.Config:
  with open(path) as f:
    return config_from_diffusers(json.load(f))


def params_from_tensors(tensors: Mapping[str, np.ndarray], config: autoencoder.Config,
                        source: str = 'weights') -> dict:
  """diffusers-named numpy arrays -> our float32 param tree; one ValueError lists every problem."""
  expected = expected_tensors(config)
  placed, unexpected, mismatched = {}, [], []
  for name in sorted(tensors):
    canonical = _canonical(name)
    if canonical not in expected or canonical in placed:
      unexpected.append(name)
      continue
    found = tuple(tensors[name].shape)
    if not _shape_ok(canonical, found, expected[canonical][1]):
      mismatched.append(f'{name} has shape {found}, expected {expected[canonical][1]}')
    placed[canonical] = name
  missing = sorted(set(expected) - set(placed))
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing keys: {", ".join(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected keys: {", ".join(unexpected)}')
    if mismatched:
      parts.append(f'{len(mismatched)} shape mismatches: {"; ".join(mismatched)}')
    raise ValueError(f'{source} do not match the architecture {config}: ' + '; '.join(parts))
  params: dict = {}
  for canonical, name in placed.items():
    array = np.asarray(tensors[name])
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f'{source}: {name} has dtype {array.dtype}; allowed: a float dtype')
    flax_path = expected[canonical][0]
    node = params
    for key in flax_path[:-1]:
      node = node.setdefault(key, {})
    node[flax_path[-1]] = np.ascontiguousarray(_to_flax(array, flax_path), dtype=np.float32)
  return params


@dataclasses.dataclass(frozen=True)
class Loaded:
  params: dict
  config: autoencoder.Config
  sha256: str
  known: KnownFile | None   # the entry of KNOWN_FILES, if the file is one of them


def load(path, config: autoencoder.Config | str | None = None, expected: str | None = None,
         known: Mapping[str, KnownFile] = KNOWN_FILES, digest: str | None = None) -> Loaded:
  """Reads AutoencoderKL weights from a diffusers safetensors file (or the folder holding it).

  Args:
    path: the `diffusion_pytorch_model.safetensors` file, or its folder.
    config: an autoencoder.Config or a PRESETS key; by default the `config.json` beside the
      file, else the preset of a known file.
    expected: the name of a KNOWN_FILES entry ('sd-vae-ft-mse', 'sdxl-vae', ...) that the file
      must be (by sha256).
    known: the table of known files (KNOWN_FILES).
    digest: the file's sha256 when the caller has just computed it (it is not hashed again).

  Raises:
    ValueError: a pickle or non-safetensors file; a file other than `expected`; an invalid
      config.json; missing, unexpected or misshapen tensors (all named in one message).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / WEIGHTS_NAME
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file')
  _refuse_pickles(path)
  digest = digest or files.sha256_file(path)
  entry = known.get(digest)
  if expected is not None:
    names = sorted(k.name for k in known.values())
    if expected not in names:
      raise ValueError(f'expected={expected!r}; allowed: {", ".join(names)}')
    if entry is None or entry.name != expected:
      raise ValueError(f'{path} is not {expected}: {identify(digest, known)}')
  if isinstance(config, str):
    if config not in autoencoder.PRESETS:
      raise ValueError(f'config={config!r}; allowed: {", ".join(autoencoder.PRESETS)} or an '
                       f'autoencoder.Config')
    config = autoencoder.PRESETS[config]
  if config is None:
    if (path.parent / CONFIG_NAME).is_file():
      config = read_config(path.parent / CONFIG_NAME)
    elif entry is not None:
      config = autoencoder.PRESETS[entry.preset]
    else:
      raise ValueError(f'{path}: no {CONFIG_NAME} beside it and {identify(digest, known)}; pass '
                       f'config= (one of {", ".join(autoencoder.PRESETS)}, or a Config)')
  with safe_open(str(path), framework='np') as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  params = params_from_tensors(tensors, config, source=f'{path} ({identify(digest, known)})')
  return Loaded(params, config, digest, entry)


def to_diffusers(params, config: autoencoder.Config) -> dict[str, np.ndarray]:
  """Our param tree -> diffusers-named torch-layout arrays (to save, or to compare)."""
  out = {}
  for name, (flax_path, shape) in expected_tensors(config).items():
    leaf = params
    for key in flax_path:
      leaf = leaf[key]
    leaf = np.asarray(leaf, np.float32)
    if flax_path[-1] == 'kernel':
      leaf = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T
    assert leaf.shape == shape, (name, leaf.shape, shape)
    out[name] = np.ascontiguousarray(leaf)
  return out


def param_count(config: autoencoder.Config) -> int:
  return sum(math.prod(s) for _, s in expected_tensors(config).values())
