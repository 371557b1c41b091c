import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpe2d import positions, rope

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
    ('yarn', {'yarn_form': 'index'}), ('tasr', {'tasr_form': 'switch'}),
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


def test_fit_attention_scales():
  """FiT's ntk-aware-pro1 / pro2 factors on the logits: ln(2 L_test) / ln(L_train), by side or by
  tokens, already above 1 at the native size (the 2 in FiT's get_proportion)."""
  side = rope.Encoding(attention_scale='fit_side')
  tokens = rope.Encoding(attention_scale='fit_tokens')
  at = lambda h, w: rope.Geometry(grid=(h, w), reference=(16, 16), train_tokens=256)
  np.testing.assert_allclose(rope.logit_multiplier(at(16, 16), tokens),
                             math.log(512) / math.log(256))
  np.testing.assert_allclose(rope.logit_multiplier(at(16, 16), side), 1.25)
  np.testing.assert_allclose(rope.logit_multiplier(at(20, 20), tokens), 1.2055, atol=1e-4)
  np.testing.assert_allclose(rope.logit_multiplier(at(14, 28), side), math.log(56) / math.log(16))
  np.testing.assert_allclose(rope.logit_multiplier(at(14, 28), tokens),
                             math.log(2 * 14 * 28) / math.log(256))
  assert rope.logit_multiplier(at(8, 8), tokens) == rope.logit_multiplier(at(8, 8), side) == 1.0
  # Above 1 below the native size too (scale 1): the sampler must not drop it there.
  assert rope.logit_multiplier(at(12, 12), tokens) > 1.0  # 288 tokens x 2 > 256


def test_shared_axis_scale_uses_the_larger_scale_on_both_axes():
  wide = rope.Geometry(grid=(16, 32), reference=(16, 16), train_tokens=256)
  per_axis, shared = rope.Encoding('pi'), rope.Encoding('pi', axis_scale='shared')
  assert rope.axis_scales(wide, per_axis) == (1.0, 2.0)
  assert rope.axis_scales(wide, shared) == (2.0, 2.0)
  pos = positions.grid(16, 32, 1)
  angles = lambda enc: rope.angles_2d(pos, jnp.ones(1), dim=8, geometry=wide, encoding=enc)
  np.testing.assert_allclose(angles(shared)[..., 0, :], angles(per_axis)[..., 0, :] / 2)
  np.testing.assert_array_equal(angles(shared)[..., 1, :], angles(per_axis)[..., 1, :])
  # YaRN's tau: per axis, or the larger on both (FiT's code, decoupled or not).
  tau = 0.1 * math.log(2.0) + 1
  np.testing.assert_allclose(rope.rope_temperatures(wide, rope.Encoding('yarn')), (1.0, tau))
  np.testing.assert_allclose(rope.rope_temperatures(wide, rope.Encoding(
      'yarn', temperature='rope_max')), (tau, tau))
  np.testing.assert_allclose(rope.rope_temperatures(wide, rope.Encoding(
      'yarn', axis_scale='shared')), (tau, tau))
  np.testing.assert_allclose(rope.logit_multiplier(wide, rope.Encoding(
      'yarn', temperature='rope_max'), rotary=False), tau * tau)
  with pytest.raises(ValueError, match="unknown axis_scale 'decoupled'; allowed: per_axis, shared"):
    rope.Encoding(axis_scale='decoupled')


# --- DyPE -------------------------------------------------------------------------------------

