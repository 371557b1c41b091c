"""FID, sFID, KID, precision, recall (and IS) of trained runs across resolutions and methods, or
of any sample batch against an ADM reference batch.

  python evaluate.py --runs=runs/grid,runs/default --resolutions=16,32,64,96 --outdir=runs/eval
  python evaluate.py --runs=runs/default --resolutions=64x128 --methods=uniform,yarn,dy-yarn
  python evaluate.py --runs=runs/in256_xl_rpe2d --resolutions=256 \
      --reference_npz=256x256:VIRTUAL_imagenet256_labeled.npz --num_samples=50000
  python evaluate.py --sample_npz=samples.npz --reference_npz=VIRTUAL_imagenet256_labeled.npz \
      --inception_classifier=inception-2015-12-05.pt

With --runs: writes <outdir>/results.{json,csv,md}, fid_vs_resolution.png and
grids/<run>/<HxW>_<method>.png. Methods are listed in rpe2d/evaluation/sweep.py. The reference at
each resolution is the --split of the run's data set resized with --resize_filter (or an ADM
.npz); a 'real' row measures --real_split images against it, the floor a model can reach at this
N. Cells already computed are reused.

With --sample_npz: ADM's evaluator on a batch written by any codebase (uint8 arr_0, NHWC RGB);
prints its numbers and writes them to --results_json (rpe2d/evaluation/adm.py).

Both run on every process of a distributed run (the flags of train.py; --outdir shared): each
process computes its shards of the samples and their features, process 0 measures and writes, and
a killed evaluation keeps its finished shards.
"""

import json
import pathlib
import pickle
import re
import sys

from absl import app, flags, logging
import jax

from rpe2d import attention, checks, checkpoints, cli, config as config_lib, distributed, files
from rpe2d import inference, rundir, sampler
from rpe2d.evaluation import adm, classifier as classifier_lib, inception, metrics
from rpe2d.evaluation import sweep

_RUNS = flags.DEFINE_list('runs', None, 'Training run directories (or --sample_npz).')
_RESOLUTIONS = flags.DEFINE_list('resolutions', None, 'Sizes: 64 (square) or HxW.')
_SAMPLE_NPZ = flags.DEFINE_string('sample_npz', None, 'An ADM batch of samples (uint8 arr_0) to '
                                  'measure against --reference_npz, instead of --runs.')
_RESULTS_JSON = flags.DEFINE_string('results_json', None, 'With --sample_npz: where the numbers '
                                    'go; default <outdir>/<sample>_vs_<reference>.json.')
_CLASSIFIER = flags.DEFINE_string(
    'inception_classifier', None, "The Inception Score's 1008-way classifier: NVIDIA's "
    "inception-2015-12-05.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_DISTANCES = flags.DEFINE_enum('distances', 'float16', list(metrics.DISTANCES),
                               "Precision / recall distances: ADM's float16 rounding, or float32.")
_SHARD_SIZE = flags.DEFINE_integer('shard_size', sweep.SHARD_SIZE,
                                   'Images per shard (what a killed evaluation keeps).')
_METHODS = flags.DEFINE_list('methods', list(sweep.DEFAULT_METHODS),
                             "Methods; position rules apply to RPE-2D runs only; FiT's settings "
                             'as fit-<interpolation>[-decouple]; a sin-cos table rule after a +, '
                             'e.g. pi+native, yarn+interpolate.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Generated images per cell.')
_NUM_REFERENCE = flags.DEFINE_integer('num_reference', 0, 'Reference images (0: the whole split).')
_SPLIT = flags.DEFINE_string('split', 'test', 'The held-out split the reference is made from.')
_REAL_SPLIT = flags.DEFINE_string('real_split', 'train',
                                  "Real images for the 'real' row (empty: no such row).")
_RESIZE_FILTER = flags.DEFINE_enum('resize_filter', 'bicubic', list(sweep.RESIZE_FILTERS),
                                   'How real images are resized to each resolution (PIL).')
_REFERENCE_NPZ = flags.DEFINE_list('reference_npz', [],
                                   'HxW:path of an ADM reference batch (mu, sigma, mu_s, sigma_s, '
                                   'arr_0) instead of a split; with --sample_npz, its path.')
_OUTDIR = flags.DEFINE_string('outdir', 'runs/evaluation', 'Results, grids and the cell cache.')
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed; every cell of a run uses the same noise.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per sampling batch.')
_INCEPTION_BATCH_SIZE = flags.DEFINE_integer('inception_batch_size', 50,
                                             'Images per Inception batch.')
_STEPS = flags.DEFINE_integer('steps', None, "Sampler steps (default: each run's config).")
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, "Guidance scale (default: each run's config).")
_SAMPLER = flags.DEFINE_enum('sampler', None, list(sampler.SAMPLERS),
                             "euler, heun, dopri5 (ODE), euler_maruyama (SiT's SDE), ddpm (DiT's).")
