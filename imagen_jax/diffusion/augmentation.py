"""Noise-conditioning augmentation for the super-resolution stages (Imagen §2.4, App. D.2)."""

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
