"""Samples a trained run at any resolution and aspect ratio, with any position method.

  python sample.py --workdir=runs/default --resolution=64x64
  python sample.py --workdir=runs/default --resolution=128x128,64x128 --extrapolation=yarn --dype
  python sample.py --workdir=runs/default --resolution=96x96 --num_samples=1000 \
      --output=runs/default/eval.npz
  python sample.py --workdir=runs/default --sampler=dopri5 --atol=1e-6 --rtol=1e-3
  python sample.py --workdir=runs/default --sampler=euler_maruyama --steps=250

Defaults (position rule, encoding, sampler and its settings, CFG) come from the config saved in the
checkpoint (the truth about its weights; another run's checkpoint whose model, positions or data
differ from the workdir's is refused); flags override them. Everything is checked before anything
is loaded or sampled, in `check_flags` and `main`. Without --output the grids go to
<workdir>/samples/sample_<step>_<H>x<W>.png; with
several resolutions an --output name gets a _<H>x<W> suffix per resolution. A method that changes
nothing at a size (its tokens lie inside the trained range) is named in a note.

Under the distributed runtime (the flags of train.py) every process samples its share of the
examples, a contiguous range of indices, into `<output stem>.part<p>-of-<P>.npz` (arr_0, labels,
indices); --merge then has process 0 write them as the one ADM batch --output names, in example
order, and remove the parts. Example i is the same image whatever the process count. Labels cycle
through the classes, so every contiguous chunk of the batch is class-balanced (ADM's Inception
Score cuts it into chunks of 5,000 in file order).

A latent run (one trained on VAE latents) writes decoded images: resolutions are pixels (multiples
of the VAE's factor, 8 for the SD VAE and 16 for the VA-VAE, times the patch size), the default is
the size of the images its latents came from, and the VAE is the file the run recorded unless
--vae names another copy of it (a different file is refused by sha256).
"""

import pathlib

from absl import app, flags, logging
import jax
import numpy as np

from rpe2d import attention, checks, checkpoints, cli, config as config_lib, data, distributed
from rpe2d import files, inference, positions, rope, rundir, sampler
from rpe2d.evaluation import batches, shards

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run directory.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A step directory (<run>/checkpoints/<step>); '
                                  'default: the newest of --workdir.')
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
_VAE = flags.DEFINE_string('vae', None, "Latent runs: the VAE file (a diffusers folder or "
                           "safetensors file, the VA-VAE's .pt; default: the path the run "
                           'recorded).')
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
_AXIS_SCALE = flags.DEFINE_enum('axis_scale', None, list(rope.AXIS_SCALES),
                                'Extrapolation scale per axis, or the larger for both (shared).')
_SINCOS = flags.DEFINE_enum('sincos', None, list(rope.SINCOS_RULES),
                            'How a sin-cos table extrapolates: with the method, at the native '
                            'positions, or the native table resized bilinearly (EI).')
_TIME_SHIFT = flags.DEFINE_float('time_shift', None, "Fixed time shift a (1: none).")
_TIME_SHIFT_BY_RESOLUTION = flags.DEFINE_bool('time_shift_by_resolution', None,
                                              'Multiply the shift by sqrt(N_test / N_train).')
_SAMPLER = flags.DEFINE_enum('sampler', None, list(sampler.SAMPLERS),
                             'euler, heun: ODE, fixed steps; dopri5: ODE, adaptive; '
                             "euler_maruyama: SiT's SDE; ddpm: DiT's ancestral sampler.")
_STEPS = flags.DEFINE_integer('steps', None, "Solver steps (euler_maruyama: SiT's num_steps; "
                              "ddpm: DiT's respaced steps).")
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
_CFG_CHANNELS = flags.DEFINE_integer('cfg_channels', None, 'Guide only the first k channels, the '
                                     'rest conditional (0: all; 3: DiT/SiT published numbers).')
_MERGE = flags.DEFINE_bool('merge', False, 'Several processes: process 0 merges their .npz parts '
                            'into the one --output batch (and removes the parts).')
flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags
_ATTENTION = flags.DEFINE_enum('attention', None, list(attention.KERNELS),
                               "Attention kernel (default: the run's); chunked for grids whose "
                               'full attention matrix does not fit in memory.')


