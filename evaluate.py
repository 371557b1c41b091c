"""FID, KID, precision and recall of trained runs across resolutions and position methods.

  python evaluate.py --runs=runs/grid,runs/default --resolutions=16,32,64,96 --outdir=runs/eval
  python evaluate.py --runs=runs/default --resolutions=64x128 --methods=uniform,yarn,dy-yarn
  python evaluate.py --runs=runs/in256_xl_rpe2d --resolutions=256 \
      --reference_npz=256x256:VIRTUAL_imagenet256_labeled.npz

Writes <outdir>/results.{json,csv,md}, fid_vs_resolution.png and grids/<run>/<HxW>_<method>.png.
Methods are listed in rpe2d/evaluation/sweep.py. The reference at each resolution is the --split of the
run's data set resized with --resize_filter (or an ADM .npz); a 'real' row measures --real_split
images against it, the floor a model can reach at this N. Cells already computed are reused.
"""

import pathlib

from absl import app, flags, logging

from rpe2d import checks, cli, config as config_lib, inference, sampler
from rpe2d.evaluation import inception, sweep

_RUNS = flags.DEFINE_list('runs', None, 'Training run directories.', required=True)
_RESOLUTIONS = flags.DEFINE_list('resolutions', None, 'Sizes: 64 (square) or HxW.', required=True)
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
                                   'HxW:path of ADM-style mu/sigma statistics, instead of a split.')
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    for flag, check in ((_SEED, checks.non_negative_int), (_BATCH_SIZE, checks.positive_int),
                        (_INCEPTION_BATCH_SIZE, checks.positive_int),
                        (_NUM_REFERENCE, checks.non_negative_int)):
      if flag.value is not None:
        check(f'--{flag.name}', flag.value)
    for flag, field in _PLAN_FLAGS:
      check = config_lib.FIELDS[f'sampling.{field}'].check
      if flag.value is not None and check is not None:
        check(f'--{flag.name}', flag.value)
    for method in _METHODS.value:
      sweep.parse_method(method)
    names = [pathlib.Path(r).name for r in _RUNS.value]
    if len(set(names)) != len(names):
      raise ValueError(f'--runs={_RUNS.value}: run directories need distinct names')
    runs = [inference.load_run(r, use_ema=not _NOEMA.value) for r in _RUNS.value]
    resolutions = sweep.parse_resolutions(
        _RESOLUTIONS.value, {(run.model.patch_size, inference.downsampling(run)) for run in runs})
    npz_references = sweep.parse_reference_npz(_REFERENCE_NPZ.value)
    overrides = {field: flag.value for flag, field in _PLAN_FLAGS if flag.value is not None}
    cells = sweep.plan_cells(runs, names, resolutions, _METHODS.value, overrides)
    sweep.check_inputs(runs, resolutions, num_samples=_NUM_SAMPLES.value,
                       num_reference=_NUM_REFERENCE.value or None, split=_SPLIT.value,
                       real_split=_REAL_SPLIT.value, npz_references=npz_references)
    print(f'{len(runs)} runs loaded; the Inception network (FID features) ...', flush=True)
    network = inception.InceptionV3(batch_size=_INCEPTION_BATCH_SIZE.value)
    cli.check_writable_dir(_OUTDIR.value, '--outdir')  # last: it may create it
  except (ValueError, FileNotFoundError, inception.WeightsUnavailableError) as e:
    cli.fail(str(e), cli.BAD_INPUT)

  with cli.exit_on(cli.FAILED, inference.SamplingError, OSError):
    sweep.run(runs, names, resolutions, cells, outdir=_OUTDIR.value, feature_fn=network,
              num_samples=_NUM_SAMPLES.value, num_reference=_NUM_REFERENCE.value or None,
              split=_SPLIT.value, real_split=_REAL_SPLIT.value,
              resize_filter=_RESIZE_FILTER.value, npz_references=npz_references, seed=_SEED.value,
              batch_size=_BATCH_SIZE.value)


if __name__ == '__main__':
  app.run(main)
