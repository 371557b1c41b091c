"""Sampling from a trained run: what sample.py, notebooks and evaluation call.

    run = inference.load_run('runs/default')
    images = inference.generate(run, height=64, width=96, labels=np.arange(10), seed=0)

Examples are sharded over every local device along the 'data' axis. Example i of a call draws its
noise and random positions from fold_in(seed key, i), so the images do not depend on the batch size
or the device count.

A latent run (`is_latent`: trained on `data.name='latents'`) samples VAE latents; `load_run` also loads the VAE
that made them (checked by sha256) and `generate` returns their decodes, so callers see uint8
images at pixel sizes either way: `height` and `width` are always pixels.
"""

import dataclasses
import functools
import pathlib
import time

import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from rpe2d import attention as attention_lib, autoencoder, autoencoder_weights, checkpoints
from rpe2d import config as config_lib, data, files, images as images_lib, model as model_lib, rope
from rpe2d import rundir, sampler, training

# Latent runs decode whole up to this many latent pixels per image (128x128: 1024x1024 pixels
# with the SD VAE, ~4 GiB on CPU, benchmarks/vae_decode_sizes.py); beyond, in tiles.
AUTO_TILE_ABOVE = 128 * 128
SOURCE_KEY = 'rpe2d:checkpoint'  # the PNG text chunk naming the checkpoint a grid came from
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels: 512 px tiles sharing 128 px
# Latent pixels one device decodes per call: bounds the decoder's activations for big batches.
DECODE_PIXELS_PER_DEVICE = 4 * 64 * 64


class SamplingError(RuntimeError):
  """Sampling or writing samples failed after work started; the message says what was kept."""


class NonFiniteSamplesError(SamplingError):
  """Generated samples hold NaN or Inf: never written, never measured."""


class UnfinishedSamplesError(SamplingError):
  """An adaptive solve stopped before t = 0: its samples are never written, never measured."""


@dataclasses.dataclass
class Run:
  config: object
  model: object
  params: dict
  step: int
  checkpoint: pathlib.Path
  vae: autoencoder_weights.Loaded | None = None  # latent runs: the decoder of their samples


def is_latent(config) -> bool:
  """Whether a run samples VAE latents (it trained on data.name='latents') rather than pixels."""
  return config.data.name == 'latents'



def load_vae(config, vae=None) -> autoencoder_weights.Loaded:
  """The VAE of a latent run: `vae` (a file or its folder) if given, else data.vae_path; refused
  unless its sha256 is the one the run recorded (data.vae_sha256)."""
  if not is_latent(config):
    raise ValueError(f'--vae={vae} given, but this is not a latent run (data.name is not latents): '
                     'it samples pixels')
  path = pathlib.Path(vae if vae else config.data.vae_path).expanduser()
  if path.is_dir():
    path = path / autoencoder_weights.WEIGHTS_NAME
  if not path.is_file():
    what = '--vae' if vae else "the run's VAE (data.vae_path)"
    raise FileNotFoundError(f'{what} {path} does not exist; pass --vae=<the VAE file (e.g. '
                            f'{autoencoder_weights.WEIGHTS_NAME}) that made the latents>')
  expected = config.data.get('vae_sha256')
  digest = files.sha256_file(path)
  if expected and digest != expected:
    raise ValueError(f"{path} is not the VAE of this run: the run's latents were made by "
                     f'{expected}; {path} is {digest}')
  loaded = autoencoder_weights.load(path, digest=digest)
  recorded = config.data.get('latent_std')
  # With a statistics file the recorded std is the file's, per channel: nothing to compare here.
  if (config.data.get('latent_scaling') == 'vae' and recorded
      and not config.data.get('vae_statistics_sha256')):
    trained = 1.0 / recorded[0]
    if abs(loaded.config.scaling_factor - trained) > 1e-6 * trained:
      raise ValueError(f'{path} has scaling_factor {loaded.config.scaling_factor}; the run trained '
                       f'on latents scaled by {trained:.6g} (the extraction manifest\'s): another '
                       "VAE config.json than the run's")
  if loaded.config.latent_channels != config.data.channels:
    raise ValueError(f'{path} has {loaded.config.latent_channels} latent channels; the run was '
                     f'trained on data.channels={config.data.channels}')
  return loaded


