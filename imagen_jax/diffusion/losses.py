"""Training inputs and the per-example denoising loss for the ε, x0 and v objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import Schedule, as_schedule

Array = jax.Array


def sample_training_inputs(
  rng: Array, x0: Array, schedule: Schedule | str, *, low_discrepancy: bool = False
) -> tuple[Array, Array, Array, Array]:
  """Draws t ~ U(0, 1) and ε ~ N(0, I) per example and noises ``x0`` (Imagen App. A).

  With ``low_discrepancy`` the batch's times are t_i = (u + i / B) mod 1 for one u ~ U(0, 1)
  (the low-discrepancy sampler of VDM, Kingma et al. 2021): still uniform per example, but the
  batch covers [0, 1] evenly, which lowers the variance of the batch-mean loss.

  Args:
    rng: a PRNG key.
    x0: clean data, ``[B, ...]``.
    schedule: the noise schedule (or its name).
    low_discrepancy: use the stratified times above.

  Returns:
    ``(x_t, t, logsnr, eps)`` with shapes ``[B, ...]``, ``[B]``, ``[B]``, ``[B, ...]``.
  """
  schedule = as_schedule(schedule)
  if x0.ndim < 1:
    raise ValueError(f"x0 must have a leading batch dimension, got shape {tuple(x0.shape)}")
  batch = x0.shape[0]
  t_rng, eps_rng = jax.random.split(rng)
  if low_discrepancy:
    u = jax.random.uniform(t_rng, ())
    t = jnp.mod(u + jnp.arange(batch) / batch, 1.0)  # [B]
  else:
    t = jax.random.uniform(t_rng, (batch,))  # [B]
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)  # [B, ...]
  logsnr = schedule(t)  # [B]
  return gaussian.q_sample(x0, logsnr, eps), t, logsnr, eps


def min_snr_weight(logsnr: Array, objective: str, gamma: float) -> Array:
  """Min-SNR-γ loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

  The weight makes every objective equal to min(SNR, γ) · ‖x̂0 − x0‖², because
  ‖ε̂ − ε‖² = SNR ‖x̂0 − x0‖² and ‖v̂ − v‖² = (SNR + 1) ‖x̂0 − x0‖² at fixed x_t:

    eps: min(SNR, γ) / SNR,   v: min(SNR, γ) / (SNR + 1),   x0: min(SNR, γ),   SNR = exp(λ).

  Written with exp(−λ) and sigmoid(−λ) = 1 / (SNR + 1) so that no term overflows at large |λ|.
  """
  gaussian.check_pred_type(objective, "objective")
  snr = jnp.exp(logsnr)
  if objective == "eps":
    return jnp.minimum(1.0, gamma * jnp.exp(-logsnr))
  if objective == "v":
    return jnp.minimum(snr, gamma) * jax.nn.sigmoid(-logsnr)
  return jnp.minimum(snr, gamma)


def diffusion_loss(
  pred: Array,
  x0: Array,
  eps: Array,
  logsnr: Array,
  *,
  objective: str,
  min_snr_gamma: float | None = None,
) -> Array:
  """Per-example mean-squared error in the objective's own space (Imagen App. A, ε objective).

    L = w(λ) · mean_{pixels} (pred − target)²,  target ∈ {ε, x0, v = α ε − σ x0},

  with w = 1, or the min-SNR-γ weight of :func:`min_snr_weight` when ``min_snr_gamma`` is set.

  Args:
    pred: model output, ``[B, ...]``.
    x0: clean data, ``[B, ...]``.
    eps: the noise used to make x_t, ``[B, ...]``.
    logsnr: λ_t, ``[B]``.
    objective: ``"eps"``, ``"x0"`` or ``"v"``.
    min_snr_gamma: γ > 0, or ``None`` for unweighted.

  Returns:
    The loss per example, ``[B]`` (float32). The caller reduces it.
  """
  gaussian.check_pred_type(objective, "objective")
  for name, value in (("pred", pred), ("eps", eps)):
    if tuple(value.shape) != tuple(x0.shape):
      raise ValueError(f"{name} has shape {tuple(value.shape)} but x0 has {tuple(x0.shape)}")
  if x0.ndim < 1 or tuple(jnp.shape(logsnr)) != (x0.shape[0],):
    raise ValueError(f"logsnr must have shape [B]={x0.shape[:1]}, got {tuple(jnp.shape(logsnr))}")
  if min_snr_gamma is not None and not min_snr_gamma > 0:
    raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
  logsnr = jnp.asarray(logsnr, jnp.float32)
  target = gaussian.pred_from_x0_eps(x0, eps, logsnr, objective)
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))  # [B, ...]
  loss = jnp.mean(err.reshape(err.shape[0], -1), axis=1)  # [B]
  if min_snr_gamma is not None:
    loss = loss * min_snr_weight(logsnr, objective, min_snr_gamma)
  return loss
