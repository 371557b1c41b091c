"""What rpe2d's dopri5 costs, and the same solve through diffrax (the measurement behind the choice
of a hand-written solver, docs/methods.md#dopri5).

  python benchmarks/dopri5_cost.py                         # tiny/4 at 32x32, batch 8, CPU-sized
  pip install diffrax && python benchmarks/dopri5_cost.py  # adds diffrax's rows (not a dependency)
  python benchmarks/dopri5_cost.py --variant=XL/2 --resolution=32 --channels=4 --batch=32   # GPU

Random weights, perturbed so the velocity varies (a zero-initialised output would be constant).
For each way of stepping (per example, per batch) it prints the compile seconds, the median
seconds of a solve, the velocity evaluations per image (mean and max over the batch) and the
accepted and rejected steps; then the Euler x 32 and Heun x 16 solves at their fixed cost beside.
diffrax's rows use its Dopri5 with a PID controller set to torchdiffeq's rule (I-control, exponent
1/5, safety 0.9, factors in [0.2, 10]); its embedded error weights are Dormand-Prince's own, not
Shampine's that torchdiffeq and rpe2d use, so its step counts differ a little. Per example, diffrax
runs under vmap (each example its own while loop, batched).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import model as model_lib, positions, sampler


def timed(fn, repeats):
  """(seconds of the first call, which compiles; the median of `repeats` more)."""
  began = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - began
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - began)
  return first, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='tiny/4')
  parser.add_argument('--resolution', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--cfg_scale', type=float, default=1.0)
  parser.add_argument('--atol', type=float, default=1e-6)
  parser.add_argument('--rtol', type=float, default=1e-3)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  patch = model_lib.parse_variant(args.variant)[3]
  grid = args.resolution // patch
  model = model_lib.DiT(variant=args.variant, channels=args.channels, num_classes=10,
                        train_grid=(grid, grid), position_range=(grid, grid))
  size = args.resolution
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, args.channels)),
                               jnp.zeros(1), jnp.zeros(1, jnp.int32), positions.grid(grid, grid, 1))
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(jax.random.key(i), p.shape)
                                     for i, p in enumerate(leaves)])
  labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
  key = jax.random.key(0)
  print(f'{jax.devices()[0].device_kind}: {args.variant} at {size}x{size}x{args.channels}, batch '
        f'{args.batch}, cfg {args.cfg_scale}, atol {args.atol:g}, rtol {args.rtol:g}; compile = '
        f'the first call, run = the median of {args.repeats}')
  print(f'{"solver":34s} {"compile s":>9s} {"run s":>8s} {"evals/image":>12s} {"max":>5s} '
        f'{"accepted":>8s} {"rejected":>8s}')

  def row(name, first, run, evaluations, accepted, rejected):
    print(f'{name:34s} {first:9.2f} {run:8.3f} {np.mean(evaluations):12.1f} '
          f'{int(np.max(evaluations)):5d} {np.mean(accepted):8.1f} {np.mean(rejected):8.1f}',
          flush=True)

  endpoints = {}
  for name, plan in (
      ('rpe2d dopri5 per_example', dict(sampler='dopri5')),
      ('rpe2d dopri5 per_batch', dict(sampler='dopri5', adaptive_step='per_batch')),
      ('rpe2d euler x 32', dict(sampler='euler', steps=32)),
      ('rpe2d heun x 16', dict(sampler='heun', steps=16))):
    plan = sampler.SamplingPlan(cfg_scale=args.cfg_scale, atol=args.atol, rtol=args.rtol, **plan)
    solve = lambda plan=plan: sampler.sample_with_stats_jit(model, params, key, labels, height=size,
                                                           width=size, plan=plan)
    first, run = timed(solve, args.repeats)
    images, stats = solve()
    endpoints[name] = np.asarray(images)
    row(name, first - run, run, stats.evaluations, stats.accepted, stats.rejected)

  try:
    import diffrax  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('diffrax is not installed: pip install diffrax for its rows')
    return

  noise = jax.vmap(lambda k: jax.random.normal(k, (size, size, args.channels)))(
      sampler.example_keys(jax.random.split(key)[0], jnp.arange(args.batch)))
  token_positions = positions.grid(grid, grid, args.batch)

  def velocity(x, t, labels, token_positions):
    return sampler.guided_velocity(model.apply, params, x, jnp.full((x.shape[0],), t), labels,
                                   token_positions, None, null_class=10,
                                   cfg_scale=args.cfg_scale)

  def solve(x, labels, token_positions):
    term = diffrax.ODETerm(lambda t, y, _: velocity(y, t, labels, token_positions))
    controller = diffrax.PIDController(rtol=args.rtol, atol=args.atol, pcoeff=0.0, icoeff=1.0,
                                       dcoeff=0.0, error_order=5, safety=0.9, factormin=0.2,
                                       factormax=10.0)
    solution = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0=1.0, t1=0.0, dt0=None, y0=x,
                                   stepsize_controller=controller, max_steps=1000,
                                   saveat=diffrax.SaveAt(t1=True))
    return solution.ys[0], solution.stats

  per_batch = jax.jit(solve)
  def one_example(x, labels, token_positions):
    image, stats = solve(x[None], labels[None], token_positions[None])
    return image[0], {k: stats[k] for k in ('num_steps', 'num_accepted_steps')}

  per_example = jax.jit(jax.vmap(one_example))
  for name, fn, reference in (
      ('diffrax Dopri5 per_example (vmap)', per_example, 'rpe2d dopri5 per_example'),
      ('diffrax Dopri5 per_batch', per_batch, 'rpe2d dopri5 per_batch')):
    call = lambda fn=fn: fn(noise, labels, token_positions)
    first, run = timed(call, args.repeats)
    images, stats = call()
    steps = np.broadcast_to(np.asarray(stats['num_steps']), (args.batch,))
    accepted = np.broadcast_to(np.asarray(stats['num_accepted_steps']), (args.batch,))
    # Dopri5 is first-same-as-last: 6 evaluations an attempt, plus the first velocity and the
    # starting-step probe.
    row(name, first - run, run, 6 * steps + 2, accepted, steps - accepted)
    difference = np.abs(np.asarray(images) - endpoints[reference]).max()
    print(f'  max |diffrax - {reference}| = {difference:.2e}')


if __name__ == '__main__':
  main()
