"""The full-size FiTv2-XL/2 (random weights) through FiT's own code and through rpe2d's import.

  # 1. FiT's side (torch, timm, einops, safetensors; github.com/whlzy/FiT at b22b7b0):
  <python with torch> benchmarks/fitv2_full_size.py reference --fit=<FiT checkout> \
      --out=/tmp/fitv2_full
  # 2. rpe2d's side (no torch), with the import's time and peak memory:
  /usr/bin/time -v env PYTHONPATH=. python benchmarks/fitv2_full_size.py check \
      --out=/tmp/fitv2_full

Never run by CI (2.7 GB of weights; peak RSS 6 GB on FiT's side, 14 GB on rpe2d's). `reference`
builds FiT(**configs/fitv2/config_fitv2_xl.yaml) with every parameter redrawn as
tests/fixtures/make_fitv2_fixtures.py does, saves it as model_ema.safetensors (FiTv2's published
format, 517 tensors) and FiT.forward on fixed inputs at 16x16 tokens (256^2 images) and at 20x20
under --interpolation ntkpro2 --decouple (320^2, the README's setting). `check` imports the file
with rpe2d.importing.convert (the real path: tensor_files, the fitv2 family, an orbax checkpoint)
recording the tests' small random SD VAE, loads the run with inference.load_run, and prints the
max abs error of each forward pass, the import's wall time and the peak RSS (ru_maxrss).
"""

import argparse
import pathlib
import resource
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
XL = dict(hidden_size=1152, depth=36, num_heads=16, adaln_lora_dim=288, num_classes=1000)
CASES = {'256': ((16, 16), 'no', False), '320_ntkpro2_decouple': ((20, 20), 'ntkpro2', True)}


def reference(args):
  sys.path.insert(0, str(REPO / 'tests' / 'fixtures'))
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  import make_fitv2_fixtures as fixtures  # pylint: disable=g-import-not-at-top
  fixtures.CONFIG.update(XL)
  fit, _, _ = fixtures.import_fit(args.fit)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  model = fixtures.build(fit, 16, 16)
  fixtures.redraw(model)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, out / 'model_ema.safetensors')
  print(f'{len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters')
  rng = np.random.default_rng(0)
  saved = {}
  for name, ((h, w), interpolation, decouple) in CASES.items():
    model = fixtures.build(fit, h, w, interpolation, decouple)
    model.load_state_dict(state, strict=True)
    x = rng.normal(size=(2, h * w, 16)).astype(np.float32)
    t = np.array([0.3, 0.85], np.float32)
    y = np.array([207, 1000], np.int64)
    grid, mask, size = fixtures.grid_inputs(h, w, 2)
    with torch.no_grad():
      result = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y), grid, mask,
                     size)
    saved.update({f'{name}_x': x, f'{name}_t': t, f'{name}_y': y, f'{name}_out': result.numpy()})
    del model
  np.savez(out / 'forward.npz', **saved)
  print(f'wrote {out}')


def check(args):
  sys.path.insert(0, str(REPO))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rpe2d import importing, inference, positions, rope  # pylint: disable=g-import-not-at-top
  from rpe2d.families import fitv2  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  workdir = out / 'run'
  if workdir.exists():
    raise SystemExit(f'error: {workdir} exists; remove it to import again')
  began = time.perf_counter()
  importing.convert('fitv2', out / 'model_ema.safetensors', vae=args.vae, workdir=workdir)
  seconds = time.perf_counter() - began
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'import: {seconds:.1f} s wall, peak RSS so far {rss:.2f} GiB')
  run = inference.load_run(workdir)
  saved = np.load(out / 'forward.npz')
  for name, ((h, w), interpolation, decouple) in CASES.items():
    x = fitv2.latents_from_tokens(saved[f'{name}_x'], 2 * h, 2 * w)
    encoding = rope.Encoding(**(rope.fit_interpolation(interpolation, decouple)
                                if interpolation != 'no' else {}))
    apply = jax.jit(lambda p, *a, encoding=encoding: run.model.apply(p, *a, encoding=encoding))
    v = apply(run.params, jnp.asarray(x), 1.0 - jnp.asarray(saved[f'{name}_t']),
              jnp.asarray(saved[f'{name}_y']), positions.grid(h, w, 2))
    error = np.abs(-fitv2.tokens_from_latents(np.asarray(v)) - saved[f'{name}_out']).max()
    print(f'forward {name}: max abs error {error:.2e} (|out| up to '
          f'{np.abs(saved[f"{name}_out"]).max():.2f})')
  print(f'peak RSS of the process: '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', choices=('reference', 'check'))
  parser.add_argument('--fit', help='reference: a checkout of whlzy/FiT at b22b7b0')
  parser.add_argument('--out', required=True, help='where the weights and outputs go')
  parser.add_argument('--vae', default=str(REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'),
                      help='check: the SD VAE the import records (default: the small random one '
                      'of the tests; only its latent format matters here)')
  args = parser.parse_args()
  (reference if args.stage == 'reference' else check)(args)


if __name__ == '__main__':
  main()
