import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpe2d import rope

DIM, BASE = 16, 10000.0


def frequencies(method, *, scale, t=1.0, reference_length=256, batch=1, **kwargs):
  enc = rope.Encoding(extrapolation=method, **kwargs)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32), (batch, 8))
  return rope.axis_positions_and_frequencies(
      pos, jnp.full((batch,), t), dim=DIM, base=BASE, scale=scale,
      reference_length=reference_length, encoding=enc)


def angles(method, **kwargs):
  pos, theta = frequencies(method, **kwargs)
  return pos[..., None] * theta[:, None, :]


# --- 2D RoPE --------------------------------------------------------------------------------

def _rotate(vec, y, x, head_dim=16):
  pos = jnp.array([[[y, x]]], jnp.float32)
  geometry = rope.Geometry(grid=(8, 8), reference=(8, 8), train_tokens=64)
  ang = rope.angles_2d(pos, jnp.ones(1), dim=head_dim // 2, geometry=geometry,
                       encoding=rope.Encoding())
  return rope.apply_rope(vec.reshape(1, 1, 1, head_dim), rope.rotation(ang)).reshape(head_dim)


def test_rope_dot_product_depends_only_on_offset():
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  reference = _rotate(q, 3.0, 5.0) @ _rotate(k, 1.0, 7.0)     # offset (2, -2)
  for shift_y, shift_x in [(0, 0), (4, 0), (0, 9), (10.5, -3.25)]:
    moved = _rotate(q, 3.0 + shift_y, 5.0 + shift_x) @ _rotate(k, 1.0 + shift_y, 7.0 + shift_x)
    np.testing.assert_allclose(moved, reference, rtol=1e-5, atol=1e-5)
  # A different offset gives a different product on either axis.
  assert abs(_rotate(q, 4.0, 5.0) @ _rotate(k, 1.0, 7.0) - reference) > 1e-3
  assert abs(_rotate(q, 3.0, 6.0) @ _rotate(k, 1.0, 7.0) - reference) > 1e-3


def test_rope_position_zero_is_identity():
  v = jax.random.normal(jax.random.key(1), (16,))
  np.testing.assert_allclose(_rotate(v, 0.0, 0.0), v, rtol=1e-6)


def test_rope_halves_rotate_independently():
  v = jax.random.normal(jax.random.key(2), (16,))
  base = _rotate(v, 2.0, 3.0)
  moved_x = _rotate(v, 2.0, 11.0)
  moved_y = _rotate(v, 9.0, 3.0)
  np.testing.assert_allclose(moved_x[:8], base[:8], rtol=1e-6)   # y half untouched by x
  assert np.abs(moved_x[8:] - base[8:]).max() > 1e-2
  np.testing.assert_allclose(moved_y[8:], base[8:], rtol=1e-6)   # x half untouched by y
  assert np.abs(moved_y[:8] - base[:8]).max() > 1e-2
  # Rotations preserve the norm of each half.
  np.testing.assert_allclose(jnp.linalg.norm(moved_x[8:]), jnp.linalg.norm(v[8:]), rtol=1e-5)


# --- static methods ---------------------------------------------------------------------------

@pytest.mark.parametrize('method,kwargs', [
    ('pi', {}), ('ntk', {}), ('yarn', {}), ('yarn', {'yarn_form': 'fit'}), ('tasr', {}),
])
@pytest.mark.parametrize('t', [0.0, 0.3, 1.0])
def test_every_method_at_scale_one_is_none(method, kwargs, t):
  np.testing.assert_array_equal(angles(method, scale=1.0, t=t, **kwargs),
                                angles('none', scale=1.0, t=t))


def test_scale_factor_is_per_axis_and_never_below_one():
  geometry = rope.Geometry(grid=(32, 8), reference=(16, 16), train_tokens=256)
  assert geometry.scales == (2.0, 1.0)


def test_ntk_is_a_change_of_base():
  for scale in (1.5, 2.0, 4.0):
    _, theta = frequencies('ntk', scale=scale)
    new_base = BASE * scale ** (DIM / (DIM - 2))
    np.testing.assert_allclose(theta[0], rope.axis_frequencies(DIM, new_base), rtol=1e-5)
  # The lowest frequency is divided by s exactly (PI-like); the highest is untouched.
  _, theta = frequencies('ntk', scale=4.0)
  native = rope.axis_frequencies(DIM, BASE)
  np.testing.assert_allclose(theta[0, -1], native[-1] / 4.0, rtol=1e-5)
  np.testing.assert_allclose(theta[0, 0], native[0], rtol=1e-6)


