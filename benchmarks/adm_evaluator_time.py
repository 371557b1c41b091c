"""Wall time of ADM's evaluation (`evaluate.py --sample_npz`) for a sample batch of N images.

  python benchmarks/adm_evaluator_time.py --num=10000 --size=256 --workdir=/tmp/evaluator_time

Writes a sample batch and a reference batch of N synthetic uint8 RGB images each (smooth random
fields: Inception's cost does not depend on what the pixels show), then runs the command a user
runs, `evaluate.py --sample_npz=... --reference_npz=...`, twice: the first computes the features
of both batches (ADM's reference batches carry `mu`/`sigma` but not the activations that precision
and recall need) and every metric; the second finds both batches' features in --outdir's cache
(as a resumed evaluation does) and pays for the metrics alone. Prints both wall times and the
images per second of the first.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
  """count x size x size x 3 uint8 images: random 8x8 fields upsampled, so not white noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
  return np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)


def evaluate(sample: pathlib.Path, reference: pathlib.Path, outdir: pathlib.Path) -> float:
  began = time.perf_counter()
  subprocess.run([sys.executable, str(REPO / 'evaluate.py'), f'--sample_npz={sample}',
                  f'--reference_npz={reference}', f'--outdir={outdir}'], cwd=REPO, check=True,
                 env=dict(os.environ, PYTHONPATH=str(REPO)))
  return time.perf_counter() - began


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num', type=int, default=10_000)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--workdir', type=pathlib.Path, default=pathlib.Path('/tmp/evaluator_time'))
  args = parser.parse_args()
  if args.num < 2 or args.size % 8:
    raise SystemExit(f'--num={args.num} --size={args.size}: allowed: --num >= 2, --size a '
                     'multiple of 8')
  args.workdir.mkdir(parents=True, exist_ok=True)
  sample, reference = args.workdir / 'sample.npz', args.workdir / 'reference.npz'
  np.savez(sample, arr_0=smooth_images(args.num, args.size, 0))
  np.savez(reference, arr_0=smooth_images(args.num, args.size, 1))
  outdir = args.workdir / 'out'
  first = evaluate(sample, reference, outdir)
  second = evaluate(sample, reference, outdir)
  print(f'{args.num} samples of {args.size}x{args.size} against {args.num} reference images: '
        f'{first:.0f} s in all ({2 * args.num / first:.2f} images/s through Inception with the '
        f'metrics), {second:.0f} s of it the metrics (the second run, features cached)')


if __name__ == '__main__':
  main()
