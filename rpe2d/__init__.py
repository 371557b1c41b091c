"""rpe2d: diffusion transformers that sample at resolutions they were not trained at."""

from rpe2d import host_memory

host_memory.keep_freed_memory()
