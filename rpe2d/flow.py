"""Flow matching (docs/methods.md#flow-matching): x_t = (1 - t) x0 + t eps, the network predicts
v = eps - x0."""

import jax
import jax.numpy as jnp

TIME_SAMPLINGS = ('logit_normal', 'uniform')


def shift_time(t, shift):
  """t' = a t / (1 + (a - 1) t): a > 1 spends more time near noise; a = 1 is the identity."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(tokens: int, train_tokens: int) -> float:
  """a = sqrt(N_test / N_train): the resolution-dependent shift."""
  return (tokens / train_tokens) ** 0.5


def sample_time(key, batch: int, *, sampling: str = 'logit_normal', mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0):
  if sampling == 'logit_normal':
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
  elif sampling == 'uniform':
    t = jax.random.uniform(key, (batch,))
  else:
    raise ValueError(f'unknown time sampling {sampling!r}; allowed: {", ".join(TIME_SAMPLINGS)}')
  return shift_time(t, shift)


def interpolate(x0, noise, t):
  t = t.reshape(-1, *([1] * (x0.ndim - 1)))
  return (1.0 - t) * x0 + t * noise


def drop_labels(key, labels, probability: float, null_class: int):
  """Replaces labels by the null class with the given probability, for classifier-free guidance."""
  drop = jax.random.bernoulli(key, probability, labels.shape)
  return jnp.where(drop, null_class, labels)


def loss(apply_fn, params, key, images, labels, positions, crop=None, *, num_classes: int,
         class_dropout: float = 0.1, time_sampling: str = 'logit_normal', time_mean: float = 0.0,
         time_std: float = 1.0, time_shift: float = 1.0):
  """Mean squared velocity error of one batch. apply_fn(params, x_t, t, labels, positions, crop)."""
  key_t, key_noise, key_drop = jax.random.split(key, 3)
  t = sample_time(key_t, images.shape[0], sampling=time_sampling, mean=time_mean, std=time_std,
                  shift=time_shift)
  noise = jax.random.normal(key_noise, images.shape, images.dtype)
  labels = drop_labels(key_drop, labels, class_dropout, num_classes)
  return velocity_loss(apply_fn, params, images, noise, t, labels, positions, crop)


def velocity_loss(apply_fn, params, images, noise, t, labels, positions, crop=None):
  """The mean squared error of the velocity predicted at x_t = (1 - t) images + t noise against
  the target noise - images, for given noise, times and labels."""
  x_t = interpolate(images, noise, t)
  prediction = apply_fn(params, x_t, t, labels, positions, crop)
  return jnp.mean(jnp.square(prediction - (noise - images)))
