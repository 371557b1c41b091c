"""AutoencoderKL weights (and latent statistics) from checkpoint files, without torch.

Files are read through rpe2d.tensor_files, which tells the format from the first bytes: a
safetensors file is read from its header, a torch file (`.pt`, `.ckpt`, `.bin`: `torch.save`
pickles) through the allow-listed unpickler of rpe2d.torch_pickle, which never imports or calls
anything outside its list; any other file, a plain pickle included, is refused unread. A
checkpoint wrapping its state dict in {'state_dict': ...} (LDM's and LightningDiT's Lightning
checkpoints) is unwrapped.

Two key layouts map onto `autoencoder.AutoencoderKL`'s parameter tree, whose names are diffusers':

* diffusers (`diffusion_pytorch_model.safetensors`):
    `encoder.down_blocks.0.resnets.1.conv1.weight` (O, I, kh, kw)
        -> params['encoder']['down_blocks_0_resnets_1']['conv1']['kernel'] (kh, kw, I, O)
    `*.norm1.weight` / `.bias` (C,) -> ['norm1']['scale'] / ['bias']
    `*.attentions.0.to_q.weight` (out, in) or (out, in, 1, 1) -> ['to_q']['kernel'] (in, out)
  The attention may be stored under the names of current diffusers (`to_q`, `to_k`, `to_v`,
  `to_out.0`) or of checkpoints written before diffusers 0.14 (`query`, `key`, `value`,
  `proj_attn`), as Linear (2-D) or 1x1 conv (4-D) weights; all are accepted.
* LDM / CompVis (`encoder.down.0.block.1.conv1.weight`, `encoder.down.4.attn.0.q.weight`,
  `encoder.mid.attn_1.proj_out.weight`, `decoder.up.4.block.2.nin_shortcut.weight`, ...; the
  VA-VAE's file): renamed to the diffusers names (`ldm_to_diffusers`; LDM numbers the decoder's
  levels from full resolution, diffusers from the deepest). Tensors outside the autoencoder
  (`loss.*`, `foundation_model.*`, `linear_proj.*`: the VA-VAE file's training networks) are
  left unread and listed in `Loaded.left_unread`.

Every key and shape is checked against the architecture, and one ValueError names every missing
key, every unexpected key and every shape mismatch.

The architecture comes, in order, from the `config=` argument, a diffusers `config.json` next
to the weights (validated), the preset of a known file (by sha256), or, for the LDM layout, the
shapes of the state dict (`config_from_ldm_shapes`: LDM's GroupNorm of 32 groups and a scaling
factor of 1). KNOWN_FILES records the sha256 of the public files; `load(..., expected=
'sd-vae-ft-mse')` refuses any other file and says which known file it is, or that it is unknown.

Latent statistics (`read_statistics`): LightningDiT normalises the VA-VAE's latents per channel
by the mean and std published beside it (`latents_stats.pt`, {'mean': (1, 32, 1, 1), 'std':
(1, 32, 1, 1)}); `load(..., statistics=<file>)` reads them with the weights
(docs/methods.md#autoencoders).
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
from absl import logging

from rpe2d import autoencoder, tensor_files

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CONFIG_NAME = 'config.json'
# The state dict's prefixes that belong to the autoencoder; an LDM-layout file's other tensors
# (a training checkpoint's loss networks, the VA-VAE's vision foundation model) are left unread.
AUTOENCODER_PREFIXES = ('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.')
# Wrappers a checkpoint may hold its state dict in (Lightning's, as LDM and the VA-VAE save it).
WRAPPERS = ('state_dict',)


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
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(autoencoder.Config)
                       if f.name != 'attention_levels')  # from the block types

# Attention names of checkpoints written before diffusers 0.14 -> current names.
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LEGACY_PATTERN = re.compile(r'^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')


# ------------------------------------------------------------------------------------------------
# Names and shapes.

def _module_name(flax_name: str) -> str:
  """'down_blocks_0_resnets_1' -> 'down_blocks.0.resnets.1'; 'to_out_0' -> 'to_out.0'."""
  return re.sub(r'_(\d+)(_|$)', lambda m: '.' + m[1] + ('.' if m[2] else ''), flax_name)


LAYOUTS = ('diffusers', 'ldm')

# diffusers module names -> LDM's, in order (the decoder's level index is renumbered apart).
_TO_LDM = (
    (r'\.down_blocks\.(\d+)\.resnets\.', r'.down.\1.block.'),
    (r'\.down_blocks\.(\d+)\.attentions\.', r'.down.\1.attn.'),
    (r'\.down_blocks\.(\d+)\.downsamplers\.0\.', r'.down.\1.downsample.'),
    (r'\.up_blocks\.(\d+)\.resnets\.', r'.up.\1.block.'),
    (r'\.up_blocks\.(\d+)\.attentions\.', r'.up.\1.attn.'),
    (r'\.up_blocks\.(\d+)\.upsamplers\.0\.', r'.up.\1.upsample.'),
    (r'\.mid_block\.resnets\.0\.', '.mid.block_1.'),
    (r'\.mid_block\.resnets\.1\.', '.mid.block_2.'),
    (r'\.mid_block\.attentions\.0\.', '.mid.attn_1.'),
    (r'\.conv_shortcut\.', '.nin_shortcut.'),
    (r'\.group_norm\.', '.norm.'),
    (r'\.to_q\.', '.q.'), (r'\.to_k\.', '.k.'), (r'\.to_v\.', '.v.'),
    (r'\.to_out\.0\.', '.proj_out.'),
    (r'^(encoder|decoder)\.conv_norm_out\.', r'\1.norm_out.'),
)


def diffusers_to_ldm(name: str, levels: int) -> str:
  """A diffusers AutoencoderKL name -> LDM's (`decoder.up_blocks.0.resnets.2.conv_shortcut.weight`
  -> `decoder.up.<levels - 1>.block.2.nin_shortcut.weight`): LDM numbers the decoder's levels by
  resolution, as the encoder's (up.0 at full resolution), diffusers in the order they run."""
  name = re.sub(r'^decoder\.up_blocks\.(\d+)\.',
                lambda m: f'decoder.up_blocks.{levels - 1 - int(m[1])}.', name)
  for pattern, replacement in _TO_LDM:
    name = re.sub(pattern, replacement, name)
  return name


