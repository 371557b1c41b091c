"""How much FID and KID move by chance at a given N: disjoint splits of cached reference features.

  python benchmarks/fid_noise.py runs/animals_sweep/reference/*_test_*.npz --n=64 --repeats=8

Each file is a reference cache written by evaluate.py (features of real images). Every repeat
splits it at random into N and the rest and scores one part against the other; the spread is the
chance variation of a score on N real images.
"""

import argparse

import numpy as np

from rpe2d.evaluation import metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('paths', nargs='+')
  parser.add_argument('--n', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for path in args.paths:
    with np.load(path, allow_pickle=False) as cached:
      features = cached['features']
    if not 2 <= args.n < len(features) - 1:
      raise SystemExit(f'--n={args.n} must lie in [2, {len(features) - 2}] for {path}')
    fids, kids = [], []
    for _ in range(args.repeats):
      order = rng.permutation(len(features))
      part, rest = features[order[:args.n]], features[order[args.n:]]
      fids.append(metrics.fid(part, rest))
      kids.append(metrics.kid(part, rest))
    print(f'{path}: N={args.n} against {len(features) - args.n}: FID {np.mean(fids):.1f} ± '
          f'{np.std(fids):.1f}, KID {1e3 * np.mean(kids):.2f} ± {1e3 * np.std(kids):.2f} ×1e-3')


if __name__ == '__main__':
  main()
