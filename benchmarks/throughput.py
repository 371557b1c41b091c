"""Training and sampling throughput of one config on whatever devices jax sees (CPU, GPU, TPU).

  PYTHONPATH=. python benchmarks/throughput.py                       # configs/default.py
  PYTHONPATH=. python benchmarks/throughput.py --config=configs/imagenet.py:XL,256,rpe2d \
      --config.model.attention_implementation=cudnn --steps=20

Prints: the devices; the train step's compile time; train images/s on synthetic batches already on
the devices (no data loading), TFLOP/s per device and MFU (against
`rpe2d.training.peak_flops_per_device`); the project's FLOP count against XLA's cost analysis;
images/s with the real data pipeline, and of the loader alone; peak device memory; sampling
images/s at the training resolution with the config's sampling plan. A config whose data is not
there (e.g. ImageNet latents) still gets every synthetic row; the data rows say why they were
skipped. --results_json writes the numbers for benchmarks/device_check.py.
"""

import dataclasses
import json
import pathlib
import resource
import sys
import time

from absl import app, flags, logging

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import config as config_lib, data, sampler, training

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = flags.DEFINE_string('config', str(_HERE.parent / 'configs' / 'default.py'),
                              'Config file (file.py or file.py:args); --config.<key>=<value> '
                              'overrides any field.')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed train steps (and loader batches)', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps after compiling', lower_bound=0)
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 8, 'solver steps of the sampling row '
                                     '(0: the config\'s sampling.steps)', lower_bound=0)
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 0, 'images per sampling call (0: the '
                                     'per-device training batch)', lower_bound=0)
_SAMPLE_REPEATS = flags.DEFINE_integer('sample_repeats', 2, 'timed sampling calls',
                                       lower_bound=1)
_SAMPLE = flags.DEFINE_bool('sample', True, 'measure sampling too')
_RESULTS_JSON = flags.DEFINE_string('results_json', None, 'also write the numbers here as JSON')

FLOP_TOLERANCE = 0.05  # the analytic count and XLA's may differ by elementwise work only
WHOLE_IMAGE = np.float32([0.0, 0.0, 1.0, 1.0])


def validated(config):
  """(the config's typed objects, why its data cannot be read or None).

  A latent config without latents (no data.latent_dir) is checked with a stand-in directory: the
  model, plans and synthetic batches do not read the data.
  """
  try:
    return config_lib.validate(config), None
  except ValueError as e:
    if config.data.name != 'latents' or config.data.latent_dir:
      raise
    reason = str(e)
  stand_in = config.copy_and_resolve_references()
  stand_in.data.latent_dir = '<none: synthetic batches>'
  return config_lib.validate(stand_in), reason


def synthetic_batch(config, batch: int) -> dict:
  s, c = config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  return {'image': rng.standard_normal((batch, s, s, c), dtype=np.float32),
          'label': rng.integers(0, config.data.num_classes, batch).astype(np.int32),
          'crop': np.tile(WHOLE_IMAGE, (batch, 1))}


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'