def expected_tensors(config: autoencoder.Config, layout: str = 'diffusers'
                     ) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """Checkpoint name in `layout` (LAYOUTS) -> (path in our param tree, torch-layout shape), for
  every parameter. Attention projections are Linear (out, in) in diffusers' layout (1x1 convs
  (out, in, 1, 1) are accepted too) and 1x1 convs in LDM's."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r}; allowed: {", ".join(LAYOUTS)}')
  levels = len(config.block_out_channels)
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
    name = '.'.join(_module_name(m) for m in modules) + '.' + torch_leaf
    if layout == 'ldm':
      name = diffusers_to_ldm(name, levels)
      if _is_attention_projection(keys):
        shape = (*shape, 1, 1)
    out[name] = (keys, shape)
  return out


def _canonical(name: str) -> str:
  m = _LEGACY_PATTERN.match(name)
  return f'{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}' if m else name


def _is_attention_projection(flax_path: tuple[str, ...]) -> bool:
  return flax_path[-1] == 'kernel' and flax_path[-2].startswith(('to_q', 'to_k', 'to_v', 'to_out'))


def _to_flax(array: np.ndarray, flax_path: tuple[str, ...]) -> np.ndarray:
  if flax_path[-1] != 'kernel':
    return array
  if array.ndim == 4 and _is_attention_projection(flax_path):
    array = array[:, :, 0, 0]                        # 1x1 conv attention weights
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)               # OIHW -> HWIO
  return array.T                                     # (out, in) -> (in, out)


def _shape_ok(flax_path: tuple[str, ...], found: tuple, expected: tuple) -> bool:
  if found == expected:
    return True
  # Attention projections saved as 1x1 convs (out, in, 1, 1): LDM's, and old diffusers files.
  return _is_attention_projection(flax_path) and found == (*expected, 1, 1)


def layout_of(names) -> str | None:
  """'diffusers' or 'ldm' by the names of a state dict's encoder and decoder blocks; None when it
  has neither."""
  names = list(names)
  if any(n.startswith(('encoder.down_blocks.', 'encoder.mid_block.', 'decoder.up_blocks.',
                       'decoder.mid_block.')) for n in names):
    return 'diffusers'
  if any(n.startswith(('encoder.down.', 'encoder.mid.', 'decoder.up.', 'decoder.mid.'))
         for n in names):
    return 'ldm'
  return None


_LDM_LEVEL = re.compile(r'^encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$')


def config_from_ldm_shapes(shapes: Mapping[str, tuple], *, norm_num_groups: int = 32,
                           scaling_factor: float = 1.0) -> autoencoder.Config:
  """The architecture of an LDM-layout state dict from its shapes: the levels and their widths,
  blocks per level, attention levels, latent and image channels. GroupNorm's group count is not
  in any shape: LDM's is 32 (its Normalize), the default here; the scaling factor is not either.
  ValueError naming what the shapes lack or contradict."""
  levels: dict[int, int] = {}
  blocks: dict[int, set] = {}
  for name, shape in shapes.items():
    if m := _LDM_LEVEL.match(name):
      level, block = int(m[1]), int(m[2])
      blocks.setdefault(level, set()).add(block)
      if block == 0:
        levels[level] = tuple(shape)[0]
  anchors = ('encoder.conv_in.weight', 'decoder.conv_out.weight', 'post_quant_conv.weight',
             'quant_conv.weight')
  problems = [f'it lacks {", ".join(k for k in anchors if k not in shapes)}'] if any(
      k not in shapes for k in anchors) else []
  if not levels or sorted(levels) != list(range(len(levels))):
    problems.append(f'its encoder levels are {sorted(levels)} (read from '
                    'encoder.down.<i>.block.0.conv1.weight, needed for i = 0, 1, ...)')
  if problems:
    raise ValueError('the architecture cannot be read from its shapes: ' + '; '.join(problems))
  per_level = {len(b) for b in blocks.values()}
  if len(per_level) != 1:
    raise ValueError(f'the encoder levels hold different numbers of blocks '
                     f'({ {i: len(b) for i, b in sorted(blocks.items())} })')
  latent = tuple(shapes['post_quant_conv.weight'])[0]
  if tuple(shapes['quant_conv.weight'])[0] != 2 * latent:
    raise ValueError(f'quant_conv.weight {tuple(shapes["quant_conv.weight"])} does not make the '
                     f'mean and log-variance of the {latent} channels post_quant_conv takes')
  attention = tuple(i for i in sorted(levels) if f'encoder.down.{i}.attn.0.q.weight' in shapes)
  return autoencoder.Config(
      block_out_channels=tuple(levels[i] for i in sorted(levels)),
      layers_per_block=per_level.pop(), latent_channels=latent,
      in_channels=tuple(shapes['encoder.conv_in.weight'])[1],
      out_channels=tuple(shapes['decoder.conv_out.weight'])[0],
      norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
      attention_levels=attention)


def preset_name(config: autoencoder.Config) -> str | None:
  """The PRESETS key whose configuration `config` is, if any."""
  return next((name for name, preset in autoencoder.PRESETS.items() if preset == config), None)


# ------------------------------------------------------------------------------------------------
# Files.

def identify(digest: str, known: Mapping[str, KnownFile] = KNOWN_FILES) -> str:
  """A phrase saying which known file a sha256 belongs to, or that it is unknown."""
  if digest in known:
    return f'it is {known[digest].name} (sha256 {digest})'
  return f'its sha256 {digest} is not a known file'


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
  levels = len(raw.get('block_out_channels', autoencoder.Config.block_out_channels))
  attention = {}
  for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                     ('up_block_types', 'UpDecoderBlock2D')):
    types = list(raw.get(key, [block] * levels))
    if len(types) != levels or any(t not in (block, 'Attn' + block) for t in types):
      raise ValueError(f'config {key}={types!r}; allowed: {levels} x {block!r} or '
                       f'{"Attn" + block!r} (one per entry of block_out_channels)')
    found = [i for i, t in enumerate(types) if t.startswith('Attn')]
    # up_blocks run from the deepest level: up block j is level levels - 1 - j.
    attention[key] = found if key == 'down_block_types' else sorted(levels - 1 - j for j in found)
  if attention['down_block_types'] != attention['up_block_types']:
    raise ValueError(f'config down_block_types={raw.get("down_block_types")!r} and up_block_types='
                     f'{raw.get("up_block_types")!r} put attention at other levels; allowed: the '
                     f'same levels (up blocks run from the deepest)')
  fields = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
  if 'block_out_channels' in fields:
    fields['block_out_channels'] = tuple(fields['block_out_channels'])
  fields['attention_levels'] = tuple(attention['down_block_types'])
  return autoencoder.Config(**fields)


def to_diffusers_config(config: autoencoder.Config) -> dict:
  """An autoencoder.Config as a diffusers config.json (the inverse of config_from_diffusers)."""
  levels = len(config.block_out_channels)
  down = ['AttnDownEncoderBlock2D' if i in config.attention_levels else 'DownEncoderBlock2D'
          for i in range(levels)]
  up = ['AttnUpDecoderBlock2D' if levels - 1 - j in config.attention_levels else
        'UpDecoderBlock2D' for j in range(levels)]
  raw = {k: v for k, v in dataclasses.asdict(config).items() if k != 'attention_levels'}
  raw['block_out_channels'] = list(config.block_out_channels)
  return {'_class_name': 'AutoencoderKL', **raw, 'down_block_types': down, 'up_block_types': up}


def read_config(path) -> autoencoder.Config:
  """A diffusers config.json; one that is not JSON, or not an AutoencoderKL config, is named."""
  try:
    with open(path, 'rb') as f:
      raw = json.loads(f.read().decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f'{path} is damaged: not JSON ({type(e).__name__}: {e}); download the '
                     "config.json of the VAE's repository again (e.g. stabilityai/sd-vae-ft-ema)"
                     ) from None
  if not isinstance(raw, dict):
    raise ValueError(f'{path} holds a JSON {type(raw).__name__}, not a VAE config')
  try:
    return config_from_diffusers(raw)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None


def params_from_tensors(tensors: Mapping[str, np.ndarray], config: autoencoder.Config,
                        source: str = 'weights', layout: str = 'diffusers') -> dict:
  """Arrays named in `layout` (diffusers' or LDM's) -> our float32 param tree; one ValueError
  lists every problem, under the file's own names."""
  expected = expected_tensors(config, layout)
  placed, unexpected, mismatched = {}, [], []
  for name in sorted(tensors):
    canonical = _canonical(name) if layout == 'diffusers' else name
    if canonical not in expected or canonical in placed:
      unexpected.append(name)
      continue
    found = tuple(tensors[name].shape)
    if not _shape_ok(expected[canonical][0], found, expected[canonical][1]):
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