_CFG_CHANNELS = flags.DEFINE_integer('cfg_channels', None, "Guide only the first k channels "
                                     "(0: all; default: each run's config).")
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
# Sampler flags: the plan field each overrides in every cell (numeric ones checked like the config).
_PLAN_FLAGS = ((_STEPS, 'steps'), (_CFG_SCALE, 'cfg_scale'), (_SAMPLER, 'sampler'),
               (_CFG_CHANNELS, 'cfg_channels'), (_ATOL, 'atol'), (_RTOL, 'rtol'),
               (_MAX_STEPS, 'max_steps'), (_ADAPTIVE_STEP, 'adaptive_step'),
               (_DIFFUSION_FORM, 'diffusion_form'), (_DIFFUSION_NORM, 'diffusion_norm'),
               (_LAST_STEP, 'last_step'), (_LAST_STEP_SIZE, 'last_step_size'))
_NOEMA = flags.DEFINE_bool('noema', False, 'Use the raw weights instead of the EMA weights.')
_ATTENTION = flags.DEFINE_enum('attention', None, list(attention.KERNELS),
                               "Attention kernel (default: each run's); chunked for grids whose "
                               'full attention matrix does not fit in memory.')
flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags


def load_classifier(num_samples: int):
  """The IS classifier of --inception_classifier (None without it), checked before any work."""
  if _CLASSIFIER.value is None:
    return None
  if num_samples < metrics.IS_SPLIT:
    raise ValueError(f'{num_samples} samples are fewer than one Inception Score split '
                     f'({metrics.IS_SPLIT}, ADM\'s): IS on fewer is not comparable; use at least '
                     f'{metrics.IS_SPLIT} samples, or no {classifier_lib.FLAG}')
  return classifier_lib.load(_CLASSIFIER.value)


def network():
  """The Inception network, its batches spread over the local accelerators (one CPU device)."""
  devices = jax.local_devices() if jax.default_backend() != 'cpu' else None
  return inception.InceptionV3(batch_size=_INCEPTION_BATCH_SIZE.value, devices=devices)


def evaluate_batch():
  """--sample_npz: ADM's numbers for one sample batch, printed and written as JSON."""
  if _RUNS.value or _RESOLUTIONS.value:
    raise ValueError('--sample_npz measures a batch file: it takes no --runs or --resolutions')
  if len(_REFERENCE_NPZ.value) != 1 or re.match(r'^\d+x\d+:', _REFERENCE_NPZ.value[0]):
    raise ValueError(f'--sample_npz needs --reference_npz=<path of one ADM reference batch>, got '
                     f'{",".join(_REFERENCE_NPZ.value) or "none"}')
  reference_npz = _REFERENCE_NPZ.value[0]
  samples, reference, stats, notes = adm.check(_SAMPLE_NPZ.value, reference_npz)
  if jax.process_index() == 0:
    for note in notes:  # before any work
      print(f'warning: {note}', file=sys.stderr, flush=True)
  chosen = load_classifier(len(samples))
  output = pathlib.Path(_RESULTS_JSON.value or pathlib.Path(_OUTDIR.value) / (
      f'{pathlib.Path(_SAMPLE_NPZ.value).stem}_vs_{pathlib.Path(reference_npz).stem}.json'))
  if output.suffix != '.json':
    raise ValueError(f'--results_json={output} must end in .json')
  if chosen is None and jax.process_index() == 0:
    print(f'note: no Inception Score: it needs the classifier file, {classifier_lib.FLAG}='
          '<inception-2015-12-05.pt or pt_inception-2015-12-05-6726825d.pth>', flush=True)
  return samples, reference, stats, chosen, output


def report(results: dict, output: pathlib.Path) -> None:
  def number(value, digits):
    return 'unavailable' if value is None else f'{value:.{digits}f}'

  print(f'Inception Score: {number(results["inception_score"], 4)}')
  print(f'FID: {number(results["fid"], 5)}')
  print(f'sFID: {number(results["sfid"], 5)}')
  print(f'Precision: {number(results["precision"], 5)}')
  print(f'Recall: {number(results["recall"], 5)}')
  print(f'KID: {number(results["kid"], 6)}')
  with files.atomic_path(output) as tmp:
    tmp.write_text(json.dumps(results, indent=1))
  print(f'results: {output}', flush=True)


BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, inception.WeightsUnavailableError,
                    checkpoints.CheckpointError, pickle.UnpicklingError)


def check_flags() -> None:
  """What can be checked without the runs or a JAX call, before anything is loaded or joined."""
  for flag, check in ((_SEED, checks.seed), (_BATCH_SIZE, checks.positive_int),
                      (_INCEPTION_BATCH_SIZE, checks.positive_int),
                      (_SHARD_SIZE, checks.positive_int),
                      (_NUM_REFERENCE, checks.non_negative_int)):
    if flag.value is not None:
      check(f'--{flag.name}', flag.value)
  for flag, field in _PLAN_FLAGS:
    check = config_lib.FIELDS[f'sampling.{field}'].check
    if flag.value is not None and check is not None:
      check(f'--{flag.name}', flag.value)
  if not 0 < _NUM_SAMPLES.value <= sweep.MAX_SAMPLES:
    raise ValueError(f'--num_samples={_NUM_SAMPLES.value} must be positive and at most '
                     f'{sweep.MAX_SAMPLES}')
  if not _OUTDIR.value.strip():
    raise ValueError('--outdir= is empty; name a directory, e.g. --outdir=runs/evaluation')
  for flag in (_RUNS, _RESOLUTIONS, _METHODS):
    if flag.value is not None and any(not v.strip() for v in flag.value):
      raise ValueError(f'--{flag.name}={",".join(flag.value)} has an empty entry')
  rundir.check_not_managed(_OUTDIR.value, '--outdir')
  if _SAMPLE_NPZ.value is None and (not _RUNS.value or not _RESOLUTIONS.value):
    raise ValueError('give --runs and --resolutions (a sweep), or --sample_npz and '
                     '--reference_npz (a batch file)')


