"""Image grids as PNG files."""

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from rpe2d import files


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8: round((x + 1) * 127.5), clipped. DiT's rule (its uint8 cast of
  127.5 x + 128 rounds half up; this rounds half to even, the same but at exact halves), which the
  papers compared against sample with; ADM's truncates (docs/methods.md#quantisation)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, rows: int, row_labels=None, padding: int = 2, label_width: int = 64) -> Image.Image:
  """(N, H, W, C) uint8 -> one picture with `rows` rows; each row optionally titled on the left."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = -(-n // rows)
  margin = label_width if row_labels is not None else 0
  canvas = np.full((rows * (h + padding) + padding, margin + cols * (w + padding) + padding, 3),
                   255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    top, left = padding + r * (h + padding), margin + padding + col * (w + padding)
    canvas[top:top + h, left:left + w] = image if c == 3 else np.repeat(image, 3, axis=-1)
  picture = Image.fromarray(canvas)
  if row_labels is not None:
    draw = ImageDraw.Draw(picture)
    for r, text in enumerate(row_labels):
      draw.text((2, padding + r * (h + padding) + max(h // 2 - 5, 0)), str(text), fill=(0, 0, 0))
  return picture


def save_grid(path, images, rows: int, row_labels=None, text: dict | None = None) -> None:
  """A grid as a PNG; `text` becomes its tEXt chunks (e.g. the checkpoint it was sampled from)."""
  info = None
  if text:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
      info.add_text(key, str(value))
  with files.atomic_path(path) as tmp:
    grid(images, rows, row_labels).save(tmp, format='PNG', pnginfo=info)
