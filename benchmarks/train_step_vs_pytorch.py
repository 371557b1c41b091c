"""rpe2d's training step (and forward) against a PyTorch DiT on the same CPU cores.

  PYTHONPATH=. python benchmarks/train_step_vs_pytorch.py --torch_python=/work/venv-ref/bin/python
  PYTHONPATH=. python benchmarks/train_step_vs_pytorch.py --works=train_tiny4 --threads=1

Each measurement is one fresh process per framework (this script with --worker), pinned to the
first n cores with the same thread count, run interleaved (rpe2d, PyTorch, rpe2d, ...) so drifting
machine load hits both alike. A worker compiles / warms up with 2 steps, then times --steps steps,
each blocked on its result, and reports the median CPU seconds (the whole process, all threads) and
wall seconds per step and its peak RSS. CPU seconds are the less load-sensitive figure on a shared
machine.

rpe2d side: the real `rpe2d.training.Trainer` step built from `rpe2d.config` (grid positions,
RoPE, float32, AdamW 1e-4, clip 1.0, EMA 0.9999), in a process where `import rpe2d` has set up
host memory as it does for every user (rpe2d/host_memory.py); PyTorch side:
benchmarks/torch_dit.py, eager, with the same objective and optimizer and a fixed sin-cos position
embedding. For the rpe2d step the script also prints XLA's cost-analysis FLOPs against the
project's analytic count. `--dtype=bfloat16` compares mixed precision on both sides: rpe2d's
`model.dtype='bfloat16'`, PyTorch's forward under `torch.autocast` (parameters float32 in both).

Each worker also measures its framework's matrix-multiply rate at the work's MLP shape (tokens x
width times width x 4 width, in the compute dtype, float32 accumulation): the step's FLOPs at the
faster of the two rates are a floor no implementation on this CPU goes below, printed beside the
time a 1.3x speed-up over PyTorch would need.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULT = 'RESULT '  # a worker's last stdout line: RESULT {json}
WARMUP_STEPS = 2

# name -> what it measures. 'train': a whole optimizer step; 'forward': one network evaluation.
WORKS = {
    'train_S2_256': dict(kind='train', variant='S/2', image_size=32, channels=4, batch=8,
                         num_classes=1000),
    'train_tiny4': dict(kind='train', variant='tiny/4', image_size=32, channels=1, batch=64,
                        num_classes=10),
    'forward_S2_1024': dict(kind='forward', variant='S/2', image_size=64, channels=4, batch=8,
                            num_classes=1000),
    'forward_S2_256': dict(kind='forward', variant='S/2', image_size=32, channels=4, batch=8,
                           num_classes=1000),
}
FRAMEWORKS = ('rpe2d', 'torch')


def describe(work: dict) -> str:
  s, c = work['image_size'], work['channels']
  from rpe2d import model as model_lib  # pylint: disable=g-import-not-at-top
  patch = model_lib.parse_variant(work['variant'])[3]
  return (f"{work['kind']} {work['variant']} {s}x{s}x{c} ({(s // patch) ** 2} tokens) "
          f"batch {work['batch']}")


def pin(threads: int):
  """This process (and the threads it starts later) on the first `threads` allowed cores."""
  allowed = sorted(os.sched_getaffinity(0))
  if threads > len(allowed):
    raise ValueError(f'--threads={threads}: only {len(allowed)} cores are available to this process')
  os.sched_setaffinity(0, allowed[:threads])


def timed_calls(call, n: int) -> tuple[list[float], list[float]]:
  """(CPU seconds, wall seconds) of each of n blocking calls."""
  cpu, wall = [], []
  for _ in range(n):
    c0, w0 = time.process_time(), time.perf_counter()
    call()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
  return cpu, wall


def median_steps(step, steps: int) -> tuple[float, float]:
  """Median (CPU seconds, wall seconds) of one blocking call of `step`."""
  cpu, wall = timed_calls(step, steps)
  return statistics.median(cpu), statistics.median(wall)


def matmul_gflops(work: dict, width: int, patch: int, make_call) -> float:
  """GFLOP/s of one framework's matrix multiply at the work's MLP shape, (batch x tokens, width) by
  (width, 4 width); make_call(lhs_shape, rhs_shape) returns one blocking product. Best of 10."""
  rows, hidden = work['batch'] * (work['image_size'] // patch) ** 2, 4 * width
  call = make_call((rows, width), (width, hidden))
  call()
  seconds = min(timed_calls(call, 10)[1])
  return 2 * rows * width * hidden / seconds / 1e9


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rpe2d_config(work: dict):
  """The project's config for this variant and shape: `base()` plus overrides, validated."""
  from rpe2d import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base()
  config.update_from_flattened_dict({
      'model.variant': work['variant'], 'data.image_size': work['image_size'],
      'data.channels': work['channels'], 'data.num_classes': work['num_classes'],
      'batch_size': work['batch'], 'optim.learning_rate': 1e-4, 'optim.warmup_steps': 0,
      'optim.ema_decay': 0.9999, 'model.dtype': work['dtype']})
  if work['channels'] not in (1, 3):
    # Latent-shaped inputs: the schema takes 4 channels only for latents; batches are synthetic
    # here, so no extraction is read.
    config.data.name, config.data.latent_dir = 'latents', 'synthetic'
  return config, config_lib.validate(config)


