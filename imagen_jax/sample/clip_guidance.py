"""CLIP guidance (GLIDE §2.3, Nichol et al. 2022): classifier guidance with CLIP as the classifier.

GLIDE steers sampling towards a caption c with the gradient of a CLIP similarity,

    ε̂' = ε̂ − s σ_t ∇_{x_t} (f(x) · g(c)),

where f, g are the image and text embeddings (:func:`imagen_jax.diffusion.classifier_guidance` does
the shift; this module supplies log p(c | x) = cos(f(x), g(c))). GLIDE trains a *noised* CLIP that
reads x_t and t; with the public (clean) CLIPs the image scored is the model's x̂0 instead, either
whole or as random square cutouts resized to CLIP's input (the usual trick: the gradient of many
crops is less adversarial). The right scale depends on the CLIP and the model: sweep it
(``bench/clip_guidance.py``). It composes with classifier-free guidance, which runs first, on
every sampler.

Use it through the cascade::

    guide = ClipGuidance(CLIP.load("/ckpt/clip-vit-base-patch32"), scale=300.0, cutouts=8)
    images, _ = cascade.generate(prompts, guide=guide)

By default only the first stage is guided (GLIDE guided its 64² model; its upsampler ran
unguided); ``stages=`` names others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.clip import CLIP

Array = jax.Array
# (CLIP state, x_t [B, H, W, 3], t [B]) -> image features [B, P]: a noised CLIP (GLIDE's).
NoisedImageFn = Callable[[Any, Array, Array], Array]


def random_cutouts(key: Array, images: Array, num: int, size: int, cut_min: float) -> Array:
  """``num`` random square crops of each image, resized to ``size``²: ``[B·num, size, size, C]``.

  A crop's side is uniform in [cut_min, 1] × the shorter image side and its place uniform in the
  image; crop + resize is one differentiable ``scale_and_translate`` (static output shape).
  """
  b, h, w, c = images.shape
  k_side, k_y, k_x = jax.random.split(key, 3)
  side = min(h, w) * jax.random.uniform(k_side, (b, num), minval=cut_min, maxval=1.0)  # [B, n]
  top = jax.random.uniform(k_y, (b, num)) * (h - side)  # [B, n]
  left = jax.random.uniform(k_x, (b, num)) * (w - side)

  def crop(image, s, y, x):  # [H, W, C] → [size, size, C]: out[i] = image[i / scale − t / scale]
    scale = size / s
    return jax.image.scale_and_translate(
      image,
      (size, size, c),
      (0, 1),
      jnp.stack([scale, scale]),
      jnp.stack([-y * scale, -x * scale]),
      method="linear",
      antialias=True,
    )

  crops = jax.vmap(lambda im, s, y, x: jax.vmap(lambda *a: crop(im, *a))(s, y, x))(
    images, side, top, left
  )  # [B, n, size, size, C]
  return crops.reshape(b * num, size, size, c)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class _StageGuide:
  """The static part of one stage's CLIP guidance (``make_stage_sampler``'s ``guide``)."""

  image_fn: Callable[[Any, Array], Array]  # (state, images in [-1, 1]) -> normalised [B, P]
  input_size: int
  cutouts: int
  cut_min: float
  grad_through_model: bool
  noised_image_fn: NoisedImageFn | None

  def log_prob(self, data: dict, x_t: Array, t: Array, x0: Array) -> Array:
    """cos(f(x), g(c)) per example, ``[B]``: f of x_t (noised CLIP) or of x̂0 (clean CLIP)."""
    text = data["text"]  # [B, P], normalised
    if self.noised_image_fn is not None:
      feats = self.noised_image_fn(data["state"], x_t, t)
      feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
      return jnp.sum(feats * text, axis=-1)
    if self.cutouts == 0:
      return jnp.sum(self.image_fn(data["state"], x0) * text, axis=-1)
    # New crops at every step: fold the step's time into the key.
    key = jax.random.fold_in(
      jax.random.wrap_key_data(data["key"]), jnp.round(t[0] * 1e6).astype(jnp.int32)
    )
    crops = random_cutouts(key, x0, self.cutouts, self.input_size, self.cut_min)
    feats = self.image_fn(data["state"], crops).reshape(x0.shape[0], self.cutouts, -1)
    return jnp.mean(jnp.einsum("bnp,bp->bn", feats, text), axis=1)


class ClipGuidance:
  """CLIP guidance for :meth:`Cascade.generate` (``guide=``) and ``sample.py --clip_guidance``.

  Args:
    clip: the CLIP model (its text tower embeds the prompts once; its image tower scores x̂0).
    scale: guidance scale s (one for all guided stages, or stage name → s).
    cutouts: random crops per image per step (0 = the whole image, resized).
    cut_min: smallest crop side, as a fraction of the image side.
    stages: the stages to guide (default: the cascade's first stage, as GLIDE).
    grad_through_model: differentiate x̂0 through the U-Net too (exact, one more backward pass
      per step) instead of ∂x̂0/∂x_t = 1/α.
    noised_image_fn: a noised CLIP's image tower ``(clip.state, x_t, t) -> [B, P]`` (GLIDE's,
      user supplied); then x_t is scored instead of x̂0.
    seed: seed of the cutouts.
  """

  def __init__(
    self,
    clip: CLIP,
    scale: float | dict[str, float],
    *,
    cutouts: int = 0,
    cut_min: float = 0.5,
    stages: Sequence[str] | None = None,
    grad_through_model: bool = False,
    noised_image_fn: NoisedImageFn | None = None,
    seed: int = 0,
  ):
    scales = scale if isinstance(scale, dict) else None
    for name, s in (scales or {"scale": scale}).items():
      if not float(s) >= 0.0:
        raise ValueError(f"ClipGuidance: {name} must be >= 0, got {s}")
    if int(cutouts) < 0:
      raise ValueError(f"ClipGuidance: cutouts must be >= 0, got {cutouts}")
    if not 0.0 < float(cut_min) <= 1.0:
      raise ValueError(f"ClipGuidance: cut_min must be in (0, 1], got {cut_min}")
    self.clip, self.scale, self.seed = clip, scale, int(seed)
    self.stages = None if stages is None else tuple(stages)
    crop = clip.processing.crop or (clip.config.vision_config.image_size,) * 2
    self._static = _StageGuide(
      image_fn=clip.image_features_fn(preprocess=True, normalize=True),
      input_size=int(crop[0]),
      cutouts=int(cutouts),
      cut_min=float(cut_min),
      grad_through_model=bool(grad_through_model),
      noised_image_fn=noised_image_fn,
    )

  def describe(self) -> dict:
    """The settings, for ``metadata.json``."""
    g = self._static
    return {
      "clip": self.clip.source,
      "scale": self.scale,
      "cutouts": g.cutouts,
      "cut_min": g.cut_min,
      "stages": list(self.stages) if self.stages is not None else "first",
      "grad_through_model": g.grad_through_model,
      "seed": self.seed,
    }

  def check_stages(self, names: Sequence[str]) -> None:
    """Raises ``ValueError`` when ``stages`` (or the scale dict) names a stage not in ``names``."""
    asked = set(self.stages or ()) | set(self.scale if isinstance(self.scale, dict) else ())
    unknown = sorted(asked - set(names))
    if unknown:
      raise ValueError(f"ClipGuidance names unknown stages {unknown}; stages: {list(names)}")

  def for_stage(self, stage: str, index: int, prompts: Sequence[str]) -> tuple[Any, dict | None]:
    """``(static guide, data)`` for stage ``stage`` (the ``index``-th of the cascade), or
    ``(None, None)`` when it is not guided. ``data["rows"]`` has one row per prompt."""
    guided = stage in self.stages if self.stages is not None else index == 0
    scale = self.scale.get(stage, 0.0) if isinstance(self.scale, dict) else self.scale
    if not guided or float(scale) == 0.0:
      return None, None
    text = np.asarray(self.clip.embed_text(list(prompts), normalize=True), np.float32)  # [N, P]
    shared = {
      "state": self.clip.state,
      "scale": np.float32(scale),
      "key": np.asarray(jax.random.key_data(jax.random.key(self.seed + index))),
    }
    return self._static, {"rows": {"text": text}, "shared": shared}

  @staticmethod
  def merge(rows: dict, shared: dict) -> dict:
    """The sampler's ``guide_data``: per-row arrays (this chunk's) and shared ones in one dict."""
    return {**shared, **rows}
