"""Sampling one cascade stage: classifier-free guidance + thresholding around a U-Net, in one jit.

Used by the trainer's periodic evals and by the cascade pipeline. The whole sampling loop of a stage
is one compiled program (the diffusion samplers are ``fori_loop``s); only array *values* change
between calls, so new prompts or seeds never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax import diffusion, kernels
from imagen_jax.diffusion import ALL_SAMPLERS, SPACINGS, THRESHOLD_MODES
from imagen_jax.diffusion.inpaint import check_resample

SPACING_CHOICES = ("auto", *SPACINGS)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Per-stage sampling settings.

  Attributes:
    sampler: ``ancestral`` (Imagen's), ``ddim``, ``dpmpp_2m`` (DPM-Solver++(2M)),
      ``dpmpp_3m`` or ``dpmpp_2m_sde`` (:data:`imagen_jax.diffusion.ALL_SAMPLERS`).
    steps: number of denoising steps.
    guidance: classifier-free guidance weight w (Imagen eq. 2; 1 = no guidance).
    thresholding: ``none``, ``static`` or ``dynamic`` (Imagen §2.3).
    percentile: dynamic-thresholding percentile p.
    aug_level: noise-augmentation level of the low-res input (SR stages; Imagen: 0.1-0.3).
    eta: DDIM stochasticity (0 = deterministic).
    resample: inpainting only: RePaint's resampling count r (1 = replacement only).
    jump: inpainting only: RePaint's jump length, in steps.
    noise_scale: the starting noise's scale (GLIDE's upsampler "temperature": 0.997 for its
      SR stage; 1 = the prior).
    threshold_max: dynamic thresholding's cap on its scale s (DeepFloyd IF: 1.5, with
      ``percentile=95``); None = no cap (Imagen).
    spacing: where the steps go: ``uniform`` in t, ``logsnr``, ``karras``
      (:mod:`imagen_jax.diffusion.spacing`) or ``auto``: uniform in log-SNR for the DPM-Solver++
      samplers (they keep a narrow mode's spread from 20-25 steps, where a uniform grid needs
      ~130; bench/RESULTS.md "Step spacing"), uniform in t for the others (DDIM is best there;
      the ancestral sampler's grid is DeepFloyd IF's).
    percentile_impl: the dynamic-thresholding percentile's kernel (``auto``, ``bisect``,
      ``sort``; :mod:`imagen_jax.kernels`).
  """

  sampler: str = "dpmpp_2m"
  steps: int = 25
  guidance: float = 5.0
  thresholding: str = "dynamic"
  percentile: float = 99.5
  aug_level: float = 0.2
  eta: float = 0.0
  resample: int = 1
  jump: int = 1
  noise_scale: float = 1.0
  threshold_max: float | None = None
  spacing: str = "auto"
  percentile_impl: str = kernels.AUTO

  def __post_init__(self):
    if self.sampler not in ALL_SAMPLERS:
      raise ValueError(f"sampler={self.sampler!r}; choose one of {ALL_SAMPLERS}")
    if self.spacing not in SPACING_CHOICES:
      raise ValueError(f"spacing={self.spacing!r}; choose one of {SPACING_CHOICES}")
    kernels.check_choice("percentile", self.percentile_impl, "percentile_impl")
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
    check_resample(self.resample, self.jump)
    if not self.noise_scale > 0.0:
      raise ValueError(f"noise_scale must be > 0, got {self.noise_scale}")
    if self.threshold_max is not None and not self.threshold_max >= 1.0:
      raise ValueError(f"threshold_max must be >= 1 or None, got {self.threshold_max}")

  @property
  def grid_spacing(self) -> str:
    """The spacing the sampler runs with (``auto`` resolved by sampler)."""
    if self.spacing != "auto":
      return self.spacing
    return "logsnr" if self.sampler.startswith("dpmpp") else "uniform"

  @classmethod
  def from_config(cls, cfg: Any) -> SamplerSettings:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in fields})


def _conditioning(
  schedule, settings, rng, text_emb, text_mask, null_emb, null_mask, lowres, shared, aug_eps=None
):
  """``(rng_sample, cond, uncond)``: the U-Net's conditions, with the low-res input noise-augmented
  at ``settings.aug_level`` (Imagen §2.4) from ``rng`` exactly as sampling does, so that an
  inversion and the sampling that undoes it see the same augmented input."""
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw key data (uint32 [2])
    rng = jax.random.wrap_key_data(rng)
  rng_aug, rng_sample = jax.random.split(rng)
  extra = {}
  if lowres is not None:
    batch = lowres.shape[0]
    eps = aug_eps  # given by an inversion, which must be undone with the same noise
    if eps is None and shared:  # one augmentation noise row for the whole batch
      eps = jax.random.normal(jax.random.fold_in(rng_aug, 1), (1, *lowres.shape[1:]))
    lowres, aug_logsnr = diffusion.noise_augment(
      rng_aug, lowres, schedule, jnp.full((batch,), settings.aug_level), eps=eps
    )
    extra = {"lowres": lowres, "aug_logsnr": aug_logsnr}
  uncond = None if null_emb is None else (null_emb.astype(text_emb.dtype), null_mask, extra)
  return rng_sample, (text_emb, text_mask, extra), uncond


