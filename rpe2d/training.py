"""Sharded training: the mesh, sharding rules, train state, optimizer and the jitted train step.

What a step does is a `TrainingPlan`, built once from the config (config.training_plan) like the
sampler's SamplingPlan; the geometry (train grid, position range, micro-conditioning) is the
model's.

The mesh has axes ('data', 'fsdp'). Batches split over both; parameters and optimizer state split
their largest divisible dimension over 'fsdp' (replicated when that axis has size 1). The step is one
`jax.jit` with explicit in/out shardings and a donated state, traced with the mesh as the context
mesh (`jit_on_mesh`), so the same code runs on one CPU, one GPU or a TPU slice, and compiles for a
TPU topology from a CPU host (benchmarks/tpu_compile.py).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rpe2d import flow, model as model_lib, positions

BATCH_AXES = ('data', 'fsdp')
# What the loop does after a step whose loss or gradient is not finite (never applied either way).
NONFINITE_POLICIES = ('error', 'skip')
MIN_SHARDED_SIZE = 2**14   # smaller arrays stay replicated: splitting them costs more than it saves
# mesh.fsdp=0 (auto): the fewest fsdp devices whose share of the train state and gradients takes at
# most this share of a device's memory; the rest is left for activations (docs/methods.md#memory).
AUTO_FSDP_SHARE = 0.5

# Peak dense bf16 FLOP/s per device (docs/methods.md#flop-accounting), by jax's device_kind: the
# whole kind, else a part of it (GPU kinds carry the board's name). A v5p chip's kind is 'TPU v5'.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5': 459e12,
              'TPU v5 lite': 197e12, 'TPU v4': 275e12, 'TPU v6 lite': 918e12}
# A TPU chip's memory as XLA:TPU counts it when it checks that a program fits (the 'available HBM'
# of its out-of-memory error, libtpu 0.0.42.1), by device_kind: a real device reports its own
# (memory_stats), compile-only devices (rpe2d/aot.py) do not.
TPU_HBM = {'TPU v2': 7.48 * 2**30, 'TPU v3': 15.48 * 2**30, 'TPU v4': 30.75 * 2**30,
           'TPU v5 lite': 15.75 * 2**30, 'TPU v5': 95.74 * 2**30, 'TPU v6 lite': 31.25 * 2**30}


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  """Everything about a training step that is not an array or the model. Static and hashable."""
  seed: int = 0
  positions: str = 'grid'               # positions.TRAIN_RULES
  per_example: bool = True              # RPE-2D: one subset per example (else per batch)
  continuous: bool = False              # RPE-2D: sorted uniform floats instead of integers
  time_sampling: str = 'logit_normal'   # flow.TIME_SAMPLINGS
  time_mean: float = 0.0
  time_std: float = 1.0
  time_shift: float = 1.0
  class_dropout: float = 0.1
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  schedule: str = 'constant'            # SCHEDULES: the learning rate after warmup
  total_steps: int = 0                  # where a decaying schedule reaches 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0
  ema_decay: float = 0.995


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema_params: dict


def make_mesh(fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be a positive divisor of the device count '
                     f'{len(devices)}')
  # Auto axes: the compiler propagates shardings through the model without per-op annotations.
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def jit_on_mesh(fn, mesh, **options):
  """`jax.jit(fn, **options)`, traced, lowered and called with `mesh` as the context mesh
  (`jax.set_mesh`): the attention kernels read from it the platform the program is compiled for
  and the axes a kernel XLA cannot partition runs over under shard_map
  (docs/methods.md#attention-kernels). Has the jitted function's `__call__` and `lower`."""
  return _OnMesh(jax.jit(fn, **options), mesh)


@dataclasses.dataclass(frozen=True)
class _OnMesh:
  jitted: Callable
  mesh: jax.sharding.Mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def abstract_train_state(model, plan: TrainingPlan) -> TrainState:
  """The train state's shapes and dtypes (nothing computed), traced for the context mesh."""
  # The key is made inside the trace: the context mesh's devices may be compile-only.
  return jax.eval_shape(lambda: create_state(model, make_optimizer(plan), jax.random.key(0)))


def state_bytes(abstract_state, fsdp: int) -> float:
  """Bytes per device of the train state (parameters, AdamW moments, EMA) and the gradients (one
  more copy of the parameters) when the fsdp axis has `fsdp` devices, under `fsdp_spec`."""
  def per_device(x):
    return math.prod(x.shape) * x.dtype.itemsize / (fsdp if fsdp_spec(x.shape, fsdp) else 1)
  return (sum(per_device(x) for x in jax.tree.leaves(abstract_state))
          + sum(per_device(x) for x in jax.tree.leaves(abstract_state.params)))


def resolve_fsdp(fsdp: int, model, plan: TrainingPlan, devices) -> int:
  """mesh.fsdp on `devices`: `fsdp` itself, or for 0 (auto) the smallest divisor of the device
  count whose `state_bytes` take at most AUTO_FSDP_SHARE of a device's memory (1 where the memory
  is unknown, e.g. on CPUs). Refuses, before anything compiles, an fsdp whose train state and
  gradients alone exceed a device's memory, naming the fsdp that fits."""
  count = len(devices)
  if fsdp < 0 or (fsdp and count % fsdp):
    raise ValueError(f'mesh.fsdp={fsdp} must divide the {count} devices (or be 0: auto)')
  memory = device_memory(devices[0])
  if memory is None:
    return fsdp or 1
  with jax.set_mesh(make_mesh(1, devices)):  # traced for these devices' platform
    state = abstract_train_state(model, plan)
  divisors = [d for d in range(1, count + 1) if count % d == 0]
  fitting = [d for d in divisors if state_bytes(state, d) <= AUTO_FSDP_SHARE * memory]
  if not fsdp:
    return fitting[0] if fitting else divisors[-1]
  needed = state_bytes(state, fsdp)
  if needed > memory:
    fix = (f'set --config.mesh.fsdp={fitting[0]} ({state_bytes(state, fitting[0]) / 2**30:.1f} '
           'GiB) or 0 (auto)' if fitting else 'use more devices or a smaller model')
    raise ValueError(f'mesh.fsdp={fsdp}: the train state and gradients alone take '
                     f'{needed / 2**30:.1f} GiB per device, more than the {memory / 2**30:.2f} GiB '
                     f'of a {devices[0].device_kind}; {fix}')
  return fsdp


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, fsdp_size: int) -> P:
  """Shards the largest dimension that fsdp divides, for arrays worth sharding."""
  if fsdp_size == 1 or not shape or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return P(*spec)
  return P()


