"""Token positions as data (docs/methods.md#positions).

Positions are float32 arrays of shape (batch, h*w, 2) holding (y, x) for every token in row-major
order. They are built from one axis array per direction, ys (batch, h) and xs (batch, w), so rows stay
aligned and columns stay aligned whatever rule produced them.
"""

import jax
import jax.numpy as jnp
import numpy as np

TRAIN_RULES = ('grid', 'rpe2d')
INFERENCE_RULES = ('uniform', 'contiguous', 'random')
SAMPLING_MODES = ('per_example', 'per_batch')


def to_tokens(ys: jax.Array, xs: jax.Array) -> jax.Array:
  """(batch, h) rows and (batch, w) columns -> (batch, h*w, 2) token positions."""
  batch, h = ys.shape
  w = xs.shape[1]
  y = jnp.broadcast_to(ys[:, :, None], (batch, h, w))
  x = jnp.broadcast_to(xs[:, None, :], (batch, h, w))
  return jnp.stack([y, x], axis=-1).reshape(batch, h * w, 2).astype(jnp.float32)


def grid_axis(n: int, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (batch, n))


def grid(h: int, w: int, batch: int) -> jax.Array:
  """The plain grid 0..h-1 x 0..w-1."""
  return to_tokens(grid_axis(h, batch), grid_axis(w, batch))


def random_subset_axis(key: jax.Array, n: int, length: int, batch: int, *,
                       per_example: bool = True, continuous: bool = False) -> jax.Array:
  """Sorted random subsets of size n of {0..length-1} (or sorted uniforms in [0, length)).

  Fixed shapes inside jit: the subset is the first n entries of an argsort of uniform noise, which
  is a uniformly random n-subset without replacement.
  """
  if n > length and not continuous:
    raise ValueError(f'cannot draw {n} distinct positions from a range of {length}; '
                     f'need n <= length')
  rows = batch if per_example else 1
  if continuous:
    picked = jax.random.uniform(key, (rows, n), minval=0.0, maxval=float(length))
  else:
    noise = jax.random.uniform(key, (rows, length))
    picked = jnp.argsort(noise, axis=-1)[:, :n].astype(jnp.float32)
  return jnp.broadcast_to(jnp.sort(picked, axis=-1), (batch, n))


def rpe2d(key: jax.Array, h: int, w: int, max_h: int, max_w: int, batch: int, *,
          per_example: bool = True, continuous: bool = False) -> jax.Array:
  """RPE-2D training positions (docs/methods.md#rpe-2d-training-positions): independent sorted
  subsets along rows and columns."""
  key_y, key_x = jax.random.split(key)
  ys = random_subset_axis(key_y, h, max_h, batch, per_example=per_example, continuous=continuous)
  xs = random_subset_axis(key_x, w, max_w, batch, per_example=per_example, continuous=continuous)
  return to_tokens(ys, xs)


def inference_axis(rule: str, n: int, length: int, batch: int, *, key: jax.Array | None = None,
                   round_positions: bool = False) -> jax.Array:
  """Positions of n tokens on an axis of trained range `length`
  (docs/methods.md#rpe-2d-inference-positions)."""
  if rule == 'uniform':
    # n and length are static: numpy in float64 keeps the last position exactly length - 1.
    axis = jnp.asarray(np.arange(n) * (length - 1) / max(n - 1, 1), jnp.float32)
    if round_positions:
      axis = jnp.round(axis)
    return jnp.broadcast_to(axis, (batch, n))
  if rule == 'contiguous':
    return grid_axis(n, batch)
  if rule == 'random':
    if key is None:
      raise ValueError("the 'random' position rule needs a PRNG key")
    return random_subset_axis(key, n, length, batch)
  raise ValueError(f'unknown inference position rule {rule!r}; allowed: {INFERENCE_RULES}')


def inference(rule: str, h: int, w: int, max_h: int, max_w: int, batch: int, *,
              key: jax.Array | None = None, round_positions: bool = False) -> jax.Array:
  key_y = key_x = None
  if key is not None:
    key_y, key_x = jax.random.split(key)
  ys = inference_axis(rule, h, max_h, batch, key=key_y, round_positions=round_positions)
  xs = inference_axis(rule, w, max_w, batch, key=key_x, round_positions=round_positions)
  return to_tokens(ys, xs)
