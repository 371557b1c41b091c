"""The solver flags sample.py and evaluate.py share: each overrides one field of the sampling plan
(`sampling.<field>` of the run's config, its default) and is checked against that field's range
before anything is loaded."""

from absl import flags

from rpe2d import config as config_lib, sampler

SAMPLER = flags.DEFINE_enum('sampler', None, list(sampler.SAMPLERS),
                            'euler, heun: ODE, fixed steps; dopri5: ODE, adaptive; '
                            "euler_maruyama: SiT's SDE; ddpm: DiT's ancestral sampler "
                            "(default: the run's config).")
STEPS = flags.DEFINE_integer('steps', None, "Solver steps (euler_maruyama: SiT's num_steps; "
                             "ddpm: DiT's respaced steps; default: the run's config).")
CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'Classifier-free guidance scale (1: none).')
CFG_CHANNELS = flags.DEFINE_integer('cfg_channels', None, 'Guide only the first k channels, the '
                                    'rest conditional (0: all; 3: DiT/SiT published numbers).')
ATOL = flags.DEFINE_float('atol', None, 'dopri5: absolute tolerance.')
RTOL = flags.DEFINE_float('rtol', None, 'dopri5: relative tolerance.')
MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'dopri5: step attempts before it gives up.')
ADAPTIVE_STEP = flags.DEFINE_enum('adaptive_step', None, list(sampler.ADAPTIVE_STEPS),
                                  'dopri5: a step size per example, or per batch (torchdiffeq).')
DIFFUSION_FORM = flags.DEFINE_enum('diffusion_form', None, list(sampler.DIFFUSION_FORMS),
                                   'euler_maruyama: the diffusion coefficient.')
DIFFUSION_NORM = flags.DEFINE_float('diffusion_norm', None, 'euler_maruyama: its magnitude.')
LAST_STEP = flags.DEFINE_enum('last_step', None, list(sampler.LAST_STEPS),
                              'euler_maruyama: the last step to t = 0.')
LAST_STEP_SIZE = flags.DEFINE_float('last_step_size', None, 'euler_maruyama: its size.')

# Each flag and the plan field it overrides.
PLAN_FLAGS = ((SAMPLER, 'sampler'), (STEPS, 'steps'), (CFG_SCALE, 'cfg_scale'),
              (CFG_CHANNELS, 'cfg_channels'), (ATOL, 'atol'), (RTOL, 'rtol'),
              (MAX_STEPS, 'max_steps'), (ADAPTIVE_STEP, 'adaptive_step'),
              (DIFFUSION_FORM, 'diffusion_form'), (DIFFUSION_NORM, 'diffusion_norm'),
              (LAST_STEP, 'last_step'), (LAST_STEP_SIZE, 'last_step_size'))


def check() -> None:
  """Each flag given against its config field's range; raises ValueError naming the flag."""
  for flag, field in PLAN_FLAGS:
    field_check = config_lib.FIELDS[f'sampling.{field}'].check
    if flag.value is not None and field_check is not None:
      field_check(f'--{flag.name}', flag.value)


def overrides() -> dict:
  """The plan fields the flags given set."""
  return {field: flag.value for flag, field in PLAN_FLAGS if flag.value is not None}
