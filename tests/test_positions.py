import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpe2d import positions


def _axes(tokens, h, w):
  """(batch, h*w, 2) -> ys (batch, h), xs (batch, w), checking rows and columns stay aligned."""
  grid = np.asarray(tokens).reshape(tokens.shape[0], h, w, 2)
  ys, xs = grid[:, :, 0, 0], grid[:, 0, :, 1]
  np.testing.assert_array_equal(grid[..., 0], np.broadcast_to(ys[:, :, None], grid.shape[:3]))
  np.testing.assert_array_equal(grid[..., 1], np.broadcast_to(xs[:, None, :], grid.shape[:3]))
  return ys, xs


def test_grid():
  ys, xs = _axes(positions.grid(3, 5, 2), 3, 5)
  np.testing.assert_array_equal(ys, [[0, 1, 2]] * 2)
  np.testing.assert_array_equal(xs, [list(range(5))] * 2)


def test_rpe2d_sorted_subsets_in_range():
  h, w, max_h, max_w, batch = 6, 4, 20, 9, 256
  ys, xs = _axes(positions.rpe2d(jax.random.key(0), h, w, max_h, max_w, batch), h, w)
  for axis, length in ((ys, max_h), (xs, max_w)):
    assert np.all(np.diff(axis, axis=1) > 0), 'strictly increasing'
    assert axis.min() >= 0 and axis.max() <= length - 1
    np.testing.assert_array_equal(axis, np.round(axis))  # integers by default


def test_rpe2d_axes_and_examples_are_independent():
  h = w = 8
  ys, xs = _axes(positions.rpe2d(jax.random.key(1), h, w, 32, 32, 512), h, w)
  # Same sizes and ranges on both axes: with a shared key they would be identical.
  assert np.mean(np.all(ys == xs, axis=1)) < 0.01
  # Every example draws its own subset.
  assert len({tuple(row) for row in ys}) > 500
  # Rows and columns are uncorrelated across examples.
  corr = np.corrcoef(ys.mean(1), xs.mean(1))[0, 1]
  assert abs(corr) < 0.15


def test_rpe2d_every_position_reachable_with_the_right_frequency():
  n, length, batch = 8, 32, 8192
  ys, _ = _axes(positions.rpe2d(jax.random.key(2), n, n, length, length, batch), n, n)
  counts = np.stack([np.sum(ys == p) for p in range(length)]) / batch
  # Each position is in a uniformly random n-subset with probability n/L = 0.25. Binomial std of
  # the estimate is sqrt(0.25 * 0.75 / 8192) = 0.0048; 0.025 is > 5 std, and a sampler biased to
  # the low or high end, or one that never visits a position, is off by far more.
  np.testing.assert_allclose(counts, n / length, atol=0.025)
  # The smallest position is distributed like the minimum of a random subset, not pinned to 0.
  assert 0.2 < np.mean(ys[:, 0] == 0) < 0.3


def test_rpe2d_per_batch_mode_shares_one_subset():
  ys, xs = _axes(positions.rpe2d(jax.random.key(3), 4, 5, 16, 16, 8, per_example=False), 4, 5)
  assert np.all(ys == ys[:1]) and np.all(xs == xs[:1])


def test_rpe2d_continuous():
  ys, xs = _axes(positions.rpe2d(jax.random.key(4), 6, 6, 10, 12, 64, continuous=True), 6, 6)
  assert np.all(np.diff(ys, axis=1) > 0) and np.all(np.diff(xs, axis=1) > 0)
  assert ys.min() >= 0 and ys.max() < 10 and xs.max() < 12
  assert np.any(ys != np.round(ys))


def test_rpe2d_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def draw(key):
    return positions.rpe2d(key, 4, 4, 16, 16, 8)

  first = draw(jax.random.key(0))
  for seed in range(1, 5):
    assert not np.array_equal(draw(jax.random.key(seed)), first)


def test_inference_uniform_spacing_matches_training():
  axis = np.asarray(positions.inference_axis('uniform', 8, 32, 1))[0]
  np.testing.assert_allclose(axis, np.arange(8) * 31 / 7)
  assert axis[0] == 0 and axis[-1] == 31
  # Training gaps of a sorted n-subset of L average (L + 1) / (n + 1); uniform's (L - 1) / (n - 1)
  # is close to that, not equal (3.67 vs 4.43 here).
  train = np.asarray(positions.random_subset_axis(jax.random.key(0), 8, 32, 4096))
  np.testing.assert_allclose(np.diff(train, axis=1).mean(), 33 / 9, rtol=0.02)
  rounded = np.asarray(positions.inference_axis('uniform', 8, 32, 1, round_positions=True))[0]
  np.testing.assert_array_equal(rounded, np.round(axis))


def test_inference_contiguous_and_random():
  np.testing.assert_array_equal(positions.inference_axis('contiguous', 5, 32, 2),
                                [list(range(5))] * 2)
  ys, xs = _axes(positions.inference('random', 6, 7, 16, 16, 3, key=jax.random.key(0)), 6, 7)
  assert np.all(np.diff(ys, axis=1) > 0) and ys.max() < 16 and xs.max() < 16


def test_inference_errors():
  with pytest.raises(ValueError, match="unknown inference position rule 'diagonal'"):
    positions.inference_axis('diagonal', 4, 8, 1)
  with pytest.raises(ValueError, match='cannot draw 20 distinct positions from a range of 16'):
    positions.inference_axis('random', 20, 16, 1, key=jax.random.key(0))
  with pytest.raises(ValueError, match='needs a PRNG key'):
    positions.inference_axis('random', 4, 16, 1)


def test_to_tokens_dtype():
  tokens = positions.to_tokens(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32))
  chex.assert_shape(tokens, (2, 12, 2))
  chex.assert_type(tokens, jnp.float32)
