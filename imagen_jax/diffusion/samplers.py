"""Samplers: ancestral (DDPM), DDIM and DPM-Solver++ (2M, 3M, 2M SDE), each one ``lax.fori_loop``.

All samplers walk a time grid t_start = t_0 > t_1 > … > t_N = t_end (uniform in t by default;
uniform in log-SNR or Karras' σ spacing with ``spacing``, :mod:`imagen_jax.diffusion.spacing`),
call ``model_fn(x_t, t)`` once per step, turn its output into (x̂0, ε̂)
(:func:`gaussian.to_x0_eps`), threshold x̂0 (Imagen §2.3) and move x_{t_i} → x_{t_{i+1}}. The last
step returns the (thresholded) x̂0 itself: with t_end = 0 that is the σ → 0 limit of every update
below, and it keeps a huge last step in log-SNR (λ jumps to ``logsnr_max``) from amplifying solver
error.

Notation: step from t to s < t, λ = log-SNR, α² = sigmoid(λ), σ² = sigmoid(−λ),
r = SNR_t / SNR_s = exp(λ_t − λ_s) ∈ (0, 1]. DPM-Solver's h is in half log-SNR, h = (λ_s − λ_t)/2.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian, inpaint
from imagen_jax.diffusion.discrete import learned_range_log_variance
from imagen_jax.diffusion.guidance import check_threshold, threshold
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, as_schedule
from imagen_jax.diffusion.spacing import check_spacing, time_grid

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

SAMPLERS = ("ancestral", "ddim", "dpmpp_2m")
# DPM-Solver++(3M) and DPM-Solver++(2M) SDE. Kept apart from SAMPLERS, which the sampler tests
# (tests/diffusion/test_samplers.py) and the settings iterate, until those list them too.
DPMPP_VARIANTS = ("dpmpp_3m", "dpmpp_2m_sde")
# Every sampler that ``sample`` accepts.
ALL_SAMPLERS = SAMPLERS + DPMPP_VARIANTS
# The samplers that draw noise at every step (they need ``rng``).
STOCHASTIC_SAMPLERS = ("ancestral", "dpmpp_2m_sde")
# The DPM-Solver++ multistep samplers (they carry a history of x̂0).
MULTISTEP_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde")
# Everything but the data: pass to ``jax.jit(sample, static_argnames=SAMPLE_STATIC_ARGNAMES)``.
SAMPLE_STATIC_ARGNAMES = (
  "model_fn",
  "sampler",
  "steps",
  "schedule",
  "pred_type",
  "thresholding",
  "percentile",
  "eta",
  "t_start",
  "t_end",
  "progress_fn",
  "progress_x0",
  "after_step",
  "shared_noise",
  "resample",
  "jump",
  "threshold_max",
  "learned_variance",
  "spacing",
  "percentile_impl",
)


def ancestral_step(
  x_t: Array,
  x0: Array,
  logsnr_t: Array,
  logsnr_s: Array,
  noise: Array,
  log_variance: Array | None = None,
) -> Array:
  """One draw from the posterior q(x_s | x_t, x0 = x̂0) (Ho et al. 2020 eq. (6)-(7) in continuous
  time, as in VDM; Imagen App. A eq. (6) with γ = 0, i.e. the posterior variance):

    μ = r (α_s / α_t) x_t + (1 − r) α_s x̂0,    σ̃² = (1 − r) σ_s².

  1 − r is computed as −expm1(λ_t − λ_s) so that small steps keep their digits.
  ``log_variance`` replaces σ̃² by a model's own (the learned range of
  :func:`~imagen_jax.diffusion.discrete.learned_range_log_variance`); the mean is unchanged.
  """
  alpha_t, _ = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  r = jnp.exp(logsnr_t - logsnr_s)
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  mean = r * (alpha_s / alpha_t) * x_t + one_minus_r * alpha_s * x0
  if log_variance is not None:
    return mean + jnp.exp(0.5 * log_variance) * noise
  return mean + jnp.sqrt(one_minus_r) * sigma_s * noise


def ddim_step(
  x0: Array,
  eps: Array,
  logsnr_t: Array,
  logsnr_s: Array,
  noise: Array | None,
  eta: float,
) -> Array:
  """DDIM update (Song et al. 2021 eq. (12), with σ_t(η) from eq. (16); Imagen eq. (5)):

    x_s = α_s x̂0 + √(σ_s² − c²) ε̂ + c z,    c = η σ_s √(1 − r).

  η = 0 is the deterministic probability-flow solver; η = 1 is exactly :func:`ancestral_step`
  (c = the posterior std). For η > 1, c would exceed σ_s and the ε̂ coefficient is taken as 0.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  if noise is None or eta == 0.0:
    return alpha_s * x0 + sigma_s * eps
  c = eta * sigma_s * jnp.sqrt(-jnp.expm1(logsnr_t - logsnr_s))
  return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps + c * noise


