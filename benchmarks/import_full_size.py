"""The full-size XL/2 through convert.py: forward parity, import time and memory, one sampler step.

  # 1. With torch and the reference code (a separate environment; --sit: a checkout of
  #    github.com/willisma/SiT at 947f95b, --dit: github.com/facebookresearch/DiT at ed81ce2):
  <python with torch> benchmarks/import_full_size.py make --sit=SiT --dit=DiT \
      --dir=/tmp/import_xl
  # 2. With rpe2d (no torch): import it as SiT and as DiT and measure.
  python benchmarks/import_full_size.py measure --dir=/tmp/import_xl \
      --vae=sd-vae-ft-ema

`make` builds SiT-XL/2 (256x256: 32x32x4 latents, learned sigma, 1000 classes) with every weight
but the sin-cos table drawn at random (the reference initialisation zeroes the output), saves its
state dict with torch.save (2.7 GB: the published files' layout), and the reference outputs of
SiT's and DiT's forward (the same weights: their module trees are one) on a fixed input.
`measure` runs `convert.py` under /usr/bin/time -v for each family and prints its wall time and
peak RSS, the max abs error of rpe2d's forward against the references, and the CPU and wall
seconds of one sampler step at 256x256, batch 1, with and without guidance (after compiling).
--vae is any SD-VAE-layout folder with 4 latent channels and scaling 0.18215 (the tiny fixture
tests/fixtures/sd_vae_tiny does: the VAE only decodes, which is not measured here).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from timed_convert import timed_convert

REPO = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = 'SiT-XL-2-random.pt'
T_SIT, N_DIT, LABEL = 0.3, 600, 207


def make(args):
  import torch  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.dir)
  out.mkdir(parents=True, exist_ok=True)
  torch.set_grad_enabled(False)
  sys.path.insert(0, args.sit)
  import models as sit_models  # pylint: disable=g-import-not-at-top
  sys.path.pop(0)
  sys.modules.pop('models')
  sys.path.insert(0, args.dit)
  import models as dit_models  # pylint: disable=g-import-not-at-top
  sys.path.pop(0)
  generator = torch.Generator().manual_seed(0)
  model = sit_models.SiT_XL_2(input_size=32).eval()
  for name, p in model.named_parameters():
    if name != 'pos_embed':
      fan_in = p[0].numel() if p.dim() > 1 else 1
      p.copy_(torch.randn(p.shape, generator=generator)
              * (1.0 / np.sqrt(fan_in) if p.dim() > 1 else 0.1))
  began = time.perf_counter()
  torch.save(model.state_dict(), out / WEIGHTS)
  print(f'{out / WEIGHTS}: {(out / WEIGHTS).stat().st_size / 1e9:.2f} GB, saved in '
        f'{time.perf_counter() - began:.1f} s')
  x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 32, 32), np.float32))
  y = torch.tensor([LABEL])
  sit = model(x, torch.tensor([T_SIT]), y)
  dit = dit_models.DiT_XL_2(input_size=32).eval()
  dit.load_state_dict(model.state_dict())
  raw = dit(x, torch.tensor([N_DIT]), y)
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  np.savez(out / 'reference.npz', x=nhwc(x), sit=nhwc(sit), dit=nhwc(raw))


def convert(args, family) -> pathlib.Path:
  workdir = pathlib.Path(args.dir) / f'{family}_run'
  wall, cpu, rss = timed_convert([f'--family={family}',
                                  f'--weights={pathlib.Path(args.dir) / WEIGHTS}',
                                  f'--vae={args.vae}'], workdir)
  print(f'| convert.py --family={family} | {wall} | {cpu:.1f} | {rss:.2f} GiB |')
  return workdir


def measure(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top  # rpe2d's environment, not the reference's
  from rpe2d import ddpm, inference, model as model_lib, positions, sampler
  reference = np.load(pathlib.Path(args.dir) / 'reference.npz')
  print('| import | wall (h:mm:ss) | CPU s | peak RSS |\n| --- | --- | --- | --- |')
  runs = {family: convert(args, family) for family in ('sit', 'dit')}

  x, y = jnp.asarray(reference['x']), jnp.array([LABEL])
  grid = positions.grid(16, 16, 1)
  sit = inference.load_run(runs['sit'])
  v = jax.jit(sit.model.apply)(sit.params, x, jnp.array([1.0 - T_SIT]), y, grid)
  error = float(jnp.max(jnp.abs(v + reference['sit'])))
  print(f'SiT-XL/2 forward (t_SiT = {T_SIT}): max abs error {error:.2e} '
        f'(outputs up to {np.abs(reference["sit"]).max():.2f})')
  dit = inference.load_run(runs['dit'])
  t = jnp.array([ddpm.flow_times()[N_DIT]], jnp.float32)
  raw = jax.jit(lambda p, x, n, t: dit.model.apply(p, x, n, t, y, grid,
                                                   method=model_lib.DiT.network))(
      dit.params, x, jnp.array([float(N_DIT)]), t)
  print(f'DiT-XL/2 network (n = {N_DIT}, 8 channels): max abs error '
        f'{float(jnp.max(jnp.abs(raw - reference["dit"]))):.2e} (outputs up to '
        f'{np.abs(reference["dit"]).max():.2f})')
  del dit

  print('| one sampler step, SiT-XL/2, 256x256, batch 1 | CPU s | wall s |\n| --- | --- | --- |')
  for cfg in (1.0, 1.5):
    plan = sampler.SamplingPlan(sampler='euler', steps=1, cfg_scale=cfg, cfg_channels=3)
    call = lambda: jax.block_until_ready(sampler.sample_jit(
        sit.model, sit.params, jax.random.key(0), jnp.array([LABEL]), height=32, width=32,
        plan=plan))
    call()  # compile
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    print(f'| euler, cfg {cfg} ({1 if cfg == 1 else 2} network passes) | '
          f'{time.process_time() - cpu:.2f} | {time.perf_counter() - wall:.2f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', choices=('make', 'measure'))
  parser.add_argument('--dir', required=True, help='where the 2.7 GB file and the runs go')
  parser.add_argument('--sit', help='make: a checkout of willisma/SiT at 947f95b')
  parser.add_argument('--dit', help='make: a checkout of facebookresearch/DiT at ed81ce2')
  parser.add_argument('--vae', default=str(REPO / 'tests' / 'fixtures' / 'sd_vae_tiny'),
                      help='measure: an SD VAE folder (4 latent channels, scaling 0.18215)')
  args = parser.parse_args()
  if args.stage == 'make':
    if not args.sit or not args.dit:
      parser.error('make needs --sit and --dit')
    make(args)
  else:
    measure(args)


if __name__ == '__main__':
  main()