# ------------------------------------------------------------------------------------------------
# Latent statistics.


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Per-channel mean and std of a VAE's latents (LightningDiT's `latents_stats.pt`): the model
  sees scaling_factor * (z - mean) / std (autoencoder.latents_to_model)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  path: str
  sha256: str


def read_statistics(path, channels: int) -> Statistics:
  """The statistics file `path` (a torch or safetensors file holding 'mean' and 'std', each
  (1, C, 1, 1) as LightningDiT saves them, or (C,)) for a VAE of `channels` latent channels.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a file of tensors, entries other than mean and std, a shape other than one
      value per latent channel, a std that is not positive and finite (all in one line).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'latent statistics {path}: no such file')
  file = tensor_files.read_tensors(path)
  problems = []
  names = sorted(file.tensors)
  if names != ['mean', 'std']:
    problems.append(f'holds {names}; expected exactly mean and std')
  allowed = ((1, channels, 1, 1), (channels,))
  values = {}
  for name in ('mean', 'std'):
    if name not in file.tensors:
      continue
    array = np.asarray(file.tensors[name])
    if tuple(array.shape) not in allowed or not np.issubdtype(array.dtype, np.floating):
      problems.append(f'{name} has shape {tuple(array.shape)} ({array.dtype}); expected float '
                      f'(1, {channels}, 1, 1) or ({channels},): one value per latent channel of '
                      f'the VAE')
      continue
    values[name] = array.astype(np.float64).reshape(channels)
  if 'std' in values and not np.all(np.isfinite(values['std']) & (values['std'] > 0)):
    problems.append(f'std is not positive and finite everywhere (min {values["std"].min():.3g})')
  if 'mean' in values and not np.all(np.isfinite(values['mean'])):
    problems.append('mean is not finite everywhere')
  if problems:
    raise ValueError(f'latent statistics {path}: ' + '; '.join(problems))
  return Statistics(mean=tuple(float(v) for v in values['mean']),
                    std=tuple(float(v) for v in values['std']), path=str(path.resolve()),
                    sha256=file.sha256)


# ------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class Loaded:
  params: dict
  config: autoencoder.Config
  sha256: str
  known: KnownFile | None   # the entry of KNOWN_FILES, if the file is one of them
  layout: str = 'diffusers'                       # the file's key layout, LAYOUTS
  format: str = 'safetensors'                     # tensor_files' name of the file's format
  unwrapped: str | None = None                    # the wrapper taken ('state_dict'), if any
  left_unread: tuple[tuple[str, int], ...] = ()   # (prefix, tensors) outside the autoencoder
  statistics: Statistics | None = None            # per-channel latent statistics, if given

  def describe(self) -> str:
    """One line: the architecture, the file's format and layout, what was left unread."""
    name = preset_name(self.config)
    arch = (f'the {name} architecture' if name else
            f'{len(self.config.block_out_channels)} levels {self.config.block_out_channels}')
    line = (f'{arch}, {self.config.latent_channels} latent channels; {self.format}, '
            f'{self.layout} names' + (f", unwrapped '{self.unwrapped}'" if self.unwrapped else ''))
    if self.left_unread:
      line += '; left unread: ' + ', '.join(f'{n} tensors of {p}.*' for p, n in self.left_unread)
    if self.statistics is not None:
      line += f'; latent statistics {self.statistics.path}'
    return line