def downsampling(run) -> int:
  """Image pixels per model pixel along each axis: 1 for pixel runs, the VAE's factor for latent
  runs."""
  return 1 if run.vae is None else run.vae.config.downsampling


def check_size(height: int, width: int, patch: int, factor: int = 1, what='resolution') -> None:
  """Errors for an image size in pixels that a model of `patch` cannot sample, `factor` image
  pixels per model pixel."""
  model_lib.check_resolution(height, width, patch if factor == 1 else 1, what)
  if factor == 1:
    return
  if height % factor or width % factor:
    raise ValueError(f"{what} {height}x{width} is not divisible by the VAE's downsampling factor "
                     f'{factor}; a latent run samples multiples of {factor} pixels')
  h, w = height // factor, width // factor
  if h % patch or w % patch:
    raise ValueError(f'{what} {height}x{width} is {h}x{w} latents, not divisible by the patch size '
                     f'{patch}; use multiples of {patch * factor} pixels')


def model_size(run, height: int, width: int) -> tuple[int, int]:
  """The size the model samples for images of height x width pixels: the same for a pixel run,
  the latent size for a latent run (checked to divide evenly)."""
  factor = downsampling(run)
  if factor == 1:
    return height, width
  check_size(height, width, run.model.patch_size, factor)
  return height // factor, width // factor


def checkpoint_dir(workdir, checkpoint=None) -> pathlib.Path:
  """The step directory to load: `checkpoint` if given, else the newest intact one (damaged ones
  are skipped with a warning)."""
  if checkpoint is not None:
    path = pathlib.Path(checkpoint).expanduser()
    if not str(checkpoint).strip() or not (path / 'state').is_dir():
      raise FileNotFoundError(f'--checkpoint={checkpoint} is not a checkpoint step directory '
                              f'(<workdir>/checkpoints/<step> holding state/)')
    return checkpoints.find_step_dir(path)
  directory = rundir.RunDir(workdir).checkpoints
  if not checkpoints.steps(directory):
    raise FileNotFoundError(f'workdir {workdir} holds no checkpoints; train first: '
                            f'python train.py --workdir={workdir}')
  return checkpoints.find_step_dir(directory)


def run_config(workdir, step_dir: pathlib.Path):
  """The config to sample a checkpoint with: the checkpoint's own (the truth about its weights:
  shapes, positions and range, data, VAE), checked against the workdir's config.json.

  A checkpoint of another run (outside <workdir>/checkpoints) whose model, position or data keys
  (rundir.CHECKPOINT_KEYS) differ from the workdir's is refused, listing them; one that agrees is
  sampled with its own config, with a note. A damaged or missing config.json is noted and the
  checkpoint's config used."""
  run = rundir.RunDir(workdir)
  try:
    own = run.read_config()
  except ValueError as e:
    print(f'note: {e}; using the config saved in the checkpoint', flush=True)
    own = None
  saved = checkpoints.saved_config(step_dir)
  if saved is None:
    if own is None:
      raise FileNotFoundError(f'workdir {workdir} has no readable config.json and the checkpoint '
                              f'{step_dir} no readable config: not a training run, or damaged')
    print(f'note: the checkpoint {step_dir} holds no readable config; using {run.config_path}',
          flush=True)
    return own
  owner = step_dir.parent.parent
  inside = step_dir.parent == run.checkpoints
  differences = [] if own is None else rundir.differing_keys(saved, own, rundir.CHECKPOINT_KEYS)
  if differences and not inside:
    raise ValueError(f'--checkpoint={step_dir} belongs to the run {owner}, whose model, positions '
                     f'or data differ from those of --workdir={workdir}; differing keys (saved '
                     'in the checkpoint, now in config.json): ' + '; '.join(differences)
                     + f'. Sample it with --workdir={owner}')
  if not inside:
    print(f'note: {step_dir} is a checkpoint of another run ({owner}); it is sampled with the '
          'config saved in it', flush=True)
  elif differences:
    print(f'note: the checkpoint {step_dir} was saved with other settings than config.json holds '
          f'now ({"; ".join(differences)}); it is sampled with the config saved in it', flush=True)
  return saved


