"""Ahead-of-time compilation for a target: the programs a user runs, built on abstract inputs for
a mesh of any devices (a TPU slice's compile-only devices on a CPU host, or this process's), and
what the compiler says about them: compile time, memory per chip, FLOPs, whether it fits.

  devices = aot.topology_devices('v5e-8')                   # needs libtpu (pip install 'jax[tpu]')
  programs = aot.programs(config, devices, resolutions=[(256, 256)], sample_batch=64)
  reports = [aot.compile_program(p) for p in programs]

With libtpu installed, `jax.experimental.topologies` describes the devices of a TPU slice without
one, and `lower(...).compile()` runs the real TPU compiler (XLA:TPU, Mosaic for Pallas kernels);
its memory analysis is per chip, and it refuses a program that does not fit the chip's HBM
(RESOURCE_EXHAUSTED) at compile time. benchmarks/tpu_compile.py is the command over this module.
"""

import dataclasses
import functools
from collections.abc import Callable
import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rpe2d import attention, autoencoder, checks, config as config_lib, inference
from rpe2d import model as model_lib, sampler, training

# Cloud TPU slice names -> (the topology name jax.experimental.topologies takes, its options). A
# v4 or v5p chip holds two TensorCores that jax drives as one device ('megacore'); a single-host
# v5e-8 or v6e-8 is 2x4 chips on one host. Any other topology name (e.g. 'v5e:2x2') is passed
# through with default options.
TOPOLOGIES = {
    'v4-8': ('v4:2x2x1', {'chip_config_name': 'megacore'}),
    'v5p-8': ('v5p:2x2x1', {'chip_config_name': 'megacore'}),
    'v5e-4': ('v5e:2x2', {}),
    'v5e-8': ('v5e:2x4', {'chips_per_host_bounds': (2, 4, 1)}),
    'v6e-4': ('v6e:2x2', {}),
    'v6e-8': ('v6e:2x4', {'chips_per_host_bounds': (2, 4, 1)}),
}
PROGRAMS = ('train', 'sample_step', 'sampler', 'decode')
# Model evaluations in one step of the fixed-step solvers (sampler.SAMPLERS), CFG's doubled batch
# aside. dopri5 takes as many steps as its solve needs.
FIXED_STEP_EVALUATIONS = {'euler': 1, 'heun': 2, 'euler_maruyama': 1}
OUT_OF_MEMORY = re.compile(r'RESOURCE_EXHAUSTED.*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)',
                           re.S)


