"""Sampling from a trained run: what sample.py, notebooks and evaluation call.

    run = inference.load_run('runs/default')
    images = inference.generate(run, height=64, width=96, labels=np.arange(10), seed=0)

Examples are sharded over every local device along the 'data' axis. Example i of a call draws its
noise and random positions from fold_in(seed key, i), so the images do not depend on the batch size
or the device count.
"""

import dataclasses
import functools
import pathlib
import time

import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from rpe2d import checkpoints, config as config_lib, files, images as images_lib, model as model_lib
from rpe2d import rope, rundir, sampler, training


@dataclasses.dataclass
class Run:
  config: object
  model: object
  params: dict
  step: int
  checkpoint: pathlib.Path


def checkpoint_dir(workdir, checkpoint=None) -> pathlib.Path:
  """The step directory to load: `checkpoint` if given, else the newest intact one (damaged ones
  are skipped with a warning)."""
  if checkpoint:
    path = pathlib.Path(checkpoint)
    if not (path / 'state').is_dir():
      raise FileNotFoundError(f'--checkpoint={checkpoint} is not a checkpoint step directory '
                              f'(<workdir>/checkpoints/<step> holding state/)')
    return checkpoints.find_step_dir(path)
  directory = rundir.RunDir(workdir).checkpoints
  if not checkpoints.steps(directory):
    raise FileNotFoundError(f'workdir {workdir} holds no checkpoints; train first: '
                            f'python train.py --workdir={workdir}')
  return checkpoints.find_step_dir(directory)


def load_run(workdir, checkpoint=None, *, use_ema: bool = True) -> Run:
  """Reads the run's config and restores its EMA (or raw) weights, replicated on the local
  devices. Only those weights are read: no optimizer state, no training state is built."""
  config = rundir.RunDir(workdir).read_config()
  if config is None:
    raise FileNotFoundError(f'workdir {workdir} has no config.json: not a training run')
  path = checkpoint_dir(workdir, checkpoint)
  model = config_lib.build_model(config)
  replicated = NamedSharding(training.make_mesh(1, devices=jax.local_devices()), P())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(functools.partial(training.init_params, model),
                                         jax.random.key(0)))
  name = 'ema_params' if use_ema else 'params'
  params = checkpoints.restore_weights(path, abstract, names=(name,))[name]
  return Run(config=config, model=model, params=params, step=int(path.name), checkpoint=path)


def parse_resolution(text: str, patch: int) -> tuple[int, int]:
  """'64x96' -> (64, 96), checked against the patch size."""
  try:
    height, width = (int(v) for v in text.lower().split('x'))
  except ValueError:
    raise ValueError(f'resolution {text!r} must look like <height>x<width>, e.g. 64x96') from None
  model_lib.check_resolution(height, width, patch, what=f'resolution {text!r}:')
  return height, width


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
  _COMPILED[cache_key] = sampler.sample_jit.lower(
      run.model, run.params, key, labels, height=height, width=width, plan=plan,
      indices=indices).compile()
  return _COMPILED[cache_key], time.perf_counter() - began


def generate(run: Run, *, height: int, width: int, labels, seed: int = 0,
             plan: sampler.SamplingPlan | None = None, batch_size: int = 64,
             progress: bool = False, stats: dict | None = None) -> np.ndarray:
  """uint8 images (len(labels), height, width, C) for the given labels.

  stats, if given, receives compile_seconds (0 when already compiled) and images_per_second.
  """
  plan = plan or config_lib.sampling_plan(run.config)
  sampler.check_resolution(run.model, plan, height, width)
  labels = check_labels(labels, run.model.num_classes)
  devices = jax.local_devices()
  data = NamedSharding(training.make_mesh(1, devices=devices), P('data'))
  # A batch is a multiple of the device count; the last one is padded and the padding dropped.
  batch_size = max(len(devices), batch_size - batch_size % len(devices))
  batch_size = min(batch_size, -(-len(labels) // len(devices)) * len(devices))
  key = jax.random.key(seed)
  outputs, compile_seconds, sample_seconds = [], 0.0, 0.0
  for start in tqdm.tqdm(range(0, len(labels), batch_size), disable=not progress,
                         desc=f'{height}x{width}'):
    count = min(batch_size, len(labels) - start)
    batch_labels = jax.device_put(np.resize(labels[start:start + count], batch_size), data)
    indices = jax.device_put(np.arange(start, start + batch_size, dtype=np.int32), data)
    compiled, seconds = _compiled_sampler(run, plan, height, width, batch_labels, indices, key)
    compile_seconds += seconds
    began = time.perf_counter()
    generated = compiled(run.params, key, batch_labels, indices=indices)
    outputs.append(images_lib.to_uint8(generated)[:count])
    sample_seconds += time.perf_counter() - began
  if stats is not None:
    stats['compile_seconds'] = compile_seconds
    stats['images_per_second'] = len(labels) / sample_seconds
  return np.concatenate(outputs)


def notes(run: Run, plan: sampler.SamplingPlan, height: int, width: int) -> list[str]:
  """What a user should know about this plan at this size: a legacy setting, or an extrapolation
  that changes nothing here because the tokens lie inside the trained range."""
  found = rope.legacy_notes(plan.encoding)
  canonical = sampler.canonical_plan(run.model, plan, height, width)
  if canonical.encoding != plan.encoding and plan.encoding.extrapolation != 'none':
    grid, trained = run.model.geometry(height, width).grid, run.model.position_range
    found.append(f'note: at {height}x{width} the {grid[0]}x{grid[1]} tokens lie inside the trained '
                 f'range {trained[0]}x{trained[1]}: extrapolation={plan.encoding.extrapolation}'
                 f'{" with dype" if plan.encoding.dype else ""} changes nothing at this size')
  return found


def write_samples(run: Run, plan: sampler.SamplingPlan, resolutions, paths, labels, *,
                  seed: int = 0, batch_size: int = 64, class_names=None) -> None:
  """Generates `labels` at each resolution and saves them to the matching path, saying what it did
  and how fast."""
  for (height, width), path in zip(resolutions, paths):
    for note in notes(run, plan, height, width):
      print(note, flush=True)
    stats = {}
    images = generate(run, height=height, width=width, labels=labels, seed=seed, plan=plan,
                      batch_size=batch_size, progress=True, stats=stats)
    save(path, images, labels, class_names)
    print(f'{height}x{width}: {len(images)} images -> {path}  (compile '
          f'{stats["compile_seconds"]:.1f} s, {stats["images_per_second"]:.1f} images/s)',
          flush=True)


def save(path, images, labels, class_names=None) -> None:
  """A PNG grid with one titled row per label, or an ADM-style .npz (arr_0 uint8 NHWC, labels)."""
  path = pathlib.Path(path)
  images, labels = np.asarray(images, np.uint8), np.asarray(labels)
  if path.suffix == '.npz':
    with files.atomic_path(path) as tmp:
      np.savez(tmp, arr_0=images, labels=labels.astype(np.int64))
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
  images_lib.save_grid(path, np.stack(rows), rows=len(distinct), row_labels=names)
