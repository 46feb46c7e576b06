"""The one metrics writer: ``metrics.jsonl``, TensorBoard event files and PNG sample grids.

Only process 0 writes (house-style rule 10); on other processes every method is a no-op, so callers
never branch on the process index themselves.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tensorboardX import SummaryWriter


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard, images to PNG and TensorBoard.

  Args:
    logdir: directory for ``metrics.jsonl``, TensorBoard events and ``samples/`` PNGs.
    enabled: whether this process writes (default: ``jax.process_index() == 0``).
    tensorboard: also write TensorBoard event files (via ``tensorboardX``; no TensorFlow needed).
  """

  def __init__(self, logdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    if enabled is None:
      enabled = jax.process_index() == 0
    self.logdir = logdir
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      self._tb = SummaryWriter(logdir=os.path.join(logdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one JSON line ``{"step": step, "time": ..., **scalars}`` and TensorBoard scalars.

    Non-finite values are written as JSON ``null`` (never silently dropped) and as NaN to
    TensorBoard.
    """
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time()}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Saves each ``uint8 [H, W, 3]`` image as ``samples/{name}_{step:08d}.png`` and to TensorBoard.

    Returns:
      name → written PNG path (empty on non-writing processes).
    """
    if not self.enabled:
      return {}
    paths = {}
    out_dir = os.path.join(self.logdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
          f"write_images: {name!r} must be uint8 [H, W, C], got {image.dtype} {image.shape}"
        )
      path = os.path.join(out_dir, f"{name.replace('/', '_')}_{int(step):08d}.png")
      Image.fromarray(image).save(path)
      paths[name] = path
      if self._tb is not None:
        self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")
    return paths

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes text (e.g. the config) to TensorBoard."""
    if self._tb is not None:
      for k, v in texts.items():
        self._tb.add_text(k, v, global_step=int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images (uint8 or float in [-1, 1]) into one ``uint8`` grid image."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid: images must be [N, H, W, C], got shape {images.shape}")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def captioned_grid(
  images: np.ndarray,
  captions: Sequence[str],
  ncols: int | None = None,
  *,
  tile: int = 128,
  line_chars: int | None = None,
  max_lines: int = 3,
) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images with each caption printed under its image, as ``uint8``.

  Images are scaled to ``tile`` pixels wide (nearest neighbour for upscaling, so small samples stay
  crisp; bicubic when shrinking); captions are word-wrapped to ``line_chars`` characters (default:
  what fits the tile in Pillow's default font) and cut after ``max_lines`` lines with "…".
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"captioned_grid: images must be [N, H, W, C], got shape {images.shape}")
  if len(captions) != images.shape[0]:
    raise ValueError(f"captioned_grid: {images.shape[0]} images but {len(captions)} captions")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, _ = images.shape
  height = max(1, round(h * tile / w))
  line_chars = line_chars or max(4, tile // 6)  # the default bitmap font is ~6 px per character
  line_h, pad = 11, 4
  text_h = max_lines * line_h + pad
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  sheet = Image.new(
    "RGB", (ncols * (tile + pad) + pad, nrows * (height + text_h + pad) + pad), "white"
  )
  draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
  resample = Image.NEAREST if tile >= w else Image.BICUBIC
  for i in range(n):
    r, c = divmod(i, ncols)
    x, y = pad + c * (tile + pad), pad + r * (height + text_h + pad)
    img = Image.fromarray(images[i][..., :3] if images.shape[-1] >= 3 else images[i][..., 0])
    sheet.paste(img.convert("RGB").resize((tile, height), resample), (x, y))
    lines = textwrap.wrap(str(captions[i]), line_chars) or [""]
    if len(lines) > max_lines:
      lines = lines[:max_lines]
      lines[-1] = lines[-1][: line_chars - 3] + "..."
    for j, line in enumerate(lines):
      draw.text((x, y + height + 2 + j * line_h), _drawable(line, font), fill="black", font=font)
  return np.asarray(sheet)


def _drawable(text: str, font: Any) -> str:
  # Pillow without FreeType falls back to a Latin-1 bitmap font, which raises on other characters.
  if isinstance(font, ImageFont.FreeTypeFont):
    return text
  return text.encode("latin-1", "replace").decode("latin-1")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] to uint8 [0, 255] (clipping; rounding to nearest)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
