"""One command for a machine with one accelerator: DiT-XL/2 training throughput at 256px latents,
and the imported FiTv2-XL/2 architecture's sampling speed at 256^2 to 512^2.

  PYTHONPATH=. python benchmarks/device_check.py                    # GPU: ~8 minutes at most
  PYTHONPATH=. python benchmarks/device_check.py --smoke            # any CPU: a micro model

Runs benchmarks/throughput.py on configs/imagenet.py:XL,256,rpe2d (32x32x4 latents, 256 tokens)
with synthetic batches, once per case: float32 and bfloat16, attention xla and cudnn (GPU only),
and scan_layers off and on. Each case is its own process with a
time cap, so a case that runs out of memory or fails takes only itself down; one that runs out of
memory is retried once at half the batch. Writes a markdown table (img/s, TFLOP/s, MFU, compile
time, peak memory) to stdout and to --output.

Then, on a GPU or TPU (and tiny with --smoke), benchmarks/fitv2_sampling.py samples the FiTv2-XL/2
architecture convert.py builds (random weights) at 256^2, 320^2, 384^2 and 512^2, one process per
resolution, static YaRN against DY-YaRN: images/s, compile time and peak memory per resolution and
method. DyPE recomputes its frequencies at every step; the table shows what that costs.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = str(REPO / 'configs' / 'imagenet.py') + ':XL,256,rpe2d'
SMOKE_VARIANT = 'micro/2'
OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')
MIN_CASE_S = 30  # a case given less than this would only measure its own start-up
# FiTv2-XL/2 sampling: pixels (SD VAE latents of a 16x16-token model: 256 is its native grid) and
# the methods compared, static first (the 'vs static' column divides by its img/s).
FITV2_RESOLUTIONS = (256, 320, 384, 512)
FITV2_METHODS = ('yarn', 'dy-yarn')


def child_env() -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(
      os.pathsep) if p])
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')  # one case owns the device
  return env


def backend() -> str:
  """jax's default backend, asked in a child process so this one never holds device memory."""
  probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                         env=dict(child_env(), XLA_PYTHON_CLIENT_PREALLOCATE='false'),
                         capture_output=True, text=True, timeout=300, check=False)
  if probe.returncode:
    raise SystemExit(f'error: jax did not start: {probe.stderr.strip().splitlines()[-1:]}')
  return probe.stdout.strip().splitlines()[-1]


def cases(on_gpu: bool, scans=(False, True)) -> list[dict]:
  """Most informative first, so a tight time budget drops the least useful cases."""
  kernels = ('cudnn', 'xla') if on_gpu else ('xla',)
  out = []
  for scan_layers in scans:
    for dtype in ('bfloat16', 'float32'):
      for kernel in kernels:
        out.append(dict(dtype=dtype, attention=kernel, scan_layers=scan_layers))
  return out


def case_name(case: dict) -> str:
  return f"{case['dtype']}, {case['attention']}, scan {case['scan_layers']}"


def last_error(text: str) -> str:
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  for line in reversed(lines):
    if 'Error' in line or line.startswith('error:'):
      return line[:200]
  return lines[-1][:200] if lines else 'no output'


def run_case(case: dict, batch: int, args, timeout: float, workdir: pathlib.Path) -> dict:
  results = workdir / f'case_{time.monotonic_ns()}.json'
  command = [sys.executable, str(HERE / 'throughput.py'), f'--config={CONFIG}',
             f'--config.batch_size={batch}', f"--config.model.dtype={case['dtype']}",
             f"--config.model.attention_implementation={case['attention']}",
             f"--config.model.scan_layers={case['scan_layers']}",
             f'--steps={args.steps}', f'--warmup={args.warmup}', f'--results_json={results}']
  if args.smoke:
    command.append(f'--config.model.variant={SMOKE_VARIANT}')
  if args.sample:
    command += [f'--sample_steps={args.sample_steps}', f'--sample_batch={args.sample_batch}',
                '--sample_repeats=1']
  else:
    command.append('--nosample')
  began = time.perf_counter()
  try:
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(case, batch=batch, failed=f'over the {timeout:.0f} s cap', wall_s=timeout)
  wall = time.perf_counter() - began
  if done.returncode or not results.is_file():
    output = done.stderr + done.stdout
    return dict(case, batch=batch, wall_s=wall, failed=last_error(output),
                out_of_memory=any(s in output for s in OUT_OF_MEMORY))
  return dict(case, **json.loads(results.read_text()), wall_s=wall)


