"""Per-word cross-attention maps as arrays and pictures (overlays, and a row like P2P's figures)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from imagen_jax.edit.tokens import TokenizedPrompt
from imagen_jax.metrics import to_uint8


def word_maps(maps: np.ndarray, prompt: TokenizedPrompt) -> dict[str, np.ndarray]:
  """Sums a prompt's token maps ``[r, r, L]`` into one map per word, ``{word: [r, r]}``.

  Words repeated in the prompt get a key per occurrence (``"a"``, ``"a#2"``); words cut by
  truncation are left out.
  """
  out: dict[str, np.ndarray] = {}
  for word, span in zip(prompt.words, prompt.spans):
    if not span:
      continue
    key, k = word, 2
    while key in out:
      key, k = f"{word}#{k}", k + 1
    out[key] = np.asarray(maps)[..., list(span)].sum(-1)
  return out


def _heat(m: np.ndarray, size: int) -> np.ndarray:
  """A map normalised to [0, 1] and resized to ``size``², as an RGB heat colouring [s, s, 3]."""
  m = np.asarray(m, np.float32)
  m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
  im = Image.fromarray(np.uint8(np.round(m * 255)), "L").resize((size, size), Image.BICUBIC)
  v = np.asarray(im, np.float32) / 255.0
  # A small "inferno"-like ramp: black → red → yellow → white.
  rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
  return rgb


def overlay(image: np.ndarray, word_map: np.ndarray, *, alpha: float = 0.6) -> Image.Image:
  """One word's map laid over ``image`` (``[H, W, 3]`` in [-1, 1]) as a PIL image."""
  img = to_uint8(np.asarray(image)).astype(np.float32) / 255.0
  heat = _heat(word_map, img.shape[0])
  mixed = (1 - alpha) * img + alpha * heat
  return Image.fromarray(np.uint8(np.round(np.clip(mixed, 0, 1) * 255)))


def attention_row(
  image: np.ndarray, maps: dict[str, np.ndarray], *, size: int = 96, caption_height: int = 14
) -> Image.Image:
  """The image followed by one captioned overlay per word, in one row (the paper's Fig. 4 style)."""
  tiles = [Image.fromarray(to_uint8(np.asarray(image))).resize((size, size), Image.NEAREST)]
  captions = ["image"]
  for word, m in maps.items():
    tiles.append(overlay(image, m).resize((size, size), Image.BICUBIC))
    captions.append(word)
  row = Image.new("RGB", (size * len(tiles), size + caption_height), "white")
  draw = ImageDraw.Draw(row)
  for i, (tile, text) in enumerate(zip(tiles, captions)):
    row.paste(tile, (i * size, caption_height))
    draw.text((i * size + 2, 1), text[: max(1, size // 6)], fill="black")
  return row