# Numeric flags and the config fields whose ranges they share.
_FLAG_FIELDS = ((_TIME_SHIFT, 'sampling.time_shift'), (_CFG_SCALE, 'sampling.cfg_scale'),
                (_CFG_CHANNELS, 'sampling.cfg_channels'),
                (_STEPS, 'sampling.steps'), (_DYPE_LAMBDA_S, 'encoding.dype_lambda_s'),
                (_DYPE_LAMBDA_T, 'encoding.dype_lambda_t'), (_ATOL, 'sampling.atol'),
                (_RTOL, 'sampling.rtol'), (_MAX_STEPS, 'sampling.max_steps'),
                (_DIFFUSION_NORM, 'sampling.diffusion_norm'),
                (_LAST_STEP_SIZE, 'sampling.last_step_size'))


# The most images one call samples: example indices are int32.
MAX_SAMPLES = 2**31 - 1


def check_flags() -> None:
  """Every flag that can be checked without the run, before anything is loaded: numeric flags in
  their ranges (NaN and Inf refused), the seed within 64 bits, names that are not empty, and the
  syntax of --resolution, --labels and --cfg_interval."""
  for flag, key in _FLAG_FIELDS:
    if flag.value is not None:
      config_lib.FIELDS[key].check(f'--{flag.name}', flag.value)
  for flag, check in ((_SEED, checks.seed), (_BATCH_SIZE, checks.positive_int)):
    check(f'--{flag.name}', flag.value)
  for note in inference.check_decode_tile('--decode_tile', _DECODE_TILE.value):
    print(note, flush=True)
  if _NUM_SAMPLES.value is not None and not 0 < _NUM_SAMPLES.value <= MAX_SAMPLES:
    raise ValueError(f'--num_samples={_NUM_SAMPLES.value} must be positive and at most '
                     f'{MAX_SAMPLES}')
  for flag in (_WORKDIR, _CHECKPOINT, _OUTPUT, _VAE, _RESOLUTION, _LABELS):
    if flag.value is not None and not flag.value.strip():
      raise ValueError(f'--{flag.name}= is empty; give a value or leave the flag out')
  if _RESOLUTION.value is not None:
    for text in _RESOLUTION.value.split(','):
      inference.parse_resolution(text, 1)
  chosen_labels()
  cfg_interval()


def cfg_interval():
  if _CFG_INTERVAL.value is None:
    return None
  try:
    low, high = (float(v) for v in _CFG_INTERVAL.value.split(','))
  except ValueError:
    raise ValueError(f'--cfg_interval={_CFG_INTERVAL.value!r} must be low,high, e.g. 0.1,0.7') \
        from None
  return low, high


def chosen_labels() -> list[int] | None:
  """--labels as a list of ints (None: every class, or 'random')."""
  text = _LABELS.value
  if not text or text == 'random':
    return None
  try:
    return [int(v) for v in text.split(',')]
  except ValueError:
    raise ValueError(f"--labels={text!r} must be a comma list of integers or 'random'") from None


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
                      (_DYPE_VARIANT, 'dype_variant'), (_ATTENTION_SCALE, 'attention_scale'),
                      (_AXIS_SCALE, 'axis_scale'), (_SINCOS, 'sincos')):
    if flag.value is not None:
      encoding[field] = flag.value
  plan = {'encoding': config_lib.encoding(config, **encoding)}
  for flag, field in ((_POSITIONS, 'positions'), (_TIME_SHIFT, 'time_shift'),
                      (_TIME_SHIFT_BY_RESOLUTION, 'time_shift_by_resolution'),
                      (_SAMPLER, 'sampler'), (_STEPS, 'steps'), (_CFG_SCALE, 'cfg_scale'),
                      (_CFG_CHANNELS, 'cfg_channels'), (_ATOL, 'atol'), (_RTOL, 'rtol'),
                      (_MAX_STEPS, 'max_steps'), (_ADAPTIVE_STEP, 'adaptive_step'),
                      (_DIFFUSION_FORM, 'diffusion_form'), (_DIFFUSION_NORM, 'diffusion_norm'),
                      (_LAST_STEP, 'last_step'), (_LAST_STEP_SIZE, 'last_step_size')):
    if flag.value is not None:
      plan[field] = flag.value
  if _CFG_INTERVAL.value is not None:
    plan['cfg_interval'] = cfg_interval()
  return config_lib.sampling_plan(config, **plan)


