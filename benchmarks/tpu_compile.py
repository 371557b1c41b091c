"""Compiles the programs a TPU user runs for a TPU slice, on any host (no TPU needed), and reports
per chip: compile time, memory against the chip's HBM, XLA's FLOPs against the analytic count, and
whether it fits.

  pip install -e '.[tpu]'     # libtpu: the TPU compiler (nothing runs on a TPU)
  PYTHONPATH=. python benchmarks/tpu_compile.py --config=configs/imagenet.py:XL,256,rpe2d \
      --topology=v5e-8
  PYTHONPATH=. python benchmarks/tpu_compile.py --config=configs/imagenet.py:XL,256,rpe2d \
      --topology=v5e:2x2 --programs=train --config.mesh.fsdp=4 --config.batch_size=64
  PYTHONPATH=. python benchmarks/tpu_compile.py --table --output=tpu_table.md   # the README's

Programs (rpe2d/aot.py): `train` (the train step at the config's global batch and mesh),
`sample_step` (one step of the config's solver, CFG included), `sampler` (the whole `lax.scan`
sampler) and `decode` (a latent run's VAE decode as sample.py splits it) at each --resolution.
Any config and `--config.<key>=<value>` override works, as for train.py. `--table` runs the cases
of the README's table, each in its own process (a failed compile takes only itself down).

Memory is XLA:TPU's per chip: arguments, outputs (minus those that reuse a donated argument),
temporaries, and the peak of its buffer assignment, which is what it checks against the chip's HBM
when it compiles; a program over it is refused at compile time (RESOURCE_EXHAUSTED), and the table
shows what it needed. XLA's FLOPs count a `lax.scan` body once (the sampler's steps; the blocks
under nn.scan), and count the recomputation of a rematerialised forward.
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
sys.path.insert(0, str(REPO))

RESULT = 'RESULT '
CONFIG = 'configs/imagenet.py:{size},{resolution},rpe2d'
KERNELS = ('xla', 'splash', 'chunked')
TOPOLOGIES = ('v5e-8', 'v4-8', 'v5p-8', 'v5e-4')  # the README's slices, and half a v5e-8


def parse_args(argv):
  from rpe2d import config as config_lib  # pylint: disable=g-import-not-at-top
  plain, overrides = config_lib.split_overrides(argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '))
  parser.add_argument('--config', default=CONFIG.format(size='XL', resolution=256))
  parser.add_argument('--topology', default='v5e-8',
                      help='Cloud TPU slices (v4-8, v5e-4, v5e-8, v5p-8, v6e-8) or jax topology '
                           'names (v5e:2x2, v4:2x2x2, ...), comma-separated')
  parser.add_argument('--programs', default='train,sample_step,sampler,decode')
  parser.add_argument('--resolutions', default='',
                      help='sampling sizes in pixels, e.g. 256,512,1024 (default: the training '
                           'resolution)')
  parser.add_argument('--sample_batch', type=int, default=64,
                      help="images per sampler call, over all chips (sample.py's --batch_size)")
  parser.add_argument('--json', help='also write the reports here (JSON)')
  parser.add_argument('--table', action='store_true', help="the README's table of cases")
  parser.add_argument('--output', default=str(pathlib.Path(tempfile.gettempdir()) /
                                              'rpe2d_tpu_compile.md'))
  parser.add_argument('--case_timeout', type=float, default=3600, help='seconds per table case')
  parser.add_argument('--case_prefix', default='',
                      help="a command each table case runs under, e.g. 'nice' or a lock")
  parser.add_argument('--cases', default='', help='table cases to run, e.g. 0-3,7 (default: all)')
  args = parser.parse_args(plain)
  args.overrides = overrides
  from rpe2d import aot  # pylint: disable=g-import-not-at-top
  args.programs = [p.strip() for p in args.programs.split(',') if p.strip()]
  for name in args.programs:
    if name not in aot.PROGRAMS:
      parser.error(f'--programs: {name!r} is not one of {", ".join(aot.PROGRAMS)}')
  if args.sample_batch < 1:
    parser.error(f'--sample_batch={args.sample_batch} must be a positive integer')
  try:
    args.resolutions = [int(r) for r in args.resolutions.split(',') if r.strip()]
  except ValueError:
    parser.error(f'--resolutions={args.resolutions!r} must be pixel sizes like 256,512')
  return args


def gib(value) -> str:
  return '-' if value is None else f'{value / 2**30:.2f}'


def describe(report) -> str:
  """One report as lines for a terminal."""
  head = f'{report.name}: {report.what}'
  if report.error and report.error != 'out of memory':
    return f'{head}\n  failed after {report.compile_s:.1f} s: {report.error}'
  lines = [head, f'  lower {report.lower_s:.1f} s, compile {report.compile_s:.1f} s on '
           f'{report.devices} x {report.device_kind}']
  if report.error:
    lines.append(f'  does not fit: needs {gib(report.peak)} GiB per chip of {gib(report.hbm)} '
                 '(the compiler refused it)')
    return '\n'.join(lines)
  lines.append(f'  per chip: arguments {gib(report.arguments)} GiB, outputs '
               f'{gib(report.outputs - report.aliased)} GiB (+{gib(report.aliased)} in donated '
               f'arguments), temporaries {gib(report.temporaries)} GiB; peak {gib(report.peak)} '
               f'of {gib(report.hbm)} GiB: {"fits" if report.fits else "does not fit"}')
  if report.visible_flops:
    total = (f'analytic {report.flops / 1e12:.3f} T per call' if report.flops else
             'analytic per call: as many steps as the solve takes')
    seen = (f'; XLA counts {report.xla_flops / 1e12:.3f} T of the '
            f'{report.visible_flops / 1e12:.3f} T it sees (loop bodies once): '
            f'{report.xla_flops / report.visible_flops:.2f}x' if report.xla_flops else '')
    lines.append(f'  FLOPs per chip: {total}{seen}')
  return '\n'.join(lines)


def run(args) -> list[dict]:
  import dataclasses  # pylint: disable=g-import-not-at-top
  from rpe2d import aot, config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(args.config, args.overrides)
  size = config.data.image_size * aot.latent_factor(config)
  resolutions = [(r, r) for r in (args.resolutions or [size])]
  slices = [(name, aot.topology_devices(name)) for name in args.topology.split(',')]
  reports = []
  for name, devices in slices:
    print(f'{args.config} {" ".join(args.overrides)} on {name}: {len(devices)} x '
          f'{devices[0].device_kind}', flush=True)
    try:
      programs = aot.programs(config, devices, which=args.programs, resolutions=resolutions,
                              sample_batch=args.sample_batch)
    except ValueError as e:  # refused before compiling, as train.py would (a state too large)
      print(f'refused before compiling: {e}', flush=True)
      reports.append(dict(name=args.programs[0], what='', error=f'refused: {e}', topology=name))
      continue
    for program in programs:
      report = aot.compile_program(program)
      print(describe(report), flush=True)
      reports.append(dict(dataclasses.asdict(report), fits=report.fits, topology=name))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(reports, indent=1))
  return reports


# --- the README's table ---------------------------------------------------------------------------

def table_cases() -> list[dict]:
  """The cases of the README's table: the ImageNet recipes' train steps (their defaults: global
  batch 256, remat, nn.scan, mesh.fsdp auto) on each slice, the other kernels, the blocks unrolled
  and remat off; then sampling XL/2 at 256 to 1024 pixels with each kernel, the VAE decode, and
  sampling the imported FiTv2-XL/2."""
  slices = ','.join(TOPOLOGIES)
  recipe = lambda size, resolution, topology, **kw: dict(
      dict(config=CONFIG.format(size=size, resolution=resolution), topology=topology,
           programs='train', kernel='xla', overrides=()), **kw)
  cases = [recipe(size, resolution, slices) for size in ('XL', 'B') for resolution in (256, 512)]
  cases += [recipe('XL', resolution, slices if (resolution, kernel) == (512, 'chunked') else
                   'v5e-8', kernel=kernel)  # chunked: the XL/2 512 recipe's own kernel
            for resolution in (256, 512) for kernel in ('splash', 'chunked')]
  cases += [recipe('XL', 256, 'v5e-8', overrides=('--config.model.scan_layers=False',)),
            recipe('XL', 256, 'v5p-8,v5e-8', overrides=('--config.model.remat=False',))]
  sampling = dict(programs='sample_step,sampler', resolutions='256,512,1024')
  cases += [recipe('XL', 256, 'v5e-8', kernel=kernel, **sampling) for kernel in KERNELS]
  cases += [recipe('XL', 256, 'v5e-8', programs='decode', resolutions='256,512,1024')]
  # FiTv2-XL/2 as convert.py imports it (DyPE's Table 4 model: SwiGLU, adaLN-LoRA, RoPE; dopri5).
  cases += [dict(config='configs/published.py:fitv2-xl2', topology='v5e-8', kernel=kernel,
                 overrides=(), **sampling) for kernel in ('xla', 'splash')]
  return cases


def run_case(case: dict, timeout: float, workdir: pathlib.Path, prefix=()) -> list[dict]:
  out = workdir / f'case_{time.monotonic_ns()}.json'
  command = [*prefix, sys.executable, __file__, f'--config={case["config"]}',
             f'--topology={case["topology"]}', f'--programs={case["programs"]}', f'--json={out}',
             f'--config.model.attention_implementation={case["kernel"]}', *case['overrides']]
  if case.get('resolutions'):
    command.append(f'--resolutions={case["resolutions"]}')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  began = time.perf_counter()
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return [dict(case, error=f'over the {timeout:.0f} s cap')]
  if done.returncode or not out.is_file():
    lines = [l for l in (done.stderr + done.stdout).strip().splitlines() if l.strip()]
    return [dict(case, error=(lines[-1] if lines else 'no output')[:200])]
  return [dict(case, **r, wall_s=time.perf_counter() - began) for r in json.loads(out.read_text())]


def config_name(config: str) -> str:
  """'configs/imagenet.py:XL,256,rpe2d' -> 'XL/2 256'; 'configs/published.py:fitv2-xl2' ->
  'fitv2-xl2'."""
  if config.startswith('configs/published.py:'):
    return config.split(':', 1)[1]
  if not config.startswith('configs/imagenet.py:'):
    return config
  size, resolution, *rest = config.split(':', 1)[1].split(',')
  return f'{size}/{16 if "pixels" in rest else 2} {resolution}'


def setting(overrides) -> str:
  """The table's words for a case's overrides of the recipe."""
  words = {'--config.model.scan_layers=False': 'unrolled', '--config.model.remat=False': 'no remat'}
  return ', '.join(words.get(o, o.removeprefix('--config.')) for o in overrides) or 'recipe'


def table(rows: list[dict]) -> str:
  lines = ['| config | slice | kernel | setting | program | batch | mesh | compile s | GiB per chip '
           '(peak / HBM) | arguments / temporaries GiB | XLA / analytic FLOPs | fits |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    head = (f"| {config_name(r['config'])} | {r['topology']} | {r['kernel']} | "
            f"{setting(r['overrides'])} | ")
    if 'name' not in r or not r['what']:  # the process failed, or the setting was refused
      lines.append(head + f"{r['programs']} | | | | | | | {r['error']} |")
      continue
    parts = r['what'].split(', ')
    batch = next(p.split()[1] for p in parts if p.startswith('batch '))
    mesh = r['what'].split('= ')[1].replace(' ', '') if 'mesh' in r['what'] else '-'
    size = next((p for p in parts if 'x' in p and p[0].isdigit()), '').split(' from ')[0]
    program = f"{r['name']} {size}" if r['name'] != 'train' else 'train step'
    flops = (f"{r['xla_flops'] / r['visible_flops']:.2f}"
             if r.get('xla_flops') and r['visible_flops'] else '-')
    if r['error'] == 'out of memory':
      memory, split, fits = f"needs {gib(r['peak'])} / {gib(r['hbm'])}", '-', 'no'
    elif r['error']:
      memory, split, fits = '-', '-', f"failed: {r['error'][:80]}"
    else:
      memory = f"{gib(r['peak'])} / {gib(r['hbm'])}"
      split = f"{gib(r['arguments'])} / {gib(r['temporaries'])}"
      fits = 'yes' if r['fits'] else 'no'
    lines.append(head + f"{program} | {batch} | {mesh} | {r['compile_s']:.0f} | {memory} | "
                 f'{split} | {flops} | {fits} |')
  return '\n'.join(lines) + '\n'


def selected(spec: str, count: int) -> list[int]:
  """'0-3,7' -> [0, 1, 2, 3, 7]; '' -> every case."""
  if not spec:
    return list(range(count))
  out = []
  for part in spec.split(','):
    low, _, high = part.partition('-')
    out.extend(range(int(low), int(high or low) + 1))
  return [i for i in out if i < count]


def run_table(args):
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  began = time.perf_counter()
  cases = table_cases()
  with tempfile.TemporaryDirectory() as tmp:
    for i in selected(args.cases, len(cases)):
      case_rows = run_case(cases[i], args.case_timeout, pathlib.Path(tmp),
                           args.case_prefix.split())
      rows.extend(case_rows)
      print(f'case {i}:\n' + '\n'.join(table(case_rows).splitlines()[2:]), flush=True)
      output.write_text(table(rows))  # as it goes: a long table survives an interruption
      output.with_suffix('.json').write_text(json.dumps(rows, indent=1))
  print('\n' + table(rows))
  print(f'written to {output} (and {output.with_suffix(".json").name}); '
        f'{time.perf_counter() - began:.0f} s in all')


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.table:
    return run_table(args)
  try:
    run(args)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  # Compiling for a topology needs no device: the command keeps off any TPU of its host (a training
  # run may own it) and shares libtpu with other compiling processes (rpe2d/aot.py).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  main()