def cell(value, spec: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value * scale, spec)


def table(rows: list[dict], title: str) -> str:
  lines = [title, '', '| case | batch | img/s | TFLOP/s per device | MFU | compile s | '
           'peak memory GiB | case wall s | note |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    note = r.get('failed') or ''
    if r.get('flop_ratio') is not None and abs(r['flop_ratio'] - 1) > 0.05:
      note = f"XLA/project FLOPs {r['flop_ratio']:.3f}"
    mfu = r.get('mfu')
    lines.append(
        f"| {case_name(r)} | {r['batch']} | {cell(r.get('images_per_s'), '.1f')} | "
        f"{cell(r.get('tflops_per_device'), '.3f')} | "
        f"{'n/a' if mfu is None and 'images_per_s' in r else cell(mfu, '.1%')} | "
        f"{cell(r.get('compile_s'), '.1f')} | {cell(r.get('peak_memory_bytes'), '.2f', 2**-30)} | "
        f"{cell(r.get('wall_s'), '.0f')} | {note} |")
  return '\n'.join(lines) + '\n'


def run_fitv2(resolution: int, args, timeout: float) -> list[dict]:
  """benchmarks/fitv2_sampling.py at one resolution: a row per method, or one row saying why
  none came back."""
  command = [sys.executable, str(HERE / 'fitv2_sampling.py'), f'--resolution={resolution}',
             f'--methods={",".join(FITV2_METHODS)}', f'--batch={args.fitv2_batch}',
             f'--steps={args.fitv2_steps}', f'--repeats={1 if args.smoke else 2}']
  if args.smoke:
    command.append('--smoke')
  failed = lambda why: [dict(resolution=f'{resolution}x{resolution}', method=m, failed=why)
                        for m in FITV2_METHODS]
  try:
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return failed(f'over the {timeout:.0f} s cap')
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  if done.returncode and len(rows) < len(FITV2_METHODS):
    rows += failed(last_error(done.stderr + done.stdout))[len(rows):]
  return rows


def fitv2_table(rows: list[dict], title: str) -> str:
  lines = [title, '', '| resolution | method | img/s | vs static | compile s | peak memory GiB | '
           'note |', '|---|---|---|---|---|---|---|']
  static = {r['resolution']: r.get('images_per_s') for r in rows if r['method'] == FITV2_METHODS[0]}
  for r in rows:
    ips, base = r.get('images_per_s'), static.get(r['resolution'])
    ratio = f'{ips / base:.3f}' if ips and base else '-'
    lines.append(f"| {r['resolution']} | {r['method']} | {cell(ips, '.2f')} | {ratio} | "
                 f"{cell(r.get('compile_s'), '.1f')} | {cell(r.get('peak_memory_gib'), '.2f')} | "
                 f"{r.get('failed', '')} |")
  return '\n'.join(lines) + '\n'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help=f'{SMOKE_VARIANT} instead of XL/2, tiny batch and one step (CPU tests)')
  parser.add_argument('--batch', type=int, default=0,
                      help='global batch (0: 256 on a GPU or TPU, 8 on CPU, 2 with --smoke)')
  parser.add_argument('--steps', type=int, default=0, help='timed steps (0: 10, 1 with --smoke)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--sample', action='store_true', help='also measure sampling per case')
  parser.add_argument('--sample_steps', type=int, default=8)
  parser.add_argument('--sample_batch', type=int, default=16)
  parser.add_argument('--case_timeout', type=float, default=150, help='seconds per case at most')
  parser.add_argument('--budget', type=float, default=450, help='seconds for all cases')
  parser.add_argument('--fitv2_batch', type=int, default=0,
                      help='FiTv2 sampling: images per call (0: 16, 1 with --smoke)')
  parser.add_argument('--fitv2_steps', type=int, default=0,
                      help='FiTv2 sampling: Euler steps (0: 8, 1 with --smoke)')
  parser.add_argument('--fitv2_budget', type=float, default=240,
                      help='seconds for the FiTv2 sampling rows (0: skip them)')
  parser.add_argument('--output', default=str(pathlib.Path(tempfile.gettempdir()) /
                                              'rpe2d_device_check' / 'device_check.md'))
  args = parser.parse_args(argv)
  for flag in ('batch', 'steps', 'warmup', 'sample_steps', 'sample_batch', 'fitv2_batch',
               'fitv2_steps', 'fitv2_budget'):
    if getattr(args, flag) < 0:
      parser.error(f'--{flag}={getattr(args, flag)} must be >= 0')
  for flag in ('case_timeout', 'budget'):
    if getattr(args, flag) <= 0:
      parser.error(f'--{flag}={getattr(args, flag)} must be positive')
  if args.smoke:
    args.warmup = min(args.warmup, 1)
    args.sample_steps, args.sample_batch = min(args.sample_steps, 1), min(args.sample_batch, 1)
  args.fitv2_batch = args.fitv2_batch or (1 if args.smoke else 16)
  args.fitv2_steps = args.fitv2_steps or (1 if args.smoke else 8)
  return args