def label_count(num_classes: int) -> int:
  """How many images each resolution gets: --num_samples, else 2 per label."""
  chosen = chosen_labels()
  return _NUM_SAMPLES.value or 2 * (num_classes if chosen is None else len(chosen))


def labels_from_flags(num_classes: int, seed: int) -> np.ndarray:
  count = label_count(num_classes)
  if _LABELS.value == 'random':
    return np.random.default_rng(seed).integers(0, num_classes, count)
  chosen = chosen_labels()
  labels = inference.check_labels(list(range(num_classes)) if chosen is None else chosen,
                                  num_classes)
  return np.resize(np.sort(labels), count) if count != len(labels) else labels


def default_output(run, height: int, width: int) -> pathlib.Path:
  """Beside the run's training-time grids (samples/step_<step>_<H>x<W>.png), never the cwd; a
  checkpoint of another run (--checkpoint) is named by that run too."""
  workdir = rundir.RunDir(_WORKDIR.value)
  owner = run.checkpoint.parent.parent
  name = '' if run.checkpoint.parent == workdir.checkpoints else f'{owner.name}_'
  return workdir.root / 'samples' / f'sample_{name}{run.step:07d}_{height}x{width}.png'


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


def check_outputs(paths) -> None:
  """The files the command will write: distinct, not directories, outside any run's checkpoints,
  names (with the temporary name each is first written under) that the file system allows."""
  if len(set(paths)) != len(paths):
    raise ValueError(f'--output gives the same file {paths[0]} to several resolutions')
  for path in paths:
    names = [files.tmp_name(path).name] + [
        files.tmp_name(batches.part_path(path, p, jax.process_count())).name
        for p in range(jax.process_count()) if jax.process_count() > 1]
    files.check_names_fit(path.parent, names, '--output')
    if path.is_dir():
      raise ValueError(f'--output {path} is a directory; name a .png or .npz file')
    rundir.check_not_managed(path, '--output')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  log = cli.quiet_libraries('sample.py')
  try:
    check_flags()  # no JAX call: bad flags are refused before joining a multi-process run
    distributed.initialize_from_flags()  # before any other JAX call
    run = inference.load_run(_WORKDIR.value, _CHECKPOINT.value, use_ema=not _NOEMA.value,
                             vae=_VAE.value, attention=_ATTENTION.value)
    config = run.config
    patch, factor = run.model.patch_size, inference.downsampling(run)
    text = _RESOLUTION.value or default_resolution(run)
    resolutions = inference.distinct_sizes(
        [inference.parse_resolution(r, patch, factor) for r in text.split(',')], '--resolution')
    plan = plan_from_flags(run)
    count = label_count(run.model.num_classes)
    available = cli.available_memory()
    for height, width in resolutions:
      sampler.check_resolution(run.model, plan, *inference.model_size(run, height, width))
      inference.check_memory(run.model, height, width, num_samples=count,
                             batch_size=_BATCH_SIZE.value, channels=3 if run.vae else
                             config.data.channels, factor=factor, available=available,
                             flags={'num_samples': '--num_samples', 'batch_size': '--batch_size',
                                    'attention': '--attention'})
    labels = labels_from_flags(run.model.num_classes, _SEED.value)
    paths = output_paths(_OUTPUT.value, resolutions, run)
    if jax.process_count() > 1 and paths[0].suffix != '.npz':
      raise ValueError(f'{jax.process_count()} processes write .npz parts: give '
                       '--output=<name>.npz (a grid is drawn by one process)')
    if _MERGE.value and jax.process_count() == 1:
      raise ValueError('--merge joins the parts of several processes; one process writes --output '
                       'whole')
    check_outputs(paths)
    cli.check_writable_dir(paths[0].parent, '--output directory')  # last: it may create it
    log.path = paths[0].parent / 'sample.log'
  except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as e:
    cli.fail(str(e), cli.BAD_INPUT)

  print(f'{run.checkpoint}: step {run.step}, {"raw" if _NOEMA.value else "EMA"} weights; '
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
