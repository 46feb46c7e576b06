"""The one metrics writer: ``metrics.jsonl``, TensorBoard event files and PNG sample grids.

Only process 0 writes (house-style rule 10); on other processes every method is a no-op, so callers
never branch on the process index themselves.
"""

from __future__ import annotations

import functools
import json
import math
import os
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


def image_grid(
  images: np.ndarray,
  ncols: int | None = None,
  pad: int = 2,
  *,
  captions: Sequence[str] | None = None,
  max_lines: int | None = None,
) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images (uint8 or float in [-1, 1]) into one ``uint8`` grid image.

  Args:
    images: the tiles, in row-major order.
    ncols: tiles per row (default: a square-ish grid).
    pad: white pixels between and around the tiles.
    captions: one text per image, printed under its tile in black on white with Pillow's
      default font, word-wrapped to the tile's width (an empty one leaves its band blank). Every
      row gets a band as tall as the longest wrapped caption, so the tiles stay a regular grid
      and are copied pixel for pixel.
    max_lines: cut longer captions to this many lines, ending in "..." (default: no limit).

  Returns:
    The grid, ``uint8 [rows * (H + band + pad) + pad, ncols * (W + pad) + pad, C]``.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid: images must be [N, H, W, C], got shape {images.shape}")
  if captions is not None and len(captions) != images.shape[0]:
    raise ValueError(f"image_grid: {images.shape[0]} images but {len(captions)} captions")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  font = _font()
  lines = [_wrap(str(t), font, w, max_lines) for t in captions] if captions is not None else []
  line_h = _line_height(font)
  most = max((len(x) for x in lines), default=0)
  band = most * line_h + _BAND_MARGIN if most else 0
  grid = np.full((nrows * (h + band + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  text = Image.new("L", (grid.shape[1], grid.shape[0]), 255) if most else None
  draw = ImageDraw.Draw(text) if text is not None else None
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + band + pad), pad + col * (w + pad)
    grid[y : y + h, x : x + w] = images[i]
    for j, line in enumerate(lines[i] if draw is not None else ()):
      draw.text((x, y + h + _BAND_MARGIN // 2 + j * line_h), line, fill=0, font=font)
  if text is not None:
    # The text is drawn once, in grey levels, then darkens the colour channels of the bands
    # only (the canvas is white over the tiles): tiles and any alpha channel are left as they are.
    colour = 1 if c <= 2 else 3  # L / LA: channel 0; RGB / RGBA: the first three
    grid[..., :colour] = np.minimum(grid[..., :colour], np.asarray(text)[..., None])
  return grid


def captioned_grid(
  images: np.ndarray,
  captions: Sequence[str],
  ncols: int | None = None,
  *,
  tile: int = 128,
  max_lines: int | None = 3,
) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images at ``tile`` pixels wide with each caption under its image.

  Images are scaled to ``tile`` pixels wide (nearest neighbour for upscaling, so small samples stay
  crisp; bicubic when shrinking) and laid out by :func:`image_grid` with ``captions``, so a
  32² sample gets a caption band as wide as 128 pixels of text. Captions are cut after
  ``max_lines`` lines with "..." (``None``: never). Always RGB ``uint8``.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"captioned_grid: images must be [N, H, W, C], got shape {images.shape}")
  if len(captions) != images.shape[0]:
    raise ValueError(f"captioned_grid: {images.shape[0]} images but {len(captions)} captions")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  _, h, w, _ = images.shape
  size = (tile, max(1, round(h * tile / w)))
  resample = Image.NEAREST if tile >= w else Image.BICUBIC
  tiles = [
    np.asarray(
      Image.fromarray(im[..., :3] if im.shape[-1] >= 3 else im[..., 0])
      .convert("RGB")
      .resize(size, resample)
    )
    for im in images
  ]
  return image_grid(np.stack(tiles), ncols, pad=4, captions=captions, max_lines=max_lines)


_BAND_MARGIN = 4  # white rows in a caption band besides its text: half above, half below


@functools.cache
def _font() -> Any:
  # Pillow's built-in font: no font file to ship or find, the same glyphs on every machine with
  # the same Pillow (a FreeType build gets its embedded Aileron, else a bitmap font).
  return ImageFont.load_default()


def _line_height(font: Any) -> int:
  return int(font.getbbox("Ág|y")[3]) + 1  # an accent's top to a descender's bottom


def _wrap(text: str, font: Any, width: int, max_lines: int | None = None) -> list[str]:
  """Greedy word wrap to ``width`` pixels; a word wider than a line is split between letters."""
  lines: list[str] = []
  line = ""
  for word in _drawable(text, font).split():
    while font.getlength(word) > width:
      if line:
        lines.append(line)
        line = ""
      cut = _fits(word, font, width)
      lines.append(word[:cut])
      word = word[cut:]
    joined = f"{line} {word}" if line else word
    if font.getlength(joined) <= width:
      line = joined
    else:
      lines.append(line)
      line = word
  if line:
    lines.append(line)
  if max_lines is not None and len(lines) > max_lines:
    lines = lines[:max_lines]
    last = lines[-1]
    while last and font.getlength(last + "...") > width:
      last = last[:-1]
    lines[-1] = last.rstrip() + "..."
  return lines


def _fits(text: str, font: Any, width: int) -> int:
  """The longest prefix of ``text`` (at least one character) no wider than ``width`` pixels."""
  k = 1
  while k < len(text) and font.getlength(text[: k + 1]) <= width:
    k += 1
  return k


def _drawable(text: str, font: Any) -> str:
  # Pillow without FreeType falls back to a Latin-1 bitmap font, which raises on other characters.
  if isinstance(font, ImageFont.FreeTypeFont):
    return text
  return text.encode("latin-1", "replace").decode("latin-1")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] to uint8 [0, 255] (clipping; rounding to nearest)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
