"""Shared fixtures and helpers. Eight CPU devices so sharding tests run on real (CPU) devices."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

NUM_DEVICES = 8

# XLA:CPU's older fusion emitters compile the suite's unoptimised programs in about half the CPU
# time of the default ones (the tiny DiT's gradient: 1.4 -> 0.7 s; the in-process tests' compiles:
# 214 -> ~120 s) and run them as fast; with XLA's optimisations on they compile slower, so the
# optimised commands (subprocess_env(optimized=True)) keep the default. Used only where this
# jaxlib knows the flag (XLA aborts on an unknown one): probed once, by the first process that
# imports this file (pytest's controller under xdist), whose environment the workers inherit.
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'
_FAST_COMPILE_ENV = 'RPE2D_TESTS_FAST_COMPILE_FLAG'


def _fast_compile_flag() -> str:
  if _FAST_COMPILE_ENV not in os.environ:
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                           env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAG, JAX_PLATFORMS='cpu'),
                           capture_output=True, timeout=300, check=False)
    os.environ[_FAST_COMPILE_ENV] = FAST_COMPILE_FLAG if probe.returncode == 0 else ''
  return os.environ[_FAST_COMPILE_ENV]


def xla_flags(devices: int = NUM_DEVICES, optimized: bool = False) -> str:
  """XLA_FLAGS for a process of the tests: `devices` CPU devices, and the fast-compiling
  emitters unless the process compiles with XLA's optimisations on."""
  return f'--xla_force_host_platform_device_count={devices}' + (
      '' if optimized or not _fast_compile_flag() else f' {_fast_compile_flag()}')


if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags()}'.strip()

import jax  # noqa: E402

# Tests run tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update('jax_disable_most_optimizations', True)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache  # noqa: E402,E501

from rpe2d import config as config_lib, model as model_lib, positions  # noqa: E402
from rpe2d.datasets import animal_mnist  # noqa: E402

import forked  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / 'train.py'


def perturb(params, key, scale=0.05):
  """Random non-zero weights everywhere, so zero-initialised outputs become informative."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def jaxpr_equations(jaxpr):
  """Every equation of a jaxpr, depth first, including those inside nested jits and the primal
  jaxprs of custom_vjp calls."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        yield from jaxpr_equations(inner)


@pytest.fixture(scope='session')
def micro_model():
  return model_lib.DiT(variant='micro/2', channels=1, num_classes=4, train_grid=(4, 4),
                       position_range=(8, 8), micro_conditioning=True)


@pytest.fixture(scope='session')
def micro_init(micro_model):
  """micro_model's initial parameters (a zero output). Compiled whole: run eagerly, every op of
  init (and of perturb) compiles on its own, ~20 s on CPU."""
  x = jnp.zeros((1, 8, 8, 1))
  return jax.jit(micro_model.init)(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32),
                                   positions.grid(4, 4, 1))


@pytest.fixture(scope='session')
def micro_params(micro_init):
  return jax.jit(perturb)(micro_init, jax.random.key(1))


@pytest.fixture(scope='session')
def synthetic_animals(tmp_path_factory):
  """animal_mnist (180 train / 20 test records) prepared by its builder from a synthetic wheel."""
  return animal_mnist.prepare_synthetic(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def data_dir(synthetic_animals):
  return synthetic_animals


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory):
  """A persistent compilation cache directory for the modules that train the tiny run: they
  compile the same programs (enabled per module by test_train.py's compilation_cache)."""
  return str(tmp_path_factory.mktemp('jax_cache'))


# The same tiny run as command-line overrides (subprocess tests) and as a ConfigDict.
TINY_OVERRIDES = {
    'model.variant': 'micro/4',
    'positions.train': 'rpe2d',           # exercise RPE-2D positions, crops and micro-conditioning
    'positions.max_grid': (8, 8),
    'data.augment': 'rpe2d_crop',
    'model.micro_conditioning': True,
    'sampling.cfg_scale': 1.0,
    'data.image_size': 16,
    'batch_size': 8,
    'log_every_steps': 1,
    'checkpoint_every_steps': 1000,
    'sample_every_steps': 1000,
    'keep_checkpoints': 100,
    'sampling.steps': 2,
    'sampling.resolutions': ((16, 16),),
    'sampling.num_per_class': 1,
    'optim.warmup_steps': 0,  # a non-zero learning rate from the first step
    'optim.schedule': 'constant',  # as base(): train.py's default.py runs equal tiny_config's
    'data.read_threads': 2,
    'data.prefetch_batches': 2,
}


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """A fresh config object: base() with TINY_OVERRIDES, then `overrides` ('a.b' keys as a__b)."""
  config = config_lib.base()
  config.data.data_dir = data_dir
  config.total_steps = 2
  config.update_from_flattened_dict(dict(TINY_OVERRIDES))
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in overrides.items()})
  return config