def rpe2d_worker(work: dict, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rpe2d import model as model_lib, training  # pylint: disable=g-import-not-at-top

  config, built = rpe2d_config(work)
  model, batch = built.model, work['batch']
  rng = np.random.default_rng(0)
  s, c = work['image_size'], work['channels']
  images = rng.standard_normal((batch, s, s, c), dtype=np.float32)
  labels = rng.integers(0, work['num_classes'], batch).astype(np.int32)
  forward = model_lib.forward_flops(model.variant, s, s, c) * batch
  began = time.perf_counter()
  if work['kind'] == 'train':
    trainer = training.Trainer(model, built.training, training.make_mesh(config.mesh.fsdp))
    state = trainer.init_state()
    device_batch = trainer.device_batch({'image': images, 'label': labels,
                                         'crop': np.tile(np.float32([0, 0, 1, 1]), (batch, 1))})
    compiled = trainer.step.lower(state, device_batch).compile()
    analytic = 3 * forward

    def step():
      nonlocal state
      state, metrics = compiled(state, device_batch)
      jax.block_until_ready((state, metrics))
  else:
    params = training.init_params(model, jax.random.key(0))
    _, t, _, token_positions = training.example_inputs(model, batch)
    inputs = (jnp.asarray(images), jnp.full_like(t, 0.5), jnp.asarray(labels), token_positions)
    compiled = jax.jit(model.apply).lower(params, *inputs).compile()
    analytic = forward

    def step():
      jax.block_until_ready(compiled(params, *inputs))
  compile_s = time.perf_counter() - began
  counted = compiled  # a train step's attention is batched already
  if work['kind'] == 'forward':
    counted = with_batched_attention(lambda: jax.jit(model.apply).lower(params, *inputs).compile())
  cost = counted.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(WARMUP_STEPS):
    step()
  cpu, wall = median_steps(step, steps)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

  def make_matmul(lhs_shape, rhs_shape):
    a, b = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32), work['dtype'])
            for shape in (lhs_shape, rhs_shape))
    return lambda: jax.block_until_ready(matmul(a, b))

  width, _, _, patch = model_lib.parse_variant(work['variant'])
  return dict(cpu_s=cpu, wall_s=wall, rss_mib=peak_rss_mib(), compile_s=compile_s,
              matmul_gflops=matmul_gflops(work, width, patch, make_matmul),
              xla_flops=float(cost.get('flops', float('nan'))) if cost else float('nan'),
              analytic_flops=float(analytic), device=jax.devices()[0].device_kind)


def with_batched_attention(compile_program):
  """compile_program() with the `xla` attention kernel's CPU per-head loop turned off. XLA's cost
  analysis skips loop bodies, and on CPU an undifferentiated call past `CPU_PER_HEAD_ABOVE` loops
  over heads: the batched form has the same FLOPs, and its count includes them."""
  from rpe2d import attention  # pylint: disable=g-import-not-at-top
  per_head, attention.CPU_PER_HEAD_ABOVE = attention.CPU_PER_HEAD_ABOVE, float('inf')
  try:
    return compile_program()
  finally:
    attention.CPU_PER_HEAD_ABOVE = per_head