def test_pi_divides_positions():
  pos, theta = frequencies('pi', scale=4.0)
  np.testing.assert_allclose(pos[0], np.arange(8) / 4.0)
  np.testing.assert_array_equal(theta[0], rope.axis_frequencies(DIM, BASE))


def test_yarn_paper_bands_worked_example():
  # d = 16, base 1e4: theta_i = 10^(-i/2). L = 256, s = 2: rotations r_i = 256 theta_i / (2 pi).
  native = 10.0 ** (-np.arange(8) / 2)
  r = 256 * native / (2 * math.pi)             # 40.7, 12.9, 4.07, 1.29, 0.41, ...
  gamma = np.clip((r - 1.0) / 31.0, 0, 1)       # alpha = 1, beta = 32
  assert gamma[0] == 1.0 and np.all(gamma[4:] == 0.0) and 0 < gamma[3] < gamma[2] < gamma[1] < 1
  expected = (1 - gamma) * native / 2 + gamma * native
  _, theta = frequencies('yarn', scale=2.0, reference_length=256)
  np.testing.assert_allclose(theta[0], expected, rtol=1e-5)
  np.testing.assert_allclose(theta[0, 0], native[0])          # many rotations: native
  np.testing.assert_allclose(theta[0, 4:], native[4:] / 2)    # under one rotation: PI


def test_yarn_fit_bands_worked_example():
  # c(n) = d ln(L / (2 pi n)) / (2 ln base) with d = 16, L = 256: c(1.25) = 3.03 -> 3,
  # c(0.75) = 3.47 -> 4, c(16) = 0.81 -> 0, c(2) = 2.62 -> 3.
  scale = 4.0
  native = 10.0 ** (-np.arange(8) / 2)
  ntk = native / scale ** (2 * np.arange(8) / 14)
  pi = native / scale
  expected = np.array([
      native[0],
      ntk[1] / 3 + 2 * native[1] / 3,
      2 * ntk[2] / 3 + native[2] / 3,
      ntk[3],
      *pi[4:],
  ])
  _, theta = frequencies('yarn', scale=scale, reference_length=256, yarn_form='fit')
  np.testing.assert_allclose(theta[0], expected, rtol=1e-5)


def test_yarn_temperature():
  assert rope.yarn_temperature(1.0) == 1.0
  np.testing.assert_allclose(rope.yarn_temperature(math.e), 1.1)
  geometry = rope.Geometry(grid=(32, 32), reference=(16, 16), train_tokens=256)
  on_logits = rope.Encoding('yarn', temperature='logits')
  on_rope = rope.Encoding('yarn', temperature='rope')
  nowhere = rope.Encoding('yarn', temperature='none')
  tau = 0.1 * math.log(2.0) + 1
  np.testing.assert_allclose(rope.logit_multiplier(geometry, on_logits), tau)
  assert rope.rope_temperatures(geometry, on_logits) == (1.0, 1.0)
  np.testing.assert_allclose(rope.rope_temperatures(geometry, on_rope), (tau, tau))
  assert rope.logit_multiplier(geometry, on_rope) == 1.0
  assert rope.logit_multiplier(geometry, nowhere) == 1.0
  assert rope.rope_temperatures(geometry, nowhere) == (1.0, 1.0)


def test_log_n_attention_scale():
  enc = rope.Encoding(attention_scale='log_n')
  same = rope.Geometry(grid=(16, 16), reference=(16, 16), train_tokens=256)
  bigger = rope.Geometry(grid=(32, 32), reference=(16, 16), train_tokens=256)
  smaller = rope.Geometry(grid=(8, 8), reference=(16, 16), train_tokens=256)
  assert rope.logit_multiplier(same, enc) == 1.0
  np.testing.assert_allclose(rope.logit_multiplier(bigger, enc),
                             math.sqrt(math.log(1024) / math.log(256)))
  assert rope.logit_multiplier(smaller, enc) == 1.0


# --- DyPE -------------------------------------------------------------------------------------

DYPE_CASES = [
    ('pi', {}), ('ntk', {}), ('yarn', {}), ('yarn', {'yarn_form': 'fit'}),
]


