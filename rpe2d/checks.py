"""Field declarations and the checks behind them: one message style for every bad value.

  <key>=<value> is not allowed; choose one of: a, b
  <key>=<value> must be <what it must be>
"""

import dataclasses
import math
from typing import Any, Callable


def positive_int(key, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{key}={value!r} must be a positive integer')


def non_negative_int(key, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{key}={value!r} must be an integer >= 0')


MAX_STEPS = 100_000  # sampler steps: beyond, a time grid alone is a memory hazard, not a method


def steps(key, value):
  """Sampler steps: a positive integer, at most MAX_STEPS."""
  positive_int(key, value)
  if value > MAX_STEPS:
    raise ValueError(f'{key}={value!r} must be at most {MAX_STEPS} (sampler steps)')


SEED_LIMIT = 2**64  # seeds are 64-bit: rpe2d.training.seed_key keeps every bit


def seed(key, value):
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
    raise ValueError(f'{key}={value!r} must be an integer in [0, 2**64)')


def number(low=-math.inf, high=math.inf, *, low_open=False, high_open=False):
  """A check for a finite number in [low, high] (open ends where asked)."""
  def check(key, value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
      bounds = (f'{"(" if low_open or low == -math.inf else "["}{low}, '
                f'{high}{")" if high_open or high == math.inf else "]"}')
      raise ValueError(f'{key}={value!r} must be a finite number in {bounds}')
  return check


def optional(inner):
  """`inner`, or None (unset: the default behaviour)."""
  def check(key, value):
    if value is not None:
      inner(key, value)
  return check


def unit_interval(key, value):
  """A pair (low, high) of finite numbers with 0 <= low <= high <= 1."""
  try:
    low, high = value
  except (TypeError, ValueError):
    raise ValueError(f'{key}={value!r} must be a pair (low, high) with 0 <= low <= high <= 1'
                     ) from None
  for item in (low, high):
    number(0.0, 1.0)(key, item)
  if low > high:
    raise ValueError(f'{key}={value!r} must be a pair (low, high) with low <= high')


def resolution(key, value):
  try:
    height, width = value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)):
      raise TypeError
  except (TypeError, ValueError):
    raise ValueError(f'{key}={value!r} must be a pair (height, width) of integers') from None
  if height <= 0 or width <= 0:
    raise ValueError(f'{key}={value!r} must be positive')


def resolutions(key, value):
  for i, item in enumerate(value):
    resolution(f'{key}[{i}]', item)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted key, default, meaning, and what values it allows."""
  key: str                       # dotted, e.g. 'data.image_size'
  default: Any
  help: str
  allowed: tuple = ()            # the values allowed, when they are names
  check: Callable | None = None  # (key, value) -> None, raising ValueError
  value_type: type | None = None  # for a default of None: the type an override must have


def choice(key, value, allowed):
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not allowed; choose one of: '
                     f'{", ".join(map(str, allowed))}')


def lookup(values, dotted: str):
  for part in dotted.split('.'):
    values = values[part] if hasattr(values, '__getitem__') else getattr(values, part)
  return values


def check(fields, values, prefix: str = '') -> None:
  """Checks each field's value in `values` (a ConfigDict, a dict or an object with attributes),
  whose keys are the fields' keys without `prefix`."""
  for f in fields:
    try:
      value = lookup(values, f.key.removeprefix(prefix))
    except (KeyError, AttributeError):
      raise ValueError(f'{f.key}: the config has no such field; every config starts from '
                       'rpe2d.config.base()') from None
    if f.allowed:
      choice(f.key, value, f.allowed)
    if f.check is not None:
      f.check(f.key, value)