def load_run(workdir, checkpoint=None, *, use_ema: bool = True, vae=None,
             attention: str | None = None) -> Run:
  """Reads the checkpoint's config (`run_config`) and restores its EMA (or raw) weights,
  replicated on the local devices. Only those weights are read: no optimizer state, no training
  state is built.

  `attention` picks the attention kernel (default: the run's own; a kernel this platform lacks,
  e.g. a GPU run's cudnn on a CPU, becomes xla, with a note). Kernels compute the same thing, so
  any serves any run.

  A latent run also gets its VAE (`load_vae`: `vae` if given, else data.vae_path), checked before
  the weights are read. The checkpoint is read under a lease (checkpoints.lease), so a live run's
  retention does not delete it meanwhile; without a `checkpoint`, a newest step deleted before
  its lease was taken gives way to the new newest."""
  if not rundir.RunDir(workdir).config_path.exists() and not checkpoints.steps(
      rundir.RunDir(workdir).checkpoints) and checkpoint is None:
    raise FileNotFoundError(f'workdir {workdir} has no config.json: not a training run')
  for attempt in range(3):
    path = checkpoint_dir(workdir, checkpoint)
    try:
      with checkpoints.lease(path):
        return _load(workdir, path, use_ema=use_ema, vae=vae, attention=attention)
    except checkpoints.CheckpointError:
      if checkpoint is not None or attempt == 2 or path.is_dir():
        raise
      print(f'note: {path} was deleted by the live run\'s retention while it was being read; '
            'loading the newest checkpoint instead', flush=True)
  raise AssertionError('unreachable')


def _load(workdir, path: pathlib.Path, *, use_ema, vae, attention) -> Run:
  config = run_config(workdir, path)
  loaded = load_vae(config, vae) if is_latent(config) or vae else None
  model = config_lib.build_model(config)
  if attention is not None:
    attention_lib.check_kernel(attention)
    model = model.clone(attention_implementation=attention)
  elif attention_lib.current_platform() not in \
      attention_lib.KERNELS[model.attention_implementation].platforms:
    print(f'note: the run was trained with attention kernel {model.attention_implementation!r}, '
          f'which {attention_lib.current_platform()} lacks; using xla', flush=True)
    model = model.clone(attention_implementation='xla')
  replicated = NamedSharding(training.make_mesh(1, devices=jax.local_devices()), P())
  saved_layout = jax.eval_shape(lambda key: model_lib.unstack_blocks(training.init_params(model, key)),
                                jax.random.key(0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          saved_layout)
  name = 'ema_params' if use_ema else 'params'
  params = checkpoints.restore_weights(path, abstract, names=(name,))[name]
  if model.scan_layers:
    params = model_lib.stack_blocks(params)
  if loaded is not None:
    loaded = dataclasses.replace(loaded, params=jax.device_put(loaded.params, replicated))
  return Run(config=config, model=model, params=params, step=int(path.name), checkpoint=path,
             vae=loaded)


def parse_resolution(text: str, patch: int, factor: int = 1) -> tuple[int, int]:
  """'64x96' -> (64, 96) pixels, checked against the patch size (and, for a latent run, the VAE's
  downsampling `factor`)."""
  try:
    height, width = (int(v) for v in text.lower().split('x'))
  except ValueError:
    raise ValueError(f'resolution {text!r} must look like <height>x<width>, e.g. 64x96') from None
  check_size(height, width, patch, factor, what=f'resolution {text!r}:')
  return height, width


def distinct_sizes(sizes, what: str) -> list[tuple[int, int]]:
  """`sizes` with repeats dropped (first occurrence kept), with a note naming what was dropped."""
  distinct = list(dict.fromkeys(sizes))
  if len(distinct) != len(sizes):
    print(f'note: {what} lists {", ".join(f"{h}x{w}" for h, w in sizes)}; each size is sampled '
          f'once: {", ".join(f"{h}x{w}" for h, w in distinct)}', flush=True)
  return distinct


def check_labels(labels, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels, np.int32)
  bad = labels[(labels < 0) | (labels > num_classes)]
  if bad.size:
    raise ValueError(f'labels {sorted(set(bad.tolist()))} are outside 0..{num_classes - 1} (or '
                     f'{num_classes} for the unconditional null class)')
  return labels


_COMPILED = {}


def _compiled_sampler(run, plan, height, width, labels, indices, key):
  """The sampler compiled ahead of time, once per (model, plan, shape, devices), and the seconds
  this call spent compiling."""
  cache_key = (run.model, plan, height, width, labels.shape, labels.sharding)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key], 0.0
  began = time.perf_counter()
  with jax.set_mesh(labels.sharding.mesh):  # the kernels' platform and shard_map axes
    lowered = sampler.sample_with_stats_jit.lower(run.model, run.params, key, labels,
                                                  height=height, width=width, plan=plan,
                                                  indices=indices)
  _COMPILED[cache_key] = lowered.compile()
  return _COMPILED[cache_key], time.perf_counter() - began