@pytest.mark.parametrize('method,kwargs', DYPE_CASES)
def test_dype_at_t1_is_static(method, kwargs):
  scale = 3.0
  lambda_s, _ = rope.Encoding(method, dype=True).lambdas
  # DY-NTK at t = 1 is NTK with scale s^lambda_s; the others use lambda_s = 1 by default.
  static_scale = scale ** lambda_s if method == 'ntk' else scale
  dynamic = angles(method, scale=scale, t=1.0, dype=True, **kwargs)
  static = angles(method, scale=static_scale, t=1.0, **kwargs)
  np.testing.assert_allclose(dynamic, static, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('method,kwargs', DYPE_CASES)
def test_dype_at_t0_is_native_exactly(method, kwargs):
  chex.assert_trees_all_equal(angles(method, scale=3.0, t=0.0, dype=True, **kwargs),
                              angles('none', scale=3.0))


@pytest.mark.parametrize('method,kwargs', DYPE_CASES)
def test_dype_is_monotone_in_t_without_flips_near_zero(method, kwargs):
  ts = np.concatenate([[0.0, 1e-8, 1e-6, 1e-4, 3e-3, 6e-3, 1e-2], np.linspace(0.02, 1.0, 50)])
  pos, theta = _frequencies_at(method, ts, kwargs)
  assert np.all(np.isfinite(theta)) and np.all(np.isfinite(pos))
  # Extrapolation weakens as t falls: frequencies and positions never decrease towards t = 0.
  assert np.all(np.diff(theta, axis=0) <= 1e-7), 'frequencies must fall monotonically with t'
  assert np.all(np.diff(pos, axis=0) <= 1e-6), 'positions must fall monotonically with t'
  _, native_theta = _frequencies_at('none', ts[:1], {})
  np.testing.assert_array_equal(theta[0], native_theta[0])
  np.testing.assert_allclose(theta[1], native_theta[0], rtol=1e-6)   # t = 1e-8 stays native
  # Something actually moves between t = 0 and t = 1.
  assert np.abs(theta[-1] - theta[0]).max() + np.abs(pos[-1] - pos[0]).max() > 1e-3


def _frequencies_at(method, ts, kwargs):
  ts = jnp.asarray(ts, jnp.float32)
  enc = rope.Encoding(extrapolation=method, dype=method != 'none', **kwargs)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32), (len(ts), 8))
  return rope.axis_positions_and_frequencies(pos, ts, dim=DIM, base=BASE, scale=3.0,
                                             reference_length=256, encoding=enc)


@pytest.mark.parametrize('method,kwargs', DYPE_CASES + [('yarn', {'dype_variant': 'power'})])
def test_dype_per_example_t(method, kwargs):
  ts = jnp.array([0.0, 0.25, 0.9, 1.0])
  as_angles = lambda pos, theta: pos[..., None] * theta[:, None, :]
  batched = as_angles(*_frequencies_at(method, ts, kwargs))
  for i, t in enumerate(ts):
    single = as_angles(*_frequencies_at(method, [t], kwargs))
    np.testing.assert_allclose(batched[i], single[0], rtol=1e-6)
  assert np.abs(batched[1] - batched[2]).max() > 1e-4


def test_dype_kappa():
  t = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(rope.kappa(t, 2.0, 2.0), [0.0, 0.5, 2.0])
  np.testing.assert_allclose(rope.kappa(t, 1.0, 1.0), [0.0, 0.5, 1.0])


def test_tasr_moves_from_pi_towards_ntk():
  native = rope.axis_frequencies(DIM, BASE)
  _, noise_end = frequencies('tasr', scale=2.0, t=1.0)
  _, data_end = frequencies('tasr', scale=2.0, t=0.0)
  np.testing.assert_allclose(noise_end[0, 1:], native[1:] / 2.0, rtol=1e-5)  # PI at noise
  _, ntk = frequencies('ntk', scale=2.0)
  # At data the base grows by s^(d/(d+1)), a little less than NTK's s^(d/(d-2)): between the two.
  assert np.all(data_end[0] >= ntk[0]) and np.all(data_end[0] <= native + 1e-7)
  assert np.all(data_end[0] >= noise_end[0])


@pytest.mark.parametrize('bad,match', [
    (dict(extrapolation='linear'), "extrapolation method 'linear'"),
    (dict(extrapolation='none', dype=True), 'dype needs an extrapolation method'),
    (dict(extrapolation='tasr', dype=True), 'dype needs an extrapolation method'),
    (dict(extrapolation='ntk', dype=True, dype_lambda_s=-1.0), 'lambda_s=-1.0'),
    (dict(extrapolation='ntk', dype=True, dype_lambda_t=0.0), 'lambda_t=0.0'),
    (dict(extrapolation='yarn', temperature='q'), "temperature 'q'"),
    (dict(extrapolation='yarn', yarn_form='vision'), "yarn_form 'vision'"),
    (dict(attention_scale='sqrt'), "attention_scale 'sqrt'"),
    (dict(dype_variant='cubic'), "dype_variant 'cubic'"),
])
def test_bad_encodings_name_the_value(bad, match):
  with pytest.raises(ValueError, match=match):
    rope.Encoding(**bad)
