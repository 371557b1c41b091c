"""What DyPE costs per sampler step: its frequencies are recomputed inside the `lax.scan` body.

  python benchmarks/dype_overhead.py                                    # tiny/4, CPU-sized
  python benchmarks/dype_overhead.py --variant=XL/2 --resolution=64 --batch=32 --steps=50   # GPU

Random weights (the cost does not depend on what the model learnt). Two numbers per method:
- the DyPE work alone, jitted: angles from (positions, t) and their cos/sin table, once per step;
- whole sampling runs, static against DyPE, interleaved so drifting machine load hits both alike,
  as the median over repeats.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from rpe2d import model as model_lib, positions, rope, sampler


def seconds(fn, repeats):
  fn()  # compile
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='tiny/4')
  parser.add_argument('--train_resolution', type=int, default=32)
  parser.add_argument('--resolution', type=int, default=64)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()

  width, _, heads, patch = model_lib.parse_variant(args.variant)
  grid = args.train_resolution // patch
  model = model_lib.DiT(variant=args.variant, channels=3, num_classes=10, train_grid=(grid, grid),
                        position_range=(grid, grid), dtype=args.dtype)
  x = jnp.zeros((1, args.train_resolution, args.train_resolution, 3))
  params = model.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32),
                      positions.grid(grid, grid, 1))
  labels = jnp.zeros((args.batch,), jnp.int32)
  n = args.resolution // patch
  geometry = model.geometry(args.resolution, args.resolution)
  token_positions = positions.grid(n, n, args.batch)
  print(f'{jax.devices()[0].device_kind}: {args.variant} at {args.resolution}x{args.resolution} '
        f'(trained {args.train_resolution}), batch {args.batch}, {args.steps} Euler steps, '
        f'median of {args.repeats}')

  def sampling(encoding):
    plan = sampler.SamplingPlan(steps=args.steps, encoding=encoding)
    return lambda: sampler.sample_jit(model, params, jax.random.key(0), labels,
                                      height=args.resolution, width=args.resolution,
                                      plan=plan).block_until_ready()

  for method in rope.DYPE_EXTRAPOLATIONS:
    encoding = rope.Encoding(method, dype=True)
    table = jax.jit(lambda t, encoding=encoding: rope.rotation(rope.angles_2d(
        token_positions, t, dim=width // heads // 2, geometry=geometry, encoding=encoding)))
    t = jnp.full((args.batch,), 0.5)
    work = seconds(lambda: jax.block_until_ready(table(t)), args.repeats * 10)
    static_run, dynamic_run = sampling(rope.Encoding(method)), sampling(encoding)
    static_run(), dynamic_run()  # compile both
    static_times, dynamic_times = [], []
    for _ in range(args.repeats):
      for run, times in ((static_run, static_times), (dynamic_run, dynamic_times)):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) / args.steps)
    static, dynamic = statistics.median(static_times), statistics.median(dynamic_times)
    print(f'{method:5s} DyPE work {1e3 * work:7.3f} ms/step ({100 * work / static:4.1f}% of a step)'
          f' | step: static {1e3 * static:8.2f} ms, DyPE {1e3 * dynamic:8.2f} ms '
          f'({100 * (dynamic - static) / static:+.1f}%)')


if __name__ == '__main__':
  main()
