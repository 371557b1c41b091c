"""A public checkpoint imported as an rpe2d run directory: what convert.py calls
(docs/methods.md#importing-checkpoints).

  imported = importing.convert('sit', 'SiT-XL-2-256x256.pt', vae='sd-vae-ft-ema',
                               workdir='runs/sit_xl_256')
  imported = importing.convert('lightningdit', 'lightningdit-xl-imagenet256-800ep.pt',
                               vae='vavae-imagenet256-f16d32-dinov2.pt',
                               vae_statistics='latents_stats.pt', workdir='runs/lightningdit_xl')

The run directory holds `config.json` (the model's rpe2d config: its family's model fields, the
latent data on the given VAE, the published sampling settings, and where the weights came from
under `imported.*`) and one checkpoint, `checkpoints/0/`, written by rpe2d's own checkpoint code
(manifest and damage checks included) with `params` and `ema_params` both the imported weights
and no optimizer or data state: it holds weights, which is what `sample.py`, `evaluate.py`,
`inference.load_run` and `train.py --config.init_from=` read. Resuming training in it is refused.

Every bad input is one line before anything is written: an unknown family, a workdir that already
holds a run, a missing VAE or one whose latents are not the family's (channels, scaling factor,
per-channel statistics: the VAE and statistics file a family needs are its `VAE`),
a file that is not a checkpoint (or is cut short, or wraps its state dicts without --unwrap, or
pickles a global outside the allow-list: rpe2d.tensor_files), and a state dict that is not the
family's (every missing, unexpected and misshapen key in one message).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import time

import jax
import numpy as np

from rpe2d import autoencoder_weights, checkpoints, config as config_lib, families, rundir
from rpe2d import sampler, tensor_files, training


@dataclasses.dataclass(frozen=True)
class Imported:
  """What convert wrote and where it came from."""
  workdir: pathlib.Path
  config: object
  family: str
  arch: object
  weights: tensor_files.TensorFile  # its tensors let go of once written (tensors: their count)
  tensors: int
  known: str              # the public file it is, by sha256 ('' when its hash is not known)
  parameters: int
  seconds: float


# A family's VAE when it does not name one (families/__init__.py): the SD VAE, scaled by a factor.
SD_VAE = 'an SD VAE, e.g. sd-vae-ft-ema'


def _vae(path, statistics=None) -> tuple[pathlib.Path, autoencoder_weights.Loaded]:
  """(the file, the VAE) the latents come from, read and checked (names, shapes; its statistics
  file's shapes) by rpe2d.autoencoder_weights; a folder means its diffusers weights file."""
  file = pathlib.Path(path).expanduser()
  if file.is_dir():
    file = file / autoencoder_weights.WEIGHTS_NAME
  if not file.is_file():
    raise FileNotFoundError(f'--vae={path}: no such file {file} (a diffusers VAE folder such as '
                            f'sd-vae-ft-ema, its {autoencoder_weights.WEIGHTS_NAME}, or an '
                            "LDM-layout file such as the VA-VAE's .pt)")
  if statistics is not None and not pathlib.Path(statistics).expanduser().is_file():
    raise FileNotFoundError(f'--vae_statistics={statistics}: no such file')
  try:
    return file.resolve(), autoencoder_weights.load(file, statistics=statistics)
  except ValueError as e:
    raise ValueError(f'--vae={path}: {e}') from None


def _check_vae(vae: autoencoder_weights.Loaded, family, arch, path) -> None:
  """The VAE must make the latents the model was trained on, normalised as it was."""
  c, needs = vae.config, getattr(family, 'VAE', SD_VAE)
  if c.latent_channels != arch.channels:
    raise ValueError(f'--vae={path} makes {c.latent_channels}-channel latents; this {family.NAME} '
                     f'model takes {arch.channels} (its VAE: {needs})')
  if not math.isclose(c.scaling_factor, family.VAE_SCALING_FACTOR) or c.shift_factor:
    raise ValueError(f'--vae={path} scales latents by {c.scaling_factor} (shift '
                     f'{c.shift_factor}); {family.NAME} was trained on latents scaled by '
                     f'{family.VAE_SCALING_FACTOR} without a shift ({needs})')
  statistics = getattr(family, 'VAE_STATISTICS', False)
  if statistics and vae.statistics is None:
    raise ValueError(f'{family.NAME} was trained on latents normalised per channel by its VAE\'s '
                     f'statistics file: pass --vae_statistics (its VAE: {needs})')
  if not statistics and vae.statistics is not None:
    raise ValueError(f'--vae_statistics given, but {family.NAME} was trained on latents scaled by '
                     f'{family.VAE_SCALING_FACTOR}, not normalised per channel: drop it')


def _tree_shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def convert(family: str, weights, *, vae, workdir, unwrap: str | None = None,
            vae_statistics=None, log=print) -> Imported:
  """Imports `weights` (a torch or safetensors file) of `family` as the run directory `workdir`,
  on the VAE `vae` (with its per-channel latent statistics file `vae_statistics` for a family
  whose latents are normalised by one: LightningDiT's VA-VAE).

  Raises ValueError, FileNotFoundError or pickle.UnpicklingError naming the bad input before
  anything is written; checkpoints.CheckpointError if writing fails (then nothing is kept).
  """
  began = time.perf_counter()
  if family not in families.FAMILIES:
    raise ValueError(f'--family={family!r} is not a known checkpoint family; allowed: '
                     f'{", ".join(families.FAMILIES)}')
  module = families.FAMILIES[family]
  run = rundir.RunDir(workdir)
  if run.config_path.exists() or run.checkpoints.exists():
    raise ValueError(f'--workdir={workdir} already holds a run ({run.config_path.name} or '
                     'checkpoints/); an import never overwrites one: choose a new directory')
  if not pathlib.Path(weights).is_file():
    raise FileNotFoundError(f'--weights={weights}: no such file')
  vae_file, loaded_vae = _vae(vae, vae_statistics)
  file = tensor_files.read_tensors(weights, unwrap=unwrap)
  matched = families.match(family, {k: v.shape for k, v in file.tensors.items()},
                           source=str(weights))
  arch = matched.arch
  _check_vae(loaded_vae, module, arch, vae)
  try:
    module.check(file.tensors, arch)
  except ValueError as e:
    raise ValueError(f'{weights}: {e}') from None

  config = matched.config
  size = arch.latent_size * loaded_vae.config.downsampling
  d = config.data
  d.vae_path = str(vae_file)
  d.vae_sha256 = loaded_vae.sha256
  d.source_image_size = size
  stats = loaded_vae.statistics
  if stats is not None:
    # What the model sees, recorded as a latent run records it (train_loop.record_latents):
    # scaling_factor * (z - mean) / std.
    d.vae_statistics, d.vae_statistics_sha256 = stats.path, stats.sha256
    d.latent_mean = tuple(stats.mean)
    d.latent_std = tuple(v / loaded_vae.config.scaling_factor for v in stats.std)
  del loaded_vae  # its weights were read to check the file; the run records the file
  config.sampling.resolutions = ((size, size), (2 * size, 2 * size))
  known = module.KNOWN_FILES.get(file.sha256, '')
  i = config.imported
  i.family, i.weights, i.sha256, i.known = family, str(file.path.resolve()), file.sha256, known
  i.unwrapped = unwrap if file.unwrapped else ''

  model = config_lib.build_model(config)
  params = module.params(file.tensors, arch)
  expected = _tree_shapes(jax.eval_shape(lambda key: training.init_params(model, key),
                                         jax.random.key(0)))
  if _tree_shapes(params) != expected:  # the family's mapping disagrees with the model: a bug
    raise AssertionError(f'{family} mapping gives {_tree_shapes(params)}, the model has {expected}')
  # The weights once, as jax arrays (orbax writes those with the fewest copies), each leaf moved
  # as it is copied; then the file's mapping goes: the import needs about the weights' size in
  # memory (benchmarks/import_full_size.py), not two or four times it.
  tensors = len(file.tensors)
  file = dataclasses.replace(file, tensors={})
  leaves, treedef = jax.tree_util.tree_flatten(params)
  del params
  _move_to_jax(leaves)
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  del leaves

  created = run.check_writable()
  run.lock()
  try:
    state = {'step': np.asarray(0, np.int32), 'params': params, 'ema_params': params}
    checkpoints.save_weights(run.root, 0, state, config)
    run.write_config(config)
  except BaseException:
    # Nothing half-written stays: the checkpoint and config.json go, and the workdir if this
    # call made it.
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    run.config_path.unlink(missing_ok=True)
    run.discard(created)
    raise
  run.unlock()
  count = sum(int(np.prod(s)) for s in expected.values())
  imported = Imported(workdir=run.root, config=config, family=family, arch=arch, weights=file,
                      tensors=tensors, known=known, parameters=count,
                      seconds=time.perf_counter() - began)
  log(describe(imported))
  return imported


def _move_to_jax(leaves: list) -> None:
  """Replaces each numpy array of `leaves` by a jax array of it, in place: each is copied (never
  aliasing a view of a mapped file) and let go of before the next."""
  for i in range(len(leaves)):
    leaves[i] = jax.device_put(np.array(leaves[i], np.float32))


def describe(imported: Imported) -> str:
  """What was imported from where, in a few lines (convert.py prints it)."""
  c, f = imported.config, imported.weights
  (h, w), encoding = config_lib.train_grid(c), c.model.position_embedding
  positions = {'sincos': 'sin-cos', 'rope': '2D RoPE',
               'rope+sincos': '2D RoPE and a sin-cos table'}.get(encoding, encoding)
  known = (f'it is {imported.known}' if imported.known else
           'not a known public file: no sha256 of the published files is recorded')
  lines = [
      f'imported  {f.path} as {imported.family}: {f.format}, {imported.tensors} tensors'
      + (f', {f.unwrapped}' if f.unwrapped else ''),
      f'sha256    {f.sha256} ({known})',
      f'model     {c.model.variant}, {imported.parameters / 1e6:.2f} M parameters, '
      f'prediction {c.model.prediction}, {positions} on its {h}x{w} token grid',
      f'VAE       {c.data.vae_path} (sha256 {c.data.vae_sha256[:16]}...), latents '
      f'{c.data.image_size}x{c.data.image_size}x{c.data.channels} of '
      f'{c.data.source_image_size}x{c.data.source_image_size} images'
      + (f', normalised by {c.data.vae_statistics}' if c.data.get('vae_statistics') else ''),
      f'sampling  {sampler.describe(config_lib.sampling_plan(c))}, cfg {c.sampling.cfg_scale} on '
      f'{c.sampling.cfg_channels or "all"} channels'
      + (f' for t in [{c.sampling.cfg_interval[0]:g}, {c.sampling.cfg_interval[1]:g}]'
         if tuple(c.sampling.cfg_interval) != (0.0, 1.0) else '')
      + (f', time shift {c.sampling.time_shift:.4g}' if c.sampling.time_shift != 1.0 else ''),
      f'wrote     {imported.workdir}/config.json and checkpoints/0 (params = ema_params = these '
      f'weights) in {imported.seconds:.1f} s',
      f'sample    python sample.py --workdir={imported.workdir}',
  ]
  return '\n'.join(lines)
