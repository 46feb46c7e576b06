"""Reading a folder of generated images and their prompts (what ``sample.py`` writes)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


def load_images_dir(images_dir: str | pathlib.Path) -> tuple[list[str], np.ndarray | list]:
  """Reads prompts and images from a directory that ``sample.py`` wrote (or a user made).

  Layouts, in order of preference: ``metadata.json`` with ``{"images": [{"file", "prompt"}, ...]}``;
  ``metadata.json`` with only ``{"prompts": [...]}`` paired with the sorted ``*.png`` files; or
  one ``NAME.txt`` prompt file beside each ``NAME.png``.

  Returns:
    ``(prompts, images)``: uint8 RGB images, one ``[N, H, W, 3]`` array when all have one size,
    else a list of ``[H, W, 3]`` arrays.

  Raises:
    ValueError: the directory has none of these layouts or counts differ.
  """
  root = pathlib.Path(images_dir)
  if not root.is_dir():
    raise ValueError(f"not a directory: {root}")
  meta_path = root / "metadata.json"
  pngs = sorted(root.glob("*.png"))
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if meta.get("images"):
      pairs = [(root / e["file"], e["prompt"]) for e in meta["images"]]
    elif "prompts" in meta:
      if len(meta["prompts"]) != len(pngs):
        raise ValueError(f"{meta_path}: {len(meta['prompts'])} prompts but {len(pngs)} PNG files")
      pairs = list(zip(pngs, meta["prompts"]))
    else:
      raise ValueError(f"{meta_path} has neither an 'images' nor a 'prompts' entry")
  else:
    missing = [p.name for p in pngs if not p.with_suffix(".txt").exists()]
    if not pngs or missing:
      raise ValueError(f"{root}: no metadata.json and PNGs without .txt prompts: {missing[:5]}")
    pairs = [(p, p.with_suffix(".txt").read_text().strip()) for p in pngs]
  images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in pairs]
  if len({im.shape for im in images}) == 1:
    images = np.stack(images)
  return [str(t) for _, t in pairs], images


def as_float_images(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
  """uint8 images (one size) → float32 ``[N, H, W, 3]`` in [-1, 1], the evaluators' input."""
  if not isinstance(images, np.ndarray):
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
      raise ValueError(f"images of several sizes {sorted(sizes)}; evaluate one size at a time")
    images = np.stack(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return np.asarray(images, np.float32)
