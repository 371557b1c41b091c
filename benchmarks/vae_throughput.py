"""VAE encode and decode throughput (images/s) and peak memory on the current device.

  python benchmarks/vae_throughput.py                                  # CPU: batch 1, one repeat
  python benchmarks/vae_throughput.py --batch=16 --repeats=5           # GPU / TPU
  python benchmarks/vae_throughput.py --weights=path/to/diffusion_pytorch_model.safetensors
  python benchmarks/vae_throughput.py --preset=vavae-f16d32 --sizes 256  # LightningDiT's VA-VAE

Random full-size weights of --preset (default `sd`) unless --weights is given (speed does not
depend on the values).
Each (operation, size, dtype) is compiled ahead of time, then timed over --repeats calls (best
kept). Peak memory is the process's peak RSS on CPU (resource.getrusage) and the device's
peak_bytes_in_use elsewhere; both only grow, so each row shows the peak up to that row.
"""

import argparse
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from rpe2d import autoencoder, autoencoder_weights


def peak_memory_gib() -> float:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  return device.memory_stats().get('peak_bytes_in_use', 0) / 2**30


def best_time(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - began)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[256, 512])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                      choices=list(autoencoder.DTYPES))
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--weights', help='a VAE file or diffusers folder (default: random weights)')
  parser.add_argument('--preset', default='sd', choices=list(autoencoder.PRESETS),
                      help='the architecture of the random weights')
  args = parser.parse_args()

  if args.weights:
    loaded = autoencoder_weights.load(args.weights)
    config, params = loaded.config, loaded.params
  else:
    config = autoencoder.PRESETS[args.preset]
    params = autoencoder.init_params(config, jax.random.key(0))
  params = jax.device_put(params)
  f = config.downsampling
  print(f'device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), batch '
        f'{args.batch}, best of {args.repeats}, weights: {args.weights or "random " + args.preset}')
  print(f'{"op":7s} {"size":>5s} {"dtype":9s} {"compile s":>9s} {"images/s":>9s} '
        f'{"peak GiB":>9s}')
  rng = np.random.default_rng(0)
  for size in args.sizes:
    images = jnp.asarray(rng.uniform(-1, 1, (args.batch, size, size, 3)), jnp.float32)
    latents = jnp.asarray(rng.normal(size=(args.batch, size // f, size // f,
                                           config.latent_channels)), jnp.float32)
    for dtype in args.dtypes:
      for op, fn, x in (('encode', autoencoder.encode, images),
                        ('decode', autoencoder.decode, latents)):
        began = time.perf_counter()
        compiled = fn.lower(params, x, config=config, dtype=dtype).compile()
        compile_s = time.perf_counter() - began
        seconds = best_time(functools.partial(compiled, params, x), args.repeats)
        print(f'{op:7s} {size:5d} {dtype:9s} {compile_s:9.1f} {args.batch / seconds:9.3f} '
              f'{peak_memory_gib():9.2f}', flush=True)


if __name__ == '__main__':
  main()
