"""Writing files so that a reader, or a crash, never sees half of one; and naming their bytes."""

import contextlib
import hashlib
import os
import pathlib


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

  The temporary name keeps the suffix (np.savez would otherwise append '.npz'); on an error it is
  removed and `path` keeps its old contents.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp' + path.suffix)
  try:
    yield tmp
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def sha256_file(path: os.PathLike[str] | str) -> str:
  """The hex sha256 of a file's bytes, read in one streaming pass (nothing is cached)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()
