"""The checkpoint families rpe2d imports: the one place that lists them
(docs/methods.md#importing-checkpoints).

A family is a module with
  NAME, DESCRIPTION     its --family name and what it is
  SOURCES               file name -> the public address of each published file
  KNOWN_FILES           sha256 -> file name, for files whose hash is published (may be empty)
  VAE_SCALING_FACTOR    the factor its latents were scaled by (its VAE must have it)
  VAE, VAE_STATISTICS   optional: the VAE it needs, in words (default an SD VAE), and whether
                        its latents are normalised per channel by a statistics file (default no)
  architecture(shapes)  what the state dict's shapes say about the model (ValueError if they
                        are not this family's layout)
  expected_shapes(arch) every key of such a state dict and its shape
  check(tensors, arch)  what the values must satisfy beyond their shapes (ValueError if not)
  params(tensors, arch) the tensors -> rpe2d's {'params': ...} tree (per-block layout)
  config(arch)          rpe2d's config of the model: model fields, data, published sampling
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from rpe2d.families import common, dit, fitv2, lightningdit, sit

FAMILIES = {module.NAME: module for module in (sit, dit, fitv2, lightningdit)}


@dataclasses.dataclass(frozen=True)
class Matched:
  """A state dict read as one family: its architecture and rpe2d config."""
  family: str
  arch: object
  config: object


def _fits(module, shapes: Mapping[str, tuple]) -> list[str]:
  """The problems of reading `shapes` as `module`'s layout (empty: it fits)."""
  try:
    arch = module.architecture(shapes)
    module.config(arch)  # its size must be an rpe2d variant
  except ValueError as e:
    return [str(e)]
  return common.mismatches(shapes, module.expected_shapes(arch))


def match(family: str, shapes: Mapping[str, tuple], source: str = 'the file') -> Matched:
  """Reads the shapes of a state dict as `family`; one ValueError lists every missing,
  unexpected and misshapen key, and names the registered families whose layout it has instead."""
  if family not in FAMILIES:
    raise ValueError(f'--family={family!r} is not a known checkpoint family; allowed: '
                     f'{", ".join(FAMILIES)}')
  module = FAMILIES[family]
  problems = _fits(module, shapes)
  if not problems:
    arch = module.architecture(shapes)
    return Matched(family, arch, module.config(arch))
  others = [name for name, other in FAMILIES.items() if name != family and not _fits(other, shapes)]
  hint = (f'; its keys and shapes are those of a {" or ".join(others)} checkpoint: '
          f'--family={others[0]}' if others else '')
  raise ValueError(f'{source} is not a {family} checkpoint ({len(shapes)} tensors): '
                   + '; '.join(problems) + hint)
