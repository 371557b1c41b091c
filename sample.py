"""Samples a trained run at any resolution and aspect ratio, with any position method.

  python sample.py --workdir=runs/default --resolution=64x64
  python sample.py --workdir=runs/default --resolution=128x128,64x128 --extrapolation=yarn --dype
  python sample.py --workdir=runs/default --resolution=96x96 --num_samples=1000 \
      --output=runs/default/eval.npz
  python sample.py --workdir=runs/default --sampler=dopri5 --atol=1e-6 --rtol=1e-3
  python sample.py --workdir=runs/default --sampler=euler_maruyama --steps=250

Defaults (position rule, encoding, sampler and its settings, CFG) come from the run's saved config;
flags override them. Without --output the grids go to <workdir>/samples/sample_<step>_<H>x<W>.png; with
several resolutions an --output name gets a _<H>x<W> suffix per resolution. A method that changes
nothing at a size (its tokens lie inside the trained range) is named in a note.

Under the distributed runtime (the flags of train.py) every process samples its share of the
examples, a contiguous range of indices, into `<output stem>.part<p>-of-<P>.npz` (arr_0, labels,
indices); --merge then has process 0 write them as the one ADM batch --output names, in example
order, and remove the parts. Example i is the same image whatever the process count. Labels cycle
through the classes, so every contiguous chunk of the batch is class-balanced (ADM's Inception
Score cuts it into chunks of 5,000 in file order).

A latent run (one trained on VAE latents) writes decoded images: resolutions are pixels (multiples
of the VAE's factor, 8, times the patch size), the default is the size of the images its latents
came from, and the VAE is the file the run recorded unless --vae names another copy of it (a
different file is refused by sha256).
"""

import pathlib

from absl import app, flags, logging
import jax
import numpy as np

from rpe2d import attention, checks, checkpoints, cli, config as config_lib, data, distributed
from rpe2d import inference, positions, rope, sampler
from rpe2d.evaluation import batches, shards

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run directory.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A step directory; default: the newest.')
_NOEMA = flags.DEFINE_bool('noema', False, 'Use the raw weights instead of the EMA weights.')
_RESOLUTION = flags.DEFINE_string('resolution', None,
                                  'HxW, or a comma list; default: the training resolution.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None,
                                    'Images per resolution; default: 2 per label.')
_OUTPUT = flags.DEFINE_string('output', None, 'A .png grid or an .npz batch; default: '
                              '<workdir>/samples/sample_<step>_<H>x<W>.png.')
_LABELS = flags.DEFINE_string('labels', None,
                              "Comma list of class ids, or 'random'; default: every class.")
_SEED = flags.DEFINE_integer('seed', 0, 'Images depend on the seed and their index only.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per device batch (all devices).')
_VAE = flags.DEFINE_string('vae', None, "Latent runs: the VAE's diffusion_pytorch_model"
                           '.safetensors (default: the path the run recorded).')
_DECODE_TILE = flags.DEFINE_integer('decode_tile', None, 'Latent runs: decode in tiles of this '
                                    'many latent pixels (0: whole; default: tiles above '
                                    f'{inference.AUTO_TILE_ABOVE} latent pixels).')

_EXTRAPOLATION = flags.DEFINE_enum('extrapolation', None, list(rope.EXTRAPOLATIONS), 'Static method.')
_YARN_FORM = flags.DEFINE_enum('yarn_form', None, list(rope.YARN_FORMS), 'YaRN variant.')
_TASR_FORM = flags.DEFINE_enum('tasr_form', None, list(rope.TASR_FORMS), 'TASR variant.')
_TEMPERATURE = flags.DEFINE_enum('temperature', None, list(rope.TEMPERATURE_PLACES),
                                 "Where YaRN's tau goes.")
_DYPE = flags.DEFINE_bool('dype', None, 'Make the extrapolation follow the diffusion time.')
_DYPE_LAMBDA_S = flags.DEFINE_float('dype_lambda_s', None, 'DyPE kappa(t) = lambda_s t^lambda_t.')
_DYPE_LAMBDA_T = flags.DEFINE_float('dype_lambda_t', None, 'DyPE exponent lambda_t.')
_DYPE_VARIANT = flags.DEFINE_enum('dype_variant', None, list(rope.DYPE_VARIANTS),
                                  'DY-YaRN thresholds x kappa (scaled) or ^ kappa (power).')
