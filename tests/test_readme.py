"""The README's shell commands run as written, in order, on a fresh copy of the repository.

Every fenced ```bash block of README.md is cut into commands (a trailing backslash joins lines,
`&&` separates commands, a `# ...` comment after the command is dropped). Each one is either run or
skipped with its reason in SKIPPED; a skipped one must name its inputs in the README.

The cheap ones run in order, in a temporary copy of the code (so `runs/` starts empty, as on a fresh
clone), with flags appended that only shrink the work (TINY: the last value of a flag wins):
training runs 2 steps of a micro/4 model at batch 8 on the synthetic animal_mnist of conftest.py
(`--config.data.data_dir`: no download of the real wheel) and draws its end-of-run grids at one
size, sampling 2 solver steps and at most 10 images, evaluation 1 solver step and 4 images per cell
(the least the metrics accept) against 4 reference images, without the 'real' row. The two
`evaluate.py` commands are still the slowest part (Inception features of every cell).
"""

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, subprocess_env

README = REPO / 'README.md'

# Flags appended to a command of each script; nothing else is changed.
TINY = {
    'train.py': ['--config.total_steps=2', '--config.batch_size=8',
                 '--config.model.variant=micro/4', '--config.sampling.steps=2',
                 '--config.sampling.num_per_class=1', '--config.log_every_steps=1',
                 '--config.data.read_threads=2', '--config.data.prefetch_batches=2',
                 '--config.data.data_dir={data_dir}',
                 '--config.sampling.resolutions=((32, 32),)'],  # 1 sampler compile, not 3
    'sample.py': ['--steps=2'],
    # Every Inception call costs seconds on CPU: 4 images (the least precision/recall accept), no
    # 'real' row (two calls per resolution); the cells and their reuse are what is run.
    'evaluate.py': ['--num_samples=4', '--num_reference=4', '--steps=1',
                    '--inception_batch_size=4', '--real_split='],
}
SAMPLES_AT_MOST = 10  # sample.py's --num_samples=N becomes min(N, this)

# (pattern, why it is not run, what the README must name for it)
IMAGENET_INPUTS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', 'sd-vae-ft-ema',
                   'diffusion_pytorch_model.safetensors', 'VIRTUAL_imagenet256_labeled.npz',
                   'VIRTUAL_imagenet512.npz', 'openai/guided-diffusion',
                   'openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/'
                   '256/VIRTUAL_imagenet256_labeled.npz')
PRETRAINED_INPUTS = ('SiT-XL-2-256x256.pt', 'DiT-XL-2-256x256.pt', 'DiT-XL-2-512x512.pt',
                     'dl.fbaipublicfiles.com/DiT/models', 'SiT-XL-2-256.pt?rlkey',
                     'stabilityai/sd-vae-ft-ema')
FITV2_INPUTS = ('InfImagine/FiTv2/resolve/main/FiTv2_XL/model_ema.safetensors', 'FiTv2_XL_HRFT',
                'sd-vae-ft-ema')
LIGHTNINGDIT_INPUTS = ('lightningdit-xl-imagenet256-800ep.pt', 'vavae-imagenet256-f16d32-dinov2.pt',
                       'latents_stats.pt', 'VIRTUAL_imagenet256_labeled.npz')
SKIPPED = (
    (r'^python3? -m venv |^\. \S*activate$', 'makes and enters a virtual environment; the test '
     'runs in its own interpreter', ()),
    (r'^pip install', 'installs packages; .ci/run installs the project and its test extra on a '
     'fresh clone', ('.[cuda]', '.[tpu]', 'Python 3.11')),
    (r'^python3? -m pytest', 'the test suite itself (.ci/run runs it)', ()),
    (r'^tensorboard ', 'a server that runs until stopped (and needs pip install tensorboard)', ()),
    (r'imagenet|in256|extract\.py', 'ImageNet: the manual download, the SD VAE, the ADM reference '
     'batches and an accelerator-sized budget', IMAGENET_INPUTS),
    (r'convert\.py|sit_xl_|dit_xl_', 'the published DiT and SiT checkpoints and the SD VAE (2.7 GB '
     'each, downloaded by you; XL/2 on a GPU); tests/test_families.py runs convert.py, sampling and '
     'fine-tuning on reduced models built by the reference code', PRETRAINED_INPUTS),
    (r'fitv2_', 'the published FiTv2 files and the SD VAE (2.7 GB each, downloaded by you; XL/2 '
     'on a GPU); tests/test_fitv2.py imports and samples a reduced FiTv2 built by its own code',
     FITV2_INPUTS),
    (r'lightningdit', 'the published LightningDiT files, its VA-VAE and statistics (2.7 and 2.15 '
     'GB, downloaded by you; XL/1 on a GPU); tests/test_lightningdit.py imports, samples and '
     'decodes a reduced LightningDiT and VA-VAE built by its own code', LIGHTNINGDIT_INPUTS),
    (r'--coordinator_address', 'two cooperating processes; tests/test_multihost.py runs this '
     'layout', ()),
    (r'benchmarks/', 'a measurement of minutes; tests/test_benchmarks.py runs every benchmark '
     'script with its smallest settings', ()),
    (r'/path/to/photos', 'a folder of your own images; tests/test_image_folder.py trains on one',
     ('photos/cat/*.jpg',)),
)


