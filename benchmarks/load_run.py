"""What `rpe2d.inference.load_run` costs: wall seconds and bytes read from disk, for one run.

  python benchmarks/load_run.py runs/default
  python benchmarks/load_run.py runs/default --repeats=5

Each repeat runs in a fresh process (the page cache stays warm after the first) and calls load_run
twice: the first call also pays for lazy imports and first traces, the second is the call itself.
Bytes are the process's `rchar` (every byte read through read(2), cached or not) around each call,
from /proc/self/io (Linux).
"""

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = '''
import json, sys, time
import jax
from rpe2d import inference

def read_bytes():
  with open('/proc/self/io') as f:
    return int(dict(line.split(': ') for line in f.read().splitlines())['rchar'])

def timed():
  before, began = read_bytes(), time.perf_counter()
  run = inference.load_run(sys.argv[1])
  jax.block_until_ready(run.params)
  return run, time.perf_counter() - began, read_bytes() - before

run, first_seconds, first_bytes = timed()   # includes the imports and traces a first call makes
_, seconds, bytes_read = timed()            # the call itself
print(json.dumps(dict(first_seconds=first_seconds, first_bytes=first_bytes, seconds=seconds,
                      bytes=bytes_read, parameters=sum(x.size for x in jax.tree.leaves(run.params)))))
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  results = []
  for _ in range(args.repeats):
    out = subprocess.run([sys.executable, '-c', _CHILD, args.workdir], capture_output=True,
                         text=True, check=True).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))
  for prefix, what in (('first_', 'first call'), ('', 'second call')):
    seconds = [r[prefix + 'seconds'] for r in results]
    print(f'{args.workdir}: load_run, {what}: {statistics.median(seconds):.3f} s median of '
          f'{len(seconds)} ({", ".join(f"{s:.3f}" for s in seconds)}), '
          f'{statistics.median(r[prefix + "bytes"] for r in results) / 1e6:.1f} MB read')
  print(f'{results[-1]["parameters"] / 1e6:.2f} M parameters restored')


if __name__ == '__main__':
  main()