def _autoencoder_tensors(tensors: Mapping[str, np.ndarray], layout: str):
  """(the autoencoder's tensors, (prefix, count) of the others). A diffusers file holds nothing
  else, so there everything is kept (and an extra key is refused by params_from_tensors)."""
  if layout == 'diffusers':
    return dict(tensors), ()
  kept = {k: v for k, v in tensors.items() if k.startswith(AUTOENCODER_PREFIXES)}
  others: dict[str, int] = {}
  for name in tensors:
    if name not in kept:
      prefix = name.split('.')[0]
      others[prefix] = others.get(prefix, 0) + 1
  return kept, tuple(sorted(others.items()))


def load(path, config: autoencoder.Config | str | None = None, expected: str | None = None,
         known: Mapping[str, KnownFile] = KNOWN_FILES, digest: str | None = None,
         statistics=None) -> Loaded:
  """Reads AutoencoderKL weights from a checkpoint file (or the diffusers folder holding one).

  Args:
    path: a diffusers `diffusion_pytorch_model.safetensors` (or its folder), or any safetensors
      or torch file in diffusers' or LDM's layout (the VA-VAE's `.pt`).
    config: an autoencoder.Config or a PRESETS key; by default the `config.json` beside the
      file, else the preset of a known file, else (LDM layout) read from the shapes.
    expected: the name of a KNOWN_FILES entry ('sd-vae-ft-mse', 'sdxl-vae', ...) that the file
      must be (by sha256).
    known: the table of known files (KNOWN_FILES).
    digest: the file's sha256 when the caller has just computed it (it is not hashed again).
    statistics: a latent statistics file (read_statistics), e.g. the VA-VAE's latents_stats.pt.

  Raises:
    ValueError: a file that is neither safetensors nor a torch file (a plain pickle is never
      unpickled), or holds no autoencoder; a file other than `expected`; an invalid config.json;
      missing, unexpected or misshapen tensors (all named in one message); bad statistics.
    pickle.UnpicklingError: a torch file naming a global outside the allow-list (nothing was
      imported or called).
  """
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    path = path / WEIGHTS_NAME
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file')
  if isinstance(config, str):
    if config not in autoencoder.PRESETS:
      raise ValueError(f'config={config!r}; allowed: {", ".join(autoencoder.PRESETS)} or an '
                       f'autoencoder.Config')
    config = autoencoder.PRESETS[config]
  if expected is not None:
    names = sorted(k.name for k in known.values())
    if expected not in names:
      raise ValueError(f'expected={expected!r}; allowed: {", ".join(names)}')
  file = tensor_files.read_tensors(path, unwrap=WRAPPERS, sha256=digest)
  digest, entry = file.sha256, known.get(file.sha256)
  if expected is not None and (entry is None or entry.name != expected):
    raise ValueError(f'{path} is not {expected}: {identify(digest, known)}')
  layout = layout_of(file.tensors)
  if layout is None:
    shown = ', '.join(sorted(file.tensors)[:5])
    raise ValueError(f'{path} holds no autoencoder: none of its {len(file.tensors)} tensors is '
                     f"an encoder or decoder block in diffusers' or LDM's names (first: {shown})")
  tensors, left_unread = _autoencoder_tensors(file.tensors, layout)
  if config is None:
    if (path.parent / CONFIG_NAME).is_file():
      config = read_config(path.parent / CONFIG_NAME)
    elif entry is not None:
      config = autoencoder.PRESETS[entry.preset]
    elif layout == 'ldm':
      try:
        config = config_from_ldm_shapes({k: v.shape for k, v in tensors.items()})
      except ValueError as e:
        raise ValueError(f'{path} ({identify(digest, known)}): {e}; pass config= (one of '
                         f'{", ".join(autoencoder.PRESETS)}, or a Config)') from None
    else:
      raise ValueError(f'{path}: no {CONFIG_NAME} beside it and {identify(digest, known)}; put '
                       f'the {CONFIG_NAME} of its diffusers repository beside it (in Python, '
                       f'load(..., config=) also takes one of {", ".join(autoencoder.PRESETS)})')
  stats = None if statistics is None else read_statistics(statistics, config.latent_channels)
  params = params_from_tensors(tensors, config, source=f'{path} ({identify(digest, known)})',
                               layout=layout)
  loaded = Loaded(params, config, digest, entry, layout=layout, format=file.format,
                  unwrapped=WRAPPERS[0] if file.unwrapped else None, left_unread=left_unread,
                  statistics=stats)
  logging.info('%s: %s', path, loaded.describe())
  return loaded


def to_diffusers(params, config: autoencoder.Config,
                 layout: str = 'diffusers') -> dict[str, np.ndarray]:
  """Our param tree -> torch-layout arrays named in `layout` (to save, or to compare); LDM's
  attention projections as its 1x1 convs."""
  out = {}
  for name, (flax_path, shape) in expected_tensors(config, layout).items():
    leaf = params
    for key in flax_path:
      leaf = leaf[key]
    leaf = np.asarray(leaf, np.float32)
    if flax_path[-1] == 'kernel':
      leaf = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T
    if layout == 'ldm' and _is_attention_projection(flax_path):
      leaf = leaf[:, :, None, None]
    assert leaf.shape == shape, (name, leaf.shape, shape)
    out[name] = np.ascontiguousarray(leaf)
  return out


def param_count(config: autoencoder.Config) -> int:
  return sum(math.prod(s) for _, s in expected_tensors(config).values())
