"""Editing images with a trained cascade: inpainting, outpainting, inversion, variations,
interpolations and text diffs — one function per operation.

  from imagen_jax import Cascade
  from imagen_jax.edit import image_ops as ops

  cascade = Cascade.from_workdir("runs/shapes")
  out = ops.inpaint(cascade, image, mask, ["a small blue square at the top left"], resample=10)
  inv = ops.invert(cascade, image, ["a small red circle at the top left"], null_text=True)
  ops.reconstruct(cascade, inv, ["a small red circle at the top left"])      # ≈ image
  ops.variations(cascade, image, "a small red circle at the top left", num=4, stochasticity=0.5)
  ops.interpolate(cascade, image_a, image_b, "prompt a", "prompt b", frames=8)
  ops.text_diff(cascade, image, "a small red circle …", "a small blue circle …", eta=0.5)

Images are ``[N, H, W, 3]`` floats in [-1, 1] at any size (each stage takes its own resolution);
results are ``{stage: [N, H, W, 3]}`` like ``Cascade.__call__``. The background: GLIDE §4
(inpainting), RePaint (resampling), DALL-E 2 §3 (variations, interpolations, text diffs on the
inverted latent), Mokady et al. 2022 (null-text inversion).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imagen_jax.sample.cascade import Cascade, StageInputs
from imagen_jax.sample.inversion import CascadeInversion, StageInversion, invert_cascade, resize

Images = dict[str, np.ndarray]


def _batch(images: np.ndarray, n: int | None = None, name: str = "image") -> np.ndarray:
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{name} must be [N, H, W, 3] (or [H, W, 3]) in [-1, 1], got {x.shape}")
  if n is not None and x.shape[0] != n:
    raise ValueError(f"{name} has {x.shape[0]} rows for {n} prompts")
  return x


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """``[N, h, w]`` bool → ``[N, size, size]``: a pixel is generated if any part of it is."""
  m = np.asarray(mask, np.float32)[..., None].repeat(3, -1)
  return resize(m, size)[..., 0] > 1e-3


def inpaint(
  cascade: Cascade,
  image: np.ndarray,
  mask: np.ndarray,
  prompts: Sequence[str],
  *,
  seed: int = 0,
  resample: int = 1,
  jump: int = 1,
  settings: dict[str, dict] | None = None,
  negative_prompts: Sequence[str] | None = None,
  progress: bool = True,
) -> Images:
  """Regenerates the masked pixels of ``image`` under ``prompts`` through every stage.

  The base stage inpaints the image and mask resized to its resolution; each SR stage inpaints
  at its own resolution with the known pixels of ``image`` there, conditioned on the previous
  stage's inpainted output (the cascade's usual low-res input). Known pixels are returned
  exactly at every stage.

  Args:
    cascade: the cascade.
    image: ``[N, H, W, 3]`` in [-1, 1] (any size; N = len(prompts)).
    mask: ``[N, H, W]`` bool (same H, W), True = generate.
    prompts: what the whole image should show.
    seed: the noise seed.
    resample, jump: RePaint's resampling (r, j) for every stage (1, 1 = replacement only; the
      paper uses 10, 10).
    settings: per-stage sampler overrides.
    negative_prompts, progress: as for ``Cascade.__call__``.
  """
  n = len(prompts)
  image = _batch(image, n)
  mask = np.asarray(mask, bool)
  if mask.shape != image.shape[:3]:
    raise ValueError(
      f"mask must be [N, H, W] = {image.shape[:3]} (True = generate), got {mask.shape}"
    )
  inputs = {
    s.name: StageInputs(known=resize(image, s.image_size), mask=resize_mask(mask, s.image_size))
    for s in cascade.stages
  }
  settings = {
    s.name: {"resample": resample, "jump": jump, **(settings or {}).get(s.name, {})}
    for s in cascade.stages
  }
  images, _ = cascade.generate(
    list(prompts),
    seed=seed,
    settings=settings,
    negative_prompts=negative_prompts,
    inputs=inputs,
    progress=progress,
  )
  return images


def outpaint_canvas(
  image: np.ndarray, size: int, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """An enlarged canvas for outpainting: ``(canvas [N, size, size, 3], mask [N, size, size])``.

  The image shrinks (aspect kept, centred) into the canvas minus the given margins, in pixels of
  the ``size``² output; the rest of the canvas is gray and masked for generation.
  """
  image = _batch(image)
  if min(left, right, top, bottom) < 0 or left + right >= size or top + bottom >= size:
    raise ValueError(
      f"outpaint margins left={left} right={right} top={top} bottom={bottom} must be >= 0 and "
      f"leave room in the {size}² canvas"
    )
  w, h = size - left - right, size - top - bottom
  side = min(w, h)
  small = resize(image, side)
  x0 = left + (w - side) // 2
  y0 = top + (h - side) // 2
  n = image.shape[0]
  canvas = np.zeros((n, size, size, 3), np.float32)
  mask = np.ones((n, size, size), bool)
  canvas[:, y0 : y0 + side, x0 : x0 + side] = small
  mask[:, y0 : y0 + side, x0 : x0 + side] = False
  return canvas, mask


def invert(
  cascade: Cascade,
  image: np.ndarray,
  prompts: Sequence[str],
  *,
  seed: int = 0,
  null_text: bool = False,
  settings: dict[str, dict] | None = None,
  inner_steps: int = 10,
  learning_rate: float = 1e-2,
) -> CascadeInversion:
  """DDIM / DPM-Solver++ inversion of ``image`` through every stage; with ``null_text``, also
  the per-step null conditions that reconstruct it under each stage's guidance (Mokady et al.
  2022). See :func:`imagen_jax.sample.inversion.invert_cascade`."""
  return invert_cascade(
    cascade,
    _batch(image, len(prompts)),
    prompts,
    seed=seed,
    settings=settings,
    null_text=null_text,
    inner_steps=inner_steps,
    learning_rate=learning_rate,
  )


def _settings(inv: CascadeInversion, settings: dict[str, dict] | None, **extra) -> dict:
  return {k: {**(settings or {}).get(k, {}), **v, **extra} for k, v in inv.settings.items()}


def reconstruct(
  cascade: Cascade,
  inversion: CascadeInversion,
  prompts: Sequence[str],
  *,
  settings: dict[str, dict] | None = None,
  progress: bool = True,
) -> Images:
  """Samples the inverted latents back (with their null conditions when there are): the
  images that :func:`invert` was given, up to the inversion's error."""
  images, _ = cascade.generate(
    list(prompts),
    seed=inversion.seed,
    settings=_settings(inversion, settings),
    inputs=inversion.inputs(),
    progress=progress,
  )
  return images


