"""Inpainting on any sampler: known pixels from the forward process, RePaint resampling.

Replacement (Song et al. 2021, App. I; GLIDE §4; Lugmayr et al. 2022 eq. (8)-(9)): after every
step to time s, the pixels outside the mask are overwritten by a draw of the forward process of the
known image, x_s^known ~ q(x_s | x0 = known). Alone this leaves the generated region unaware of
the known one until late in sampling (it only sees it through x_s), so boundaries disagree.
RePaint's resampling fixes that: after stepping down to s it jumps back up by ``jump`` steps with
the forward kernel q(x_t | x_s) and denoises again, ``resample`` times in all, which lets the two
regions harmonise (its §4.2).

The path through the time grid is a static list of moves (:func:`repaint_path`); every sampler
walks it (:func:`imagen_jax.diffusion.samplers.sample`).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import alpha_sigma

Array = jax.Array


def check_resample(resample: int, jump: int) -> None:
  """Raises ``ValueError`` unless ``resample`` and ``jump`` are ints ≥ 1."""
  for name, value in (("resample", resample), ("jump", jump)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def repaint_path(steps: int, resample: int = 1, jump: int = 1) -> np.ndarray:
  """The moves ``[(i, j), ...]`` through the grid t_0 = 1 > … > t_N = 0, as ``[M, 2]`` int32.

  ``j = i + 1`` is a denoising step; ``j < i`` a jump back up by the forward process. Without
  resampling the path is 0 → 1 → … → N. With it, on reaching grid index c (a multiple of
  ``jump``, c < N) the path goes back to c − ``jump`` and down again, ``resample − 1`` times
  (Lugmayr et al. 2022, Alg. 1 with jumps); about ``steps × resample`` model calls in all.
  """
  check_resample(resample, jump)
  moves, i = [], 0
  left = {c: resample - 1 for c in range(jump, steps, jump)}
  while i < steps:
    moves.append((i, i + 1))
    i += 1
    if left.get(i, 0) > 0:
      left[i] -= 1
      moves.append((i, i - jump))
      i -= jump
  return np.asarray(moves, np.int32).reshape(-1, 2)


def forward_jump(x_s: Array, logsnr_s: Array, logsnr_t: Array, noise: Array) -> Array:
  """One draw from q(x_t | x_s) for t noisier than s (λ_t < λ_s; VDM eq. (19)):

  x_t = (α_t / α_s) x_s + σ_t √(1 − r) z,    r = SNR_t / SNR_s = exp(λ_t − λ_s).
  """
  alpha_s, _ = alpha_sigma(logsnr_s)
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  return (alpha_t / alpha_s) * x_s + sigma_t * jnp.sqrt(-jnp.expm1(logsnr_t - logsnr_s)) * noise


def paste_known(x: Array, known: Array, mask: Array, logsnr: Array | None, noise: Array) -> Array:
  """Keeps ``x`` where ``mask`` (True = regenerate) and a forward-process draw of ``known``
  elsewhere: q_sample(known, λ, z) at an intermediate time, ``known`` itself when ``logsnr`` is
  None (the final x̂0). ``mask`` broadcasts to ``x`` (``[B, H, W, 1]`` for images)."""
  fill = known if logsnr is None else gaussian.q_sample(known, logsnr, noise)
  return jnp.where(mask, x, fill.astype(x.dtype))