def torch_worker(work: dict, dims: dict, threads: int, steps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_dit  # pylint: disable=g-import-not-at-top  # this script's folder is on sys.path

  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  torch.manual_seed(0)
  s, c, batch = work['image_size'], work['channels'], work['batch']
  model = torch_dit.DiT(**dims, channels=c, image_size=s, num_classes=work['num_classes'])
  images = torch.randn(batch, c, s, s)
  labels = torch.randint(0, work['num_classes'], (batch,))
  # PyTorch's mixed precision: float32 parameters, the forward under autocast.
  compute_dtype = getattr(torch, work['dtype'])
  if work['kind'] == 'train':
    trainer = torch_dit.Trainer(model, learning_rate=1e-4, grad_clip=1.0, ema_decay=0.9999,
                                compute_dtype=compute_dtype)
    step = lambda: trainer.step(images, labels).item()
  else:
    model.eval()
    t = torch.full((batch,), 0.5)

    def step():
      with torch.inference_mode(), torch_dit.autocast(compute_dtype):
        model(images, t, labels).sum().item()
  for _ in range(WARMUP_STEPS):
    step()
  cpu, wall = median_steps(step, steps)

  def make_matmul(lhs_shape, rhs_shape):  # what autocast runs for a Linear layer
    a, b = (torch.randn(shape, dtype=compute_dtype) for shape in (lhs_shape, rhs_shape))
    return lambda: a @ b

  return dict(cpu_s=cpu, wall_s=wall, rss_mib=peak_rss_mib(), device=f'torch {torch.__version__}',
              matmul_gflops=matmul_gflops(work, dims['width'], dims['patch'], make_matmul))


def worker_env(threads: int) -> dict:
  env = dict(os.environ)
  for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    env[name] = str(threads)
  env['JAX_PLATFORMS'] = 'cpu'
  # One XLA CPU device; with one thread, no Eigen thread pool inside ops either. The affinity set
  # by pin() is what bounds XLA's own thread pool (it sizes itself from the allowed cores).
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if 'xla_force_host_platform_device_count' not in f and 'multi_thread_eigen' not in f]
  if threads == 1:
    flags.append('--xla_cpu_multi_thread_eigen=false')
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(
      os.pathsep) if p])
  return env


def run_worker(python: str, framework: str, name: str, work: dict, threads: int, steps: int,
               timeout: float) -> dict:
  command = [python, str(pathlib.Path(__file__).resolve()), f'--worker={framework}',
             f'--work_json={json.dumps(dict(work, name=name))}', f'--threads={threads}',
             f'--steps={steps}']
  if framework == 'torch':
    from rpe2d import model as model_lib  # pylint: disable=g-import-not-at-top
    width, depth, heads, patch = model_lib.parse_variant(work['variant'])
    command.append('--dims_json=' + json.dumps(dict(width=width, depth=depth, heads=heads,
                                                    patch=patch)))
  done = subprocess.run(command, env=worker_env(threads), capture_output=True, text=True,
                        timeout=timeout, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT)]
  if done.returncode or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f'{framework} worker for {name} (threads {threads}) failed with exit code '
                       f'{done.returncode}:\n  ' + '\n  '.join(tail))
  return json.loads(lines[-1][len(RESULT):])


def torch_available(python: str) -> bool:
  probe = subprocess.run([python, '-c', 'import torch'], capture_output=True, check=False)
  return probe.returncode == 0


def ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else 'n/a'


