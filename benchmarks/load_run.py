"""What `rpe2d.inference.load_run` costs: wall seconds and bytes read from disk, for one run.

  python benchmarks/load_run.py runs/default
  python benchmarks/load_run.py runs/default --repeats=5

Each repeat runs in a fresh process (the page cache stays warm after the first), so imports and
compilation caches do not carry over. Bytes are the process's `rchar` (every byte read through
read(2), cached or not) around the call, from /proc/self/io (Linux).
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

before, began = read_bytes(), time.perf_counter()
run = inference.load_run(sys.argv[1])
jax.block_until_ready(run.params)
print(json.dumps(dict(seconds=time.perf_counter() - began, bytes=read_bytes() - before,
                      parameters=sum(x.size for x in jax.tree.leaves(run.params)))))
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
  seconds = [r['seconds'] for r in results]
  print(f'{args.workdir}: load_run {statistics.median(seconds):.2f} s median of {len(seconds)} '
        f'({", ".join(f"{s:.2f}" for s in seconds)}), {results[-1]["bytes"] / 1e6:.1f} MB read, '
        f'{results[-1]["parameters"] / 1e6:.2f} M parameters')


if __name__ == '__main__':
  main()
