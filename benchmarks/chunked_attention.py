"""What the chunked attention kernel costs and what it makes possible
(docs/methods.md#attention-kernels).

  python benchmarks/chunked_attention.py                         # both parts, CPU-sized
  python benchmarks/chunked_attention.py --tokens=1024,4096 --pixels=256

(a) Attention alone, batch 1 with tiny's heads (4 x 32): the compiled temp memory
    (`memory_analysis`) and the median time of xla vs chunked, forward and forward+backward. xla is
    run only where its compiled temp memory stays under --xla_limit_gb.
(b) One DiT forward (one sampler step) of tiny/4 with the chunked kernel at sizes far beyond the
    8x8-token training grid, batch 1, each size in a fresh subprocess so its peak RSS is its own;
    next to it what the xla kernel's score matrix alone would need (tokens^2 x heads x 4 bytes).
Random weights: the cost does not depend on what the model learnt.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from rpe2d import attention

HEADS, HEAD_DIM = 4, 32  # tiny: width 128, 4 heads
GIB = 2 ** 30


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # warm-up outside the timing
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - began)
  return statistics.median(times)


def attention_alone(token_counts, xla_limit_gb, repeats):
  print('(a) attention alone: batch 1, 4 heads x 32, float32; temp = compiled temp memory')
  print(f'{"tokens":>7} {"kernel":>8} {"pass":>9} {"temp MiB":>10} {"seconds":>9}')
  for tokens in token_counts:
    keys = jax.random.split(jax.random.key(tokens), 3)
    q, k, v = (jax.random.normal(key, (1, tokens, HEADS, HEAD_DIM)) for key in keys)
    scale = HEAD_DIM ** -0.5
    for name in ('xla', 'chunked'):
      kernel = attention.KERNELS[name]
      forward = lambda q, k, v, kernel=kernel: kernel(q, k, v, scale=scale)
      loss = lambda q, k, v, forward=forward: jnp.sum(forward(q, k, v) ** 2)
      for label, fn in (('fwd', forward), ('fwd+bwd', jax.grad(loss, argnums=(0, 1, 2)))):
        compiled = jax.jit(fn).lower(q, k, v).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        if name == 'xla' and temp > xla_limit_gb * GIB:
          print(f'{tokens:>7} {name:>8} {label:>9} {temp / 2**20:>10.0f} {"skipped":>9}')
          continue
        seconds = median_seconds(compiled, (q, k, v), repeats if tokens <= 4096 else 1)
        print(f'{tokens:>7} {name:>8} {label:>9} {temp / 2**20:>10.1f} {seconds:>9.3f}', flush=True)


def one_step(pixels: int, kernel: str):
  """Child process: one tiny/4 forward at pixels x pixels; prints a JSON line."""
  from rpe2d import model as model_lib, positions, training
  model = model_lib.DiT(variant='tiny/4', channels=1, num_classes=10, train_grid=(8, 8),
                        position_range=(24, 24), attention_implementation=kernel)
  params = training.init_params(model, jax.random.key(0))
  grid = pixels // model.patch_size
  x = jax.random.normal(jax.random.key(1), (1, pixels, pixels, 1))
  inputs = (x, jnp.full((1,), 0.5), jnp.zeros((1,), jnp.int32), positions.grid(grid, grid, 1))
  began = time.perf_counter()
  compiled = jax.jit(model.apply).lower(params, *inputs).compile()
  compile_s = time.perf_counter() - began
  began = time.perf_counter()
  out = jax.block_until_ready(compiled(params, *inputs))
  run_s = time.perf_counter() - began
  assert out.shape == x.shape and bool(jnp.isfinite(out).all())
  print(json.dumps({'compile_s': compile_s, 'run_s': run_s,
                    'temp_bytes': compiled.memory_analysis().temp_size_in_bytes,
                    'peak_rss_bytes': peak_rss_bytes()}))


def peak_rss_bytes() -> int:
  """This process's peak resident memory. Linux's VmHWM starts afresh at exec; getrusage's
  ru_maxrss does not (a child started by a big parent reports at least the parent's size)."""
  try:
    with open('/proc/self/status') as status:
      line = next(line for line in status if line.startswith('VmHWM:'))
    return int(line.split()[1]) * 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def largest_grid(sizes, timeout_s):
  print('\n(b) one tiny/4 forward with the chunked kernel, batch 1, fresh process per size')
  print(f'{"pixels":>9} {"tokens":>7} {"compile s":>10} {"run s":>8} {"temp MiB":>9} '
        f'{"peak RSS MiB":>13} {"xla scores GiB":>15}')
  deadline = time.monotonic() + timeout_s
  for pixels in sizes:
    tokens = (pixels // 4) ** 2
    scores_gib = tokens * tokens * HEADS * 4 / GIB
    left = deadline - time.monotonic()
    row = f'{f"{pixels}x{pixels}":>9} {tokens:>7} '
    try:
      done = subprocess.run([sys.executable, __file__, f'--child={pixels}'], capture_output=True,
                            text=True, timeout=max(left, 1), check=True)
    except subprocess.TimeoutExpired:
      print(row + f'did not finish within the benchmark budget ({timeout_s:.0f} s in all)')
      break
    except subprocess.CalledProcessError as error:
      last = (error.stderr.strip().splitlines() or [f'exit status {error.returncode}'])[-1]
      print(row + f'failed: {last}')
      break
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(row + f'{r["compile_s"]:>10.1f} {r["run_s"]:>8.1f} {r["temp_bytes"] / 2**20:>9.0f} '
          f'{r["peak_rss_bytes"] / 2**20:>13.0f} {scores_gib:>15.2f}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokens', default='1024,4096,16384', help='(a) token counts')
  parser.add_argument('--pixels', default='256,512,1024', help='(b) square image sizes')
  parser.add_argument('--xla_limit_gb', type=float, default=4.0)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--timeout_s', type=float, default=600.0, help='(b) budget for all sizes')
  parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return one_step(args.child, 'chunked')
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}')
  if args.tokens:
    attention_alone([int(n) for n in args.tokens.split(',')], args.xla_limit_gb, args.repeats)
  if args.pixels:
    largest_grid([int(n) for n in args.pixels.split(',')], args.timeout_s)


if __name__ == '__main__':
  main()