def state_sharding(abstract_state, mesh):
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)),
                      abstract_state)


def _constant(plan: TrainingPlan) -> optax.Schedule:
  return optax.constant_schedule(plan.learning_rate)


def _cosine(plan: TrainingPlan) -> optax.Schedule:
  # Annealed to 0 at total_steps. On the animals default's budget a constant rate scored better
  # (docs/default_recipe.md): the EMA already averages the last steps of an unconverged model.
  return optax.cosine_decay_schedule(plan.learning_rate,
                                     max(plan.total_steps - plan.warmup_steps, 1))


# name -> the learning rate after warmup, from the end of warmup on.
SCHEDULES = {'constant': _constant, 'cosine': _cosine}


def learning_rate_schedule(plan: TrainingPlan) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, plan.learning_rate, max(plan.warmup_steps, 1))
  return optax.join_schedules([warmup, SCHEDULES[plan.schedule](plan)], [plan.warmup_steps])


def make_optimizer(plan: TrainingPlan) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(plan.grad_clip),
      optax.adamw(learning_rate_schedule(plan), b1=plan.b1, b2=plan.b2,
                  weight_decay=plan.weight_decay))


def example_inputs(model, batch: int = 1):
  """Zeros shaped like one batch at the model's training resolution, for init and shapes."""
  h, w = model.train_grid
  patch = model.patch_size
  return (jnp.zeros((batch, h * patch, w * patch, model.channels)), jnp.zeros((batch,)),
          jnp.zeros((batch,), jnp.int32), positions.grid(h, w, batch))


def init_params(model, key):
  return model.init(key, *example_inputs(model))


def create_state(model, optimizer, key) -> TrainState:
  params = init_params(model, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=params)


def abstract_saved_params(model, mesh):
  """A model's parameters as a checkpoint holds them (per-block layout), as jax.ShapeDtypeStruct
  leaves sharded for `mesh` like a Trainer's: for restoring another model's weights."""
  abstract = jax.eval_shape(lambda key: model_lib.unstack_blocks(init_params(model, key)),
                            jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, state_sharding(abstract, mesh))


def train_positions(model, plan: TrainingPlan, key, batch: int):
  """(batch, h0*w0, 2) positions of one training batch
  (docs/methods.md#rpe-2d-training-positions)."""
  h, w = model.train_grid
  if plan.positions == 'grid':
    return positions.grid(h, w, batch)
  max_h, max_w = model.position_range
  return positions.rpe2d(key, h, w, max_h, max_w, batch, per_example=plan.per_example,
                         continuous=plan.continuous)


def seed_key(seed: int) -> jax.Array:
  """The PRNG key of a 64-bit seed. jax.random.key keeps only the low 32 bits of a seed unless
  x64 is on (seed 2**32 would give the key of seed 0); this builds threefry's key from both halves
  as jax does with x64, so seeds below 2**32 give the same key as jax.random.key."""
  seed = int(seed)
  if seed < 2**32 or jax.config.jax_default_prng_impl != 'threefry2x32':
    return jax.random.key(seed)
  return jax.random.wrap_key_data(jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32))


