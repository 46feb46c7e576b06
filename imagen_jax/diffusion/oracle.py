"""The exact denoiser for Gaussian data: a closed-form "perfect model" for testing samplers.

For data x0 ~ N(μ, diag(s²)) and x_t = α x0 + σ ε, x_t ~ N(α μ, α² s² + σ²) and the posterior
mean (the minimiser of every diffusion loss) is

  E[x0 | x_t] = μ + α s² / (α² s² + σ²) · (x_t − α μ),
  E[ε  | x_t] = σ / (α² s² + σ²) · (x_t − α μ),       v̂ = α ε̂ − σ x̂0.

ε̂ is written without dividing by σ, so the oracle is exact at both ends of the schedule. The
probability-flow ODE maps x_t to x_s keeping (x − α μ) / √(α² s² + σ²) constant, which gives the
exact deterministic sample that DDIM (η = 0) and DPM-Solver++ approximate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, as_schedule

Array = jax.Array


def _scales(x_t: Array, logsnr: Array) -> tuple[Array, Array]:
  return alpha_sigma(gaussian.broadcast_to_x(logsnr, x_t))


def oracle_pred(x_t: Array, logsnr: Array, mean: Array, std: Array, pred_type: str) -> Array:
  """The exact ``pred_type`` prediction for Gaussian data (``mean``/``std`` broadcast to x_t)."""
  gaussian.check_pred_type(pred_type)
  alpha, sigma = _scales(x_t, logsnr)
  var_t = alpha**2 * std**2 + sigma**2
  centred = x_t - alpha * mean
  x0 = mean + alpha * std**2 / var_t * centred
  eps = sigma / var_t * centred
  return {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}[pred_type]


def oracle_model_fn(
  mean: Array, std: Array, schedule: Schedule | str, pred_type: str
) -> Callable[[Array, Array], Array]:
  """A ``model_fn(x_t, t)`` that returns the exact prediction, for the samplers."""
  schedule = as_schedule(schedule)
  return lambda x_t, t: oracle_pred(x_t, schedule(t), mean, std, pred_type)


def oracle_cond_model_fn(
  std: Array, schedule: Schedule | str, pred_type: str
) -> Callable[[Array, Array, dict], Array]:
  """A conditional ``model_fn(x_t, t, cond)`` whose ``cond["mean"]`` ([B, ...]) is the data mean."""
  schedule = as_schedule(schedule)
  return lambda x_t, t, cond: oracle_pred(x_t, schedule(t), cond["mean"], std, pred_type)


def flow_map(x_t: Array, logsnr_t: Array, logsnr_s: Array, mean: Array, std: Array) -> Array:
  """The exact probability-flow ODE solution from λ_t to λ_s for Gaussian data."""
  alpha_t, sigma_t = _scales(x_t, logsnr_t)
  alpha_s, sigma_s = _scales(x_t, logsnr_s)
  z = (x_t - alpha_t * mean) / jnp.sqrt(alpha_t**2 * std**2 + sigma_t**2)
  return alpha_s * mean + jnp.sqrt(alpha_s**2 * std**2 + sigma_s**2) * z


def marginal_from_noise(z: Array, logsnr: Array, mean: Array, std: Array) -> Array:
  """Maps z ~ N(0, I) to x_t ~ N(α μ, α² s² + σ²), the exact marginal at ``logsnr`` ([B] or [])."""
  alpha, sigma = _scales(z, logsnr)
  return alpha * mean + jnp.sqrt(alpha**2 * std**2 + sigma**2) * z


def correlated_pred(x_t: Array, logsnr: Array, mean: Array, cov: Array, pred_type: str) -> Array:
  """The exact prediction for data x0 ~ N(μ, Σ) with a full covariance over the flattened
  pixels (``mean`` ``[D]``, ``cov`` ``[D, D]``, ``x_t`` ``[B, ...]`` with D elements per row):

    E[x0 | x_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (x_t − α μ),  E[ε | x_t] = σ (α² Σ + σ² I)⁻¹ (x_t − α μ).

  Solved in Σ's eigenbasis (Σ = Q diag(d) Qᵀ), where it is the diagonal oracle.
  """
  gaussian.check_pred_type(pred_type)
  d, q = jnp.linalg.eigh(cov)
  shape = x_t.shape
  x = x_t.reshape(shape[0], -1) @ q  # [B, D] in the eigenbasis
  logsnr = jnp.broadcast_to(jnp.asarray(logsnr), shape[:1])
  pred = oracle_pred(x, logsnr, mean @ q, jnp.sqrt(jnp.maximum(d, 0.0)), pred_type)
  return (pred @ q.T).reshape(shape)


def mixture_pred(
  x_t: Array, logsnr: Array, weights: Array, means: Array, stds: Array, pred_type: str
) -> Array:
  """The exact prediction for an isotropic Gaussian mixture x0 ~ Σ_k π_k N(μ_k, s_k² I)
  (``weights`` ``[K]``, ``means`` ``[K, ...]`` like one row of ``x_t``, ``stds`` ``[K]``):
  the posterior-weighted sum of the components' oracles,

    E[x0 | x_t] = Σ_k p(k | x_t) E_k[x0 | x_t],   p(k | x_t) ∝ π_k N(x_t; α μ_k, (α² s_k² + σ²) I).
  """
  gaussian.check_pred_type(pred_type)
  alpha, sigma = _scales(x_t, logsnr)  # [B, 1, ...]
  dims = x_t[0].size
  preds, logits = [], []
  for k in range(means.shape[0]):
    var = alpha**2 * stds[k] ** 2 + sigma**2  # [B, 1, ...]
    sq = jnp.sum(((x_t - alpha * means[k]) ** 2 / var).reshape(x_t.shape[0], -1), axis=1)
    logdet = dims * jnp.log(var.reshape(x_t.shape[0], -1)[:, 0])
    logits.append(jnp.log(weights[k]) - 0.5 * (sq + logdet))
    preds.append(oracle_pred(x_t, logsnr, means[k], stds[k], pred_type))
  post = jax.nn.softmax(jnp.stack(logits, axis=0), axis=0)  # [K, B]
  post = post.reshape(post.shape + (1,) * (x_t.ndim - 1))
  return jnp.sum(post * jnp.stack(preds, axis=0), axis=0)


def gaussian_classifier_log_prob(
  x_t: Array, logsnr: Array, mean: Array, std: Array, target: Array, tau: float
) -> Array:
  """The noised form of a Gaussian "classifier" log p(c | x0) = −‖x0 − m‖² / (2τ) for Gaussian data
  x0 ~ N(μ, s²): with x0 | x_t ~ N(x̂0, v), v = s² σ² / (α² s² + σ²),

    log p(c | x_t) = log ∫ p(c | x0) p(x0 | x_t) dx0 = −Σ (m − x̂0)² / (2 (τ + v)) − ½ Σ log(τ + v),

  per example, ``[B]`` (the second term does not depend on x_t). Classifier guidance with this
  and the exact denoiser samples the tilted data distribution exactly (:func:`tilted_gaussian`).
  """
  alpha, sigma = _scales(x_t, logsnr)
  var_t = alpha**2 * std**2 + sigma**2
  x0 = mean + alpha * std**2 / var_t * (x_t - alpha * mean)  # E[x0 | x_t]
  total = tau + std**2 * sigma**2 / var_t  # τ + Var[x0 | x_t]
  log_p = -((target - x0) ** 2) / (2.0 * total) - 0.5 * jnp.log(total)
  return log_p.reshape(x_t.shape[0], -1).sum(axis=1)


def tilted_gaussian(
  mean: Array, std: Array, target: Array, tau: float, scale: float = 1.0
) -> tuple[Array, Array]:
  """Mean and std of p(x0) p(c | x0)^s for x0 ~ N(μ, s²) and log p(c | x0) = −‖x0 − m‖² / (2τ):

  1/s*² = 1/s² + s/τ,    μ* = s*² (μ / s² + s m / τ).
  """
  var = 1.0 / (1.0 / std**2 + scale / tau)
  return var * (mean / std**2 + scale * target / tau), jnp.sqrt(var)
