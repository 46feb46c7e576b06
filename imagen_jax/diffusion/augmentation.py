"""Conditioning augmentation for the super-resolution stages: noise (Imagen §2.4, App. D.2) and
Gaussian blur (Cascaded Diffusion Models, Ho et al. 2021, §4.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import Schedule, as_schedule

Array = jax.Array


def _check_aug_level(aug_level, batch: int) -> None:
  if aug_level is None:
    return
  shape = tuple(jnp.shape(aug_level))
  if shape not in ((), (batch,)):
    raise ValueError(
      f"aug_level must be a float, an array of shape [B]=({batch},) or None, got {shape}"
    )
  if not isinstance(aug_level, jax.core.Tracer):  # traced levels can only be checked by the caller
    level = np.asarray(aug_level, np.float64)
    if np.any(level < 0.0) or np.any(level > 1.0) or not np.all(np.isfinite(level)):
      raise ValueError(f"aug_level must be in [0, 1], got {aug_level}")


def _aug_levels(rng: Array, batch: int, aug_level, max_aug_level: float) -> Array:
  if aug_level is None:
    return jax.random.uniform(rng, (batch,), maxval=max_aug_level)  # [B]
  return jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (batch,))  # [B]


def noise_augment(
  rng: Array,
  lowres: Array,
  schedule: Schedule | str,
  aug_level: float | Array | None = None,
  *,
  max_aug_level: float = 1.0,
  eps: Array | None = None,
) -> tuple[Array, Array]:
  """Corrupts the low-res conditioning image with the forward process at t = ``aug_level``.

  Imagen §2.4: the low-res image is noised with variance-preserving Gaussian noise, like the
  forward process, and the SR model is conditioned on the level. In training the level is random
  per example (``aug_level=None``: t ~ U(0, ``max_aug_level``)); at sampling it is fixed (the
  paper uses 0 for best FID and 0.1–0.3 for its best samples). The model is conditioned on the
  returned log-SNR rather than on t, so the conditioning does not depend on how t was mapped.

    z = α(t_aug) · lowres + σ(t_aug) · ε,   λ_aug = schedule(t_aug).

  Args:
    rng: PRNG key.
    lowres: the (upsampled) low-res image, ``[B, ...]``.
    schedule: the schedule mapping the level to a log-SNR (or its name).
    aug_level: a float or ``[B]`` array in [0, 1], or ``None`` for random levels (training).
    max_aug_level: upper end of the random levels, in (0, 1].
    eps: the noise ε, broadcastable to ``lowres`` (default: drawn from ``rng``); e.g. one row
      shared by a batch of prompt-to-prompt edits.

  Returns:
    ``(noisy_lowres, aug_logsnr)`` with shapes ``[B, ...]`` and ``[B]``.

  Raises:
    ValueError: ``aug_level`` outside [0, 1] (when concrete) or of the wrong shape, or
      ``max_aug_level`` outside (0, 1].
  """
  schedule = as_schedule(schedule)
  if jnp.ndim(lowres) < 1:
    raise ValueError(f"lowres must have a leading batch dimension, got shape {jnp.shape(lowres)}")
  if not 0.0 < max_aug_level <= 1.0:
    raise ValueError(f"max_aug_level must be in (0, 1], got {max_aug_level}")
  _check_aug_level(aug_level, lowres.shape[0])
  level_rng, eps_rng = jax.random.split(rng)
  level = _aug_levels(level_rng, lowres.shape[0], aug_level, max_aug_level)  # [B]
  aug_logsnr = schedule(level)  # [B]
  if eps is None:
    eps = jax.random.normal(eps_rng, lowres.shape, lowres.dtype)
  eps = jnp.broadcast_to(jnp.asarray(eps, lowres.dtype), lowres.shape)
  noisy = gaussian.q_sample(lowres, aug_logsnr, eps).astype(lowres.dtype)
  return noisy, aug_logsnr


def blur_augment(
  rng: Array, lowres: Array, max_sigma: float, sigma: float | Array | None = None
) -> Array:
  """Blurs each low-res conditioning image with a Gaussian of random width (CDM §4.2).

  Cascaded Diffusion Models (Ho et al. 2021) blur the SR stages' low-res inputs in training so
  that the stage learns to restore detail the previous stage draws soft, rather than copying
  its input: the previous stage's samples are blurrier than the real low-res images the stage
  trains on. Each example gets its own σ ~ U(0, ``max_sigma``), in low-res pixels (σ = 0 leaves
  the image as it is); edges are padded by replication. Sampling applies no blur.

    lowres_b ← G_σb ∗ lowres_b,   G_σ(k) ∝ exp(−k² / 2σ²),  |k| ≤ ⌈3 · max_sigma⌉.

  Args:
    rng: PRNG key.
    lowres: ``[B, h, w, C]`` low-res images.
    max_sigma: the largest σ, in pixels of ``lowres``; ``0`` returns ``lowres`` unchanged. It
      also sets the kernel's radius, ⌈3 · max_sigma⌉.
    sigma: σ per example (a float or ``[B]``, at most ``max_sigma``) instead of random ones.

  Returns:
    The blurred images, ``[B, h, w, C]``, in ``lowres``'s dtype.

  Raises:
    ValueError: ``max_sigma`` negative or not finite, ``sigma`` above it, or ``lowres`` not
      ``[B, h, w, C]``.
  """
  if not (np.isfinite(max_sigma) and max_sigma >= 0.0):
    raise ValueError(f"max_sigma must be a finite number >= 0, got {max_sigma}")
  if jnp.ndim(lowres) != 4:
    raise ValueError(f"lowres must be [B, h, w, C], got shape {jnp.shape(lowres)}")
  if max_sigma == 0.0:
    return lowres
  b = lowres.shape[0]
  radius = int(np.ceil(3.0 * max_sigma))
  if sigma is None:
    sigma = jax.random.uniform(rng, (b,), maxval=max_sigma)  # [B]
  elif not isinstance(sigma, jax.core.Tracer) and np.any(np.asarray(sigma) > max_sigma):
    raise ValueError(
      f"sigma must be at most max_sigma={max_sigma} (it sets the kernel), got {sigma}"
    )
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))  # [B]
  k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)  # [K]
  # σ → 0 makes the kernel a delta: only k = 0 keeps weight exp(0) = 1.
  logits = -0.5 * jnp.square(k) / jnp.maximum(jnp.square(sigma), 1e-6)[:, None]  # [B, K]
  kernel = jax.nn.softmax(logits, axis=-1)  # [B, K], sums to 1
  x = _blur_rows(lowres.astype(jnp.float32), kernel)  # along h
  x = _blur_rows(x.swapaxes(1, 2), kernel).swapaxes(1, 2)  # along w
  return x.astype(lowres.dtype)  # [B, h, w, C]


def _blur_rows(x: Array, kernel: Array) -> Array:
  """``[B, h, w, C]`` convolved along h with a per-example ``[B, 2r + 1]`` kernel (edges repeat)."""
  h, radius = x.shape[1], (kernel.shape[1] - 1) // 2
  x = jnp.pad(x, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")  # [B, h + 2r, w, C]
  return sum(kernel[:, i, None, None, None] * x[:, i : i + h] for i in range(kernel.shape[1]))
