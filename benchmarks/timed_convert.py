"""convert.py in a process of its own under `/usr/bin/time -v`, as the full-size benchmarks
measure an import: its wall time, CPU seconds and peak RSS."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def timed_convert(flags: list[str], workdir: pathlib.Path) -> tuple[str, float, float]:
  """Runs `convert.py <flags> --workdir=<workdir>` (a previous workdir is removed first), prints
  what convert printed, and returns (wall time h:mm:ss, CPU seconds, peak RSS in GiB); exits with
  convert's error if it fails."""
  if workdir.exists():
    shutil.rmtree(workdir)
  done = subprocess.run(
      ['/usr/bin/time', '-v', sys.executable, str(REPO / 'convert.py'), *flags,
       f'--workdir={workdir}'],
      capture_output=True, text=True, check=False, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  if done.returncode:
    sys.exit(f'convert.py failed:\n{done.stderr[-3000:]}')
  wall = re.search(r'Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)', done.stderr)[1]
  rss = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', done.stderr)[1])
  cpu = sum(float(re.search(rf'{kind} time \(seconds\): ([\d.]+)', done.stderr)[1])
            for kind in ('User', 'System'))
  print(done.stdout.strip())
  return wall, cpu, rss / 2**20