def _model_fn(apply_fn, params, schedule, controller=None, learned_variance=False):
  """``model_fn(x_t, t, cond) -> pred`` (float32) of the U-Net with ``cond = (emb, mask, kw)``.

  A U-Net with a learned variance (DeepFloyd IF: 2C output channels) keeps it only with
  ``learned_variance`` (the ancestral sampler steps with it); otherwise the prediction alone.
  """

  def model_fn(x_t, t, cond):
    emb, mask, kw = cond
    out = apply_fn(params, x_t, schedule(t), emb, mask, controller=controller, **kw)
    out = out[0] if controller is not None else out  # (out, controller.outputs())
    if not learned_variance:
      out = out[..., : x_t.shape[-1]]
    return out.astype(jnp.float32)

  return model_fn


def make_stage_sampler(
  apply_fn: Callable,
  schedule: Any,
  pred_type: str,
  settings: SamplerSettings,
  *,
  progress_fn: Callable | None = None,
  progress_x0: bool = False,
  control: Any = None,
  guide: Any = None,
  learned_variance: bool = False,
) -> Callable:
  """Returns a jitted ``sample(params, rng, text_emb, text_mask, null_emb, null_mask, x_T,
  lowres=None, control_data=None, known=None, mask=None, aug_eps=None, guide_data=None,
  t_start=1.0) -> x0``.

  ``rng`` is a key or its raw data (``jax.random.key_data``: a plain uint32 array, which can be
  placed on a multi-process mesh like any other input).

  ``null_emb``/``null_mask`` condition the unconditional branch: zeros + all-false mask (the
  training-time text dropout) or a negative prompt's embedding; ``null_emb`` of shape
  ``[steps, B, L, D]`` gives every step its own (null-text inversion). ``t_start < 1`` starts
  from a noised image (img2img); it is static (each strength compiles once).
  ``progress_fn(step, x0)`` is called at every step from the device (``x0`` is None unless
  ``progress_x0``). ``known`` ``[B, H, W, C]`` and ``mask`` ``[B, H, W]`` (True = generate)
  inpaint: the pixels outside the mask follow the forward process of ``known`` and end equal
  to it, with ``settings.resample`` / ``jump`` (RePaint). ``aug_eps`` fixes the low-res input's
  augmentation noise (an inversion's).

  ``control`` (static, hashable; e.g. a prompt-to-prompt ``StageEdit``) steers the sampling with
  arrays ``control_data``: ``control.init_state(data, batch)`` is carried through the loop,
  ``control.controller(step, state, data, cond_batch=B)`` is the U-Net's attention controller at
  every step (it sees the ``[cond; uncond]`` batch under guidance; ``cond_batch`` says where the
  conditional half ends) and its ``outputs()`` are the next state, and
  ``control.after_step(step, x_next, state, data)`` post-processes every step. The batch rows
  share their noise (starting noise is the caller's; the augmentation and per-step noise are
  drawn once per step). The sampler then returns ``(x0, state)``.

  ``guide`` (static, hashable; e.g. :class:`~imagen_jax.sample.clip_guidance.ClipGuidance`'s
  per-stage part) adds classifier guidance after classifier-free guidance
  (:func:`~imagen_jax.diffusion.classifier_guidance`): ``guide.log_prob(guide_data, x_t, t, x̂0)
  -> [B]`` with arrays ``guide_data`` (its ``"scale"`` is s), ``guide.grad_through_model``.

  ``learned_variance``: the U-Net also outputs a learned-range variance (DeepFloyd IF); the
  ancestral sampler steps with it (the conditional branch's, under guidance), the others use
  the prediction alone.
  """
  learned_variance = bool(learned_variance) and settings.sampler == "ancestral"
  if learned_variance and guide is not None:
    raise ValueError(
      "classifier (CLIP) guidance with a learned-variance stage needs a sampler other than "
      "'ancestral' (ddim or dpmpp_2m)"
    )

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
    known=None,
    mask=None,
    aug_eps=None,
    guide_data=None,
    t_start=1.0,
  ):
    batch = x_T.shape[0]
    per_step_null = null_emb.ndim == text_emb.ndim + 1  # [steps, B, L, D]
    rng_sample, cond, uncond = _conditioning(
      schedule,
      settings,
      rng,
      text_emb,
      text_mask,
      null_emb[0] if per_step_null else null_emb,
      null_mask,
      lowres,
      control is not None,
      aug_eps,
    )

    def guided(controller, step=None):
      model_fn = _model_fn(apply_fn, params, schedule, controller, learned_variance)
      if settings.guidance == 1.0:
        # w = 1 is the conditional model alone: skip the doubled batch.
        fn = lambda x_t, t: model_fn(x_t, t, cond)
      else:
        un = uncond
        if per_step_null:
          un = (null_emb[step].astype(text_emb.dtype), *uncond[1:])
        fn = diffusion.classifier_free_guidance(
          model_fn, cond, un, settings.guidance, learned_variance=learned_variance
        )
      if guide is None:
        return fn
      return diffusion.classifier_guidance(
        fn,
        functools.partial(guide.log_prob, guide_data),
        guide_data["scale"],
        schedule,
        pred_type,
        grad_through_model=guide.grad_through_model,
      )

    kwargs = dict(
      sampler=settings.sampler,
      steps=int(settings.steps),
      schedule=schedule,
      pred_type=pred_type,
      thresholding=settings.thresholding,
      percentile=settings.percentile,
      threshold_max=settings.threshold_max,
      percentile_impl=settings.percentile_impl,
      spacing=settings.grid_spacing,
      learned_variance=learned_variance,
      eta=settings.eta,
      t_start=t_start,
      progress_fn=progress_fn,
      progress_x0=progress_x0,
    )
    if known is not None:
      kwargs.update(
        known=known.astype(x_T.dtype),
        mask=mask[..., None],  # [B, H, W, 1]: every channel of a pixel
        resample=int(settings.resample),
        jump=int(settings.jump),
      )
    if control is None and not per_step_null:
      return diffusion.sample(guided(None), x_T, rng_sample, **kwargs)
    if control is None:  # per-step null conditions: the model needs the step
      x0, _ = diffusion.sample(
        lambda x_t, t, step, state: (guided(None, step)(x_t, t), state),
        x_T,
        rng_sample,
        state=(),
        **kwargs,
      )
      return x0

    def controlled_fn(x_t, t, step, state):
      controller = control.controller(step, state, control_data, cond_batch=batch)
      pred = guided(controller, step)(x_t, t)
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


