"""Keep freed host memory for reuse instead of handing it back to the kernel (Linux, glibc).

XLA:CPU allocates a step's buffers afresh on every call. glibc serves large requests with `mmap`
and returns them with `munmap`, so every step touches hundreds of megabytes of new pages, each a
page fault the kernel must zero: a quarter of the default model's train step went to the kernel
(README.md, Performance). With one malloc arena, no `mmap` for allocations and no trimming of the
heap, a freed buffer is reused by the next step at no cost. The process's memory then stays at its
peak; with several threads the heap also grows now and then over the first tens of steps (a
buffer one thread frees is not yet free when another allocates) before it settles, so the peak
can be higher than with the default malloc.

`import rpe2d` applies it (before jax starts its threads: a thread that already owns an arena keeps
it); set RPE2D_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
OPT_OUT = 'RPE2D_KEEP_FREED_MEMORY'


def keep_freed_memory() -> bool:
  """Configures glibc's malloc as above; True if it did, False off Linux, without glibc or when
  the environment opts out."""
  if not sys.platform.startswith('linux') or os.environ.get(OPT_OUT, '1') == '0':
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
  except (OSError, AttributeError):  # a libc without mallopt (musl)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
