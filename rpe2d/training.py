"""Sharded training: the mesh, sharding rules, train state, optimizer and the jitted train step.

The mesh has axes ('data', 'fsdp'). Batches split over both; parameters and optimizer state split
their largest divisible dimension over 'fsdp' (replicated when that axis has size 1). The step is one
`jax.jit` with explicit in/out shardings and a donated state, so the same code runs on one CPU, one
GPU or a TPU slice.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rpe2d import config as config_lib, flow, model as model_lib, positions

BATCH_AXES = ('data', 'fsdp')
MIN_SHARDED_SIZE = 2**14   # smaller arrays stay replicated: splitting them costs more than it saves

# Peak dense bf16 FLOP/s per device (SPEC §6), matched against jax's device_kind.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5p': 459e12,
              'TPU v5 lite': 197e12, 'TPU v4': 275e12, 'TPU v6': 918e12}


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


def learning_rate_schedule(optim) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
  return optax.join_schedules([warmup, optax.constant_schedule(optim.learning_rate)],
                              [optim.warmup_steps])


def make_optimizer(optim) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2,
                  weight_decay=optim.weight_decay))


def example_inputs(config, batch: int = 1):
  """Zeros shaped like one training batch, for init and shape inference."""
  size, channels = config.data.image_size, config.data.channels
  h, w = config_lib.train_grid(config)
  return (jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,)),
          jnp.zeros((batch,), jnp.int32), positions.grid(h, w, batch))


def init_params(model, config, key):
  return model.init(key, *example_inputs(config))


def create_state(model, optimizer, config, key) -> TrainState:
  params = init_params(model, config, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=params)


def train_positions(config, key, batch: int):
  h, w = config_lib.train_grid(config)
  if config.positions.train == 'grid':
    return positions.grid(h, w, batch)
  max_h, max_w = config_lib.position_range(config)
  return positions.rpe2d(key, h, w, max_h, max_w, batch,
                         per_example=config.positions.mode == 'per_example',
                         continuous=config.positions.continuous)


def train_step(state: TrainState, batch, *, model, optimizer, config):
  """One optimizer step. Randomness derives from (seed, step): a resumed run repeats it exactly.

  metrics['finite'] says whether the loss and the gradient were finite; a step where they were
  not changes nothing but the step counter (config.nonfinite decides whether training goes on).
  """
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  key_positions, key_loss = jax.random.split(key)
  images, labels = batch['image'], batch['label']
  token_positions = train_positions(config, key_positions, images.shape[0])
  crop = batch['crop'] if model.micro_conditioning else None
  loss_fn = functools.partial(
      flow.loss, model.apply, num_classes=model.num_classes,
      class_dropout=config.flow.class_dropout, time_sampling=config.flow.time_sampling,
      time_mean=config.flow.time_mean, time_std=config.flow.time_std,
      time_shift=config.flow.time_shift)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, key_loss, images, labels,
                                            token_positions, crop)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optim.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)  # NaN or Inf if any gradient is
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
             'learning_rate': learning_rate_schedule(config.optim)(state.step)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params)
  unchanged = state.replace(step=new_state.step)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, unchanged)
  return new_state, metrics


class Trainer:
  """Holds the compiled pieces for one config on one mesh."""

  def __init__(self, config, mesh):
    self.config = config
    self.mesh = mesh
    self.model = config_lib.build_model(config)
    self.optimizer = make_optimizer(config.optim)
    new_state = functools.partial(create_state, self.model, self.optimizer, config)
    self.abstract_state = jax.eval_shape(new_state, jax.random.key(0))
    self.state_sharding = state_sharding(self.abstract_state, mesh)
    self.batch_sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    step = functools.partial(train_step, model=self.model, optimizer=self.optimizer,
                             config=config)
    self.step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                        out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self._init = jax.jit(new_state, out_shardings=self.state_sharding)

  def init_state(self) -> TrainState:
    return self._init(jax.random.key(self.config.seed))

  def device_batch(self, local_batch):
    """Process-local numpy batch -> global arrays sharded over the batch axes."""
    names = ('image', 'label', 'crop')
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, local_batch[k])
            for k in names}

  def flops_per_image(self) -> float:
    size = self.config.data.image_size
    return 3.0 * model_lib.forward_flops(self.config.model.variant, size, size,
                                         self.config.data.channels)


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None
