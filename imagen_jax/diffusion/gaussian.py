"""The Gaussian forward process and the three prediction parameterisations (ε, x0, v).

With α² + σ² = 1 (variance preserving) and log-SNR λ = log(α²/σ²):

  x_t = α x0 + σ ε                       (forward process, Imagen App. A / VDM)
  x0  = (x_t − σ ε) / α                  (Imagen App. A: x̂θ = (z_t − σ_t εθ) / α_t)
  ε   = (x_t − α x0) / σ
  v   = α ε − σ x0                       (Salimans & Ho 2022, progressive distillation, §4)
  x0  = α x_t − σ v,   ε = σ x_t + α v   (same, inverting the rotation (x0, ε) → (x_t, v))

``logsnr`` has shape ``[B]`` (or ``[]``) and broadcasts over the trailing dimensions of ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma

Array = jax.Array

PRED_TYPES = ("eps", "x0", "v")


def check_pred_type(pred_type: str, name: str = "pred_type") -> None:
  """Raises ``ValueError`` naming ``name`` unless ``pred_type`` is one of ``PRED_TYPES``."""
  if pred_type not in PRED_TYPES:
    raise ValueError(f"{name} must be one of {PRED_TYPES}, got {pred_type!r}")


def broadcast_to_x(coef: Array, x: Array, name: str = "logsnr") -> Array:
  """Reshapes a per-example ``coef`` of shape ``[B]`` (or ``[]``) to broadcast against ``x``.

  Raises:
    ValueError: ``coef``'s shape is not a prefix of ``x.shape``.
  """
  coef = jnp.asarray(coef)
  if coef.shape != tuple(x.shape[: coef.ndim]):
    raise ValueError(
      f"{name} has shape {coef.shape}, which must be [] or the leading (batch) dims of x "
      f"with shape {tuple(x.shape)}"
    )
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _ab(logsnr: Array, x: Array) -> tuple[Array, Array]:
  alpha, sigma = alpha_sigma(broadcast_to_x(logsnr, x))
  return alpha, sigma


def _check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}")


def q_sample(x0: Array, logsnr: Array, eps: Array) -> Array:
  """Samples the forward process, x_t = α x0 + σ ε (Imagen App. A, q(z_t | x)).

  Args:
    x0: clean data, ``[B, ...]``.
    logsnr: λ_t, ``[B]`` or ``[]``.
    eps: standard normal noise with the shape of ``x0``.

  Returns:
    x_t with the shape of ``x0``.
  """
  _check_same_shape(eps, x0, "eps", "x0")
  alpha, sigma = _ab(logsnr, x0)
  return alpha * x0 + sigma * eps


def x0_from_eps(eps: Array, x_t: Array, logsnr: Array) -> Array:
  """x0 = (x_t − σ ε) / α (Imagen App. A)."""
  alpha, sigma = _ab(logsnr, x_t)
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x0: Array, x_t: Array, logsnr: Array) -> Array:
  """ε = (x_t − α x0) / σ, the forward process solved for ε."""
  alpha, sigma = _ab(logsnr, x_t)
  return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: Array, eps: Array, logsnr: Array) -> Array:
  """v = α ε − σ x0 (Salimans & Ho 2022, §4)."""
  alpha, sigma = _ab(logsnr, x0)
  return alpha * eps - sigma * x0


def x0_from_v(v: Array, x_t: Array, logsnr: Array) -> Array:
  """x0 = α x_t − σ v (Salimans & Ho 2022, §4; exact because α² + σ² = 1)."""
  alpha, sigma = _ab(logsnr, x_t)
  return alpha * x_t - sigma * v


def eps_from_v(v: Array, x_t: Array, logsnr: Array) -> Array:
  """ε = σ x_t + α v (Salimans & Ho 2022, §4)."""
  alpha, sigma = _ab(logsnr, x_t)
  return sigma * x_t + alpha * v


def pred_from_x0_eps(x0: Array, eps: Array, logsnr: Array, pred_type: str) -> Array:
  """The regression target of a ``pred_type`` model for a given (x0, ε) pair."""
  check_pred_type(pred_type)
  _check_same_shape(eps, x0, "eps", "x0")
  if pred_type == "eps":
    return eps
  if pred_type == "x0":
    return x0
  return v_from_x0_eps(x0, eps, logsnr)


def to_x0_eps(pred: Array, x_t: Array, logsnr: Array, pred_type: str) -> tuple[Array, Array]:
  """Converts a model output of any parameterisation to the pair (x̂0, ε̂).

  Args:
    pred: model output with the shape of ``x_t``.
    x_t: the noisy input, ``[B, ...]``.
    logsnr: λ_t, ``[B]`` or ``[]``.
    pred_type: ``"eps"``, ``"x0"`` or ``"v"``.

  Returns:
    ``(x0, eps)`` satisfying x_t = α x0 + σ ε.
  """
  check_pred_type(pred_type)
  _check_same_shape(pred, x_t, "pred", "x_t")
  if pred_type == "eps":
    return x0_from_eps(pred, x_t, logsnr), pred
  if pred_type == "x0":
    return pred, eps_from_x0(pred, x_t, logsnr)
  return x0_from_v(pred, x_t, logsnr), eps_from_v(pred, x_t, logsnr)


def predict_x0(pred: Array, x_t: Array, logsnr: Array, pred_type: str) -> Array:
  """x̂0 from a model output of any parameterisation (see :func:`to_x0_eps`)."""
  return to_x0_eps(pred, x_t, logsnr, pred_type)[0]


def predict_eps(pred: Array, x_t: Array, logsnr: Array, pred_type: str) -> Array:
  """ε̂ from a model output of any parameterisation (see :func:`to_x0_eps`)."""
  return to_x0_eps(pred, x_t, logsnr, pred_type)[1]
