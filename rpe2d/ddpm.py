"""DiT's discrete DDPM seen from rpe2d's flow time (docs/methods.md#dit-in-flow-time).

DiT trains an epsilon-prediction network on the linear-beta DDPM of Ho et al. (1000 steps, betas
from 1e-4 to 0.02): x_n = a_n x0 + s_n eps with a_n = sqrt(abar_n), s_n = sqrt(1 - abar_n), and
the network sees x_n and the integer index n. rpe2d's state is z_t = (1 - t) x0 + t eps. The two
meet at equal signal-to-noise ratio: z = x / (a + s) at t = s / (a + s); at any t, x = z /
sqrt((1 - t)^2 + t^2), and the index is n*(t), the discrete log-SNR table lambda_n = ln(abar_n /
(1 - abar_n)) interpolated at lambda*(t) = 2 ln((1 - t) / t). The network's eps becomes the
velocity v = (eps - z) / (1 - t). The schedule covers t in [t(n = 0), t(n = 999)] =
[0.00990, 0.99369], the model's time range.

The schedule and the respacing of DiT's 250-step ancestral sampler are computed here in float64
with numpy (static per sampler plan) and enter compiled code as float32 constants, as DiT's own
code reads its float64 tables into float32 tensors.
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # at 1000 steps; DiT scales both by 1000 / steps


@functools.cache
def _tables(steps: int = STEPS):
  """(betas, abar) in float64: DiT's 'linear' schedule."""
  scale = 1000 / steps
  betas = np.linspace(scale * BETA_START, scale * BETA_END, steps, dtype=np.float64)
  return betas, np.cumprod(1.0 - betas)


def flow_times(steps: int = STEPS) -> np.ndarray:
  """t_n = s_n / (a_n + s_n): the flow time of every DDPM index (float64, ascending in n)."""
  _, abar = _tables(steps)
  a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
  return s / (a + s)


def time_range(steps: int = STEPS) -> tuple[float, float]:
  """(t_min, t_max) = (t(n = 0), t(n = steps - 1)): the flow times the schedule covers."""
  times = flow_times(steps)
  return float(times[0]), float(times[-1])


def _log_snr(t):
  """lambda*(t) = 2 ln((1 - t) / t): +inf at t = 0, -inf at t = 1, never NaN."""
  return 2.0 * (jnp.log1p(-t) - jnp.log(t))


def fractional_index(t):
  """n*(t), (batch,) -> (batch,) float32 in [0, STEPS - 1]: the log-SNR table interpolated at
  lambda*(t), clamped at its ends.

  The bracket comes from the table of float32 flow times and the weight from lambda* of t and of
  the bracket's ends, all in float32: at the flow time of an index the result is that index
  exactly, so a sampler on the DDPM grid feeds the network the integers DiT's own code does
  (interpolating float32 lambdas instead would miss them by up to 5e-4 near n = 999).
  """
  nodes = jnp.asarray(flow_times(), jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  low = jnp.clip(jnp.searchsorted(nodes, t, side='right') - 1, 0, STEPS - 2)
  lam_low, lam_high = _log_snr(nodes[low]), _log_snr(nodes[low + 1])
  weight = (_log_snr(t) - lam_low) / (lam_high - lam_low)
  return low.astype(jnp.float32) + jnp.clip(weight, 0.0, 1.0)


def network_input(z, t):
  """The VP state x = z / sqrt((1 - t)^2 + t^2) of rpe2d's z at time t (batch,)."""
  t = t.reshape(-1, *([1] * (z.ndim - 1)))
  return z / jnp.sqrt((1.0 - t) ** 2 + t ** 2)


def velocity(eps, z, t):
  """v = (eps - z) / (1 - t): the flow velocity eps - x0_hat of an eps prediction at time t < 1."""
  t = t.reshape(-1, *([1] * (z.ndim - 1)))
  return (eps - z) / (1.0 - t)


# ------------------------------------------------------------------------------------------------
# DiT's ancestral sampler with learned variance, respaced to fewer steps.


def respaced_indices(steps: int, total: int = STEPS) -> list[int]:
  """The DDPM indices a sampler of `steps` steps visits, ascending: DiT's
  space_timesteps(total, str(steps)) (one section: `steps` evenly strided indices from 0 to
  total - 1, each rounded half to even as Python's round does)."""
  if not 1 <= steps <= total:
    raise ValueError(f'a DDPM sampler of {steps} steps over {total} indices; allowed: 1 to {total}')
  stride = (total - 1) / (steps - 1) if steps > 1 else 1
  position, indices = 0.0, []
  for _ in range(steps):
    indices.append(round(position))
    position += stride  # accumulated, as the reference does: the same roundings
  return indices


@dataclasses.dataclass(frozen=True)
class Ancestral:
  """The respaced schedule's tables for p(x_{k-1} | x_k), one entry per step k (float64).

  Respacing keeps the indices n_k and gives step k the beta 1 - abar(n_k) / abar(n_{k-1})
  (abar(n_{-1}) = 1), so abar of the kept indices is unchanged. The learned variance interpolates
  in log space between the posterior's and that beta: log var = f log beta + (1 - f) log
  posterior, f = (v + 1) / 2 of the network's variance output v (DiT's LEARNED_RANGE); the
  posterior's log variance at k = 0 (where it is 0) takes the value of k = 1, as in DiT.
  """
  indices: np.ndarray            # n_k, ascending
  times: np.ndarray              # t of n_k
  recip_sqrt_abar: np.ndarray    # x0 = recip_sqrt_abar x - recipm1_sqrt_abar eps
  recipm1_sqrt_abar: np.ndarray
  mean_x0: np.ndarray            # posterior mean = mean_x0 x0 + mean_x x
  mean_x: np.ndarray
  min_log_variance: np.ndarray   # the posterior's (clipped) log variance
  max_log_variance: np.ndarray   # log beta


@functools.cache
def ancestral(steps: int) -> Ancestral:
  indices = np.asarray(respaced_indices(steps))
  _, abar_all = _tables()
  abar = abar_all[indices]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / abar_prev
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  clipped = np.append(posterior_variance[1], posterior_variance[1:]) if steps > 1 else \
      posterior_variance
  return Ancestral(
      indices=indices, times=flow_times()[indices],
      recip_sqrt_abar=np.sqrt(1.0 / abar), recipm1_sqrt_abar=np.sqrt(1.0 / abar - 1.0),
      mean_x0=betas * np.sqrt(abar_prev) / (1.0 - abar),
      mean_x=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
      min_log_variance=np.log(clipped), max_log_variance=np.log(betas))


def ancestral_step(schedule_k, x, eps, variance, noise, last):
  """One step of DiT's p_sample from step k (clip_denoised off, as DiT's sample.py):
  x0 = (x - s eps) / a, the posterior mean, and noise of the learned variance (none at the last
  step). schedule_k holds step k's float32 entries of an `Ancestral`, keyed by field name."""
  x0 = schedule_k['recip_sqrt_abar'] * x - schedule_k['recipm1_sqrt_abar'] * eps
  mean = schedule_k['mean_x0'] * x0 + schedule_k['mean_x'] * x
  fraction = (variance + 1.0) / 2.0
  log_variance = (fraction * schedule_k['max_log_variance']
                  + (1.0 - fraction) * schedule_k['min_log_variance'])
  return mean + jnp.where(last, 0.0, 1.0) * jnp.exp(0.5 * log_variance) * noise
