"""`import rpe2d` keeps freed host memory: a repeated XLA:CPU computation stops faulting in
pages."""

import json
import os
import subprocess
import sys

import pytest

from rpe2d import host_memory

# A fresh process runs a jitted MLP training step (its activations and gradients are 16 MiB
# buffers XLA allocates on every call) and reports the minor page faults of 30 steps after 5. It
# runs on one core: with several threads the heap still grows now and then during the first tens
# of steps (a buffer one thread frees is not yet free when another allocates) before it settles,
# which would make the count depend on the machine's load.
_PROBE = """
import json, os, resource, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
if sys.argv[1] == 'rpe2d':
  import rpe2d
import jax, jax.numpy as jnp

def loss(w, x):
  return jnp.sum((jnp.tanh(x @ w[0]) @ w[1]) ** 2)

step = jax.jit(lambda w, x: jax.tree.map(lambda a, g: a - 1e-3 * g, w, jax.grad(loss)(w, x)),
               donate_argnums=0)
x = jnp.ones((4096, 256), jnp.float32)
w = (jnp.full((256, 1024), 0.01), jnp.full((1024, 256), 0.01))
for _ in range(5):
  w = jax.block_until_ready(step(w, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
  w = jax.block_until_ready(step(w, x))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def minor_faults(mode: str, **env) -> int:
  # One CPU device, as train.py has on a CPU host (not the suite's eight).
  done = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True,
                        check=True, env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', **env))
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.keep_freed_memory(), reason="needs glibc's mallopt (Linux)")
def test_importing_rpe2d_stops_page_faults_of_repeated_steps():
  # Without the setting every step faults in ~12k fresh 4 KiB pages; with it, none after the first.
  plain = minor_faults('jax')
  kept = minor_faults('rpe2d')
  opted_out = minor_faults('rpe2d', **{host_memory.OPT_OUT: '0'})
  assert plain > 200_000 and opted_out > plain / 2, (plain, opted_out)
  assert kept < 2_000, (kept, plain)
