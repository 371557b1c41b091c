"""Time per sampler step with static extrapolation against DyPE (frequencies recomputed every step).

  python benchmarks/dype_overhead.py                                  # tiny/2, 64x64, CPU-sized
  python benchmarks/dype_overhead.py --variant=XL/2 --resolution=64 --batch=32 --steps=50   # GPU

Random weights: the cost does not depend on what the model learnt. Prints ms per step for each
method, static and dynamic, and the relative difference.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from rpe2d import model as model_lib, positions, rope, sampler


def time_per_step(model, params, plan, resolution, batch, repeats):
  labels = jnp.zeros((batch,), jnp.int32)
  key = jax.random.key(0)
  run = lambda: sampler.sample_jit(model, params, key, labels, height=resolution,
                                   width=resolution, plan=plan).block_until_ready()
  run()  # compile
  best = float('inf')
  for _ in range(repeats):
    began = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - began)
  return best / plan.steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='tiny/2')
  parser.add_argument('--train_resolution', type=int, default=32)
  parser.add_argument('--resolution', type=int, default=64)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()

  patch = model_lib.parse_variant(args.variant)[3]
  grid = args.train_resolution // patch
  model = model_lib.DiT(variant=args.variant, channels=3, num_classes=10, train_grid=(grid, grid),
                        position_range=(grid, grid), dtype=args.dtype)
  x = jnp.zeros((1, args.train_resolution, args.train_resolution, 3))
  params = model.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32),
                      positions.grid(grid, grid, 1))
  print(f'{jax.devices()[0].device_kind}: {args.variant} at {args.resolution}x{args.resolution} '
        f'(trained {args.train_resolution}), batch {args.batch}, {args.steps} Euler steps, '
        f'best of {args.repeats}')
  for method in rope.DYPE_METHODS:
    static = time_per_step(model, params, sampler.SamplingPlan(
        steps=args.steps, encoding=rope.Encoding(method)), args.resolution, args.batch,
        args.repeats)
    dynamic = time_per_step(model, params, sampler.SamplingPlan(
        steps=args.steps, encoding=rope.Encoding(method, dype=True)), args.resolution,
        args.batch, args.repeats)
    print(f'{method:5s} static {1e3 * static:8.2f} ms/step   DyPE {1e3 * dynamic:8.2f} ms/step   '
          f'difference {100 * (dynamic - static) / static:+.1f}%')


if __name__ == '__main__':
  main()
