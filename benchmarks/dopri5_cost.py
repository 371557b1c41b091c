"""What rpe2d's dopri5 costs, beside Euler and Heun and the same solve through diffrax (the
measurement behind a hand-written solver, docs/methods.md#dopri5).

  python benchmarks/dopri5_cost.py                         # tiny/4 at 32x32, batch 8, CPU-sized
  pip install diffrax && python benchmarks/dopri5_cost.py  # adds diffrax's rows (not a dependency)
  python benchmarks/dopri5_cost.py --variant=XL/2 --resolution=32 --channels=4 --batch=32   # GPU
  python benchmarks/dopri5_cost.py --rows='rpe2d dopri5 per_batch,rpe2d euler x 32'   # some rows

Random weights, perturbed so the velocity varies (a zero-initialised output would be constant).
Per solver, from the same noise: the compile seconds, how many copies of the network the compiled
program holds (its dot products over one forward pass's: each call site of the network compiles
once), the median seconds of a solve (every solver's repeats interleaved, so drifting machine load
hits all alike), the velocity evaluations per image (mean and max over the batch), the accepted
and rejected steps, and the largest difference from another row's images. diffrax's rows use its Dopri5 with a PID
controller set to torchdiffeq's rule (I-control, exponent 1/5, safety 0.9, factors in [0.2, 10]);
its embedded error weights are Dormand-Prince's own, not Shampine's that torchdiffeq and rpe2d use,
so its step counts differ a little. Per example, diffrax runs under vmap (each example its own
while loop, batched).
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import model as model_lib, positions, sampler


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
  parser.add_argument('--rows', default='', help='comma list of row names to run (default: all)')
  args = parser.parse_args()

  patch = model_lib.parse_variant(args.variant)[3]
  grid, size = args.resolution // patch, args.resolution
  model = model_lib.DiT(variant=args.variant, channels=args.channels, num_classes=10,
                        train_grid=(grid, grid), position_range=(grid, grid))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, args.channels)),
                               jnp.zeros(1), jnp.zeros(1, jnp.int32), positions.grid(grid, grid, 1))
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(jax.random.key(i), p.shape)
                                     for i, p in enumerate(leaves)])
  labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
  key = jax.random.key(0)
  noise = jax.vmap(lambda k: jax.random.normal(k, (size, size, args.channels)))(
      sampler.example_keys(jax.random.split(key)[0], jnp.arange(args.batch)))

  token_positions = positions.grid(grid, grid, args.batch)
  inputs = (params, noise, labels, token_positions)

  def rpe2d_solve(plan, params, noise, labels, token_positions):
    del token_positions  # grid positions, made by the sampler
    images, stats = sampler.sample_with_stats(model, params, key, labels, height=size,
                                              width=size, plan=plan, noise=noise)
    return images, stats.evaluations, stats.accepted, stats.rejected

  # name -> (a jitted function of `inputs` returning (images, evaluations per example, accepted,
  # rejected), the row its images are compared with)
  solvers = {}
  per_example = 'rpe2d dopri5 per_example'
  for name, plan, reference in (
      (per_example, dict(sampler='dopri5'), None),
      ('rpe2d dopri5 per_batch', dict(sampler='dopri5', adaptive_step='per_batch'), per_example),
      ('rpe2d euler x 32', dict(sampler='euler', steps=32), per_example),
      ('rpe2d heun x 16', dict(sampler='heun', steps=16), per_example)):
    plan = sampler.SamplingPlan(cfg_scale=args.cfg_scale, atol=args.atol, rtol=args.rtol, **plan)
    solvers[name] = (jax.jit(functools.partial(rpe2d_solve, plan)), reference)
  try:
    import diffrax  # pylint: disable=g-import-not-at-top
  except ImportError:
    diffrax = None
    print('diffrax is not installed (pip install diffrax for its rows)')
  if diffrax is not None:

    def diffrax_solve(params, x, labels, token_positions):
      def velocity(t, y, _):
        return sampler.guided_velocity(model.apply, params, y, jnp.full((y.shape[0],), t), labels,
                                       token_positions, None, null_class=10,
                                       cfg_scale=args.cfg_scale)
      controller = diffrax.PIDController(rtol=args.rtol, atol=args.atol, pcoeff=0.0, icoeff=1.0,
                                         dcoeff=0.0, error_order=5, safety=0.9, factormin=0.2,
                                         factormax=10.0)
      solution = diffrax.diffeqsolve(diffrax.ODETerm(velocity), diffrax.Dopri5(), t0=1.0, t1=0.0,
                                     dt0=None, y0=x, stepsize_controller=controller,
                                     max_steps=1000, saveat=diffrax.SaveAt(t1=True))
      steps, accepted = solution.stats['num_steps'], solution.stats['num_accepted_steps']
      # First same as last: 6 evaluations an attempt, plus the first velocity and the probe of
      # the starting step.
      return solution.ys[0], 6 * steps + 2, accepted, steps - accepted

    def one_example(params, x, labels, token_positions):
      image, *counts = diffrax_solve(params, x[None], labels[None], token_positions[None])
      return (image[0], *counts)

    solvers['diffrax Dopri5 per_example (vmap)'] = (
        jax.jit(jax.vmap(one_example, in_axes=(None, 0, 0, 0))), per_example)
    solvers['diffrax Dopri5 per_batch'] = (jax.jit(diffrax_solve), 'rpe2d dopri5 per_batch')

  if args.rows:
    chosen = args.rows.split(',')
    unknown = sorted(set(chosen) - set(solvers))
    if unknown:
      raise SystemExit(f'error: unknown rows {unknown}; allowed: {", ".join(solvers)}')
    solvers = {name: (fn, reference if reference in chosen else None)
               for name, (fn, reference) in solvers.items() if name in chosen}
  print(f'{jax.devices()[0].device_kind}: {args.variant} at {size}x{size}x{args.channels}, batch '
        f'{args.batch}, cfg {args.cfg_scale}, atol {args.atol:g}, rtol {args.rtol:g}; median of '
        f'{args.repeats} interleaved solves', flush=True)
  dots = lambda compiled: compiled.as_text().count(' dot(')
  forward = dots(jax.jit(model.apply).lower(params, noise, jnp.zeros(args.batch), labels,
                                            token_positions).compile())
  compiled, compile_seconds, copies, outputs = {}, {}, {}, {}
  for name, (fn, _) in solvers.items():
    began = time.perf_counter()
    compiled[name] = fn.lower(*inputs).compile()
    compile_seconds[name] = time.perf_counter() - began
    copies[name] = dots(compiled[name]) / forward
    outputs[name] = jax.device_get(compiled[name](*inputs))
  times = {name: [] for name in solvers}
  for _ in range(args.repeats):
    for name in solvers:
      began = time.perf_counter()
      jax.block_until_ready(compiled[name](*inputs))
      times[name].append(time.perf_counter() - began)

  print('| solver | compile s | network copies compiled | solve s | evaluations/image | max | '
        'accepted | rejected | max abs diff from |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for name, (_, reference) in solvers.items():
    images, evaluations, accepted, rejected = outputs[name]
    evaluations, accepted, rejected = (np.broadcast_to(a, (args.batch,))
                                       for a in (evaluations, accepted, rejected))
    shown = (f'{np.abs(images - outputs[reference][0]).max():.1e} ({reference})' if reference
             else '')
    print(f'| {name} | {compile_seconds[name]:.2f} | {copies[name]:.1f} | '
          f'{statistics.median(times[name]):.3f} | {np.mean(evaluations):.1f} | '
          f'{int(np.max(evaluations))} | {np.mean(accepted):.1f} | {np.mean(rejected):.1f} | '
          f'{shown} |', flush=True)


if __name__ == '__main__':
  main()