_POSITIONS = flags.DEFINE_enum('positions', None, list(positions.INFERENCE_RULES),
                               'Inference position rule, RPE-2D models only.')
_ATTENTION_SCALE = flags.DEFINE_enum('attention_scale', None, list(rope.ATTENTION_SCALES),
                                     'Attention logit scale for more tokens.')
_TIME_SHIFT = flags.DEFINE_float('time_shift', None, "Fixed time shift a (1: none).")
_TIME_SHIFT_BY_RESOLUTION = flags.DEFINE_bool('time_shift_by_resolution', None,
                                              'Multiply the shift by sqrt(N_test / N_train).')
_SAMPLER = flags.DEFINE_enum('sampler', None, list(sampler.SAMPLERS),
                             'euler, heun: ODE, fixed steps; dopri5: ODE, adaptive; '
                             "euler_maruyama: SiT's SDE.")
_STEPS = flags.DEFINE_integer('steps', None, "Solver steps (euler_maruyama: SiT's num_steps).")
_ATOL = flags.DEFINE_float('atol', None, 'dopri5: absolute tolerance.')
_RTOL = flags.DEFINE_float('rtol', None, 'dopri5: relative tolerance.')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'dopri5: step attempts before it gives up.')
_ADAPTIVE_STEP = flags.DEFINE_enum('adaptive_step', None, list(sampler.ADAPTIVE_STEPS),
                                   'dopri5: a step size per example, or per batch (torchdiffeq).')
_DIFFUSION_FORM = flags.DEFINE_enum('diffusion_form', None, list(sampler.DIFFUSION_FORMS),
                                    'euler_maruyama: the diffusion coefficient.')
_DIFFUSION_NORM = flags.DEFINE_float('diffusion_norm', None, 'euler_maruyama: its magnitude.')
_LAST_STEP = flags.DEFINE_enum('last_step', None, list(sampler.LAST_STEPS),
                               'euler_maruyama: the last step to t = 0.')
_LAST_STEP_SIZE = flags.DEFINE_float('last_step_size', None, 'euler_maruyama: its size.')
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'Classifier-free guidance scale (1: none).')
_CFG_INTERVAL = flags.DEFINE_string('cfg_interval', None, 'low,high: guide only for t inside.')
_MERGE = flags.DEFINE_bool('merge', False, 'Several processes: process 0 merges their .npz parts '
                            'into the one --output batch (and removes the parts).')
flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags
_ATTENTION = flags.DEFINE_enum('attention', None, list(attention.KERNELS),
                               "Attention kernel (default: the run's); chunked for grids whose "
                               'full attention matrix does not fit in memory.')


# Numeric flags and the config fields whose ranges they share.
_FLAG_FIELDS = ((_TIME_SHIFT, 'sampling.time_shift'), (_CFG_SCALE, 'sampling.cfg_scale'),
                (_STEPS, 'sampling.steps'), (_DYPE_LAMBDA_S, 'encoding.dype_lambda_s'),
                (_DYPE_LAMBDA_T, 'encoding.dype_lambda_t'), (_ATOL, 'sampling.atol'),
                (_RTOL, 'sampling.rtol'), (_MAX_STEPS, 'sampling.max_steps'),
                (_DIFFUSION_NORM, 'sampling.diffusion_norm'),
                (_LAST_STEP_SIZE, 'sampling.last_step_size'))


def check_flags() -> None:
  """Every numeric flag in its range (NaN and Inf refused), before anything is loaded."""
  for flag, key in _FLAG_FIELDS:
    if flag.value is not None:
      config_lib.FIELDS[key].check(f'--{flag.name}', flag.value)
  for flag, check in ((_SEED, checks.non_negative_int), (_BATCH_SIZE, checks.positive_int),
                      (_DECODE_TILE, checks.non_negative_int)):
    if flag.value is not None:
      check(f'--{flag.name}', flag.value)