def topology_devices(name: str) -> list:
  """The compile-only devices of a TPU slice: a name of TOPOLOGIES (v4-8, v5e-8, v5p-8, ...) or a
  topology name jax takes ('v5e:2x2', 'v4:2x2x2', ...). Needs libtpu; nothing runs on them."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compile-only devices run nothing: several processes compiling at once (a table's cases,
  # pytest's workers) may share libtpu, which otherwise admits one process per machine.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError(f"topology {name!r}: compiling for a TPU needs libtpu, which is not "
                     "installed here: pip install -e '.[tpu]' (or 'jax[tpu]')")
  topology, options = TOPOLOGIES.get(name, (name, {}))
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform='tpu',
                                             **options).devices)
  except Exception as e:  # pylint: disable=broad-except  # jax's words vary: one line of them
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'topology {name!r}: {reason}; use one of {", ".join(TOPOLOGIES)} or a jax '
                     "topology name like 'v5e:2x2'") from None


@dataclasses.dataclass(frozen=True)
class Program:
  """One program to compile: `lower()` traces and lowers it for its mesh over `devices`; `flops`
  is the analytic count of one call per device (model.forward_flops), `visible_flops` the part
  XLA's cost analysis sees, which counts each loop body once (a solver step of the sampler's
  `lax.scan`, one block of nn.scan); `what` says what one call does."""
  name: str
  what: str
  lower: Callable
  flops: float
  visible_flops: float
  devices: tuple


@dataclasses.dataclass
class Report:
  """What compiling a Program gave, per device (chip): sizes in bytes, times in seconds."""
  name: str
  what: str
  devices: int
  device_kind: str
  hbm: float | None              # the device's memory as the compiler counts it (None: unknown)
  lower_s: float = 0.0
  compile_s: float = 0.0
  arguments: float = 0.0
  outputs: float = 0.0
  aliased: float = 0.0           # outputs that reuse a donated argument's memory
  temporaries: float = 0.0
  peak: float = 0.0              # the compiler's peak, the figure it checks against its HBM
  xla_flops: float | None = None  # what XLA's cost analysis counts (each loop body once)
  flops: float = 0.0             # analytic, per device, one call
  visible_flops: float = 0.0     # analytic, per device, each loop body once: XLA's count's peer
  error: str | None = None       # why it did not compile

  @property
  def fits(self) -> bool:
    return self.error is None and (self.hbm is None or self.peak <= self.hbm)


def _abstract(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def build(config, platform: str):
  """(model, training plan, sampling plan) of `config` checked for `platform` (the attention
  kernel must exist there), without the data set (compiling needs only shapes)."""
  config = config_lib.resolve(config)
  checks.check(config_lib.SCHEMA, config)
  model_lib.validate_shape(config.model.variant, config.model.position_embedding)
  attention.check_kernel(config.model.attention_implementation, platform)
  return (config_lib.build_model(config), config_lib.training_plan(config),
          config_lib.sampling_plan(config))


def train_program(config, devices, fsdp: int | None = None) -> Program:
  """The train step of `config` (its batch_size, global) on a ('data', 'fsdp') mesh over
  `devices`; fsdp defaults to the config's mesh.fsdp, resolved and checked as train.py does
  (training.resolve_fsdp: 0 is auto; a train state that cannot fit is refused)."""
  model, plan, _ = build(config, devices[0].platform)
  if config.batch_size % len(devices):
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {len(devices)} '
                     f'devices; use a multiple of {len(devices)}')
  fsdp = training.resolve_fsdp(config.mesh.fsdp if fsdp is None else fsdp, model, plan, devices)
  mesh = training.make_mesh(fsdp, devices=devices)
  trainer = training.Trainer(model, plan, mesh)
  batch, size, channels = config.batch_size, config.data.image_size, config.data.channels
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_sharding)
  shapes = {'image': ((batch, size, size, channels), jnp.float32), 'label': ((batch,), jnp.int32),
            'crop': ((batch, 4), jnp.float32)}
  inputs = {k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_sharding)
            for k, (s, d) in shapes.items()}
  flops = 3 * model_lib.forward_flops(model.variant, size, size, channels) * batch / len(devices)
  what = (f'train step, batch {batch}, {size}x{size}x{channels}, mesh data x fsdp = '
          f'{mesh.shape["data"]} x {mesh.shape["fsdp"]}')
  return Program('train', what, lambda: trainer.step.lower(state, inputs), flops,
                 flops / _scanned_depth(model), tuple(devices))


def _scanned_depth(model) -> int:
  """How many times nn.scan runs the block that XLA's cost analysis counts once (1 unrolled)."""
  return model_lib.parse_variant(model.variant)[1] if model.scan_layers else 1


def sample_program(config, devices, height: int, width: int, batch: int,
                   steps: int | None = None) -> Program:
  """The sampler of `config` drawing `batch` images (split over `devices`) of height x width in
  the model's space (latents for a latent run), as inference.generate compiles it: weights
  replicated, the batch on the 'data' axis. steps: the solver steps (default: the config's)."""
  model, _, plan = build(config, devices[0].platform)
  if batch % len(devices):
    raise ValueError(f'a sampler batch of {batch} does not split over {len(devices)} devices; '
                     f'use a multiple of {len(devices)}')
  if steps is not None:
    plan = dataclasses.replace(plan, steps=steps)
  plan = sampler.canonical_plan(model, plan, height, width)
  mesh = training.make_mesh(1, devices=devices)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  with jax.set_mesh(mesh):  # keys made inside the traces: the mesh's devices are compile-only
    params = _abstract(jax.eval_shape(lambda: training.init_params(model, jax.random.key(0))),
                       replicated)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=replicated)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)  # and the example indices

  def lower():
    with jax.set_mesh(mesh):
      return sampler.sample_with_stats_jit.lower(model, params, key, labels, height=height,
                                                 width=width, plan=plan, indices=labels)

  evaluations = FIXED_STEP_EVALUATIONS.get(plan.sampler, 0) * (2 if plan.cfg_scale != 1.0 else 1)
  per_step = evaluations * model_lib.forward_flops(model.variant, height, width,
                                                   model.channels) * batch / len(devices)
  # dopri5's step count is the solve's, and its stages are a loop inside its loop: no count.
  adaptive = plan.sampler not in FIXED_STEP_EVALUATIONS
  name = 'sampler' if steps is None else 'sample_step'
  factor = latent_factor(config)
  size = f'{height}x{width}x{model.channels}'
  what = (f'{plan.sampler}{"" if adaptive else f" x {plan.steps}"}'
          f'{", CFG" if plan.cfg_scale != 1.0 else ""}, batch {batch}, '
          + (f'{height * factor}x{width * factor} from {size} latents' if factor > 1 else size))
  return Program(name, what, lower, 0.0 if adaptive else plan.steps * per_step,
                 0.0 if adaptive else per_step / _scanned_depth(model), tuple(devices))


