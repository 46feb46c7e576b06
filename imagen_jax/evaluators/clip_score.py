"""CLIP score (Hessel et al. 2021, as torchmetrics computes it) with the JAX CLIP.

For images I_n and their captions C_n, with E the L2-normalised CLIP embeddings::

    CLIPScore = max(100 · mean_n cos(E_{I_n}, E_{C_n}), 0)

exactly as ``torchmetrics.multimodal.CLIPScore`` computes it (its docs write the floor per pair;
its code floors the mean, which is what the numbers people report come from). Images go through
the CLIP image processor (shorter side bicubic, centre crop, normalise), captions through the
CLIP tokenizer, truncated to the text tower's length. The resize is PIL's bicubic, as CLIP was
trained with (transformers' ``CLIPImageProcessorPil``); transformers 5's default
``CLIPImageProcessor``, which torchmetrics uses, resizes with torchvision instead, so its scores
differ in the second decimal (≤ 0.05 in tests). The Imagen paper reports the CLIP score of
zero-shot COCO samples (Fig. A.11) with a ViT-L/14.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imagen_jax.clip import CLIP
from imagen_jax.metrics import to_uint8


def pair_scores(
  clip: CLIP,
  images: np.ndarray | Sequence[np.ndarray],
  prompts: Sequence[str],
  batch_size: int = 32,
) -> np.ndarray:
  """100 · cos(E_I, E_C) per (image, prompt) pair, ``[N]`` (not floored).

  Args:
    clip: the CLIP model.
    images: ``[N, H, W, 3]`` uint8, or floats in [-1, 1] (sampler output); or a list of uint8
      images of any sizes.
    prompts: N captions.
    batch_size: images / captions per CLIP forward pass.

  Raises:
    ValueError: counts differ or nothing is given.
  """
  if len(images) != len(prompts):
    raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
  if len(prompts) == 0:
    raise ValueError("clip_score: no images to score")
  if isinstance(images, np.ndarray) and images.dtype != np.uint8:
    images = to_uint8(images)  # the processor's input, as torchmetrics feeds it
  scores = []
  for i in range(0, len(prompts), batch_size):
    img = clip.embed_images(images[i : i + batch_size], normalize=True)  # [b, P]
    txt = clip.embed_text(list(prompts[i : i + batch_size]), normalize=True)  # [b, P]
    scores.append(100.0 * np.sum(np.asarray(img, np.float64) * np.asarray(txt, np.float64), -1))
  return np.concatenate(scores)


def clip_score(
  clip: CLIP,
  images: np.ndarray | Sequence[np.ndarray],
  prompts: Sequence[str],
  batch_size: int = 32,
) -> float:
  """max(100 · mean cos(E_I, E_C), 0) over the pairs (torchmetrics' ``CLIPScore``)."""
  return float(max(pair_scores(clip, images, prompts, batch_size).mean(), 0.0))


class ClipScoreEvaluator:
  """The ``clip_score`` evaluator: CLIP score of images vs the prompts they were sampled for."""

  name = "clip_score"
  prompts = None

  def __init__(self, clip: str | CLIP, batch_size: int = 32):
    """Args:
    clip: a CLIP checkpoint dir (Hugging Face ``CLIPModel`` format) or hub id, or a loaded CLIP.
    batch_size: pairs per CLIP forward pass.
    """
    self.clip = clip if isinstance(clip, CLIP) else CLIP.load(clip)
    self.batch_size = int(batch_size)

  def run(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    return {"clip_score": clip_score(self.clip, images, prompts, self.batch_size)}