def readme_commands(text: str) -> list[str]:
  """Every command of the README's bash blocks, in order."""
  commands = []
  for block in re.findall(r'^```bash\n(.*?)^```', text, flags=re.M | re.S):
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      if line and not line.startswith('#'):
        commands.extend(part.strip() for part in line.split(' && '))
  return commands


def skip_reason(command: str):
  for pattern, reason, inputs in SKIPPED:
    if re.search(pattern, command):
      return reason, inputs
  return None


def flag(words, name, default=None):
  values = [w.split('=', 1)[1] for w in words if w.startswith(f'--{name}=')]
  return values[-1] if values else default


COMMANDS = readme_commands(README.read_text())


def test_every_command_is_run_or_skipped_for_a_listed_reason():
  text = README.read_text()
  assert len(COMMANDS) > 15, COMMANDS
  for command in COMMANDS:
    words = shlex.split(command)
    skipped = skip_reason(command)
    if skipped is None:
      assert words[0] == 'python' and words[1] in TINY, f'neither run nor skipped: {command}'
    else:
      for name in skipped[1]:
        assert name in text, f'{command!r} is skipped ({skipped[0]}); the README must name {name}'


def test_commands_use_only_runs_an_earlier_command_created():
  created = set()
  for command in COMMANDS:
    words = shlex.split(command)
    if len(words) < 2 or words[0] != 'python':
      continue
    script = words[1]
    used = []
    if script == 'train.py':
      used = [flag(words, 'config.init_from')] if flag(words, 'config.init_from') else []
      created.add(flag(words, 'workdir', 'runs/default'))
    elif script == 'convert.py':
      created.add(flag(words, 'workdir'))
    elif script == 'sample.py':
      used = [flag(words, 'workdir')]
    elif script == 'evaluate.py':
      used = [r for r in (flag(words, 'runs') or '').split(',') if r]  # --sample_npz: none
    for run in used:
      assert run in created, f'{command!r} uses {run}, which no earlier command creates'


@pytest.fixture(scope='module')
def fresh_copy(tmp_path_factory):
  """The code as a fresh clone has it: no runs/, no samples."""
  root = tmp_path_factory.mktemp('clone')
  for name in ('train.py', 'sample.py', 'evaluate.py', 'extract.py', 'pyproject.toml'):
    shutil.copy(REPO / name, root / name)
  for name in ('rpe2d', 'configs', 'docs'):
    shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns('__pycache__'))
  return root


def tiny_command(command: str, data_dir: str) -> list[str]:
  words = shlex.split(command)
  script = words[1]
  args = [w for w in words[2:]]
  if script == 'sample.py':  # the default is 2 per class: 20
    args.append(f'--num_samples={min(int(flag(args, "num_samples", 20)), SAMPLES_AT_MOST)}')
  args += [a.format(data_dir=data_dir) for a in TINY[script]]
  return [sys.executable, script, *args]


def test_the_cheap_commands_run_in_order_on_a_fresh_copy(fresh_copy, data_dir, compilation_cache):
  from rpe2d.evaluation import inception  # pylint: disable=g-import-not-at-top
  try:
    inception.load_params(None, download=True)
  except inception.WeightsUnavailableError as e:
    pytest.skip(f'the Inception weights for evaluate.py are unavailable: {e}')
  # Sampling at up to 128x160 pixels and Inception features run long enough for XLA's
  # optimisations to pay (measured here: sample.py 50 -> 42 s, evaluate.py 101 -> 91 s); the tiny
  # training runs are compile time, which the optimisations would double.
  envs = {optimized: dict(subprocess_env(compilation_cache, optimized=optimized),
                          PYTHONPATH=str(fresh_copy)) for optimized in (False, True)}
  ran = []
  for command in COMMANDS:
    if skip_reason(command) is not None:
      continue
    argv = tiny_command(command, data_dir)
    began = time.perf_counter()
    result = subprocess.run(argv, cwd=fresh_copy, env=envs[argv[1] != 'train.py'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f'{command}\n-> {shlex.join(argv[1:])}\n'
                                    f'{result.stdout[-2000:]}\n{result.stderr[-3000:]}')
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    ran.append((command, result))
    print(f'{time.perf_counter() - began:6.1f} s  {command}', flush=True)  # pytest -s shows it
  scripts = [shlex.split(c)[1] for c, _ in ran]
  assert scripts.count('train.py') >= 4 and scripts.count('sample.py') >= 4
  assert scripts.count('evaluate.py') >= 2
  # Nothing lands beside the code: runs/ holds every output (sample.py's default is the run).
  assert sorted(p.name for p in fresh_copy.iterdir()) == sorted(
      ['configs', 'docs', 'evaluate.py', 'extract.py', 'pyproject.toml', 'rpe2d', 'runs',
       'sample.py', 'train.py'])
  assert list((fresh_copy / 'runs' / 'default' / 'samples').glob('sample_0000002_64x64.png'))
  assert (fresh_copy / 'runs' / 'default' / 'eval.npz').is_file()
  assert (fresh_copy / 'runs' / 'eval' / 'results.md').is_file()
  # The documented no-op note: YaRN/DyPE at 128x128 and 64x160 matter for the default run.
  yarn = next(r for c, r in ran if '--extrapolation=yarn --dype' in c and 'sample.py' in c)
  assert 'changes nothing' not in yarn.stdout, yarn.stdout