def number(value, digits=3) -> str:
  return 'n/a' if value is None else f'{value:.{digits}f}'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--works', default=','.join(WORKS),
                      help=f'comma-separated, from: {", ".join(WORKS)}')
  parser.add_argument('--threads', default='1,2', help='comma-separated thread (= core) counts')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved runs per framework')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per run')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='compute dtype on both sides (parameters stay float32): rpe2d\'s '
                      'model.dtype, PyTorch\'s autocast')
  parser.add_argument('--batch', type=int, default=0, help='override every work\'s batch (0: no)')
  parser.add_argument('--variant', default='',
                      help='override every work\'s model variant, e.g. micro/4 (empty: no)')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='a python that imports torch (e.g. /work/venv-ref/bin/python)')
  parser.add_argument('--timeout', type=float, default=1800, help='seconds per worker run')
  parser.add_argument('--worker', choices=FRAMEWORKS, help=argparse.SUPPRESS)
  parser.add_argument('--work_json', help=argparse.SUPPRESS)
  parser.add_argument('--dims_json', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    args.threads = int(args.threads)
    return args
  names = [n for n in args.works.split(',') if n]
  for n in names:
    if n not in WORKS:
      parser.error(f'--works: unknown work {n!r}; choose from: {", ".join(WORKS)}')
  args.works = names
  try:
    args.threads = [int(n) for n in args.threads.split(',')]
  except ValueError:
    parser.error(f'--threads={args.threads!r} must be comma-separated positive integers')
  cores = len(os.sched_getaffinity(0))
  for n in args.threads:
    if not 1 <= n <= cores:
      parser.error(f'--threads: {n} must lie in 1..{cores} (the cores this process may use)')
  for flag in ('rounds', 'steps'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag}={getattr(args, flag)} must be a positive integer')
  if args.batch < 0:
    parser.error(f'--batch={args.batch} must be >= 0')
  if args.variant:
    from rpe2d import model as model_lib  # pylint: disable=g-import-not-at-top
    try:
      model_lib.parse_variant(args.variant)
    except ValueError as e:
      parser.error(f'--variant: {e}')
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    pin(args.threads)
    work = json.loads(args.work_json)
    if args.worker == 'rpe2d':
      result = rpe2d_worker(work, args.steps)
    else:
      result = torch_worker(work, json.loads(args.dims_json), args.threads, args.steps)
    print(RESULT + json.dumps(result), flush=True)
    return

  frameworks = ['rpe2d']
  if torch_available(args.torch_python):
    frameworks.append('torch')
  else:
    print(f'torch is not importable by {args.torch_python}: rpe2d numbers only '
          '(--torch_python=/path/to/python with torch)')
  works = {n: dict(WORKS[n], batch=args.batch or WORKS[n]['batch'], dtype=args.dtype,
                  variant=args.variant or WORKS[n]['variant']) for n in args.works}
  print(f'{args.rounds} interleaved rounds x {args.steps} timed steps (after {WARMUP_STEPS} '
        f'warm-up) per worker; medians; threads = pinned cores; compute in {args.dtype}',
        flush=True)
  results = {}  # (work, threads, framework) -> [worker results]
  for name, work in works.items():
    for threads in args.threads:
      for r in range(args.rounds):
        for framework in frameworks:
          result = run_worker(args.torch_python if framework == 'torch' else sys.executable,
                              framework, name, work, threads, args.steps, args.timeout)
          results.setdefault((name, threads, framework), []).append(result)
          print(f'  {name} threads={threads} round {r + 1} {framework}: '
                f'{result["cpu_s"]:.3f} cpu-s/step, {result["wall_s"]:.3f} wall-s/step',
                flush=True)

  def med(name, threads, framework, key):
    rows = results.get((name, threads, framework))
    return statistics.median(r[key] for r in rows) if rows else None

  print()
  print('| work | threads | PyTorch cpu-s | rpe2d cpu-s | rpe2d speed vs PyTorch (cpu) | '
        'PyTorch wall-s | rpe2d wall-s | rpe2d speed vs PyTorch (wall) | peak RSS MiB '
        'PyTorch / rpe2d |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, work in works.items():
    for threads in args.threads:
      tc, jc = med(name, threads, 'torch', 'cpu_s'), med(name, threads, 'rpe2d', 'cpu_s')
      tw, jw = med(name, threads, 'torch', 'wall_s'), med(name, threads, 'rpe2d', 'wall_s')
      tr, jr = med(name, threads, 'torch', 'rss_mib'), med(name, threads, 'rpe2d', 'rss_mib')
      print(f'| {describe(work)} | {threads} | {number(tc)} | {number(jc)} | {ratio(tc, jc)} | '
            f'{number(tw)} | {number(jw)} | {ratio(tw, jw)} | {number(tr, 0)} / {number(jr, 0)} |')
  print('\n(speed = PyTorch seconds / rpe2d seconds: above 1x, rpe2d is faster)\n')

  print('| work | XLA cost-analysis GFLOP | project analytic GFLOP | XLA / analytic | '
        'rpe2d compile s |')
  print('|---|---|---|---|---|')
  for name, work in works.items():
    first = results[(name, args.threads[0], 'rpe2d')][0]
    print(f'| {describe(work)} | {first["xla_flops"] / 1e9:.4g} | '
          f'{first["analytic_flops"] / 1e9:.4g} | '
          f'{first["xla_flops"] / first["analytic_flops"]:.3f} | {first["compile_s"]:.1f} |')
  print('(analytic: 3 x forward_flops per image x batch for a train step, 1 x for a forward)')

  print()
  print('| work | threads | matmul GFLOP/s PyTorch / rpe2d | analytic FLOPs at the faster rate, '
        'wall-s | PyTorch wall-s / 1.3 |')
  print('|---|---|---|---|---|')
  for name, work in works.items():
    analytic = results[(name, args.threads[0], 'rpe2d')][0]['analytic_flops']
    for threads in args.threads:
      rates = [med(name, threads, f, 'matmul_gflops') for f in ('torch', 'rpe2d')]
      floor = analytic / (max(r for r in rates if r) * 1e9)
      target = med(name, threads, 'torch', 'wall_s')
      print(f'| {describe(work)} | {threads} | {number(rates[0], 1)} / {number(rates[1], 1)} | '
            f'{floor:.3f} | {number(target and target / 1.3)} |')
  print('(every FLOP at the matrix-multiply rate of the work\'s MLP shape is a floor for the step: '
        'where it comes near PyTorch / 1.3, a 1.3x speed-up is out of reach on this CPU)')


if __name__ == '__main__':
  main()