def decode_program(devices, latent_height: int, latent_width: int,
                   vae: autoencoder.Config = autoencoder.PRESETS['sd']) -> Program:
  """The VAE decode of latents of latent_height x latent_width as inference.decode runs it: whole,
  split over `devices`, as many images per device as DECODE_PIXELS_PER_DEVICE allows."""
  per_device = max(1, inference.DECODE_PIXELS_PER_DEVICE // (latent_height * latent_width))
  batch = per_device * len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  fn = autoencoder.sharded(functools.partial(autoencoder.decode, config=vae), mesh)
  params = _abstract(autoencoder.param_shapes(vae), NamedSharding(mesh, P()))
  latents = jax.ShapeDtypeStruct((batch, latent_height, latent_width, vae.latent_channels),
                                 jnp.float32, sharding=NamedSharding(mesh, P('batch')))
  factor = vae.downsampling
  what = (f'VAE decode, batch {batch}, {latent_height * factor}x{latent_width * factor} from '
          f'{latent_height}x{latent_width}x{vae.latent_channels}')
  return Program('decode', what, lambda: fn.lower(params, latents), 0.0, 0.0, tuple(devices))


def latent_factor(config) -> int:
  """Image pixels per model pixel: the SD VAE's downsampling for a latent run, else 1."""
  return autoencoder.PRESETS['sd'].downsampling if inference.is_latent(config) else 1


def programs(config, devices, *, which=PROGRAMS, resolutions=(), sample_batch: int = 0,
             fsdp: int | None = None) -> list[Program]:
  """The programs `which` names for `config` on `devices`: the train step, then per resolution
  (pixels) one sampler step, the whole sampler and (latent runs) the VAE decode. sample_batch:
  images per sampler call (default: one per device)."""
  config = config_lib.resolve(config)
  factor = latent_factor(config)
  out = []
  if 'train' in which:
    out.append(train_program(config, devices, fsdp))
  batch = sample_batch or len(devices)
  for height, width in resolutions:
    h, w = height // factor, width // factor
    if 'sample_step' in which:
      out.append(sample_program(config, devices, h, w, batch, steps=1))
    if 'sampler' in which:
      out.append(sample_program(config, devices, h, w, batch))
    if 'decode' in which and factor > 1:
      out.append(decode_program(devices, h, w))
  return out


def compile_program(program: Program) -> Report:
  """Lowers and compiles `program` and reads the compiler's memory and cost analyses; a program
  the compiler refuses (out of memory, an unsupported kernel) gives a Report with `error`."""
  device = program.devices[0]
  report = Report(program.name, program.what, len(program.devices), device.device_kind,
                  training.device_memory(device), flops=program.flops,
                  visible_flops=program.visible_flops)
  began = time.perf_counter()
  try:
    lowered = program.lower()
    report.lower_s = time.perf_counter() - began
    began = time.perf_counter()
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # the compiler's refusal is the result
    report.compile_s = time.perf_counter() - began
    text = str(e)
    needed = OUT_OF_MEMORY.search(text)
    if needed:
      report.peak, report.hbm = float(needed.group(1)) * 2**30, float(needed.group(2)) * 2**30
      report.error = 'out of memory'
    else:
      lines = [l for l in text.strip().splitlines() if l.strip()] or [type(e).__name__]
      report.error = f'{type(e).__name__}: {lines[0][:240]}'
    return report
  report.compile_s = time.perf_counter() - began
  memory = compiled.memory_analysis()
  report.arguments = memory.argument_size_in_bytes
  report.outputs = memory.output_size_in_bytes
  report.aliased = memory.alias_size_in_bytes
  report.temporaries = memory.temp_size_in_bytes
  report.peak = getattr(memory, 'peak_memory_in_bytes', 0) or (
      report.arguments + report.outputs - report.aliased + report.temporaries)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.xla_flops = float(cost.get('flops', 0.0)) if cost else None
  return report

