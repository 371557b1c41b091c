"""Scalars to <workdir>/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow);
the sample grids as TensorBoard images too."""

import json

import jax


class MetricWriter:
  """Writes on process 0 only; every other process gets a writer that does nothing."""

  def __init__(self, run):
    """run: an rpe2d.rundir.RunDir."""
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._jsonl = open(run.metrics, 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(str(run.tensorboard))

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)

  def write_image(self, name: str, step: int, image) -> None:
    """One (H, W, 3) uint8 picture, e.g. a sample grid, under `name` in TensorBoard's Images tab."""
    if self.active:
      self._tensorboard.add_image(name, image, step, dataformats='HWC')
      self._tensorboard.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tensorboard.close()