_DECODERS = {}


def check_decode_tile(key: str, tile) -> list[str]:
  """A decode tile size: None (automatic), 0 (whole) or a positive number of latent pixels.
  Returns a note for a tile smaller than twice DECODE_OVERLAP: its neighbours then share only
  tile // 2 latent pixels, and seams may show."""
  if tile is None:
    return []
  if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
    raise ValueError(f'{key}={tile!r} must be an integer >= 0 (latent pixels; 0: decode whole)')
  if 0 < tile < 2 * DECODE_OVERLAP:
    return [f'note: {key}={tile} is smaller than twice the {DECODE_OVERLAP}-latent-pixel overlap '
            f'tiles are blended over: tiles overlap by {decode_overlap(tile)} only, and seams may '
            f'show (use {2 * DECODE_OVERLAP} or more, or 0 to decode whole)']
  return []


def decode_overlap(tile: int) -> int:
  """Latent pixels neighbouring tiles share: DECODE_OVERLAP, or half of a smaller tile."""
  return min(DECODE_OVERLAP, tile // 2)


def decode_tiling(run: Run, height: int, width: int, tile: int | None = None) -> int:
  """The latent tile size a latent run's images of height x width pixels are decoded in; 0: whole.

  tile: None (automatic: tiles of DECODE_TILE above AUTO_TILE_ABOVE latent pixels), 0 (whole), or
  a tile size in latent pixels (whole when one tile covers the image).
  """
  check_decode_tile('decode_tile', tile)
  h, w = model_size(run, height, width)
  if tile is None:
    tile = DECODE_TILE if h * w > AUTO_TILE_ABOVE else 0
  return tile if 0 < tile < max(h, w) else 0


def _decoder(run: Run, devices):
  """The VAE's decode, jit-compiled with the batch split over `devices` (cached)."""
  key = (run.vae.config, tuple(devices))
  if key not in _DECODERS:
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    _DECODERS[key] = autoencoder.sharded(
        functools.partial(autoencoder.decode, config=run.vae.config), mesh)
  return _DECODERS[key]


def decode(run: Run, samples, *, tile: int = 0, devices=None) -> np.ndarray:
  """A latent run's samples (B, h, w, Z) in the model's space -> float32 images (B, H, W, C) on
  the host, nominally in [-1, 1]: unscaled, then decoded over `devices` (default: the local ones)
  whole, or in tiles of `tile` latent pixels (autoencoder.decode_tiled). B must be a multiple of
  the device count; calls decode at most DECODE_PIXELS_PER_DEVICE latent pixels per device."""
  devices = jax.local_devices() if devices is None else devices
  # Latents are small: on the host they slice into even chunks for the sharded decoder.
  d, vae = run.config.data, run.vae.config
  if d.latent_std is not None:  # what the run trained with (train_loop.record_latents)
    scale, shift = 1.0 / np.asarray(d.latent_std, np.float32), np.asarray(d.latent_mean, np.float32)
  else:
    scale, shift = data.latent_scale_shift('vae', d.channels, scaling_factor=vae.scaling_factor,
                                           shift_factor=vae.shift_factor)
  latents = np.asarray(samples, np.float32) / scale + shift
  batch, h, w, _ = latents.shape
  if batch % len(devices) or not batch:
    raise ValueError(f'a batch of {batch} latents does not split over {len(devices)} devices; '
                     f'allowed: a positive multiple of {len(devices)}')
  per_device = batch // len(devices)
  fit = max(1, DECODE_PIXELS_PER_DEVICE // (min(tile, h) * min(tile, w) if tile else h * w))
  # The largest divisor of the per-device batch that fits: every call has one shape.
  chunk = len(devices) * max(d for d in range(1, per_device + 1) if per_device % d == 0
                             and d <= fit)
  fn, params = _decoder(run, devices), run.vae.params
  out = []
  for start in range(0, batch, chunk):
    part = latents[start:start + chunk]
    if tile:
      out.append(autoencoder.decode_tiled(params, part, config=run.vae.config, tile=tile,
                                          overlap=decode_overlap(tile), decode_fn=fn))
    else:
      out.append(np.asarray(fn(params, part)))
  return np.concatenate(out)


def generate(run: Run, *, height: int, width: int, labels, seed: int = 0,
             plan: sampler.SamplingPlan | None = None, batch_size: int = 64,
             progress: bool = False, stats: dict | None = None,
             decode_tile: int | None = None, first_index: int = 0) -> np.ndarray:
  """uint8 images (len(labels), height, width, C) for the given labels: examples first_index,
  first_index + 1, ... (a share of a larger batch is the same images as in the whole batch).

  For a latent run, height and width are pixels: the model samples latents of height / f x
  width / f, which are decoded whole or in tiles as `decode_tiling(run, height, width,
  decode_tile)` says.

  stats, if given, receives compile_seconds (0 when already compiled), images_per_second,
  evaluations_per_image and evaluations_max (velocity evaluations: they vary per image with
  dopri5), and for a latent run decode_seconds (which includes the decoder's first compile).
  """
  plan = plan or config_lib.sampling_plan(run.config)
  latent_height, latent_width = model_size(run, height, width)
  sampler.check_resolution(run.model, plan, latent_height, latent_width)
  tile = decode_tiling(run, height, width, decode_tile) if run.vae is not None else 0
  labels = check_labels(labels, run.model.num_classes)
  devices = jax.local_devices()
  data = NamedSharding(training.make_mesh(1, devices=devices), P('data'))
  # A batch is a multiple of the device count; the last one is padded and the padding dropped.
  batch_size = max(len(devices), batch_size - batch_size % len(devices))
  batch_size = min(batch_size, -(-len(labels) // len(devices)) * len(devices))
  key = training.seed_key(seed)
  outputs, compile_seconds, sample_seconds, decode_seconds = [], 0.0, 0.0, 0.0
  evaluations = []
  for start in tqdm.tqdm(range(0, len(labels), batch_size), disable=not progress,
                         desc=f'{height}x{width}'):
    count = min(batch_size, len(labels) - start)
    batch_labels = jax.device_put(np.resize(labels[start:start + count], batch_size), data)
    indices = jax.device_put(np.arange(first_index + start, first_index + start + batch_size,
                                       dtype=np.int32), data)
    compiled, seconds = _compiled_sampler(run, plan, latent_height, latent_width, batch_labels,
                                          indices, key)
    compile_seconds += seconds
    began = time.perf_counter()
    generated, solved = compiled(run.params, key, batch_labels, indices=indices)
    solved = jax.device_get(solved)
    check_finished(solved, plan, start, count, height, width)
    evaluations.append(solved.evaluations[:count])
    if run.vae is not None:
      generated = jax.block_until_ready(generated)
      decoding = time.perf_counter()
      generated = decode(run, generated, tile=tile, devices=devices)
      decode_seconds += time.perf_counter() - decoding
    generated = np.asarray(generated)[:count]
    finite = np.isfinite(generated.reshape(count, -1)).all(axis=1)
    if not finite.all():  # to_uint8 would make them black images that look like results
      raise NonFiniteSamplesError(
          f'{int((~finite).sum())} of samples {first_index + start}..'
          f'{first_index + start + count - 1} at {height}x{width} are not finite (NaN/Inf; the '
          f'first is sample {first_index + start + int(np.argmin(finite))}): the plan '
          f'{sampler.describe(plan)}, cfg_scale={plan.cfg_scale}, time_shift='
          f'{plan.time_shift}, extrapolation={plan.encoding.extrapolation} diverges for this run')
    outputs.append(images_lib.to_uint8(generated))
    sample_seconds += time.perf_counter() - began
  if stats is not None:
    stats['compile_seconds'] = compile_seconds
    stats['images_per_second'] = len(labels) / sample_seconds
    evaluations = np.concatenate(evaluations)
    stats['evaluations_per_image'] = float(evaluations.mean())
    stats['evaluations_max'] = int(evaluations.max())
    if run.vae is not None:
      stats['decode_seconds'] = decode_seconds
  return np.concatenate(outputs)


def check_finished(stats: sampler.Stats, plan: sampler.SamplingPlan, start: int, count: int,
                   height: int, width: int) -> None:
  """Raises UnfinishedSamplesError when one of the batch's first `count` examples (samples start,
  start + 1, ...) did not reach t = 0, saying where it stopped and why."""
  unfinished = np.flatnonzero(~np.asarray(stats.finished[:count]))
  if not unfinished.size:
    return
  first = int(unfinished[0])
  steps = int(stats.accepted[first])
  reached = float(stats.times[first, steps - 1]) if steps else None
  attempts = steps + int(stats.rejected[first])
  why = (f'sampling.max_steps={plan.max_steps} step attempts were not enough: raise --max_steps '
         'or loosen --atol/--rtol' if attempts >= plan.max_steps else
         'its velocity became NaN/Inf')
  raise UnfinishedSamplesError(
      f'{unfinished.size} of samples {start}..{start + count - 1} at {height}x{width} did not '
      f'reach t = 0 with {sampler.describe(plan)}: sample {start + first} stopped after '
      f'{attempts} step attempts at t = {"its start" if reached is None else f"{reached:.4g}"}; '
      f'{why}')


def notes(run: Run, plan: sampler.SamplingPlan, height: int, width: int) -> list[str]:
  """What a user should know about this plan at this size: a legacy setting, or an extrapolation
  that changes nothing here because the tokens lie inside the trained range."""
  found = rope.legacy_notes(plan.encoding)
  size = model_size(run, height, width)
  canonical = sampler.canonical_plan(run.model, plan, *size)
  if canonical.encoding != plan.encoding and plan.encoding.extrapolation != 'none':
    grid, trained = run.model.geometry(*size).grid, run.model.position_range
    found.append(f'note: at {height}x{width} the {grid[0]}x{grid[1]} tokens lie inside the trained '
                 f'range {trained[0]}x{trained[1]}: extrapolation={plan.encoding.extrapolation}'
                 f'{" with dype" if plan.encoding.dype else ""} changes nothing at this size')
  return found


def write_samples(run: Run, plan: sampler.SamplingPlan, resolutions, paths, labels, *,
                  seed: int = 0, batch_size: int = 64, class_names=None,
                  decode_tile: int | None = None) -> None:
  """Generates `labels` at each resolution and saves them to the matching path, saying what it did
  and how fast. A failure raises SamplingError naming what failed and the files already written
  (which are complete: every file is written atomically)."""
  written = []

  def kept():
    return (f'{len(written)} of {len(paths)} files were written ({", ".join(map(str, written))})'
            if written else f'none of the {len(paths)} files was written')

  for (height, width), path in zip(resolutions, paths):
    for note in notes(run, plan, height, width):
      print(note, flush=True)
    stats = {}
    try:
      images = generate(run, height=height, width=width, labels=labels, seed=seed, plan=plan,
                        batch_size=batch_size, progress=True, stats=stats,
                        decode_tile=decode_tile)
    except (NonFiniteSamplesError, UnfinishedSamplesError) as e:
      raise type(e)(f'{e}; nothing is written for {height}x{width}; {kept()}') from None
    except (MemoryError, RuntimeError, OSError) as e:  # XLA's out of memory is a RuntimeError
      raise SamplingError(f'sampling {len(labels)} images at {height}x{width} failed '
                          f'({_reason(e)}); {kept()}') from e
    try:
      save(path, images, labels, class_names, source=run.checkpoint)
    except (OSError, MemoryError, ValueError) as e:
      raise SamplingError(f'writing {path} failed ({_reason(e)}); {kept()}') from e
    written.append(path)
    decoded = ''
    if 'decode_seconds' in stats:
      tile = decode_tiling(run, height, width, decode_tile)
      decoded = (f', decode {stats["decode_seconds"]:.1f} s '
                 + (f'in {tile}x{tile}-latent tiles' if tile else 'whole'))
    adaptive = ''
    if plan.sampler == 'dopri5':
      adaptive = (f', {stats["evaluations_per_image"]:.1f} velocity evaluations per image (max '
                  f'{stats["evaluations_max"]})')
    print(f'{height}x{width}: {len(images)} images -> {path}  (compile '
          f'{stats["compile_seconds"]:.1f} s, {stats["images_per_second"]:.1f} images/s'
          f'{adaptive}{decoded})', flush=True)


def _reason(error) -> str:
  from rpe2d import cli  # pylint: disable=g-import-not-at-top
  return cli.reason(error)


def attention_bytes(model, tokens: int, batch: int) -> int:
  """A lower bound on the host memory one sampler call's attention takes on a CPU: the scores of
  the conditional and unconditional batch (`xla`: whole, or one (example, head) at a time past
  attention.CPU_PER_HEAD_ABOVE; `chunked`: one block pair per head). 0 on an accelerator, which
  holds them in its own memory."""
  if jax.default_backend() != 'cpu':
    return 0
  heads = model_lib.parse_variant(model.variant)[2]
  if model.attention_implementation == 'chunked':
    return 2 * batch * heads * attention_lib.Q_CHUNK * attention_lib.KV_CHUNK * 4
  whole = 2 * batch * heads * tokens * tokens * 4
  return whole if whole <= attention_lib.CPU_PER_HEAD_ABOVE else 2 * tokens * tokens * 4


def check_memory(model, height: int, width: int, *, num_samples: int, batch_size: int,
                 channels: int, factor: int = 1, available: int | None, flags: dict) -> None:
  """Refuses, before any work, a sampling whose lower bound of memory (the images kept for
  writing, one batch's attention) exceeds `available` bytes, with the advice that fixes it:
  `flags` names the command's flag (or config key) for 'num_samples', 'batch_size' and
  'attention'. height, width: pixels; `factor` image pixels per model pixel (latent runs)."""
  if available is None:
    return
  from rpe2d import cli  # pylint: disable=g-import-not-at-top
  images = num_samples * height * width * channels
  tokens = (height // factor // model.patch_size) * (width // factor // model.patch_size)
  batch = min(batch_size, num_samples)
  needed = images + attention_bytes(model, tokens, batch)
  if needed <= available:
    return
  if images + attention_bytes(model, tokens, 1) > available and images <= available // 2:
    advice = (f'one image\'s attention scores alone ({tokens} tokens) do not fit: use '
              f'{flags["attention"]}=chunked, which never holds them whole')
    if model.attention_implementation == 'chunked':
      advice = 'use a smaller resolution'
  elif images > available // 2:
    advice = (f'the {num_samples} images are kept in memory until written: use a smaller '
              f'{flags["num_samples"]}')
  else:
    advice = f'use a smaller {flags["batch_size"]}'
  raise ValueError(f'{num_samples} images at {height}x{width} need at least {cli.gib(needed)} of '
                   f'memory and {cli.gib(available)} is available; {advice}')


def save(path, images, labels, class_names=None, source=None) -> None:
  """A PNG grid with one titled row per label, or an ADM-style .npz (arr_0 uint8 NHWC, labels).
  `source`, the checkpoint the images came from, is recorded in it (the PNG's tEXt chunk
  `rpe2d:checkpoint`, the .npz's string array `checkpoint`)."""
  path = pathlib.Path(path)
  images, labels = np.asarray(images, np.uint8), np.asarray(labels)
  if path.suffix == '.npz':
    extra = {} if source is None else {'checkpoint': np.asarray(str(source))}
    with files.atomic_path(path) as tmp:
      np.savez(tmp, arr_0=images, labels=labels.astype(np.int64), **extra)
    return
  distinct = sorted(set(labels.tolist()))
  width = max(int(np.sum(labels == label)) for label in distinct)
  blank = np.full(images.shape[1:], 255, np.uint8)
  rows = []
  for label in distinct:
    row = list(images[labels == label])
    rows.extend(row + [blank] * (width - len(row)))
  names = [class_names[l] if class_names is not None and l < len(class_names) else
           ('uncond' if class_names is not None else str(l)) for l in distinct]
  images_lib.save_grid(path, np.stack(rows), rows=len(distinct), row_labels=names,
                       text=None if source is None else {SOURCE_KEY: source})