def random_image_folder(root: pathlib.Path, size: int, per_class: int):
  """`per_class` random RGB PNGs of size x size in classes a and b under root/images, and the
  image_folder data config that reads them (its TFDS files in root/tfds)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for kind in ('a', 'b'):
    (root / 'images' / kind).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
          root / 'images' / kind / f'{i}.png')
  images = config_lib.base().data
  images.update(dict(name='image_folder', image_dir=str(root / 'images'),
                     data_dir=str(root / 'tfds'), image_size=size, channels=3, num_classes=2,
                     augment='none'))
  return images


@pytest.fixture(scope='module')
def eight_devices():
  assert jax.device_count() == NUM_DEVICES, 'tests/conftest.py should give 8 CPU devices'


_CACHE_OPTIONS = {
    'jax_compilation_cache_dir': None,  # set to a tmp dir below
    'jax_persistent_cache_min_compile_time_secs': 0.0,
    'jax_persistent_cache_min_entry_size_bytes': -1,
}


@contextlib.contextmanager
def persistent_cache(path):
  """This process's jax compiles through the persistent cache in `path` while active."""
  previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  for name, value in _CACHE_OPTIONS.items():
    jax.config.update(name, path if value is None else value)
  jax_compilation_cache.reset_cache()
  try:
    yield path
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def compilation_cache(jax_cache_dir):
  """A persistent compilation cache for the modules that train the tiny run, in a tmp dir.

  Every train() call builds a new Trainer, whose new jit objects recompile the same programs
  (run A, both halves of run B, the resume after SIGTERM; ~6 s each on CPU). The cache serves the
  identical executables; the subprocesses share it through the environment (subprocess_env).
  """
  with persistent_cache(jax_cache_dir) as path:
    yield path


@pytest.fixture(scope='session')
def tiny_run(synthetic_animals, jax_cache_dir, tmp_path_factory):
  """tiny_config's 2-step run (micro/4 RPE-2D at 16x16, max_grid 8x8: a train grid of 4x4 tokens),
  trained once per worker for the modules that only sample and evaluate it (test_sample.py,
  test_evaluate.py), which used to train the same run each. Copy it before writing into it."""
  from rpe2d import train_loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('tiny_run') / 'run'
  with persistent_cache(jax_cache_dir):
    train_loop.train(tiny_config(synthetic_animals), workdir)
  return workdir


def flag_args(data_dir, **overrides) -> list[str]:
  values = dict(TINY_OVERRIDES, **{'data.data_dir': data_dir}, **overrides)
  return [f'--config.{k}={v}' for k, v in values.items()]