def make_stage_inverter(
  apply_fn: Callable, schedule: Any, pred_type: str, settings: SamplerSettings
) -> Callable:
  """Returns a jitted ``invert(params, rng, text_emb, text_mask, x0, lowres=None, aug_eps=None)
  -> (latent, trajectory)``: DDIM / DPM-Solver++ inversion of ``x0`` ``[B, H, W, C]`` with the
  conditional model (w = 1) on the grid of ``settings`` (:func:`imagen_jax.diffusion.invert`);
  the low-res input is augmented from ``rng`` (or with ``aug_eps``) as in sampling.
  ``trajectory`` ``[steps + 1, B, H, W, C]`` are the pivots of null-text inversion."""

  def invert(params, rng, text_emb, text_mask, x0, lowres=None, aug_eps=None):
    _, cond, _ = _conditioning(
      schedule, settings, rng, text_emb, text_mask, None, None, lowres, False, aug_eps
    )
    model_fn = _model_fn(apply_fn, params, schedule)
    return diffusion.invert(
      lambda x_t, t: model_fn(x_t, t, cond),
      x0,
      sampler=settings.sampler,
      steps=int(settings.steps),
      schedule=schedule,
      pred_type=pred_type,
      spacing=settings.grid_spacing,
      return_trajectory=True,
    )

  return jax.jit(invert)


def make_null_text_optimizer(
  apply_fn: Callable,
  schedule: Any,
  pred_type: str,
  settings: SamplerSettings,
  *,
  inner_steps: int = 10,
  learning_rate: float = 1e-2,
) -> Callable:
  """Returns a jitted ``optimize(params, rng, text_emb, text_mask, null_init, null_mask,
  trajectory, lowres=None) -> (nulls [steps, B, L, D], x0)``: null-text inversion
  (:func:`imagen_jax.diffusion.null_text_inversion`) of the U-Net under ``settings.guidance``."""

  def optimize(
    params, rng, text_emb, text_mask, null_init, null_mask, trajectory, lowres=None, aug_eps=None
  ):
    _, cond, (_, _, extra) = _conditioning(
      schedule, settings, rng, text_emb, text_mask, null_init, null_mask, lowres, False, aug_eps
    )
    model_fn = _model_fn(apply_fn, params, schedule)

    def guided_fn(x_t, t, null):
      uncond = (null.astype(text_emb.dtype), null_mask, extra)
      return diffusion.classifier_free_guidance(model_fn, cond, uncond, settings.guidance)(x_t, t)

    return diffusion.null_text_inversion(
      guided_fn,
      trajectory,
      null_init.astype(jnp.float32),
      sampler=settings.sampler,
      steps=int(settings.steps),
      schedule=schedule,
      pred_type=pred_type,
      thresholding=settings.thresholding,
      percentile=settings.percentile,
      spacing=settings.grid_spacing,
      inner_steps=inner_steps,
      learning_rate=learning_rate,
    )

  return jax.jit(optimize)
