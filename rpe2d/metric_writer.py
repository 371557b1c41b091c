"""Scalars to <workdir>/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow);
the sample grids as TensorBoard images too."""

import json

from absl import logging
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
    # A queue long enough for many log steps: tensorboardX writes from a thread, and were that
    # thread to die (a full disk), a full queue would block training; _check_tensorboard says so.
    self._tensorboard = SummaryWriter(str(run.tensorboard), max_queue=1000)

  def _check_tensorboard(self) -> None:
    """Raises OSError when tensorboardX's writer thread has died (its error is in the library log,
    rpe2d.cli), so that the loop stops after saving instead of losing events silently."""
    writer = getattr(self._tensorboard, 'file_writer', None)
    worker = getattr(getattr(writer, 'event_writer', None), '_worker', None)
    if worker is not None and not worker.is_alive():
      raise OSError(f'the TensorBoard event writer of {self._tensorboard.logdir} stopped')

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    self._check_tensorboard()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)

  def write_image(self, name: str, step: int, image) -> None:
    """One (H, W, 3) uint8 picture, e.g. a sample grid, under `name` in TensorBoard's Images tab."""
    if self.active:
      self._check_tensorboard()
      self._tensorboard.add_image(name, image, step, dataformats='HWC')
      self._tensorboard.flush()

  def close(self) -> None:
    """Closes both files; a failure to close the event file (its writer failed already, and the
    loop said so) is a warning, so that it never hides the error that stopped the run."""
    if self.active:
      self._jsonl.close()
      try:
        self._tensorboard.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('closing the TensorBoard event file failed: %s', e)
