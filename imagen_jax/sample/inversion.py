"""Inverting images through a cascade: each stage's latent (and null-text conditions).

  inv = invert_cascade(cascade, images, ["a small red circle at the top left"], null_text=True)
  images = cascade.generate(prompts, inputs=inv.inputs(), settings=inv.settings)[0]  # ≈ images

Every stage is inverted on its own resolution of the image: the base on the image resized to
its size, each SR stage on the image at its size with the image at its low-res size as input
(what a perfect earlier stage would hand it), augmented exactly as sampling with the same seed
augments it. The deterministic sampler of each stage (DDIM η = 0 or DPM-Solver++; an ancestral
stage is inverted and resampled with DDIM) then regenerates the image from the latents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from imagen_jax import sharding
from imagen_jax.sample.batching import batch_size, chunk_rng, to_host
from imagen_jax.sample.cascade import Cascade, StageInputs, resize
from imagen_jax.sample.stage import (
  SamplerSettings,
  make_null_text_optimizer,
  make_stage_inverter,
)


@dataclasses.dataclass
class StageInversion:
  """One stage's inversion of N images.

  Attributes:
    latent: ``[N, H, W, 3]`` x_1 that regenerates the image.
    trajectory: ``[steps + 1, N, H, W, 3]``: the pivots (x_{t_i} in sampling order).
    null_emb: ``[steps, N, L, D]`` per-step null conditions (null-text inversion) or None.
    null_mask: ``[N, L]`` the null conditions' mask (the prompt's), or None.
    aug_eps: ``[N, h, w, 3]`` the low-res input's augmentation noise (SR stages; at the size
      it is added: the low-res size, or the stage's for DeepFloyd IF), or None.
  """

  latent: np.ndarray
  trajectory: np.ndarray
  null_emb: np.ndarray | None = None
  null_mask: np.ndarray | None = None
  aug_eps: np.ndarray | None = None


@dataclasses.dataclass
class CascadeInversion:
  """Every stage's inversion, with the settings and seed that regenerate the images.

  Attributes:
    stages: stage name → :class:`StageInversion`.
    settings: stage name → sampler overrides (deterministic sampler, η = 0) for ``generate``.
    seed: the seed whose noise augmentation the SR inversions used.
  """

  stages: dict[str, StageInversion]
  settings: dict[str, dict]
  seed: int

  def inputs(self, null_text: bool = True) -> dict[str, StageInputs]:
    """``Cascade.generate(inputs=...)`` that start every stage from its latent (with the
    per-step null conditions when there are, and ``null_text``)."""
    out = {}
    for name, inv in self.stages.items():
      use = null_text and inv.null_emb is not None
      out[name] = StageInputs(
        latent=inv.latent,
        null_emb=inv.null_emb if use else None,
        null_mask=inv.null_mask if use else None,
        aug_eps=inv.aug_eps,
      )
    return out


def inversion_settings(settings: SamplerSettings) -> dict:
  """The overrides that make a stage's sampler deterministic and invertible."""
  sampler = settings.sampler if settings.sampler in ("ddim", "dpmpp_2m") else "ddim"
  return {"sampler": sampler, "eta": 0.0, "noise_scale": 1.0}


