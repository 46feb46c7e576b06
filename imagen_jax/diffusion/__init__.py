"""The diffusion core: schedules, the Gaussian forward process, losses, guidance and samplers.

Pure, jittable functions that follow the papers (Imagen App. A, VDM, Ho & Salimans CFG, DDIM,
DPM-Solver++). Nothing here knows about the U-Net: samplers take any ``model_fn(x_t, t)``.
:mod:`imagen_jax.diffusion.oracle` holds the exact denoiser of Gaussian data, a "perfect model"
for tests; ``python -m imagen_jax.diffusion.demo`` samples it with every sampler.
"""

from imagen_jax.diffusion.augmentation import blur_augment, noise_augment
from imagen_jax.diffusion.gaussian import (
  PRED_TYPES,
  eps_from_v,
  eps_from_x0,
  pred_from_x0_eps,
  predict_eps,
  predict_x0,
  q_sample,
  to_x0_eps,
  v_from_x0_eps,
  x0_from_eps,
  x0_from_v,
)
from imagen_jax.diffusion.guidance import (
  THRESHOLD_MODES,
  classifier_free_guidance,
  classifier_guidance,
  dynamic_threshold,
  guide,
  threshold,
)
from imagen_jax.diffusion.inpaint import forward_jump, paste_known, repaint_path
from imagen_jax.diffusion.inversion import INVERTIBLE_SAMPLERS, invert, null_text_inversion
from imagen_jax.diffusion.losses import diffusion_loss, min_snr_weight, sample_training_inputs
from imagen_jax.diffusion.samplers import (
  ALL_SAMPLERS,
  DPMPP_VARIANTS,
  SAMPLE_STATIC_ARGNAMES,
  SAMPLERS,
  ancestral_step,
  ddim_step,
  denoise,
  dpmpp_2m_sde_step,
  dpmpp_2m_step,
  dpmpp_3m_step,
  sample,
  solver_step,
)
from imagen_jax.diffusion.schedules import (
  SCHEDULE_NAMES,
  CosineSchedule,
  LinearBetaSchedule,
  Schedule,
  ShiftedCosineSchedule,
  alpha_sigma,
  as_schedule,
  get_schedule,
)
from imagen_jax.diffusion.spacing import SPACINGS, karras_logsnr, logsnr_uniform, time_grid

__all__ = [
  "ALL_SAMPLERS",
  "CosineSchedule",
  "DPMPP_VARIANTS",
  "INVERTIBLE_SAMPLERS",
  "LinearBetaSchedule",
  "PRED_TYPES",
  "SAMPLERS",
  "SAMPLE_STATIC_ARGNAMES",
  "SCHEDULE_NAMES",
  "SPACINGS",
  "Schedule",
  "ShiftedCosineSchedule",
  "THRESHOLD_MODES",
  "alpha_sigma",
  "ancestral_step",
  "as_schedule",
  "blur_augment",
  "classifier_free_guidance",
  "classifier_guidance",
  "ddim_step",
  "denoise",
  "diffusion_loss",
  "dpmpp_2m_sde_step",
  "dpmpp_2m_step",
  "dpmpp_3m_step",
  "dynamic_threshold",
  "eps_from_v",
  "eps_from_x0",
  "forward_jump",
  "get_schedule",
  "guide",
  "invert",
  "karras_logsnr",
  "logsnr_uniform",
  "min_snr_weight",
  "noise_augment",
  "null_text_inversion",
  "paste_known",
  "pred_from_x0_eps",
  "predict_eps",
  "predict_x0",
  "q_sample",
  "repaint_path",
  "sample",
  "sample_training_inputs",
  "solver_step",
  "threshold",
  "time_grid",
  "to_x0_eps",
  "v_from_x0_eps",
  "x0_from_eps",
  "x0_from_v",
]