DYPE_CASES = [
    ('pi', {}), ('ntk', {}), ('yarn', {}), ('yarn', {'yarn_form': 'fit'}),
    ('yarn', {'yarn_form': 'index'}),
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


@pytest.mark.parametrize('method,kwargs', DYPE_CASES + [
    ('yarn', {'dype_variant': 'power'}), ('yarn', {'dype_variant': 'power', 'yarn_form': 'fit'}),
    ('yarn', {'dype_variant': 'power', 'yarn_form': 'index'})])
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
  # At data the base grows by s, a little less than NTK's s^(d/(d-2)): between the two.
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
    (dict(extrapolation='tasr', tasr_form='ntk_v2'),
     "unknown tasr_form 'ntk_v2'; allowed: continuous, switch"),
    (dict(yarn_form='ramp'), "unknown yarn_form 'ramp'; allowed: paper, index, fit"),
])
def test_bad_encodings_name_the_value(bad, match):
  with pytest.raises(ValueError, match=match):
    rope.Encoding(**bad)


# --- the reference implementations ------------------------------------------------------------

def _hf_yarn_ratio(dim, reference_length, scale, base=BASE, beta_fast=32.0, beta_slow=1.0):
  """theta'/theta of HF transformers' `yarn` (= FiT's yarn mode), written out from its formula."""
  c = lambda r: dim * math.log(reference_length / (2 * math.pi * r)) / (2 * math.log(base))
  low = max(math.floor(c(beta_fast)), 0)
  high = min(math.ceil(c(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return ramp / scale + (1 - ramp)


def _axis_theta(encoding, *, dim, reference_length, scale, t=1.0, base=BASE):
  ts = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
  pos = jnp.zeros((ts.shape[0], 4), jnp.float32)
  return np.asarray(rope.axis_positions_and_frequencies(
      pos, ts, dim=dim, base=base, scale=scale, reference_length=reference_length,
      encoding=encoding)[1])


@pytest.mark.parametrize('dim,reference_length,scale,expected', [
    (16, 16, 2.0, [1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
    (32, 16, 2.0, [1, 0.75] + [0.5] * 14),
    (64, 16, 4.0, [1, 0.8125, 0.625, 0.4375] + [0.25] * 28),
])
def test_yarn_index_form_matches_the_reference_formula(dim, reference_length, scale, expected):
  np.testing.assert_allclose(_hf_yarn_ratio(dim, reference_length, scale), expected, rtol=1e-12)
  theta = _axis_theta(rope.Encoding('yarn', yarn_form='index'), dim=dim,
                      reference_length=reference_length, scale=scale)
  native = np.asarray(rope.axis_frequencies(dim, BASE))
  np.testing.assert_allclose(theta[0] / native, expected, rtol=1e-6)


def test_yarn_index_form_differs_from_the_paper_ramp():
  # Same thresholds, but linear in the index instead of the rotations: different middle bands.
  paper = _axis_theta(rope.Encoding('yarn'), dim=32, reference_length=16, scale=2.0)
  index = _axis_theta(rope.Encoding('yarn', yarn_form='index'), dim=32, reference_length=16,
                      scale=2.0)
  assert np.abs(paper - index).max() > 1e-3


def test_yarn_temperature_defaults_to_the_reference_placement():
  # The references multiply cos and sin of q and k by tau: the logits see tau^2 (1.1434 at s = 2).
  assert rope.Encoding().temperature == 'rope'
  geometry = rope.Geometry(grid=(32, 32), reference=(16, 16), train_tokens=256)
  for form in rope.YARN_FORMS:
    default = rope.Encoding('yarn', yarn_form=form)
    tau_y, tau_x = rope.rope_temperatures(geometry, default)
    np.testing.assert_allclose(tau_y * tau_y, 1.1434, atol=1e-4)
    np.testing.assert_allclose(tau_x * tau_x, 1.1434, atol=1e-4)
    assert rope.logit_multiplier(geometry, default) == 1.0
  # A sin-cos model has no rotation table: tau on q and k reaches its logits as tau^2.
  sincos = rope.logit_multiplier(geometry, rope.Encoding('yarn'), rotary=False)
  np.testing.assert_allclose(sincos, 1.1434, atol=1e-4)
  np.testing.assert_allclose(rope.logit_multiplier(geometry, rope.Encoding(
      'yarn', temperature='logits'), rotary=False), 0.1 * math.log(2.0) + 1)
  assert rope.logit_multiplier(geometry, rope.Encoding('yarn', temperature='none'),
                               rotary=False) == 1.0
  # Per axis: a grid stretched on one axis only gets tau on that axis.
  wide = rope.Geometry(grid=(16, 64), reference=(16, 16), train_tokens=256)
  np.testing.assert_allclose(rope.rope_temperatures(wide, rope.Encoding('yarn')),
                             (1.0, 0.1 * math.log(4.0) + 1))


def test_yarn_temperature_on_the_rotation_reaches_the_logits_squared():
  # q . k after rotating both with the tau-scaled table is tau^2 times the plain product.
  geometry = rope.Geometry(grid=(32, 32), reference=(16, 16), train_tokens=256)
  enc = rope.Encoding('yarn')
  pos = jnp.array([[[3.0, 5.0], [1.0, 7.0]]])
  ang = rope.angles_2d(pos, jnp.ones(1), dim=8, geometry=geometry, encoding=enc)
  q, k = jax.random.normal(jax.random.key(3), (2, 1, 2, 1, 16))
  plain = rope.rotation(ang)
  scaled = rope.rotation(ang, rope.rope_temperatures(geometry, enc))
  dot = lambda table: (rope.apply_rope(q, table)[0, 0, 0] @ rope.apply_rope(k, table)[0, 1, 0])
  np.testing.assert_allclose(dot(scaled), dot(plain) * (0.1 * math.log(2.0) + 1) ** 2, rtol=1e-5)


def test_legacy_logits_temperature_keeps_its_behaviour_and_is_noted():
  geometry = rope.Geometry(grid=(32, 64), reference=(16, 16), train_tokens=512)
  legacy = rope.Encoding('yarn', temperature='logits')
  # tau once on the logits, with the geometric-mean scale, as before the default changed.
  np.testing.assert_allclose(rope.logit_multiplier(geometry, legacy),
                             0.1 * math.log(math.sqrt(2.0 * 4.0)) + 1)
  assert rope.rope_temperatures(geometry, legacy) == (1.0, 1.0)
  notes = rope.legacy_notes(legacy)
  assert len(notes) == 1 and '\n' not in notes[0]
  assert 'default before' in notes[0] and '--temperature=rope' in notes[0]
  for quiet in (rope.Encoding('yarn'), rope.Encoding('yarn', temperature='none'),
                rope.Encoding('ntk', temperature='logits'), rope.Encoding()):
    assert rope.legacy_notes(quiet) == []


# TASR, d = 16 (head dimension D = 32), base 1e4, s = 2; theta'/theta. Continuous exponent
# D / (t_data (D - 1) + 1): t_data = 0 -> 32, so 2^(-4i), below PI's 0.5 for i >= 1;
# t_data = 0.5 -> 32 / 16.5 = 1.93939, so 2^(-0.242424 i); t_data = 1 -> 1, so 2^(-i/8).
TASR_DATA_END = [1.0, 0.917004, 0.840896, 0.771105, 0.707107, 0.648420, 0.594604, 0.545254]


@pytest.mark.parametrize('t,expected', [
    (1.0, [1.0] + [0.5] * 7),
    (0.5, [1.0, 0.845324, 0.714572, 0.604045, 0.510613, 0.5, 0.5, 0.5]),
    (0.0, TASR_DATA_END),
])
def test_tasr_continuous_worked_values(t, expected):
  _, theta = frequencies('tasr', scale=2.0, t=t)
  np.testing.assert_allclose(theta[0] / rope.axis_frequencies(DIM, BASE), expected, rtol=2e-5)
  _, explicit = frequencies('tasr', scale=2.0, t=t, tasr_form='continuous')
  np.testing.assert_array_equal(theta, explicit)


@pytest.mark.parametrize('t,expected', [
    (1.0, [0.5] * 8),           # t_data = 0: PI, every band
    (0.75, [0.5] * 8),          # t_data = 0.25 < 0.3: still PI
    (0.65, TASR_DATA_END),      # t_data = 0.35: NTK with base * s
    (0.0, TASR_DATA_END),
])
def test_tasr_switch_worked_values(t, expected):
  _, theta = frequencies('tasr', scale=2.0, t=t, tasr_form='switch')
  np.testing.assert_allclose(theta[0] / rope.axis_frequencies(DIM, BASE), expected, rtol=2e-5)


def test_tasr_forms_per_example_t():
  ts = jnp.array([1.0, 0.75, 0.65, 0.0])
  for form in rope.TASR_FORMS:
    enc = rope.Encoding('tasr', tasr_form=form)
    batched = _axis_theta(enc, dim=DIM, reference_length=256, scale=2.0, t=ts)
    for i, t in enumerate(ts):
      np.testing.assert_allclose(
          batched[i], _axis_theta(enc, dim=DIM, reference_length=256, scale=2.0, t=t)[0])


def _fit_reference(theta, scale, dim, reference_length, thresholds, base=BASE):
  """FiT's NTK-by-parts as written in its code (low clamped below only, high above only)."""
  c = lambda r: dim * math.log(reference_length / (2 * math.pi * r)) / (2 * math.log(base))

  def ramp(fast, slow):
    low, high = max(math.floor(c(fast)), 0), min(math.ceil(c(slow)), dim - 1)
    if low == high:
      high += 0.001
    return np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)

  beta0, beta1, gamma0, gamma1 = thresholds
  ntk = theta / scale ** (np.arange(dim // 2) * 2 / (dim - 2))
  mask = 1 - ramp(beta0, beta1)
  mixed = theta / scale * (1 - mask) + ntk * mask
  mask = 1 - ramp(gamma0, gamma1)
  return mixed * (1 - mask) + theta * mask


@pytest.mark.parametrize('t', [0.25, 0.5, 0.9, 1.0])
def test_dype_power_variant_reproduces_the_old_official_code(t):
  # The official DyPE code before Feb 2026: FiT thresholds ** (2 t^2), i.e. lambda_s = 2.
  enc = rope.Encoding('yarn', yarn_form='fit', dype=True, dype_variant='power')
  assert enc.lambdas == (2.0, 2.0)
  dim, length, scale = 64, 64, 3.0
  native = np.asarray(rope.axis_frequencies(dim, BASE), np.float64)
  thresholds = [c ** (2 * t**2) for c in (1.25, 0.75, 16.0, 2.0)]
  expected = _fit_reference(native, scale, dim, length, thresholds)
  theta = _axis_theta(enc, dim=dim, reference_length=length, scale=scale, t=t)
  np.testing.assert_allclose(theta[0], expected, rtol=1e-5)
  # The scaled variant's lambdas are unchanged; explicit lambdas still win.
  assert rope.Encoding('yarn', dype=True).lambdas == (1.0, 2.0)
  explicit = rope.Encoding('yarn', dype=True, dype_variant='power', dype_lambda_s=1.0)
  assert explicit.lambdas == (1.0, 2.0)


@pytest.mark.parametrize('form', rope.YARN_FORMS)
def test_dype_power_variant_is_not_native_at_t0(form):
  # thresholds ** 0 = 1 for every threshold, not 0: the old code's behaviour, kept on purpose.
  enc = rope.Encoding('yarn', yarn_form=form, dype=True, dype_variant='power')
  theta = _axis_theta(enc, dim=64, reference_length=64, scale=2.0, t=0.0)
  native = np.asarray(rope.axis_frequencies(64, BASE))
  assert np.all(np.isfinite(theta))
  assert np.abs(theta[0] - native).max() > 1e-6


@pytest.mark.parametrize('form', rope.YARN_FORMS)
@pytest.mark.parametrize('reference_length', [4, 6, 8, 9])
def test_yarn_extrapolates_at_tiny_reference_lengths(form, reference_length):
  # FiT's clamping inverts the ramp here (ceil(c(slow)) < 0) and returns native frequencies; the
  # bands with under one rotation in L must be interpolated.
  dim, scale = 64, 2.0
  native = np.asarray(rope.axis_frequencies(dim, BASE))
  theta = _axis_theta(rope.Encoding('yarn', yarn_form=form), dim=dim,
                      reference_length=reference_length, scale=scale)[0]
  few_rotations = reference_length * native / (2 * math.pi) < 1.0
  assert few_rotations[dim // 4:].all()
  np.testing.assert_allclose(theta[dim // 4:], native[dim // 4:] / scale, rtol=1e-5)
  assert np.all(theta <= native * (1 + 1e-6)) and np.all(theta >= native / scale * (1 - 1e-6))
  if form == 'fit':  # the FiT reference itself returns native here
    fit = _fit_reference(native.astype(np.float64), scale, dim, reference_length,
                         (1.25, 0.75, 16.0, 2.0))
    np.testing.assert_allclose(fit, native, rtol=1e-6)


@pytest.mark.parametrize('form', rope.YARN_FORMS)
@pytest.mark.parametrize('reference_length', [64, 256])
def test_dy_yarn_scaled_is_native_near_t0(form, reference_length):
  # The official DY-YaRN's ramp inverts below t of about 0.002-0.007 (pure PI) and divides by zero
  # at t = 0. Ours is native there: kappa beta_fast is below the lowest band's rotations in L.
  dim, scale = 64, 2.0
  enc = rope.Encoding('yarn', yarn_form=form, dype=True)
  ts = jnp.array([0.0, 1e-6, 1e-3, 3e-3, 6e-3])
  theta = _axis_theta(enc, dim=dim, reference_length=reference_length, scale=scale, t=ts)
  native = np.asarray(rope.axis_frequencies(dim, BASE))
  assert np.all(np.isfinite(theta))
  np.testing.assert_allclose(theta, np.broadcast_to(native, theta.shape), rtol=1e-6, atol=0)


def _slug(heading):
  """GitHub's anchor for a Markdown heading."""
  text = heading.strip().lower()
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def test_docs_anchors_cited_in_the_code_exist():
  root = pathlib.Path(__file__).parent.parent
  doc = (root / 'docs' / 'methods.md').read_text()
  anchors = {_slug(line.lstrip('#')) for line in doc.splitlines() if line.startswith('#')}
  cited = set()
  for path in (root / 'rpe2d').rglob('*.py'):
    cited |= {(path.name, a) for a in re.findall(r'docs/methods\.md#([\w-]+)', path.read_text())}
  assert cited, 'rope.py cites docs/methods.md'
  missing = sorted(c for c in cited if c[1] not in anchors)
  assert not missing, f'anchors cited but not in docs/methods.md: {missing}'


ALL_FORMS = [dict(extrapolation='yarn', yarn_form=f, dype=d, dype_variant=v)
             for f in rope.YARN_FORMS for d in (False, True) for v in rope.DYPE_VARIANTS] + [
             dict(extrapolation='tasr', tasr_form=f) for f in rope.TASR_FORMS]


@pytest.mark.parametrize('kwargs', ALL_FORMS, ids=lambda k: '-'.join(map(str, k.values())))
def test_every_form_traces_under_jit_with_per_example_t(kwargs):
  enc = rope.Encoding(**kwargs)
  ts = jnp.array([0.0, 0.2, 0.68, 0.72, 1.0])
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32), (5, 8))
  run = lambda p, t: rope.axis_positions_and_frequencies(
      p, t, dim=DIM, base=BASE, scale=3.0, reference_length=16, encoding=enc)
  eager, jitted = run(pos, ts), jax.jit(run)(pos, ts)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.all(np.isfinite(jitted[1]))