def variations(
  cascade: Cascade,
  image: np.ndarray,
  prompt: str,
  *,
  num: int = 4,
  stochasticity: float = 0.5,
  seed: int = 0,
  settings: dict[str, dict] | None = None,
  progress: bool = True,
) -> Images:
  """``num`` variations of one image (DALL-E 2 §3): invert it, then sample from its latents with
  DDIM η = ``stochasticity`` (fresh noise per row; 0 reconstructs, 1 is ancestral sampling).
  Rows beyond the first use other noise, so the variations differ from each other."""
  if stochasticity < 0:
    raise ValueError(f"stochasticity (DDIM eta) must be >= 0, got {stochasticity}")
  inv = invert_cascade(cascade, _batch(image, 1), [prompt], seed=seed, settings=settings)
  inputs = {k: _repeat(v, num) for k, v in inv.stages.items()}
  images, _ = cascade.generate(
    [prompt] * num,
    seed=seed,
    settings=_settings(inv, settings, sampler="ddim", eta=float(stochasticity)),
    inputs=inputs,
    progress=progress,
  )
  return images


def _repeat(inv: StageInversion, k: int) -> StageInputs:
  """One inverted image's latent (and augmentation noise) for k rows."""
  eps = None if inv.aug_eps is None else np.repeat(inv.aug_eps[:1], k, 0)
  return StageInputs(latent=np.repeat(inv.latent[:1], k, 0), aug_eps=eps)