def peak_memory() -> tuple[float, str]:
  """(bytes, what was measured): the largest device peak where jax reports one, else the RSS."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  if peaks:
    return float(max(peaks)), 'device peak_bytes_in_use (largest device)'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, 'process peak RSS'


def timed(fn, repeats: int) -> float:
  """Seconds for `repeats` calls of fn, blocking once at the end (dispatch may run ahead)."""
  began = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - began


def measure(config, steps: int, warmup: int, sample: bool, sample_steps: int, sample_batch: int,
            sample_repeats: int) -> dict:
  built, data_problem = validated(config)
  devices = jax.devices()
  count, kind = len(devices), devices[0].device_kind
  batch = config.batch_size
  if batch % count:
    raise ValueError(f'batch_size={batch} is not divisible by the {count} devices; use a '
                     f'multiple of {count}')
  out = dict(device_kind=kind, device_count=count, variant=config.model.variant,
             image_size=config.data.image_size, channels=config.data.channels, batch=batch,
             dtype=config.model.dtype, attention=config.model.attention_implementation,
             scan_layers=config.model.scan_layers)
  print(f'devices: {count} x {kind} ({jax.default_backend()})')
  print(f'model: {config.model.variant} on {config.data.image_size}x{config.data.image_size}x'
        f'{config.data.channels}, batch {batch}, {config.model.dtype}, attention '
        f'{config.model.attention_implementation}, scan_layers {config.model.scan_layers}', flush=True)

  trainer = training.Trainer(built.model, built.training, training.make_mesh(
      training.resolve_fsdp(config.mesh.fsdp, built.model, built.training, jax.devices())))
  state = trainer.init_state()
  device_batch = trainer.device_batch(synthetic_batch(config, batch // jax.process_count()))
  began = time.perf_counter()
  step = trainer.step.lower(state, device_batch).compile()
  out['compile_s'] = time.perf_counter() - began
  print(f'compile: {out["compile_s"]:.1f} s', flush=True)

  for _ in range(warmup):
    state, _ = step(state, device_batch)
  jax.block_until_ready(state)

  def train_one():
    nonlocal state
    state, metrics = step(state, device_batch)
    return metrics
  seconds = timed(train_one, steps)
  out['images_per_s'] = steps * batch / seconds
  flops_per_image = trainer.flops_per_image()
  out['tflops_per_device'] = out['images_per_s'] * flops_per_image / count / 1e12
  peak = training.peak_flops_per_device()
  out['mfu'] = out['tflops_per_device'] * 1e12 / peak if peak else None
  mfu = 'n/a' if out['mfu'] is None else f'{100 * out["mfu"]:.1f}%'
  print(f'train (synthetic, device-resident): {out["images_per_s"]:.1f} img/s, '
        f'{1e3 * seconds / steps:.1f} ms/step, {out["tflops_per_device"]:.3f} TFLOP/s per device, '
        f'MFU {mfu}'
        + (f' (peak {peak / 1e12:.0f} TFLOP/s)' if peak else ' (no peak known for this device)'))

  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost['flops']) * count if cost and 'flops' in cost else None
  analytic = flops_per_image * batch
  out['analytic_flops'], out['xla_flops'] = analytic, xla_flops
  if xla_flops:
    flop_ratio = xla_flops / analytic
    out['flop_ratio'] = flop_ratio
    flag = '' if abs(flop_ratio - 1) <= FLOP_TOLERANCE else (
        f'  <-- off by more than {100 * FLOP_TOLERANCE:.0f}%')
    print(f'FLOPs per step: project {analytic / 1e12:.4f} T (3 x forward_flops x batch), XLA cost '
          f'analysis {xla_flops / 1e12:.4f} T (per-device program x {count}); XLA / project '
          f'{flop_ratio:.3f}{flag}')
  else:
    print('FLOPs per step: XLA reports no cost analysis on this backend')
  sys.stdout.flush()

  if data_problem is None:
    try:
      iterator = data.make_iterator(config.data, split='train', seed=config.seed,
                                    global_batch_size=batch)
      next(iterator)  # the first batch: starts the reader threads
    except Exception as e:  # pylint: disable=broad-except  # any reason the data cannot be read
      data_problem = first_line(e)
  if data_problem is None:
    def train_loaded():
      nonlocal state
      state, metrics = step(state, trainer.device_batch(next(iterator)))
      return metrics
    for _ in range(warmup):
      jax.block_until_ready(train_loaded())
    out['data_images_per_s'] = steps * batch / timed(train_loaded, steps)
    for _ in range(data.parse_config(config.data).prefetch_batches):
      next(iterator)  # empty the read-ahead buffer (filled while the steps ran): time the readers
    began = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    out['loader_images_per_s'] = steps * batch / (time.perf_counter() - began)
    print(f'train with the data pipeline: {out["data_images_per_s"]:.1f} img/s')
    print(f'loader alone (next(iterator)): {out["loader_images_per_s"]:.1f} img/s')
  else:
    out['data_skipped'] = data_problem
    print(f'train with the data pipeline: skipped: {data_problem}')
    print(f'loader alone: skipped: {data_problem}')

  memory, what = peak_memory()
  out['peak_memory_bytes'], out['peak_memory_what'] = memory, what
  print(f'peak memory: {memory / 2**30:.2f} GiB ({what})', flush=True)

  if not sample:
    return out
  plan = built.sampling
  if sample_steps:
    plan = dataclasses.replace(plan, steps=sample_steps)
  sample_batch = sample_batch or max(batch // count, 1)
  labels = jnp.arange(sample_batch, dtype=jnp.int32) % built.model.num_classes
  size = config.data.image_size
  key = jax.random.key(0)

  def draw():
    with jax.set_mesh(trainer.mesh):  # the kernels' platform and shard_map axes, as in training
      return sampler.sample_jit(built.model, state.ema_params, key, labels, height=size,
                                width=size, plan=plan)
  began = time.perf_counter()
  jax.block_until_ready(draw())
  out['sample_compile_s'] = time.perf_counter() - began
  out['sample_images_per_s'] = sample_repeats * sample_batch / timed(draw, sample_repeats)
  out['sample_steps'], out['sample_batch'] = plan.steps, sample_batch
  print(f'sampling ({plan.sampler}, {plan.steps} steps, cfg {plan.cfg_scale}, batch '
        f'{sample_batch}, {size}x{size}): {out["sample_images_per_s"]:.2f} img/s '
        f'(first call with compile {out["sample_compile_s"]:.1f} s)', flush=True)
  return out


def main(argv):
  extra, overrides = config_lib.split_overrides(argv[1:])
  if extra:
    raise app.UsageError(f'unexpected arguments: {extra}')
  logging.set_verbosity(logging.WARNING)  # tfds logs every file it touches at INFO
  try:
    config = config_lib.load(_CONFIG.value, overrides)
    results = measure(config, _STEPS.value, _WARMUP.value, _SAMPLE.value, _SAMPLE_STEPS.value,
                      _SAMPLE_BATCH.value, _SAMPLE_REPEATS.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if _RESULTS_JSON.value:
    pathlib.Path(_RESULTS_JSON.value).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