def take_outdir(log) -> pathlib.Path:
  """--outdir, created and written by this command alone (process 0 takes its lock; the library
  log goes there)."""
  outdir = cli.check_writable_dir(_OUTDIR.value, '--outdir')  # last: it may create it
  log.path = outdir / 'evaluate.log'
  if jax.process_index() == 0:
    files.DirectoryLock(outdir, sweep.LOCK, 'evaluate.py').acquire(
        f'--outdir {outdir}', 'wait for it to finish or stop it, or choose another --outdir')
  return outdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  log = cli.quiet_libraries('evaluate.py')
  try:
    check_flags()  # no JAX call: bad flags are refused before joining a multi-process run
    distributed.initialize_from_flags()  # before any other JAX call
  except BAD_INPUT_ERRORS as e:
    cli.fail(str(e), cli.BAD_INPUT)
  if _SAMPLE_NPZ.value is not None:
    main_batch(log)
  else:
    main_sweep(log)


def main_batch(log):
  """--sample_npz: every check, then ADM's numbers for the batch."""
  try:
    samples, reference, stats, chosen, output = evaluate_batch()
    if jax.process_index() == 0:
      print('the Inception network (features) ...', flush=True)
    net = network()
    cli.check_writable_dir(output.parent, '--results_json directory')
    take_outdir(log)
  except BAD_INPUT_ERRORS as e:
    cli.fail(str(e), cli.BAD_INPUT)
  with cli.exit_on(cli.FAILED, OSError, ValueError):
    results = adm.evaluate(samples, reference, stats, net, cache_dir=pathlib.Path(_OUTDIR.value)
                           / 'features', classifier=chosen, distances=_DISTANCES.value,
                           shard_size=_SHARD_SIZE.value)
    if results is not None:
      report(results, output)


def main_sweep(log):
  """--runs: every check, then the sweep."""
  try:
    methods = sweep.distinct_methods(_METHODS.value)
    names = [pathlib.Path(r).name for r in _RUNS.value]
    if len(set(names)) != len(names):
      raise ValueError(f'--runs={_RUNS.value}: run directories need distinct names')
    runs = [inference.load_run(r, use_ema=not _NOEMA.value, attention=_ATTENTION.value)
            for r in _RUNS.value]
    resolutions = inference.distinct_sizes(sweep.parse_resolutions(
        _RESOLUTIONS.value, {(run.model.patch_size, inference.downsampling(run)) for run in runs}),
        '--resolutions')
    npz_references = sweep.parse_reference_npz(_REFERENCE_NPZ.value, resolutions)
    overrides = {field: flag.value for flag, field in _PLAN_FLAGS if flag.value is not None}
    cells = sweep.plan_cells(runs, names, resolutions, methods, overrides)
    sweep.check_inputs(runs, resolutions, num_samples=_NUM_SAMPLES.value,
                       num_reference=_NUM_REFERENCE.value or None, split=_SPLIT.value,
                       real_split=_REAL_SPLIT.value, npz_references=npz_references)
    sweep.check_memory(runs, resolutions, num_samples=_NUM_SAMPLES.value,
                       batch_size=_BATCH_SIZE.value, available=cli.available_memory())
    files.check_names_fit(_OUTDIR.value, sweep.written_names(names, resolutions, methods),
                          f'--outdir {_OUTDIR.value}')
    chosen = load_classifier(_NUM_SAMPLES.value)
    if jax.process_index() == 0:
      print(f'{len(runs)} runs loaded; the Inception network (features) ...', flush=True)
    net = network()
    take_outdir(log)
  except BAD_INPUT_ERRORS as e:
    cli.fail(str(e), cli.BAD_INPUT)

  with cli.exit_on(cli.FAILED, inference.SamplingError, OSError):
    sweep.run(runs, names, resolutions, cells, outdir=_OUTDIR.value, feature_fn=net,
              num_samples=_NUM_SAMPLES.value, num_reference=_NUM_REFERENCE.value or None,
              split=_SPLIT.value, real_split=_REAL_SPLIT.value,
              resize_filter=_RESIZE_FILTER.value, npz_references=npz_references, seed=_SEED.value,
              batch_size=_BATCH_SIZE.value, classifier=chosen, shard_size=_SHARD_SIZE.value,
              distances=_DISTANCES.value)


if __name__ == '__main__':
  app.run(main)
