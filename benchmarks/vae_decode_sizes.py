"""The largest image the SD VAE decodes whole, and tiled, on this machine: time and peak memory.

  python benchmarks/vae_decode_sizes.py                  # whole 512..2048, tiled 1024..4096
  python benchmarks/vae_decode_sizes.py --whole 512 1024 --tiled 2048 --budget=540
  python benchmarks/vae_decode_sizes.py --whole 2048 3072 --tiled 4096 --compile_only

Full-size `sd` architecture with random weights (speed and memory do not depend on the values),
batch 1, float32. Each (mode, size) runs in its own subprocess, so that one running out of memory
does not end the script; peak memory is that subprocess's peak RSS (resource.getrusage), which on
CPU includes the weights, the compiled program and the host copy of the image. Before running, a
size whose compiled program XLA says needs more memory than is available is skipped (a shared
machine should not be pushed into its OOM killer), and so is a size whose time, extrapolated from
the last size run by pixel count, would overrun what is left of --budget: such sizes are only
compiled, for XLA's memory estimate (the `fits` column), and not run.

Measured 2026-12-01 on the project's 2-core CPU, shared (load average 2-7), 24 GiB RAM of which
14.5 GiB were free; three invocations, ~17 minutes in all:

  mode     size tiles compile s  decode s peak RSS GiB  XLA GiB  note
  whole     256     —       5.0      11.2         1.20     0.40
  whole     512     —       4.5      54.9         1.83     1.06
  whole    1024     —       4.4     367.3         4.57     3.70
  whole    1536     —       6.7         —            —     8.09  fits; not run: ~939 s
  whole    2048     —       6.6         —            —    14.23  not run: 14.5 GiB free
  whole    3072     —       7.1         —            —    31.79  does not fit in 24 GiB
  tiled     640     4       4.4     223.1         1.87     1.06
  tiled    4096   121       7.1         —            —     1.06  fits; not run: ~2 h at ~55 s a tile

Largest run whole: 1024x1024 (1536x1536 fits by XLA's estimate, 2048x2048 would need 14.2 GiB:
the whole 24 GiB machine, not what others left free). Tiled, memory stays at one 512x512 tile's
(1.9 GiB peak RSS) plus the float32 image on the host, so any size fits; time grows with the
tile count (121 tiles for 4096x4096).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

TILE, OVERLAP = 64, 16  # latent pixels: 512 px tiles sharing 128 px, as inference uses
COMPILE_SECONDS = 180  # a compile-only probe (start, random init, compile), outside the budget


def available_bytes() -> int:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return 0


def child(mode: str, size: int, run: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rpe2d import autoencoder

  config = autoencoder.PRESETS['sd']
  params = autoencoder.init_params(config, jax.random.key(0))
  h = size // config.downsampling
  latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, h, h, 4)), jnp.float32)
  piece = min(TILE, h) if mode == 'tiled' else h
  began = time.perf_counter()
  compiled = autoencoder.decode.lower(params, latents[:, :piece, :piece], config=config).compile()
  compile_s = time.perf_counter() - began
  analysis = compiled.memory_analysis()
  needed = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes) if analysis is not None else 0
  result = dict(mode=mode, size=size, compile_s=compile_s, xla_gib=needed / 2**30,
                fits=needed <= 0.9 * available_bytes())
  if mode == 'tiled':
    result['tiles'] = len(autoencoder.tile_windows(h, h, TILE, OVERLAP))
  if not result['fits']:
    result['skipped'] = (f'not run: XLA needs {needed / 2**30:.1f} GiB, '
                         f'{available_bytes() / 2**30:.1f} GiB available')
  if not run or not result['fits']:
    return result
  began = time.perf_counter()
  if mode == 'whole':
    images = np.asarray(compiled(params, latents))
  else:
    images = autoencoder.decode_tiled(params, latents, config=config, tile=TILE, overlap=OVERLAP)
  result['seconds'] = time.perf_counter() - began
  assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
  result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--whole', type=int, nargs='*', default=[512, 1024, 1536, 2048])
  parser.add_argument('--tiled', type=int, nargs='*', default=[1024, 2048, 4096])
  parser.add_argument('--budget', type=float, default=900, help='seconds for the runs')
  parser.add_argument('--compile_only', action='store_true', help="only XLA's memory estimates")
  parser.add_argument('--child', nargs=3, metavar=('MODE', 'SIZE', 'RUN'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2] == 'run')),
          flush=True)
    return

  began = time.perf_counter()
  rows, rate = [], None  # rate: decode seconds per output pixel, from the last size run
  print(f'{"mode":6s} {"size":>6s} {"tiles":>5s} {"compile s":>9s} {"decode s":>9s} '
        f'{"peak RSS GiB":>12s} {"XLA GiB":>8s} {"fits":>5s}  note', flush=True)
  for mode, size in [('whole', s) for s in args.whole] + [('tiled', s) for s in args.tiled]:
    left = args.budget - (time.perf_counter() - began)
    row, note = dict(mode=mode, size=size), ''
    pixels = size * size
    if mode == 'tiled':
      h = size // 8
      pixels = len(tile_windows(h, TILE, OVERLAP)) * (min(TILE, h) * 8) ** 2
    estimate = None if rate is None else rate * pixels * 1.1 + 30  # + start, init, compile
    run = not args.compile_only and (estimate is None or estimate < left)
    if not run and not args.compile_only:
      note = f'not run: would take ~{estimate:.0f} s, {left:.0f} s of the budget left'
    try:
      done = subprocess.run([sys.executable, __file__, '--child', mode, str(size),
                             'run' if run else 'compile'],
                            capture_output=True, text=True,
                            timeout=max(left, 1) if run else COMPILE_SECONDS)
      lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
      if done.returncode == 0 and lines:
        row = json.loads(lines[-1])
      else:
        killed = done.returncode in (-9, 137)
        note = ('killed (out of memory?)' if killed else
                f'failed (exit {done.returncode}): {done.stderr.strip()[-300:]}')
    except subprocess.TimeoutExpired:
      note = (f'over the {left:.0f} s left of the budget' if run else
              f'compiling took over {COMPILE_SECONDS} s')
    note = row.get('skipped', note)
    if 'seconds' in row:
      rate = row['seconds'] / pixels
    rows.append(row)
    fmt = lambda key, spec: format(row[key], spec) if key in row else '—'
    print(f'{mode:6s} {size:6d} {fmt("tiles", "5d"):>5s} {fmt("compile_s", "9.1f"):>9s} '
          f'{fmt("seconds", "9.1f"):>9s} {fmt("peak_rss_gib", "12.2f"):>12s} '
          f'{fmt("xla_gib", "8.2f"):>8s} {fmt("fits", ""):>5s}  {note}', flush=True)
  for mode in ('whole', 'tiled'):
    done = [r['size'] for r in rows if r['mode'] == mode and 'seconds' in r]
    fits = [r['size'] for r in rows if r['mode'] == mode and r.get('fits')]
    print(f'largest {mode}: run {f"{max(done)}x{max(done)}" if done else "none"}; '
          f'fits in memory by XLA\'s estimate: {f"{max(fits)}x{max(fits)}" if fits else "none"}')
  print(f'total {time.perf_counter() - began:.0f} s; tiles of {TILE} latent pixels sharing '
        f'{OVERLAP}; XLA GiB: temporaries + arguments + outputs of one (tile) decode', flush=True)


def tile_windows(h: int, tile: int, overlap: int) -> list:
  # autoencoder.tile_windows without importing jax into the parent
  starts = [0] if h <= tile else list(range(0, h - tile, tile - overlap)) + [h - tile]
  return [(a, b) for a in starts for b in starts]


if __name__ == '__main__':
  main()
