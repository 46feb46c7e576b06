"""Classifier-free guidance (Ho & Salimans 2022; Imagen eq. (2)), classifier guidance (Dhariwal &
Nichol 2021; GLIDE §2.3, e.g. CLIP guidance) and thresholding (Imagen §2.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import kernels
from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, as_schedule

Array = jax.Array
ConditionalModelFn = Callable[[Array, Array, Any], Array]
ModelFn = Callable[[Array, Array], Array]
# log p(c | x_t) per example, [B], from (x_t [B, ...], t [B], x̂0 [B, ...]): a noised classifier
# reads x_t and t (GLIDE's noised CLIP), a clean one scores the model's x̂0 (CLIP on the denoised
# image).
LogProbFn = Callable[[Array, Array, Array], Array]

THRESHOLD_MODES = ("none", "static", "dynamic")


def _is_concrete(value: Any) -> bool:
  # Values that are traced (e.g. a guidance scale passed into a jitted function) cannot be
  # checked in Python; they are validated wherever they are still concrete.
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def check_guidance_scale(guidance_scale: Any, batch: int | None = None) -> None:
  """Raises ``ValueError`` for a negative or wrongly shaped ``guidance_scale`` (scalar or [B])."""
  shape = tuple(jnp.shape(guidance_scale))
  if shape != () and (len(shape) != 1 or (batch is not None and shape[0] != batch)):
    raise ValueError(f"guidance_scale must be a scalar or have shape [B]=({batch},), got {shape}")
  if _is_concrete(guidance_scale) and np.any(np.asarray(guidance_scale) < 0):
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")


def guide(pred_cond: Array, pred_uncond: Array, guidance_scale: Array | float) -> Array:
  """Combines conditional and unconditional predictions (Imagen eq. (2); Ho & Salimans 2022):

    ε̃ = w · ε(z_t, c) + (1 − w) · ε(z_t, c_uncond).

  The combination is affine with weights summing to 1, so it is the same whether the model
  predicts ε, x0 or v (each is affine in the others at fixed x_t). Written as w·c + (1 − w)·u
  rather than u + w(c − u) so that w = 1 returns the conditional prediction bit for bit.

  Args:
    pred_cond: conditional prediction, ``[B, ...]``.
    pred_uncond: unconditional (or negative-prompt) prediction, ``[B, ...]``.
    guidance_scale: w ≥ 0, a scalar or ``[B]``.
  """
  w = jnp.asarray(guidance_scale, jnp.float32)
  w = w.reshape(w.shape + (1,) * (pred_cond.ndim - w.ndim))  # [B, 1, ...] or []
  return (w * pred_cond + (1.0 - w) * pred_uncond).astype(pred_cond.dtype)


def _double(cond: Any, uncond: Any, batch: int) -> Any:
  def concat(c, u):
    if c.shape[:1] != (batch,) or c.shape[1:] != u.shape[1:] or u.shape[:1] != (batch,):
      raise ValueError(
        f"cond and uncond leaves must have shape [B={batch}, ...] and match; got cond "
        f"{tuple(c.shape)} and uncond {tuple(u.shape)}"
      )
    return jnp.concatenate([c, u.astype(c.dtype)], axis=0)  # [2B, ...]

  return jax.tree.map(concat, cond, uncond)


def classifier_free_guidance(
  model_fn: ConditionalModelFn,
  cond: Any,
  uncond: Any,
  guidance_scale: Array | float,
  *,
  learned_variance: bool = False,
) -> ModelFn:
  """Wraps a conditional model into a guided ``model_fn(x_t, t)`` for the samplers.

  The conditional and unconditional branches run as ONE forward pass over the doubled batch
  ``[x_t; x_t]`` with conditioning ``[cond; uncond]`` (concatenated leaf-wise), then are split
  and combined with :func:`guide`. ``uncond`` can be the null conditioning or a negative
  prompt; it only has to match ``cond``'s structure and shapes. When ``guidance_scale`` is the
  Python number 1 the unconditional half is skipped entirely (it would get weight 0).

  Args:
    model_fn: ``model_fn(x_t, t, cond) -> pred`` with ``x_t [B, ...]``, ``t [B]``.
    cond: pytree of arrays with leading batch dimension B (e.g. text embeddings and mask).
    uncond: pytree like ``cond`` for the unconditional / negative branch.
    guidance_scale: w ≥ 0, scalar or ``[B]`` (per-example).
    learned_variance: the model's last axis holds 2C channels, the prediction then the learned
      variance (DeepFloyd IF); the prediction is guided, the variance is the conditional
      branch's (as IF's pipelines do).

  Returns:
    ``guided_fn(x_t, t) -> pred`` with the shape of ``x_t`` (2C channels with
    ``learned_variance``).

  Raises:
    ValueError: negative ``guidance_scale`` (when concrete), mismatched ``cond``/``uncond``.
  """
  check_guidance_scale(guidance_scale)
  if jax.tree.structure(cond) != jax.tree.structure(uncond):
    raise ValueError(
      f"uncond must have the same pytree structure as cond; got {jax.tree.structure(uncond)} "
      f"vs {jax.tree.structure(cond)}"
    )
  skip_uncond = isinstance(guidance_scale, int | float) and float(guidance_scale) == 1.0

  def guided_fn(x_t: Array, t: Array) -> Array:
    batch = x_t.shape[0]
    check_guidance_scale(guidance_scale, batch)
    if skip_uncond:
      return model_fn(x_t, t, cond)
    both = model_fn(
      jnp.concatenate([x_t, x_t], axis=0),  # [2B, ...]
      jnp.concatenate([t, t], axis=0),  # [2B]
      _double(cond, uncond, batch),
    )
    want = (2 * batch, *x_t.shape[1:])
    if learned_variance:
      want = (*want[:-1], 2 * want[-1])
    if tuple(both.shape) != want:
      raise ValueError(
        f"model_fn output on the doubled batch has shape {tuple(both.shape)}, expected {want}"
      )
    pred_cond, pred_uncond = both[:batch], both[batch:]
    if not learned_variance:
      return guide(pred_cond, pred_uncond, guidance_scale)
    c = x_t.shape[-1]
    guided = guide(pred_cond[..., :c], pred_uncond[..., :c], guidance_scale)
    return jnp.concatenate([guided, pred_cond[..., c:]], axis=-1)

  return guided_fn


def classifier_guidance(
  model_fn: ModelFn,
  log_prob_fn: LogProbFn,
  scale: Array | float,
  schedule: Schedule | str,
  pred_type: str,
  *,
  grad_through_model: bool = False,
) -> ModelFn:
  """Wraps ``model_fn(x_t, t)`` so that it samples p(x) p(c | x)^s (Dhariwal & Nichol 2021 Alg. 2;
  GLIDE §2.3, which uses CLIP as the classifier) by shifting its noise prediction:

    ε̂' = ε̂ − s σ_t ∇_{x_t} log p(c | x_t),        x̂0' = (x_t − σ_t ε̂') / α_t = x̂0 + s σ_t²/α_t ∇.

  (σ_t ∇ log p(x_t) = −ε̂ is the score in ε form, so this adds s times the classifier's score.) The
  shifted pair goes back to ``pred_type``, so the wrapper drops into every sampler, after
  classifier-free guidance (wrap the CFG-guided ``model_fn``) and before thresholding.

  ``log_prob_fn(x_t, t, x̂0)`` may read x_t and t (a noised classifier: the gradient is exact) or
  the model's x̂0 (a clean classifier such as CLIP on the denoised image). For the latter,
  ``grad_through_model`` differentiates x̂0(x_t) through the model (the exact gradient of
  log p(c | x̂0(x_t)); one more backward pass of the U-Net per step). Without it no backward pass
  goes through the U-Net: ∂x̂0/∂x_t ≈ α I, the Jacobian of E[x0 | x_t] for unit-variance Gaussian
  data (α / (α² + σ²) = α), so ∇_{x_t} = α ∇_{x̂0} and x̂0 moves by s σ² ∇_{x̂0}. (Holding ε̂ fixed
  instead, ∂x̂0/∂x_t = 1/α, agrees as σ → 0 but explodes at high noise, where the true Jacobian
  vanishes: guidance would then wreck the first steps.)

  Args:
    model_fn: ``model_fn(x_t, t) -> pred`` (already CFG-guided, if guided).
    log_prob_fn: ``(x_t, t, x0) -> [B]`` log-probabilities (up to a constant).
    scale: s ≥ 0, scalar or ``[B]``.
    schedule: the noise schedule (t → λ_t).
    pred_type: what ``model_fn`` predicts (``eps``, ``x0``, ``v``).
    grad_through_model: differentiate x̂0 through ``model_fn`` too.

  Returns:
    ``guided_fn(x_t, t) -> pred`` of the same parameterisation.
  """
  check_guidance_scale(scale)
  gaussian.check_pred_type(pred_type)
  schedule = as_schedule(schedule)

  def guided_fn(x_t: Array, t: Array) -> Array:
    logsnr = schedule(t)  # [B]
    alpha, sigma = alpha_sigma(gaussian.broadcast_to_x(logsnr, x_t))  # [B, 1, ..., 1]

    def log_prob(x):  # Σ_b log p(c_b | x_b): the sum's gradient is each example's own
      pred = model_fn(x, t) if grad_through_model else jax.lax.stop_gradient(fixed_pred)
      x0, eps = gaussian.to_x0_eps(pred, x, logsnr, pred_type)
      if not grad_through_model:  # ∂x̂0/∂x_t ≈ α I (see the docstring)
        x0 = jax.lax.stop_gradient(x0) + alpha * (x - jax.lax.stop_gradient(x))
      return jnp.sum(log_prob_fn(x, t, x0).astype(jnp.float32)), pred

    fixed_pred = None if grad_through_model else model_fn(x_t, t)
    grad, pred = jax.grad(log_prob, has_aux=True)(x_t)  # ∇_{x_t} log p(c | x_t), [B, ...]
    x0, eps = gaussian.to_x0_eps(pred, x_t, logsnr, pred_type)
    s = gaussian.broadcast_to_x(jnp.asarray(scale, jnp.float32), x_t, "scale")
    eps = eps - s * sigma * grad
    x0 = x0 + s * sigma**2 / alpha * grad
    return gaussian.pred_from_x0_eps(x0, eps, logsnr, pred_type).astype(pred.dtype)

  return guided_fn


def check_threshold(mode: str, percentile: float, max_scale: float | None = None) -> None:
  """Raises ``ValueError`` for an unknown ``mode``, a ``percentile`` outside (0, 100] or a
  ``max_scale`` below 1."""
  if mode not in THRESHOLD_MODES:
    raise ValueError(f"thresholding mode must be one of {THRESHOLD_MODES}, got {mode!r}")
  _check_percentile(percentile)
  if max_scale is not None and not (_is_concrete(max_scale) and float(max_scale) >= 1.0):
    raise ValueError(f"threshold max_scale must be a number >= 1 or None, got {max_scale!r}")


def _check_percentile(percentile: float) -> None:
  # Static: the percentile picks the order statistics, so it cannot be a traced value.
  if not _is_concrete(percentile) or not 0.0 < float(percentile) <= 100.0:
    raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")


def _kth_smallest_bits(bits: Array, k: int) -> Array:
  """Per row, the k-th smallest (0-based) of ``bits`` [B, D]: int32 patterns of floats ≥ 0.

  Non-negative IEEE floats order like their bit patterns, so bisection on the pattern finds the
  exact order statistic in 31 counting passes over the row; a sort of the row costs ~30× more on
  CPU at 64² and grows faster with the image size.
  """
  lo = jnp.zeros(bits.shape[:1], jnp.int32)  # [B]
  hi = jnp.max(bits, axis=1)  # [B]; invariant: the answer lies in [lo, hi]

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1, dtype=jnp.int32) >= k + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  return jax.lax.fori_loop(0, 31, halve, (lo, hi))[1]


def abs_percentile(x: Array, percentile: float, *, impl: str = "auto") -> Array:
  """``jnp.percentile(|x|, p, axis=1)`` (linear interpolation) for ``x`` [B, D].

  ``impl`` (:mod:`imagen_jax.kernels`, kind ``"percentile"``): ``"bisect"`` finds the two order
  statistics around rank (D − 1)·p/100 exactly by bisection (``_kth_smallest_bits``, no sort; 30×
  faster than a sort on CPU) and interpolates them as numpy does; ``"sort"`` is
  ``jnp.percentile``; ``"auto"`` takes bisect on CPU and sort on GPU/TPU. Both give the same
  numbers. Rows holding NaN give NaN.
  """
  _check_percentile(percentile)
  a = jnp.abs(x.astype(jnp.float32))  # [B, D]
  nan_rows = jnp.isnan(a).any(axis=1)  # [B]
  if kernels.resolve("percentile", impl, field="percentile impl") == "sort":
    return jnp.where(nan_rows, jnp.nan, jnp.percentile(a, float(percentile), axis=1))
  d = a.shape[1]
  rank = (d - 1) * float(percentile) / 100.0
  k = min(int(np.floor(rank)), d - 1)
  frac = rank - k
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)  # [B, D]
  lower = _kth_smallest_bits(bits, k)  # [B]
  if k + 1 < d and frac > 0:
    # The (k+1)-th smallest: ``lower`` again when it is repeated, else the next larger value.
    count = jnp.sum(bits <= lower[:, None], axis=1, dtype=jnp.int32)
    larger = jnp.where(bits > lower[:, None], bits, jnp.iinfo(jnp.int32).max)
    upper = jnp.where(count >= k + 2, lower, jnp.min(larger, axis=1))
  else:
    upper = lower
  v0 = jax.lax.bitcast_convert_type(lower, jnp.float32)
  v1 = jax.lax.bitcast_convert_type(upper, jnp.float32)
  out = v0 + (v1 - v0) * frac  # [B]
  return jnp.where(nan_rows, jnp.nan, out)


def dynamic_threshold(
  x0: Array, percentile: float = 99.5, max_scale: float | None = None, *, impl: str = "auto"
) -> Array:
  """Dynamic thresholding (Imagen §2.3): per sample, s = percentile_p(|x̂0|), s = max(s, 1);
  x̂0 ← clip(x̂0, −s, s) / s.

  Samples already in [−1, 1] have s ≤ 1 → s = 1 and are returned unchanged; others are
  squeezed into [−1, 1] instead of being saturated by a hard clip.

  Args:
    x0: predicted data, ``[B, ...]``.
    percentile: p ∈ (0, 100]; the paper uses 99.5.
    max_scale: cap on s (DeepFloyd IF: s ≤ 1.5, diffusers' ``sample_max_value``; values beyond
      are clipped); ``None`` = no cap, as in the paper.
    impl: how the percentile is computed: ``"auto"``, ``"bisect"`` or ``"sort"``
      (:func:`abs_percentile`).
  """
  s = abs_percentile(x0.reshape(x0.shape[0], -1), percentile, impl=impl)  # [B]
  s = jnp.maximum(s, 1.0)
  if max_scale is not None:
    s = jnp.minimum(s, float(max_scale))
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def threshold(
  x0: Array,
  mode: str,
  percentile: float = 99.5,
  max_scale: float | None = None,
  *,
  percentile_impl: str = "auto",
) -> Array:
  """Applies ``"none"``, ``"static"`` (clip to [−1, 1], Imagen §2.3) or ``"dynamic"`` thresholding.

  Args:
    x0: predicted data, ``[B, ...]``.
    mode: ``"none"``, ``"static"`` or ``"dynamic"``.
    percentile: p for dynamic thresholding, in (0, 100].
    max_scale: dynamic thresholding's cap on s (see :func:`dynamic_threshold`).
    percentile_impl: how dynamic thresholding computes the percentile (``"auto"``, ``"bisect"``,
      ``"sort"``; :func:`abs_percentile`).
  """
  check_threshold(mode, percentile, max_scale)
  kernels.check_choice("percentile", percentile_impl, "percentile_impl")
  if mode == "none":
    return x0
  if mode == "static":
    return jnp.clip(x0, -1.0, 1.0)
  return dynamic_threshold(x0, percentile, max_scale, impl=percentile_impl)