def invert_cascade(
  cascade: Cascade,
  images: np.ndarray,
  prompts: Sequence[str],
  *,
  seed: int = 0,
  settings: dict[str, dict] | None = None,
  embeddings: tuple[np.ndarray, np.ndarray] | None = None,
  null_text: bool = False,
  inner_steps: int = 10,
  learning_rate: float = 1e-2,
  stages: Sequence[str] | None = None,
) -> CascadeInversion:
  """Inverts ``images`` through every stage of ``cascade`` (or ``stages``).

  Args:
    cascade: the cascade.
    images: ``[N, H, W, 3]`` in [-1, 1], any size (resized to each stage's).
    prompts: N captions the images are inverted under (``""`` = unconditional).
    seed: the seed ``generate`` will be called with (SR augmentation noise depends on it).
    settings: per-stage sampler overrides (steps, guidance, ...); the sampler is made
      deterministic (DDIM unless the stage uses DPM-Solver++).
    embeddings: ``(emb, mask)`` instead of encoding ``prompts``.
    null_text: also run null-text inversion for the stage's guidance weight (Mokady et al.).
    inner_steps, learning_rate: the null-text optimisation per step.
    stages: which stages to invert, in cascade order from the first (default: all).

  Returns:
    A :class:`CascadeInversion`.
  """
  images = np.asarray(images, np.float32)
  n = len(prompts)
  if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
    raise ValueError(
      f"images must be [{n}, H, W, 3] in [-1, 1] (one per prompt), got {images.shape}"
    )
  if n > cascade.max_batch:
    raise ValueError(
      f"inversion runs in one batch: {n} images exceed max_batch={cascade.max_batch}"
    )
  names = [s.name for s in cascade.stages]
  run = list(stages or names)
  if run != names[: len(run)]:
    raise ValueError(f"stages {run} must be the first stages of the cascade, in order: {names}")
  settings = dict(settings or {})
  if embeddings is None:
    emb, mask = (to_host(a) for a in cascade.text.encode_prompts(list(prompts)))
  else:
    emb, mask = (np.asarray(a) for a in embeddings)
  bucket = batch_size(n, cascade.max_batch, cascade.batch_shards)
  # Null-text inversion starts from the unconditional branch's condition: the null prompt's
  # states where the cascade has one (DeepFloyd IF: ""), else zeros under the prompt's mask.
  if null_text and cascade.null_prompt is not None:
    null_start = tuple(map(to_host, cascade.text.encode_prompts([cascade.null_prompt] * n)))
  else:
    null_start = (np.zeros_like(emb), np.asarray(mask))

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], bucket - n, axis=0)]) if bucket > n else x

  def put(x, batch=True):
    where = (
      sharding.batch_sharding(cascade.mesh, x.ndim) if batch else sharding.replicated(cascade.mesh)
    )
    return cascade._put(np.asarray(x), where)

  key = jax.random.key(seed)
  out, used = {}, {}
  for si, stage in enumerate(cascade.stages[: len(run)]):
    overrides = {**settings.get(stage.name, {})}
    cfg = dataclasses.replace(stage.settings, **overrides)
    overrides.update(inversion_settings(cfg))
    cfg = dataclasses.replace(cfg, **overrides)
    used[stage.name] = overrides
    x0 = put(pad(resize(images, stage.image_size)))
    lowres, aug_eps, eps = None, None, None
    if stage.lowres_size is not None:
      # The U-Net's low-res input as sampling gives it (DeepFloyd IF: upscaled first).
      low = np.asarray(
        stage.model.prepare_lowres(resize(images, stage.lowres_size), stage.image_size)
      )
      lowres = put(pad(low))
      # One augmentation noise per image (at the size it is added), kept with the latent:
      # sampling must see it again.
      key_aug = jax.random.fold_in(key, 2_000_003 + si)
      eps = np.asarray(jax.random.normal(key_aug, low.shape))
      aug_eps = put(pad(eps))
    rng = put(chunk_rng(key, si, 0), batch=False)
    e, m = put(pad(emb)), put(pad(mask))
    programs = cascade.__dict__.setdefault("_inversion_programs", {})  # compiled once per cfg
    with sharding.use_rules(cascade.mesh, cascade.rules):
      key_i = ("invert", stage.name, cfg)
      if key_i not in programs:
        programs[key_i] = make_stage_inverter(
          stage.model.apply, stage.schedule, stage.pred_type, cfg
        )
      latent, traj = programs[key_i](stage.params, rng, e, m, x0, lowres, aug_eps)
      inv = StageInversion(to_host(latent)[:n], to_host(traj)[:, :n], aug_eps=eps)
      if null_text and cfg.guidance != 1.0:
        key_n = ("null_text", stage.name, cfg, int(inner_steps), float(learning_rate))
        if key_n not in programs:
          programs[key_n] = make_null_text_optimizer(
            stage.model.apply,
            stage.schedule,
            stage.pred_type,
            cfg,
            inner_steps=inner_steps,
            learning_rate=learning_rate,
          )
        null0, null_mask = null_start
        nulls, _ = programs[key_n](
          stage.params, rng, e, m, put(pad(null0)), put(pad(null_mask)), traj, lowres, aug_eps
        )
        inv.null_emb = to_host(nulls)[:, :n]
        inv.null_mask = np.asarray(null_mask)[:n]
    out[stage.name] = inv
  return CascadeInversion(out, used, seed)
