"""Sampling one cascade stage: classifier-free guidance + thresholding around a U-Net, in one jit.

Used by the trainer's periodic evals and by the cascade pipeline. The whole sampling loop of a stage
is one compiled program (the diffusion samplers are ``fori_loop``s); only array *values* change
between calls, so new prompts or seeds never recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax import diffusion
from imagen_jax.diffusion import SAMPLERS, THRESHOLD_MODES


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Per-stage sampling settings.

  Attributes:
    sampler: ``ancestral`` (Imagen's), ``ddim`` or ``dpmpp_2m`` (DPM-Solver++(2M)).
    steps: number of denoising steps.
    guidance: classifier-free guidance weight w (Imagen eq. 2; 1 = no guidance).
    thresholding: ``none``, ``static`` or ``dynamic`` (Imagen §2.3).
    percentile: dynamic-thresholding percentile p.
    aug_level: noise-augmentation level of the low-res input (SR stages; Imagen: 0.1-0.3).
    eta: DDIM stochasticity (0 = deterministic).
  """

  sampler: str = "dpmpp_2m"
  steps: int = 25
  guidance: float = 5.0
  thresholding: str = "dynamic"
  percentile: float = 99.5
  aug_level: float = 0.2
  eta: float = 0.0

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"sampler={self.sampler!r}; choose one of {SAMPLERS}")
    if self.thresholding not in THRESHOLD_MODES:
      raise ValueError(f"thresholding={self.thresholding!r}; choose one of {THRESHOLD_MODES}")
    if int(self.steps) < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.guidance < 0:
      raise ValueError(f"guidance must be >= 0, got {self.guidance}")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
    if not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f"aug_level must be in [0, 1], got {self.aug_level}")

  @classmethod
  def from_config(cls, cfg: Any) -> SamplerSettings:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in fields})


def make_stage_sampler(
  apply_fn: Callable,
  schedule: Any,
  pred_type: str,
  settings: SamplerSettings,
  *,
  progress_fn: Callable | None = None,
  progress_x0: bool = False,
  control: Any = None,
) -> Callable:
  """Returns a jitted ``sample(params, rng, text_emb, text_mask, null_emb, null_mask, x_T,
  lowres=None, control_data=None, t_start=1.0) -> x0 [B, H, W, C]``.

  ``rng`` is a key or its raw data (``jax.random.key_data``: a plain uint32 array, which can be
  placed on a multi-process mesh like any other input).

  ``null_emb``/``null_mask`` condition the unconditional branch: zeros + all-false mask (the
  training-time text dropout) or a negative prompt's embedding. ``t_start < 1`` starts from a
  noised image (img2img); it is static (each strength compiles once). ``progress_fn(step, x0)``
  is called at every step from the device (``x0`` is None unless ``progress_x0``).

  ``control`` (static, hashable; e.g. a prompt-to-prompt ``StageEdit``) steers the sampling with
  arrays ``control_data``: ``control.init_state(data, batch)`` is carried through the loop,
  ``control.controller(step, state, data, cond_batch=B)`` is the U-Net's attention controller at
  every step (it sees the ``[cond; uncond]`` batch under guidance; ``cond_batch`` says where the
  conditional half ends) and its ``outputs()`` are the next state, and
  ``control.after_step(step, x_next, state, data)`` post-processes every step. The batch rows
  share their noise (starting noise is the caller's; the augmentation and per-step noise are
  drawn once per step). The sampler then returns ``(x0, state)``.
  """

  def sample(
    params,
    rng,
    text_emb,
    text_mask,
    null_emb,
    null_mask,
    x_T,
    lowres=None,
    control_data=None,
    t_start=1.0,
  ):
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw key data (uint32 [2])
      rng = jax.random.wrap_key_data(rng)
    rng_aug, rng_sample = jax.random.split(rng)
    batch = x_T.shape[0]
    extra = {}
    if lowres is not None:
      eps = None
      if control is not None:  # one augmentation noise row for the whole batch
        eps = jax.random.normal(jax.random.fold_in(rng_aug, 1), (1, *lowres.shape[1:]))
      lowres, aug_logsnr = diffusion.noise_augment(
        rng_aug, lowres, schedule, jnp.full((batch,), settings.aug_level), eps=eps
      )
      extra = {"lowres": lowres, "aug_logsnr": aug_logsnr}
    cond = (text_emb, text_mask, extra)
    uncond = (null_emb.astype(text_emb.dtype), null_mask, extra)

    def guided_with(controller):
      def model_fn(x_t, t, cond):
        emb, mask, kw = cond
        out = apply_fn(params, x_t, schedule(t), emb, mask, controller=controller, **kw)
        out = out[0] if controller is not None else out  # (out, controller.outputs())
        return out.astype(jnp.float32)

      if settings.guidance == 1.0:
        # w = 1 is the conditional model alone: skip the doubled batch.
        return lambda x_t, t: model_fn(x_t, t, cond)
      return diffusion.classifier_free_guidance(model_fn, cond, uncond, settings.guidance)

    kwargs = dict(
      sampler=settings.sampler,
      steps=int(settings.steps),
      schedule=schedule,
      pred_type=pred_type,
      thresholding=settings.thresholding,
      percentile=settings.percentile,
      eta=settings.eta,
      t_start=t_start,
      progress_fn=progress_fn,
      progress_x0=progress_x0,
    )
    if control is None:
      return diffusion.sample(guided_with(None), x_T, rng_sample, **kwargs)

    def controlled_fn(x_t, t, step, state):
      controller = control.controller(step, state, control_data, cond_batch=batch)
      pred = guided_with(controller)(x_t, t)
      return pred, controller.outputs()

    return diffusion.sample(
      controlled_fn,
      x_T,
      rng_sample,
      state=control.init_state(control_data, batch),
      after_step=lambda step, x, state: control.after_step(step, x, state, control_data),
      shared_noise=True,
      **kwargs,
    )

  return jax.jit(sample, static_argnames=("t_start",))