def _slerp_inputs(inv: StageInversion, alphas: np.ndarray) -> StageInputs:
  """Rows slerped from the first inverted image to the second (latents and augmentation noise,
  both standard Gaussian draws)."""

  def path(x):
    return None if x is None else np.concatenate([slerp(x[:1], x[1:2], float(a)) for a in alphas])

  return StageInputs(latent=path(inv.latent), aug_eps=path(inv.aug_eps))


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
  """Spherical interpolation of two latents (per row, flattened): keeps the norm of Gaussian
  noise, which linear interpolation shrinks in between."""
  fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
  cos = np.sum(fa * fb, 1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
  theta = np.arccos(np.clip(cos, -1.0, 1.0))[:, None]
  sin = np.sin(theta)
  safe = np.where(sin < 1e-6, 1.0, sin)
  wa = np.where(sin < 1e-6, 1.0 - alpha, np.sin((1.0 - alpha) * theta) / safe)
  wb = np.where(sin < 1e-6, alpha, np.sin(alpha * theta) / safe)
  return (wa * fa + wb * fb).reshape(a.shape).astype(np.float32)


def _embed(cascade: Cascade, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  emb, mask = cascade.text.encode_prompts(list(prompts))
  return np.asarray(emb, np.float32), np.asarray(mask)


def _mix_text(emb: np.ndarray, mask: np.ndarray, weights: np.ndarray):
  """Text conditions e_0 + w (e_1 − e_0) for each weight w: ``([K, L, D], [K, L])``. Padding is
  zero in both, so the mix is taken over the union of their tokens; at w = 0 and w = 1 the mask
  is that prompt's own, so the end points are exactly the two prompts' conditions."""
  w = np.asarray(weights, np.float32)[:, None, None]
  mixed = emb[0] + w * (emb[1] - emb[0])  # [K, L, D]
  masks = [mask[0] if x == 0 else mask[1] if x == 1 else mask[0] | mask[1] for x in weights]
  return mixed.astype(np.float32), np.stack(masks)


def interpolate(
  cascade: Cascade,
  image_a: np.ndarray,
  image_b: np.ndarray,
  prompt_a: str,
  prompt_b: str,
  *,
  frames: int = 8,
  seed: int = 0,
  settings: dict[str, dict] | None = None,
  progress: bool = True,
) -> Images:
  """``frames`` images from ``image_a`` to ``image_b`` (DALL-E 2 §3): both are inverted, then
  frame k samples the slerp of their latents at α = k / (frames − 1) (every stage) under the
  linear interpolation of their text embeddings. The end frames reconstruct the inputs."""
  if frames < 2:
    raise ValueError(f"frames must be >= 2, got {frames}")
  a, b = _batch(image_a, 1, "image_a"), _batch(image_b, 1, "image_b")
  if a.shape != b.shape:
    raise ValueError(f"image_a {a.shape[1:3]} and image_b {b.shape[1:3]} must have one size")
  images = np.concatenate([a, b])
  inv = invert_cascade(cascade, images, [prompt_a, prompt_b], seed=seed, settings=settings)
  emb, mask = _embed(cascade, [prompt_a, prompt_b])
  alphas = np.linspace(0.0, 1.0, frames, dtype=np.float32)
  inputs = {k: _slerp_inputs(v, alphas) for k, v in inv.stages.items()}
  frames_emb, frames_mask = _mix_text(emb, mask, alphas)
  labels = [f"{prompt_a} → {prompt_b} ({a:.2f})" for a in alphas]
  out, _ = cascade.generate(
    labels,
    seed=seed,
    settings=_settings(inv, settings),
    inputs=inputs,
    embeddings=(frames_emb, frames_mask),
    progress=progress,
  )
  return out


def text_diff(
  cascade: Cascade,
  image: np.ndarray,
  source_prompt: str,
  target_prompt: str,
  *,
  eta: float | Sequence[float] = 0.5,
  seed: int = 0,
  settings: dict[str, dict] | None = None,
  progress: bool = True,
) -> Images:
  """Edits ``image`` by a text diff (DALL-E 2 §3, in T5 space): the inverted latent is kept and
  the text embedding moves along e(target) − e(source) by ``eta`` (one image per value; 0
  reconstructs the input, 1 conditions on the target prompt)."""
  etas = np.atleast_1d(np.asarray(eta, np.float32))
  inv = invert_cascade(cascade, _batch(image, 1), [source_prompt], seed=seed, settings=settings)
  emb, mask = _embed(cascade, [source_prompt, target_prompt])
  k = len(etas)
  moved, moved_mask = _mix_text(emb, mask, etas)
  inputs = {name: _repeat(v, k) for name, v in inv.stages.items()}
  out, _ = cascade.generate(
    [f"{source_prompt} → {target_prompt} (η={e:.2f})" for e in etas],
    seed=seed,
    settings=_settings(inv, settings),
    inputs=inputs,
    embeddings=(moved, moved_mask),
    progress=progress,
  )
  return out