def plan_from_flags(run) -> sampler.SamplingPlan:
  """The run's own sampling settings with the command line's changes on top."""
  config = run.config
  if _POSITIONS.value is not None and config.positions.train != 'rpe2d':
    raise ValueError(f'--positions={_POSITIONS.value} needs an RPE-2D model; this run was trained '
                     f'with positions.train={config.positions.train!r} and samples on the grid')
  encoding = {}
  for flag, field in ((_EXTRAPOLATION, 'extrapolation'), (_YARN_FORM, 'yarn_form'),
                      (_TEMPERATURE, 'temperature'), (_DYPE, 'dype'), (_TASR_FORM, 'tasr_form'),
                      (_DYPE_LAMBDA_S, 'dype_lambda_s'), (_DYPE_LAMBDA_T, 'dype_lambda_t'),
                      (_DYPE_VARIANT, 'dype_variant'), (_ATTENTION_SCALE, 'attention_scale')):
    if flag.value is not None:
      encoding[field] = flag.value
  plan = {'encoding': config_lib.encoding(config, **encoding)}
  for flag, field in ((_POSITIONS, 'positions'), (_TIME_SHIFT, 'time_shift'),
                      (_TIME_SHIFT_BY_RESOLUTION, 'time_shift_by_resolution'),
                      (_SAMPLER, 'sampler'), (_STEPS, 'steps'), (_CFG_SCALE, 'cfg_scale'),
                      (_ATOL, 'atol'), (_RTOL, 'rtol'), (_MAX_STEPS, 'max_steps'),
                      (_ADAPTIVE_STEP, 'adaptive_step'), (_DIFFUSION_FORM, 'diffusion_form'),
                      (_DIFFUSION_NORM, 'diffusion_norm'), (_LAST_STEP, 'last_step'),
                      (_LAST_STEP_SIZE, 'last_step_size')):
    if flag.value is not None:
      plan[field] = flag.value
  if _CFG_INTERVAL.value is not None:
    try:
      low, high = (float(v) for v in _CFG_INTERVAL.value.split(','))
    except ValueError:
      raise ValueError(f'--cfg_interval={_CFG_INTERVAL.value!r} must be low,high, e.g. 0.1,0.7') \
          from None
    plan['cfg_interval'] = (low, high)
  return config_lib.sampling_plan(config, **plan)


def labels_from_flags(num_classes: int, seed: int) -> np.ndarray:
  text = _LABELS.value
  count = _NUM_SAMPLES.value
  if count is not None and count <= 0:
    raise ValueError(f'--num_samples={count} must be positive')
  if text == 'random':
    return np.random.default_rng(seed).integers(0, num_classes, count or 2 * num_classes)
  if text:
    try:
      chosen = [int(v) for v in text.split(',')]
    except ValueError:
      raise ValueError(f"--labels={text!r} must be a comma list of integers or 'random'") from None
  else:
    chosen = list(range(num_classes))
  labels = inference.check_labels(chosen, num_classes)
  count = count or 2 * len(labels)
  return np.resize(np.sort(labels), count) if count != len(labels) else labels


def default_output(run, height: int, width: int) -> pathlib.Path:
  """Beside the run's training-time grids (samples/step_<step>_<H>x<W>.png), never the cwd."""
  return pathlib.Path(_WORKDIR.value) / 'samples' / f'sample_{run.step:07d}_{height}x{width}.png'


def output_paths(output: str | None, resolutions, run=None) -> list[pathlib.Path]:
  if output is None:
    return [default_output(run, h, w) for h, w in resolutions]
  path = pathlib.Path(output)
  if path.suffix not in ('.png', '.npz'):
    raise ValueError(f'--output={output} must end in .png (a grid) or .npz (an evaluation batch)')
  if len(resolutions) == 1:
    return [path]
  return [path.with_name(f'{path.stem}_{h}x{w}{path.suffix}') for h, w in resolutions]


def default_resolution(run) -> str:
  """The training size in pixels: for a latent run, that of the images its latents came from."""
  data_config = run.config.data
  size = data_config.image_size * inference.downsampling(run)
  if inference.is_latent(run.config) and data_config.get('source_image_size'):
    size = int(data_config.source_image_size)
  return f'{size}x{size}'