def train_step(state: TrainState, batch, *, model, optimizer, plan: TrainingPlan):
  """One optimizer step. Randomness derives from (seed, step): a resumed run repeats it exactly.

  metrics['finite'] says whether the loss, the gradient and the updated parameters were finite; a
  step where they were not changes nothing but the step counter (config.nonfinite decides whether
  training goes on).
  """
  key = jax.random.fold_in(seed_key(plan.seed), state.step)
  key_positions, key_loss = jax.random.split(key)
  images, labels = batch['image'], batch['label']
  token_positions = train_positions(model, plan, key_positions, images.shape[0])
  crop = batch['crop'] if model.micro_conditioning else None
  loss_fn = functools.partial(
      flow.loss, model.apply, num_classes=model.num_classes, class_dropout=plan.class_dropout,
      time_sampling=plan.time_sampling, time_mean=plan.time_mean, time_std=plan.time_std,
      time_shift=plan.time_shift)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, key_loss, images, labels,
                                            token_positions, crop)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = plan.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)  # NaN or Inf if any gradient is
  # What is saved must be finite too: a finite gradient can still make NaN parameters (a NaN or
  # huge learning rate, an optimizer state gone bad).
  update_finite = jax.tree.reduce(jnp.logical_and,
                                  jax.tree.map(lambda p: jnp.isfinite(p).all(), params))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
             'update_finite': update_finite,
             'learning_rate': learning_rate_schedule(plan)(state.step)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params)
  unchanged = state.replace(step=new_state.step)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, unchanged)
  return new_state, metrics


class Trainer:
  """The compiled init and step of one model and plan on one mesh."""

  def __init__(self, model, plan: TrainingPlan, mesh):
    self.model, self.plan, self.mesh = model, plan, mesh
    self.optimizer = make_optimizer(plan)
    new_state = functools.partial(create_state, model, self.optimizer)
    with jax.set_mesh(mesh):  # traced for the mesh's platform, like the step
      self.abstract_state = abstract_train_state(model, plan)
    self.state_sharding = state_sharding(self.abstract_state, mesh)
    self.batch_sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    step = functools.partial(train_step, model=model, optimizer=self.optimizer, plan=plan)
    self.step = jit_on_mesh(step, mesh, in_shardings=(self.state_sharding, self.batch_sharding),
                            out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self._init = jit_on_mesh(new_state, mesh, out_shardings=self.state_sharding)
    # Checkpoints hold the per-block layout whatever model.scan_layers is, so a run can change it.
    self.abstract_saved_state = jax.eval_shape(model_lib.unstack_blocks, self.abstract_state)
    self.saved_sharding = state_sharding(self.abstract_saved_state, mesh)
    self._to_saved = jax.jit(model_lib.unstack_blocks, out_shardings=self.saved_sharding)
    self._from_saved = jax.jit(model_lib.stack_blocks, out_shardings=self.state_sharding)

  def init_state(self) -> TrainState:
    return self._init(seed_key(self.plan.seed))

  def abstract_sharded_state(self) -> TrainState:
    """The state as a checkpoint holds it (per-block layout), as jax.ShapeDtypeStruct leaves with
    this mesh's shardings, for restoring."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_saved_state, self.saved_sharding)

  def to_saved(self, state: TrainState) -> TrainState:
    """The state in the checkpoint layout (a copy when the model scans its blocks)."""
    return self._to_saved(state) if self.model.scan_layers else state

  def from_saved(self, state: TrainState) -> TrainState:
    """A restored state (or weights) in this model's layout."""
    return self._from_saved(state) if self.model.scan_layers else state

  def device_batch(self, local_batch):
    """Process-local numpy batch -> global arrays sharded over the batch axes."""
    names = ('image', 'label', 'crop')
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, local_batch[k])
            for k in names}

  def flops_per_image(self) -> float:
    h, w = self.model.train_grid
    patch = self.model.patch_size
    return 3.0 * model_lib.forward_flops(self.model.variant, h * patch, w * patch,
                                         self.model.channels)


def _by_kind(table: dict, kind: str):
  """table[kind], else the entry with the longest name inside kind (None: no entry)."""
  if kind in table:
    return table[kind]
  names = [name for name in table if name.lower() in kind.lower()]
  return table[max(names, key=len)] if names else None


def peak_flops_per_device() -> float | None:
  return _by_kind(PEAK_FLOPS, jax.devices()[0].device_kind)


def device_memory(device) -> float | None:
  """Bytes of memory a program may use on `device`: what the device reports (its allocator's
  limit), else, for a TPU kind, what XLA:TPU's compiler counts (TPU_HBM); None when unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # compile-only and some CPU devices have none
    stats = None
  if stats and stats.get('bytes_limit'):
    return float(stats['bytes_limit'])
  return TPU_HBM.get(device.device_kind) if device.platform == 'tpu' else None
