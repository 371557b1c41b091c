"""Compile time of the train step with the blocks unrolled and under nn.scan, without running it.

  PYTHONPATH=. python benchmarks/compile_time.py                        # XL/2 on 32x32x4 latents
  PYTHONPATH=. python benchmarks/compile_time.py --variant=B/2 --batch=8

Each case is a fresh process (no compilation cache, nothing shared) that builds the Trainer of
`configs/imagenet.py:<size>,256,rpe2d` with the given variant, lowers the step on abstract
arguments (no parameters are initialised, so XL/2 needs no memory for its weights) and compiles it.
Prints the seconds of each phase and XLA's temporary memory for one step.
"""

import argparse
import json
import subprocess
import sys
import time

RESULT = 'RESULT '


def worker(variant: str, batch: int, scan: bool, remat: bool):
  import jax  # pylint: disable=g-import-not-at-top
  from rpe2d import config as config_lib, training  # pylint: disable=g-import-not-at-top
  config = config_lib.load('configs/imagenet.py:XL,256,rpe2d', [
      f'--config.model.variant={variant}', f'--config.batch_size={batch}',
      f'--config.model.scan_layers={scan}', f'--config.model.remat={remat}'])
  config = config_lib.resolve(config)  # not validate: it would ask for extracted latents
  start = time.perf_counter()
  trainer = training.Trainer(config_lib.build_model(config), config_lib.training_plan(config),
                             training.make_mesh(1))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_sharding)
  size, channels = config.data.image_size, config.data.channels  # the latent grid
  batch_shapes = {'image': (batch, size, size, channels), 'label': (batch,), 'crop': (batch, 4)}
  dtypes = {'image': 'float32', 'label': 'int32', 'crop': 'float32'}
  inputs = {k: jax.ShapeDtypeStruct(v, dtypes[k], sharding=trainer.batch_sharding)
            for k, v in batch_shapes.items()}
  lowered = trainer.step.lower(state, inputs)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  memory = compiled.memory_analysis()
  print(RESULT + json.dumps(dict(
      trace_lower_s=lowered_at - start, compile_s=done - lowered_at,
      temp_gib=getattr(memory, 'temp_size_in_bytes', 0) / 2**30,
      hlo_lines=len(lowered.as_text().splitlines()))), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='XL/2')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--remat', default='false,true', help='remat settings to try')
  parser.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)  # scan remat _
  args = parser.parse_args()
  if args.worker:
    scan, remat, _ = args.worker
    return worker(args.variant, args.batch, scan == 'True', remat == 'True')
  print(f'train step of {args.variant}, batch {args.batch}, 32x32x4 latents')
  print('| blocks | remat | trace + lower s | compile s | temp GiB | StableHLO lines |')
  print('|---|---|---|---|---|---|')
  for remat in [r.strip().lower() == 'true' for r in args.remat.split(',')]:
    for scan in (False, True):
      out = subprocess.run([sys.executable, __file__, f'--variant={args.variant}',
                            f'--batch={args.batch}', '--worker', str(scan), str(remat), '_'],
                           capture_output=True, text=True, check=False)
      lines = [l for l in out.stdout.splitlines() if l.startswith(RESULT)]
      if out.returncode or not lines:
        print(f'| {"scan" if scan else "loop"} | {remat} | failed: '
              f'{(out.stderr.strip().splitlines() or ["?"])[-1]} | | | |')
        continue
      r = json.loads(lines[-1][len(RESULT):])
      print(f'| {"nn.scan" if scan else "unrolled"} | {remat} | {r["trace_lower_s"]:.1f} | '
            f'{r["compile_s"]:.1f} | {r["temp_gib"]:.2f} | {r["hlo_lines"]} |', flush=True)


if __name__ == '__main__':
  main()