def class_names(config):
  if not inference.is_latent(config):
    return data.class_names(config.data)
  # The latents' data set may not know its labels' names, nor the source be at hand: numbers then.
  try:
    return data.class_names(config.data)
  except Exception:  # pylint: disable=broad-except
    return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize_from_flags()  # before any other JAX call
    check_flags()
    run = inference.load_run(_WORKDIR.value, _CHECKPOINT.value, use_ema=not _NOEMA.value,
                             vae=_VAE.value, attention=_ATTENTION.value)
    config = run.config
    patch, factor = run.model.patch_size, inference.downsampling(run)
    text = _RESOLUTION.value or default_resolution(run)
    resolutions = [inference.parse_resolution(r, patch, factor) for r in text.split(',')]
    plan = plan_from_flags(run)
    labels = labels_from_flags(run.model.num_classes, _SEED.value)
    paths = output_paths(_OUTPUT.value, resolutions, run)
    if jax.process_count() > 1 and paths[0].suffix != '.npz':
      raise ValueError(f'{jax.process_count()} processes write .npz parts: give '
                       '--output=<name>.npz (a grid is drawn by one process)')
    if _MERGE.value and jax.process_count() == 1:
      raise ValueError('--merge joins the parts of several processes; one process writes --output '
                       'whole')
    available = cli.available_memory()
    for height, width in resolutions:
      sampler.check_resolution(run.model, plan, *inference.model_size(run, height, width))
      needed = inference.memory_estimate(run, height, width, len(labels), _BATCH_SIZE.value)
      if available is not None and needed > available:
        raise ValueError(f'{len(labels)} images at {height}x{width} need at least '
                         f'{cli.gib(needed)} of memory and {cli.gib(available)} is available; '
                         'use a smaller --num_samples or --batch_size')
    cli.check_writable_dir(paths[0].parent, '--output directory')  # last: it may create it
  except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as e:
    cli.fail(str(e), cli.BAD_INPUT)

  print(f'{_WORKDIR.value}: step {run.step}, {"raw" if _NOEMA.value else "EMA"} weights; '
        f'positions={plan.positions}, extrapolation={plan.encoding.extrapolation}, '
        f'dype={plan.encoding.dype}, sampler={sampler.describe(plan)}'
        + (f'; decoded by the VAE {run.vae.sha256[:12]}' if run.vae else ''), flush=True)
  with cli.exit_on(cli.FAILED, inference.SamplingError, OSError, ValueError):
    if jax.process_count() > 1:
      write_parts(run, plan, resolutions, paths, labels)
    else:
      inference.write_samples(run, plan, resolutions, paths, labels, seed=_SEED.value,
                              batch_size=_BATCH_SIZE.value, class_names=class_names(config),
                              decode_tile=_DECODE_TILE.value)


def write_parts(run, plan, resolutions, paths, labels) -> None:
  """This process's share of the examples at each resolution, as `<stem>.part<p>-of-<P>.npz`;
  with --merge, process 0 then writes each --output whole."""
  process, processes = jax.process_index(), jax.process_count()
  start, stop = len(labels) * process // processes, len(labels) * (process + 1) // processes
  for (height, width), path in zip(resolutions, paths):
    images = inference.generate(run, height=height, width=width, labels=labels[start:stop],
                                seed=_SEED.value, plan=plan, batch_size=_BATCH_SIZE.value,
                                progress=process == 0, decode_tile=_DECODE_TILE.value,
                                first_index=start) if stop > start else np.zeros(
                                    (0, height, width, 3 if run.vae else run.config.data.channels),
                                    np.uint8)
    part = batches.part_path(path, process, processes)
    batches.write_part(part, images, labels[start:stop], np.arange(start, stop))
    print(f'process {process}: examples {start}..{stop - 1} at {height}x{width} -> {part}',
          flush=True)
  shards.barrier('rpe2d.sample: every part written')
  if _MERGE.value and process == 0:
    for path in paths:
      count = batches.merge_parts(path, processes)
      batches.remove_parts(path, processes)
      print(f'merged {processes} parts: {count} images -> {path}', flush=True)


if __name__ == '__main__':
  app.run(main)
