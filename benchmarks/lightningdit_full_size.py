"""The full-size LightningDiT-XL/1 and VA-VAE f16d32 through convert.py: parity, import time and
memory, and the VA-VAE's decode speed.

  # 1. With torch and the reference code (a separate environment; a checkout of
  #    github.com/hustvl/LightningDiT at 2725fed):
  <python with torch> benchmarks/lightningdit_full_size.py make \
      --checkout=LightningDiT --dir=/tmp/lightningdit_xl
  # 2. With rpe2d (no torch): import and measure.
  python benchmarks/lightningdit_full_size.py measure --dir=/tmp/lightningdit_xl

`make` builds, with LightningDiT's own code, the VA-VAE f16d32 (tokenizer/autoencoder.py as
VA_VAE.load builds it) and LightningDiT-XL/1 (models/lightningdit.py with the reproduction
config's options), every weight drawn at random (LightningDiT's init zeroes the output; the fixed
tables are kept), and saves them as the published files are laid out: the VA-VAE as
{'state_dict': ...} beside stand-ins for the other networks of the published file (a few small
loss.* and foundation_model.* tensors: the published file's 1.8 GB of DINOv2 and loss weights are
memory-mapped and never touched, so they cost no reading), a latents_stats.pt, and the generator's
plain state dict (2.7 GB). It also saves the reference outputs: the VA-VAE's posterior of a
64x64 image and its decode of a 4x4x32 latent, and LightningDiT's forward at its 16x16 grid.
`measure` runs `convert.py --family=lightningdit` under /usr/bin/time -v and prints its wall time,
CPU time and peak RSS, the max abs errors of rpe2d's VA-VAE and forward against the references,
and the VA-VAE's decode images/s at 256x256 (batch 1, after compiling) in float32 and bfloat16.
"""

import argparse
import functools
import os
import pathlib
import sys
import time

import numpy as np

from timed_convert import timed_convert

WEIGHTS, VAE, STATS = 'lightningdit-xl-random.pt', 'vavae-random.pt', 'latents_stats.pt'
T, LABEL = 0.3, 207  # LightningDiT's time (1 is data) and a class of the forward reference


def make(args):
  os.environ['TORCHDYNAMO_DISABLE'] = '1'  # torch.compile decorators run eagerly
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures'))
  import make_lightningdit_fixtures as fixtures  # pylint: disable=g-import-not-at-top
  autoencoder, lightningdit, _, _ = fixtures.import_reference(pathlib.Path(args.checkout).resolve())
  out = pathlib.Path(args.dir)
  out.mkdir(parents=True, exist_ok=True)
  torch.set_grad_enabled(False)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda a: np.ascontiguousarray(a.numpy().transpose(0, 2, 3, 1))
  rng = np.random.default_rng(0)

  torch.manual_seed(0)
  vae = autoencoder.AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4)).eval()
  fixtures.perturb(vae, 1)
  state = dict(vae.state_dict())
  state['loss.discriminator.main.1.num_batches_tracked'] = torch.tensor(7, dtype=torch.int64)
  state['foundation_model.model.cls_token'] = torch.randn(1, 1, 1024)
  state['linear_proj.weight'] = torch.randn(1024, 32, 1, 1)
  torch.save({'state_dict': state}, out / VAE)
  torch.save({'mean': 0.3 * torch.randn(1, 32, 1, 1), 'std': 0.5 + torch.rand(1, 32, 1, 1)},
             out / STATS)
  images = np.tanh(rng.normal(size=(1, 64, 64, 3))).astype(np.float32)
  latents = rng.normal(size=(1, 4, 4, 32)).astype(np.float32)
  posterior = vae.encode(nchw(images))
  decoded = vae.decode(nchw(latents))
  del vae

  torch.manual_seed(0)
  model = lightningdit.LightningDiT_models['LightningDiT-XL/1'](
      input_size=16, num_classes=1000, use_qknorm=False, use_swiglu=True, use_rope=True,
      use_rmsnorm=True, wo_shift=False, in_channels=32, learn_sigma=False).eval()
  fixtures.perturb(model, 2)
  began = time.perf_counter()
  torch.save(model.state_dict(), out / WEIGHTS)
  print(f'{out / WEIGHTS}: {(out / WEIGHTS).stat().st_size / 1e9:.2f} GB, saved in '
        f'{time.perf_counter() - began:.1f} s; {out / VAE}: {(out / VAE).stat().st_size / 1e9:.2f} '
        'GB')
  x = rng.normal(size=(1, 16, 16, 32)).astype(np.float32)
  forward = model(nchw(x), torch.tensor([T]), torch.tensor([LABEL]))
  np.savez(out / 'reference.npz', images=images, mean=nhwc(posterior.mean),
           logvar=nhwc(posterior.logvar), latents=latents, decoded=nhwc(decoded), x=x,
           forward=nhwc(forward))


