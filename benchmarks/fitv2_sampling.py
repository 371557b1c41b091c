"""Sampling speed and memory of the imported FiTv2-XL/2 architecture per resolution and method.

  PYTHONPATH=. python benchmarks/fitv2_sampling.py --resolution=320 --methods=none,yarn,dy-yarn
  PYTHONPATH=. python benchmarks/fitv2_sampling.py --smoke     # any CPU: FiTv2's blocks at mini

The model is what `convert.py --family=fitv2` builds for FiTv2-XL/2 (rpe2d.families.fitv2's config
of the published file's shapes: 36 blocks of width 1152, SwiGLU, adaLN-LoRA rank 288,
QK-LayerNorm, 2D RoPE) with random weights: speed does not depend on the values. For each method
(evaluate.py's names: none, pi, ntk, yarn, dy-*, fit-*) it samples latents of --resolution
pixels (the SD VAE's f8, not decoded) with cfg 1.5 on 3 channels and --steps Euler steps, compiled
ahead, then timed over --repeats calls (best kept). DyPE recomputes its frequencies from t at every
step, which should cost nothing next to the network: compare its row with the static method's.
Peak memory is the device's peak_bytes_in_use (the process's peak RSS on CPU); both only grow, so
each row shows the peak up to that row. Prints one JSON object per method; benchmarks/
device_check.py runs this once per resolution and tabulates the rows.
"""

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp

from rpe2d import config as config_lib, sampler, training
from rpe2d.evaluation import sweep
from rpe2d.families import fitv2

XL = fitv2.FiTArchitecture(width=1152, depth=36, patch=2, num_classes=1000, mlp_hidden=3072,
                           adaln_rank=288)
MINI = fitv2.FiTArchitecture(width=80, depth=2, patch=2, num_classes=10, mlp_hidden=213,
                             adaln_rank=16)


def peak_memory_gib() -> float:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  return (device.memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolution', default='256', help='pixels: 320 (square) or HxW')
  parser.add_argument('--methods', default='none,yarn,dy-yarn,ntk,dy-ntk')
  parser.add_argument('--batch', type=int, default=16, help='images per call (guided: x2)')
  parser.add_argument('--steps', type=int, default=8, help='Euler steps')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--smoke', action='store_true', help="FiTv2's blocks at the mini size")
  args = parser.parse_args()
  for flag in ('batch', 'steps', 'repeats'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag}={getattr(args, flag)} must be a positive integer')
  height, _, width = args.resolution.lower().partition('x')
  height, width = int(height), int(width or height)
  arch = MINI if args.smoke else XL
  config = fitv2.config(arch)
  config.model.dtype = args.dtype
  config.model.scan_layers = True  # one block compiled, whatever the depth
  methods = args.methods.split(',')
  model = config_lib.build_model(config)
  latent_h, latent_w = height // 8, width // 8
  plans = {m: sweep.method_plan(config, m, sampler='euler', steps=args.steps) for m in methods}
  for plan in plans.values():
    sampler.check_resolution(model, plan, latent_h, latent_w)
  params = jax.jit(training.init_params, static_argnums=0)(model, jax.random.key(0))
  labels = jnp.arange(args.batch) % arch.num_classes
  device = jax.devices()[0]
  for method, plan in plans.items():
    began = time.perf_counter()
    compiled = sampler.sample_jit.lower(model, params, jax.random.key(1), labels, height=latent_h,
                                        width=latent_w, plan=plan).compile()
    compile_s = time.perf_counter() - began
    best = float('inf')
    for repeat in range(args.repeats):
      began = time.perf_counter()
      jax.block_until_ready(compiled(params, jax.random.key(repeat), labels))
      best = min(best, time.perf_counter() - began)
    print(json.dumps(dict(
        resolution=f'{height}x{width}', method=method, model=config.model.variant,
        batch=args.batch, steps=args.steps, dtype=args.dtype, images_per_s=args.batch / best,
        seconds_per_call=best, compile_s=compile_s, peak_memory_gib=peak_memory_gib(),
        device_kind=device.device_kind)), flush=True)


if __name__ == '__main__':
  main()