def dpmpp_2m_step(
  x_t: Array,
  x0: Array,
  x0_prev: Array,
  logsnr_t: Array,
  logsnr_s: Array,
  h_prev: Array,
  first: Array,
) -> tuple[Array, Array]:
  """DPM-Solver++(2M) multistep update (Lu et al. 2022b, Alg. 2), data prediction form.

  With DPM-Solver's half log-SNR λ' = λ/2 = log(α/σ), h = λ'_s − λ'_t and r = h_prev / h:

    D = x̂0 + (1 / 2r) (x̂0 − x̂0_prev)       (D = x̂0 on the ``first`` step: DPM-Solver++(1))
    x_s = (σ_s / σ_t) x_t − α_s (e^{−h} − 1) D.

  Returns:
    ``(x_s, h)``; h is carried to the next step as ``h_prev``.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  h = 0.5 * (logsnr_s - logsnr_t)
  # 1 / (2r) = h / (2 h_prev); h_prev is 0 before the first step, so guard the division.
  coef = jnp.where(first, 0.0, h / (2.0 * jnp.where(first, 1.0, h_prev)))
  d = x0 + coef * (x0 - x0_prev)
  return (sigma_s / sigma_t) * x_t - alpha_s * jnp.expm1(-h) * d, h


def dpmpp_3m_step(
  x_t: Array,
  x0s: tuple[Array, Array, Array],
  logsnr_t: Array,
  logsnr_s: Array,
  hs_prev: tuple[Array, Array],
  order: Array,
) -> tuple[Array, Array]:
  """DPM-Solver++(3M) multistep update: Lu et al. 2022b's multistep data-prediction solver at
  third order (as in the authors' code and diffusers' ``multistep_dpm_solver_third_order_update``).

  With m0, m1, m2 = x̂0 at t and the two previous grid points, h = λ'_s − λ'_t and the previous
  steps h_0, h_1 (λ' = λ/2), the divided differences in λ'

    g0 = (m0 − m1) / h_0,   g1 = (m1 − m2) / h_1,
    d1 = g0 + h_0 / (h_0 + h_1) (g0 − g1),   d2 = (g0 − g1) / (h_0 + h_1)

  give the exponential integrator of the Taylor expansion of x̂0 in λ' (e^{−h} − 1 = expm1(−h)):

    x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) m0 + α_s (e^{−h} − 1 + h) d1
          − α_s (e^{−h} − 1 + h − h²/2) d2.

  This is diffusers' form with D1 = h d1 and D2 = h² d2, written without dividing by h (so a
  zero-length step is x_s = x_t, not 0/0). ``order`` < 3 (the first two steps after a restart)
  falls back to DPM-Solver++(2M) (:func:`dpmpp_2m_step`; it is (1) for ``order`` = 1), as
  diffusers' warm-up does.

  Args:
    x_t: the state at t, ``[B, ...]``.
    x0s: ``(m0, m1, m2)``, each like ``x_t`` (m1, m2 are ignored below orders 2, 3).
    logsnr_t: λ_t.
    logsnr_s: λ_s > λ_t.
    hs_prev: ``(h_0, h_1)``: the last two steps in λ'.
    order: 1, 2 or 3 (int32 scalar).

  Returns:
    ``(x_s, h)``.
  """
  m0, m1, m2 = x0s
  h0, h1 = hs_prev
  x_2m, h = dpmpp_2m_step(x_t, m0, m1, logsnr_t, logsnr_s, h0, order < 2)
  third = order >= 3
  # Below order 3 the history may hold zero steps: divide by 1 there (the result is unused).
  safe = lambda v: jnp.where(third, v, 1.0)
  g0 = (m0 - m1) / safe(h0)
  g1 = (m1 - m2) / safe(h1)
  d1 = g0 + (h0 / safe(h0 + h1)) * (g0 - g1)
  d2 = (g0 - g1) / safe(h0 + h1)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  em1 = jnp.expm1(-h)  # e^{−h} − 1
  x_3m = (
    (sigma_s / sigma_t) * x_t
    - alpha_s * em1 * m0
    + alpha_s * (em1 + h) * d1
    - alpha_s * (em1 + h - 0.5 * h * h) * d2
  )
  return jnp.where(third, x_3m, x_2m), h


def dpmpp_2m_sde_step(
  x_t: Array,
  x0: Array,
  x0_prev: Array,
  logsnr_t: Array,
  logsnr_s: Array,
  h_prev: Array,
  first: Array,
  noise: Array,
) -> tuple[Array, Array]:
  """DPM-Solver++(2M) SDE update: the stochastic form of Lu et al. 2022b's 2M, data prediction
  (diffusers' ``algorithm_type="sde-dpmsolver++"``, ``solver_type="midpoint"``):

    x_s = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) D + σ_s √(1 − e^{−2h}) z,
    D = x̂0 + (1 / 2r) (x̂0 − x̂0_prev),  r = h_prev / h   (D = x̂0 on the ``first`` step).

  Since e^{−2h} = SNR_t / SNR_s, (σ_s/σ_t) e^{−h} = r_snr α_s / α_t: this is exactly the
  ancestral step (:func:`ancestral_step`) taken with the multistep D in place of x̂0, so its
  first-order form is DDPM itself and it keeps DDPM's noise while gaining an order.

  Returns:
    ``(x_s, h)``.
  """
  h = 0.5 * (logsnr_s - logsnr_t)
  coef = jnp.where(first, 0.0, h / (2.0 * jnp.where(first, 1.0, h_prev)))
  d = x0 + coef * (x0 - x0_prev)
  return ancestral_step(x_t, d, logsnr_t, logsnr_s, noise), h


def denoise(
  pred: Array,
  x_t: Array,
  logsnr: Array,
  pred_type: str,
  thresholding: str,
  percentile: float,
  threshold_max: float | None = None,
  percentile_impl: str = "auto",
) -> tuple[Array, Array]:
  """A model output → the thresholded (x̂0, ε̂) every sampler steps with (Imagen §2.3).

  ε̂ is recomputed from the clipped x̂0 so that x_t = α x̂0 + σ ε̂ still holds.
  ``percentile_impl``: the dynamic-thresholding percentile's kernel (:mod:`imagen_jax.kernels`).
  """
  x0, eps = gaussian.to_x0_eps(pred, x_t, logsnr, pred_type)
  if thresholding != "none":
    x0 = threshold(x0, thresholding, percentile, threshold_max, percentile_impl=percentile_impl)
    eps = gaussian.eps_from_x0(x0, x_t, logsnr)
  return x0, eps


def solver_step(
  sampler: str,
  x_t: Array,
  x0: Array,
  eps: Array,
  aux: Any,
  logsnr_t: Array,
  logsnr_s: Array,
  first: Array,
  noise: Array | None,
  eta: float,
  log_variance: Array | None = None,
) -> tuple[Array, Any]:
  """One move t → s of ``sampler`` from the denoised (x̂0, ε̂) at t; ``aux`` is the multistep
  history (``(x̂0_prev, h_prev)`` for DPM-Solver++(2M) and its SDE,
  ``((x̂0_prev, x̂0_prev2), (h_prev, h_prev2), count)`` for 3M, ``()`` otherwise), ``first``
  restarts it. ``noise``: the step's draw (ancestral, DDIM η > 0, 2M SDE).
  ``log_variance``: a learned variance for the ancestral step (ignored by the others).

  Returns:
    ``(x_s, aux)``.
  """
  if sampler == "ancestral":
    return ancestral_step(x_t, x0, logsnr_t, logsnr_s, noise, log_variance), aux
  if sampler == "ddim":
    return ddim_step(x0, eps, logsnr_t, logsnr_s, noise if eta > 0 else None, eta), aux
  if sampler == "dpmpp_3m":
    (m1, m2), (h0, h1), count = aux
    count = jnp.where(first, 0, count)  # previous x̂0s held: 0, 1 or 2
    x0s = (x0, m1.astype(x0.dtype), m2.astype(x0.dtype))
    x_s, h = dpmpp_3m_step(x_t, x0s, logsnr_t, logsnr_s, (h0, h1), count + 1)
    new_count = jnp.minimum(count + 1, 2)
    return x_s, ((x0.astype(m1.dtype), m1), (h, h0), new_count)
  x0_prev, h_prev = aux
  if sampler == "dpmpp_2m_sde":
    x_s, h = dpmpp_2m_sde_step(x_t, x0, x0_prev, logsnr_t, logsnr_s, h_prev, first, noise)
  else:
    x_s, h = dpmpp_2m_step(x_t, x0, x0_prev, logsnr_t, logsnr_s, h_prev, first)
  return x_s, (x0.astype(x0_prev.dtype), h)


def initial_aux(sampler: str, x: Array) -> Any:
  """The empty multistep history of ``sampler`` for states like ``x``."""
  if sampler == "dpmpp_3m":
    zero = jnp.zeros((), jnp.float32)
    return (jnp.zeros_like(x), jnp.zeros_like(x)), (zero, zero), jnp.zeros((), jnp.int32)
  if sampler in MULTISTEP_SAMPLERS:
    return (jnp.zeros_like(x), jnp.zeros((), jnp.float32))
  return ()


def _is_stochastic(sampler: str, eta: float) -> bool:
  return sampler in STOCHASTIC_SAMPLERS or (sampler == "ddim" and eta > 0)


def _check_config(model_fn, x_T, rng, sampler, steps, pred_type, eta, t_start, t_end, progress_fn):
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
  if sampler not in ALL_SAMPLERS:
    raise ValueError(f"sampler must be one of {ALL_SAMPLERS}, got {sampler!r}")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  gaussian.check_pred_type(pred_type)
  if not isinstance(eta, numbers.Real) or eta < 0:
    raise ValueError(f"eta must be a number >= 0, got {eta!r}")
  if not (isinstance(t_start, numbers.Real) and isinstance(t_end, numbers.Real)):
    raise ValueError(f"t_start and t_end must be Python numbers, got {t_start!r}, {t_end!r}")
  if not 0.0 <= t_end < t_start <= 1.0:
    raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
  if jnp.ndim(x_T) < 1:
    raise ValueError(f"x_T must have a leading batch dimension, got shape {jnp.shape(x_T)}")
  if progress_fn is not None and not callable(progress_fn):
    raise ValueError("progress_fn must be callable or None")
  if _is_stochastic(sampler, eta) and rng is None:
    raise ValueError(f"rng is required for sampler={sampler!r} (eta={eta})")


def sample(
  model_fn: ModelFn,
  x_T: Array,
  rng: Array | None,
  *,
  sampler: str,
  steps: int,
  schedule: Schedule | str,
  pred_type: str,
  thresholding: str = "dynamic",
  percentile: float = 99.5,
  eta: float = 0.0,
  t_start: float = 1.0,
  t_end: float = 0.0,
  progress_fn: Callable[[Array, Array], None] | None = None,
  progress_x0: bool = True,
  state: Any = None,
  after_step: Callable[[Array, Array, Any], Array] | None = None,
  shared_noise: bool = False,
  known: Array | None = None,
  mask: Array | None = None,
  resample: int = 1,
  jump: int = 1,
  threshold_max: float | None = None,
  learned_variance: bool = False,
  spacing: str = "uniform",
  percentile_impl: str = "auto",
) -> Array | tuple[Array, Any]:
  """Runs a whole sampler as one ``lax.fori_loop`` and returns x̂0.

  Args:
    model_fn: ``model_fn(x_t, t) -> pred`` with ``x_t [B, ...]``, ``t [B]`` (float32, in [0, 1]);
      any function (the U-Net, a CFG wrapper from :func:`classifier_free_guidance`, an oracle).
    x_T: the starting point, ``[B, ...]``: pure noise for t_start = 1, or ``q_sample`` of an
      image at t_start for img2img / SDEdit.
    rng: PRNG key for the stochastic samplers (may be ``None`` for DDIM η = 0 and the
      deterministic DPM++ samplers).
    sampler: ``"ancestral"``, ``"ddim"``, ``"dpmpp_2m"``, ``"dpmpp_3m"`` (DPM-Solver++(3M)) or
      ``"dpmpp_2m_sde"`` (DPM-Solver++(2M) SDE, stochastic).
    steps: number of model evaluations, ≥ 1.
    schedule: the noise schedule the model was trained with (or its name).
    pred_type: what ``model_fn`` predicts: ``"eps"``, ``"x0"`` or ``"v"``.
    thresholding: ``"none"``, ``"static"`` or ``"dynamic"`` (applied to x̂0 at every step).
    percentile: p for dynamic thresholding, in (0, 100].
    eta: DDIM stochasticity η ≥ 0 (ignored by the other samplers).
    t_start: first time, in (t_end, 1].
    t_end: end of the time grid, in [0, t_start).
    progress_fn: optional ``progress_fn(step, x0_pred)``, called through an unordered
      ``jax.debug.callback`` at every step (a sharded x0_pred is gathered to one device for
      it); ``None`` adds nothing to the program. Unordered because ordered effects are not
      supported on more than one device.
    progress_x0: pass x̂0 to ``progress_fn`` (``False`` passes ``None``: a progress bar then
      costs no device-to-host copy of the images).
    state: optional pytree of arrays carried through the loop (e.g. prompt-to-prompt's
      aggregated attention maps). With it, the model is called as
      ``model_fn(x_t, t, step, state) -> (pred, state)`` (``step`` is the traced int32 step
      index, so step-dependent behaviour never recompiles) and ``sample`` returns
      ``(x0, state)``.
    after_step: optional ``after_step(step, x_next, state) -> x_next``, applied to every
      step's result (the last step's is x̂0), e.g. prompt-to-prompt's local blending; needs
      ``state``.
    shared_noise: draw one noise row per step and give it to every batch row (edits of one
      source image share its noise, so rows with equal inputs stay bit-identical).
    known: inpainting: the known image ``[B, ...]`` (shape of ``x_T``). After every step to
      time s the pixels outside ``mask`` are replaced by q_sample(known, λ_s) (fresh noise), and
      the result holds ``known`` there exactly (:mod:`imagen_jax.diffusion.inpaint`). Needs
      ``rng``.
    mask: with ``known``: True (or 1) where pixels are generated, broadcastable to ``x_T``
      (``[B, H, W, 1]`` for images).
    resample: RePaint resampling: each stretch of ``jump`` steps is walked ``resample`` times,
      going back up with the forward process in between (1 = plain replacement). Only with
      ``known``.
    jump: RePaint's jump length, in steps.
    threshold_max: dynamic thresholding's cap on the scale s (DeepFloyd IF: 1.5).
    learned_variance: ``model_fn`` returns 2C channels on the last axis: the prediction, then
      a learned-range variance v (DDPM with learned Σ, Nichol & Dhariwal 2021; DeepFloyd IF).
      The ancestral sampler steps with Σ = exp(f log β + (1 − f) log β̃), f = (v + 1)/2; DDIM
      and DPM-Solver++ use the prediction only.
    spacing: where the N steps go (:mod:`imagen_jax.diffusion.spacing`): ``"uniform"`` in t
      (the default; diffusers' "trailing" on a discrete schedule), ``"logsnr"`` (uniform in
      log-SNR) or ``"karras"`` (Karras et al. 2022's σ^{1/7} spacing).
    percentile_impl: the dynamic-thresholding percentile's kernel: ``"auto"`` (by backend),
      ``"bisect"`` or ``"sort"`` (:mod:`imagen_jax.kernels`).

  The model sees grid indices as ``step``: under resampling a step index repeats.

  Returns:
    The sample x̂0, with the shape and dtype of ``x_T`` (and the final ``state`` if given).

  Raises:
    ValueError: an invalid argument (checked before the loop is traced), or a ``model_fn``
      output whose shape differs from ``x_T`` (checked when the loop body is traced).

  Jit it with the configuration static, e.g.
  ``jax.jit(sample, static_argnames=SAMPLE_STATIC_ARGNAMES)``, or call it inside your own jitted
  function; changing only ``x_T``, ``rng`` or arrays closed over by the traced caller does not
  recompile.
  """
  _check_config(model_fn, x_T, rng, sampler, steps, pred_type, eta, t_start, t_end, progress_fn)
  check_threshold(thresholding, percentile, threshold_max)
  check_spacing(spacing)
  if after_step is not None and state is None:
    raise ValueError("after_step needs state (it is called as after_step(step, x_next, state))")
  inpaint.check_resample(resample, jump)
  if (known is None) != (mask is None):
    raise ValueError("inpainting needs both known (the image) and mask (True = generate)")
  if known is None and (resample, jump) != (1, 1):
    raise ValueError("resample/jump are RePaint settings: they need known and mask")
  if known is not None:
    if tuple(jnp.shape(known)) != tuple(jnp.shape(x_T)):
      raise ValueError(f"known has shape {jnp.shape(known)}, but x_T has {jnp.shape(x_T)}")
    try:
      jnp.broadcast_shapes(jnp.shape(mask), jnp.shape(x_T))
    except ValueError:
      raise ValueError(
        f"mask of shape {jnp.shape(mask)} does not broadcast to x_T {jnp.shape(x_T)}"
      ) from None
    if rng is None:
      raise ValueError("rng is required for inpainting (the known region is re-noised)")
    mask = jnp.asarray(mask).astype(bool)
  stateful = state is not None
  schedule = as_schedule(schedule)
  x_T = jnp.asarray(x_T)
  batch, dtype = x_T.shape[0], x_T.dtype
  ts = time_grid(steps, t_start, t_end, spacing=spacing, schedule=schedule)  # [N + 1]
  logsnrs = schedule(ts)  # [N + 1]
  path = inpaint.repaint_path(steps, resample, jump)  # [M, 2] static moves (i → j)
  moves = jnp.asarray(path)
  has_jumps = bool((path[:, 1] < path[:, 0]).any())

  def draw(key):
    if shared_noise:  # one row for the whole batch: [1, ...] broadcast to [B, ...]
      return jnp.broadcast_to(jax.random.normal(key, (1, *x_T.shape[1:]), dtype), x_T.shape)
    return jax.random.normal(key, x_T.shape, dtype)

  def down(k, i, x, aux, state, fresh):
    """Step t_i → t_{i+1} (the last step returns x̂0)."""
    t = jnp.full((batch,), ts[i], jnp.float32)
    if stateful:
      pred, state = model_fn(x, t, i, state)
    else:
      pred = model_fn(x, t)
    want = (*x.shape[:-1], 2 * x.shape[-1]) if learned_variance else tuple(x.shape)
    if tuple(pred.shape) != want:
      raise ValueError(
        f"model_fn output has shape {tuple(pred.shape)}, but x_T has shape {tuple(x.shape)}"
        + (" (learned_variance: 2× the channels)" if learned_variance else "")
      )
    log_var = None
    if learned_variance:
      c = x.shape[-1]
      pred, v = pred[..., :c], pred[..., c:]
      if sampler == "ancestral":
        log_var = learned_range_log_variance(v, logsnrs[i], logsnrs[i + 1])
    x0, eps = denoise(
      pred, x, logsnrs[i], pred_type, thresholding, percentile, threshold_max, percentile_impl
    )
    if progress_fn is not None:
      jax.debug.callback(progress_fn, i, x0 if progress_x0 else None)
    lt, ls = logsnrs[i], logsnrs[i + 1]
    noise = draw(jax.random.fold_in(rng, k)) if _is_stochastic(sampler, eta) else None
    x_next, aux = solver_step(sampler, x, x0, eps, aux, lt, ls, fresh, noise, eta, log_var)
    last = i == steps - 1
    x_next = jnp.where(last, x0, x_next)  # the last step returns x̂0
    if known is not None:
      z = draw(jax.random.fold_in(jax.random.fold_in(rng, 1 << 30), k))
      x_next = jnp.where(
        last,
        inpaint.paste_known(x_next, known, mask, None, z),
        inpaint.paste_known(x_next, known, mask, ls, z),
      )
    if after_step is not None:
      x_next = after_step(i, x_next, state)
    return x_next.astype(dtype), aux, state

  def up(k, i, j, x):
    """Jump back t_i → t_j (j < i) with the forward process q(x_{t_j} | x_{t_i})."""
    z = draw(jax.random.fold_in(jax.random.fold_in(rng, 1 << 29), k))
    return inpaint.forward_jump(x, logsnrs[i], logsnrs[j], z).astype(dtype)

  def body(k, carry):
    x, aux, state, fresh = carry
    i, j = moves[k, 0], moves[k, 1]
    if not has_jumps:
      x, aux, state = down(k, i, x, aux, state, fresh)
      return x, aux, state, jnp.zeros((), bool)

    def go_down(operands):
      x, aux, state = operands
      x, aux, state = down(k, i, x, aux, state, fresh)
      return x, aux, state, jnp.zeros((), bool)

    def go_up(operands):
      x, aux, state = operands
      return up(k, i, j, x), aux, state, jnp.ones((), bool)  # multistep history restarts

    return jax.lax.cond(j > i, go_down, go_up, (x, aux, state))

  carry = (x_T, initial_aux(sampler, x_T), state if stateful else (), jnp.ones((), bool))
  x0, _, state, _ = jax.lax.fori_loop(0, len(path), body, carry)
  return (x0, state) if stateful else x0