def convert(args) -> pathlib.Path:
  out = pathlib.Path(args.dir)
  workdir = out / 'run'
  wall, cpu, rss = timed_convert(['--family=lightningdit', f'--weights={out / WEIGHTS}',
                                  f'--vae={out / VAE}', f'--vae_statistics={out / STATS}'],
                                 workdir)
  print('| import | wall (h:mm:ss) | CPU s | peak RSS |\n| --- | --- | --- | --- |')
  print(f'| convert.py --family=lightningdit | {wall} | {cpu:.1f} | {rss:.2f} GiB |')
  return workdir


def measure(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rpe2d import autoencoder, inference, positions  # pylint: disable=g-import-not-at-top
  reference = np.load(pathlib.Path(args.dir) / 'reference.npz')
  run = inference.load_run(convert(args))
  vae = run.vae
  error = lambda a, b: f'{float(np.max(np.abs(np.asarray(a) - b))):.2e}'
  mean, logvar = autoencoder.encode(vae.params, reference['images'], config=vae.config)
  decoded = autoencoder.decode(vae.params, reference['latents'], config=vae.config)
  print(f'VA-VAE f16d32 ({vae.describe()}): max abs error mean {error(mean, reference["mean"])}, '
        f'logvar {error(logvar, reference["logvar"])}, decode '
        f'{error(decoded, reference["decoded"])} (decoded values up to '
        f'{np.abs(reference["decoded"]).max():.2f})')
  v = jax.jit(run.model.apply)(run.params, jnp.asarray(reference['x']), jnp.array([1.0 - T]),
                               jnp.array([LABEL]), positions.grid(16, 16, 1))
  print(f'LightningDiT-XL/1 forward at 16x16 (t = {T}): max abs error '
        f'{error(-np.asarray(v), reference["forward"])} (outputs up to '
        f'{np.abs(reference["forward"]).max():.2f})')
  del run

  print('| VA-VAE decode, 16x16x32 -> 256x256, batch 1 | images/s | CPU s per image |\n'
        '| --- | --- | --- |')
  z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 16, 32)), jnp.float32)
  for dtype in ('float32', 'bfloat16'):
    decode = functools.partial(autoencoder.decode, vae.params, z, config=vae.config, dtype=dtype)
    jax.block_until_ready(decode())  # compile
    best, cpu_best = float('inf'), float('inf')
    for _ in range(args.repeats):
      cpu, wall = time.process_time(), time.perf_counter()
      jax.block_until_ready(decode())
      best, cpu_best = min(best, time.perf_counter() - wall), min(cpu_best,
                                                                   time.process_time() - cpu)
    print(f'| {dtype} | {1 / best:.3f} | {cpu_best:.2f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', choices=('make', 'measure'))
  parser.add_argument('--dir', required=True, help='where the files and the run go (3 GB)')
  parser.add_argument('--checkout', help='make: a checkout of hustvl/LightningDiT at 2725fed')
  parser.add_argument('--repeats', type=int, default=2, help='measure: timed decodes (best kept)')
  args = parser.parse_args()
  if args.stage == 'make':
    if not args.checkout:
      parser.error('make needs --checkout')
    make(args)
  else:
    measure(args)


if __name__ == '__main__':
  main()