def subprocess_env(cache_dir, optimized=False):
  """The environment of a script run by a test: 8 CPU devices and the compilation cache in
  `cache_dir`. Most optimisations are off as in this process (compile time dominates a tiny run),
  unless `optimized`: for the commands whose time is spent running programs, not compiling them
  (Inception features, sampling 1024 tokens), where the unoptimised programs run ~2x longer than
  the optimisation takes (evaluate.py of the README: 33 s against 61 s, cache warm)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(optimized=optimized)
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '0' if optimized else '1'
  for name, value in _CACHE_OPTIONS.items():
    env[name.upper()] = str(cache_dir if value is None else value)
  return env


# What train.py, sample.py, evaluate.py and extract.py import before their first line of main.
SCRIPT_MODULES = ('absl.app', 'rpe2d.cli', 'rpe2d.checkpoints', 'rpe2d.distributed',
                  'rpe2d.train_loop', 'rpe2d.inference', 'rpe2d.evaluation.sweep',
                  'rpe2d.evaluation.inception', 'rpe2d.latents')


class ScriptServers:
  """One tests/forked.py server per environment, started on first use: the scripts run as
  processes forked from an interpreter that imported their modules once (~2.5 s of CPU each
  time otherwise). Servers differ only where an environment differs in what is read at import
  (PYTHONPATH, JAX_* options); XLA_FLAGS and PYTHONUNBUFFERED are set per process."""

  def __init__(self):
    self._servers = {}

  def __call__(self, env) -> forked.Scripts:
    key = tuple(sorted((k, v) for k, v in env.items() if k not in forked.PER_CHILD))
    if key not in self._servers:
      self._servers[key] = forked.Scripts(list(SCRIPT_MODULES), env)
    return self._servers[key]

  def close(self):
    for server in self._servers.values():
      server.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@pytest.fixture(scope='session')
def script_servers():
  servers = ScriptServers()
  yield servers
  servers.close()


@pytest.fixture(scope='session')
def warm_scripts(script_servers, jax_cache_dir):
  """train.py, sample.py, evaluate.py and extract.py as children forked from one interpreter
  that imported their modules once (tests/forked.py), in subprocess_env's environment: each
  command still its own process, with its own pid, signals, exit status and output files."""
  return script_servers(subprocess_env(jax_cache_dir))


def host(tree):
  return jax.device_get(tree)


def edit_run_config(workdir, edit) -> None:
  """Applies `edit` (a function of the config as a dict, changing it in place) to a run's
  config.json and to the config saved in each of its checkpoints, whose manifests are written
  again: the run then looks as if trained with the edited config (e.g. the same weights as a
  grid-position run), since a checkpoint's own config is what sampling reads."""
  from rpe2d import checkpoints  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  paths = [workdir / 'config.json'] + [workdir / 'checkpoints' / str(step) / 'config' / 'metadata'
                                       for step in step_dirs(workdir)]
  for path in paths:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
  for step in step_dirs(workdir):
    checkpoints.write_manifest(workdir / 'checkpoints' / str(step))


def step_dirs(workdir) -> list[int]:
  path = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def int_leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype,
                                                                          np.integer)]


class CompileCounter:
  """Counts jit lowerings and XLA compilations while active (jax.monitoring, no patching).

  Lowerings count too: with the persistent cache a compilation can be a cache hit, but a new
  Trainer's programs are always lowered.
  """

  EVENTS = ('/jax/core/compile/jaxpr_to_mlir_module_duration',
            '/jax/core/compile/backend_compile_duration')

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration, **kwargs):
    del duration, kwargs
    if event in self.EVENTS:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


# ------------------------------------------------------------------------------------------------
# `pytest -n 2` (xdist, `--dist=loadgroup` in pyproject.toml): which worker runs what, and when.

# The longest work first (a test id or a module), so that neither worker is left with it at the
# end; the rest keep their order. Minutes per file with `--durations` on a loaded 2-core machine:
# readme 11, faults 7.5, evaluate 9, sample 9, adm evaluation 6, multihost 2.5, latent pipeline 2.3
# (reliability, not timed, trains 14 runs).
LONGEST_FIRST = (
    'tests/test_readme.py::test_the_cheap_commands_run_in_order_on_a_fresh_copy',
    'tests/test_faults.py',
    'tests/test_evaluate.py',
    'tests/test_adm_evaluation.py',
    'tests/test_sample.py',
    'tests/test_reliability.py',
    'tests/test_multihost.py',
    'tests/test_latent_pipeline.py',
    'tests/test_fitv2.py',
)


def _uses_a_module_fixture_of_its_own(item) -> bool:
  defs = getattr(item, '_fixtureinfo', None)
  if defs is None:
    return False
  module = item.nodeid.split('::')[0]
  return any(d.scope == 'module' and d.baseid == module
             for fixture_defs in defs.name2fixturedefs.values() for d in fixture_defs)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  """Tests that share a module-scoped fixture of their module (a trained run, a multi-process
  reference, extracted latents) form one xdist group, so that one worker builds it once; plain
  `--dist=load` would split the module over both workers and build it on each. Every other test
  is a unit of its own. Then the longest work moves to the front (a stable sort)."""
  del config
  for item in items:
    if _uses_a_module_fixture_of_its_own(item):
      item.add_marker(pytest.mark.xdist_group(item.nodeid.split('::')[0]))

  def rank(item):
    for i, prefix in enumerate(LONGEST_FIRST):
      if item.nodeid == prefix or item.nodeid.startswith(prefix + '::'):
        return i
    return len(LONGEST_FIRST)

  items.sort(key=rank)