def main(argv=None):
  args = parse_args(argv)
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  platform = backend()
  accelerator = platform in ('gpu', 'cuda', 'rocm', 'tpu')
  batch = args.batch or (2 if args.smoke else 256 if accelerator else 8)
  args.steps = args.steps or (1 if args.smoke else 10)
  # The smoke run checks the machinery, not the numbers: unrolled only.
  todo = cases(platform in ('gpu', 'cuda'), scans=(False,) if args.smoke else (False, True))
  print(f'{platform}: {len(todo)} cases of {SMOKE_VARIANT if args.smoke else "XL/2"} at 32x32x4, '
        f'batch {batch}, {args.steps} steps; cap {args.case_timeout:.0f} s each, '
        f'{args.budget:.0f} s in all', flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in todo:
      case_batch = batch
      while True:
        left = args.budget - (time.perf_counter() - started)
        if left < MIN_CASE_S:
          row = dict(case, batch=case_batch, failed='not run: the time budget is spent')
          break
        row = run_case(case, case_batch, args, min(args.case_timeout, left), pathlib.Path(tmp))
        if not (row.get('out_of_memory') and case_batch > 1 and case_batch == batch):
          break
        print(f'  {case_name(case)}: out of memory at batch {case_batch}; retrying at '
              f'{case_batch // 2}', flush=True)
        case_batch //= 2
      rows.append(row)
      status = row.get('failed') or f"{row['images_per_s']:.1f} img/s"
      print(f'  {case_name(case)}: {status}', flush=True)
  kind = next((r['device_kind'] for r in rows if 'device_kind' in r), platform)
  text = table(rows, f'## DiT {SMOKE_VARIANT if args.smoke else "XL/2"}, 32x32x4 latents '
               f'(256 tokens), synthetic batches, on {kind}')

  fitv2_rows = []
  if (accelerator or args.smoke) and args.fitv2_budget:
    began = time.perf_counter()
    # The smoke run: FiTv2's blocks at the mini size, one resolution beyond the native grid.
    for resolution in (320,) if args.smoke else FITV2_RESOLUTIONS:
      left = args.fitv2_budget - (time.perf_counter() - began)
      if left < MIN_CASE_S:
        fitv2_rows += [dict(resolution=f'{resolution}x{resolution}', method=m,
                            failed='not run: the time budget is spent') for m in FITV2_METHODS]
        continue
      fitv2_rows += run_fitv2(resolution, args, left)
      for r in fitv2_rows[-len(FITV2_METHODS):]:
        status = r.get('failed') or f"{r['images_per_s']:.2f} img/s"
        print(f"  FiTv2 {r['resolution']} {r['method']}: {status}", flush=True)
    model = 'FiTv2 blocks at mini/2' if args.smoke else 'FiTv2-XL/2'
    text += '\n' + fitv2_table(
        fitv2_rows, f'## {model} sampling (random weights): {args.fitv2_steps} Euler steps, cfg '
        f'1.5 on 3 channels, batch {args.fitv2_batch}, bfloat16, latents not decoded, on {kind}')
  output.write_text(text)
  output.with_suffix('.json').write_text(json.dumps(rows, indent=1))
  if fitv2_rows:
    output.with_name(f'{output.stem}_fitv2.json').write_text(json.dumps(fitv2_rows, indent=1))
  print('\n' + text)
  print(f'written to {output} (and {output.with_suffix(".json").name}); '
        f'{time.perf_counter() - started:.0f} s in all')


if __name__ == '__main__':
  main()
