"""Inversion: an image → the latent x_1 from which the deterministic samplers regenerate it.

* :func:`invert` runs DDIM (η = 0) or DPM-Solver++(2M) backwards along the sampling grid,
  t_N = 0 → t_0 = 1, evaluating the model at the less noisy end of each step (Song et al. 2021
  §4.3; Dhariwal & Nichol 2021 App. F: the ODE read in reverse). The error of that one-sided
  evaluation is what makes the reconstruction inexact; it falls as the steps grow.
* :func:`null_text_inversion` (Mokady et al. 2022, Alg. 1): the inversion trajectory at w = 1
  is the *pivot*; for guided sampling (w > 1) to retrace it, the unconditional ("null") condition
  of every step is optimised so that the guided step from the current point lands on the next
  pivot. Sampling then takes those per-step null conditions and reconstructs the image under
  strong guidance, which plain inversion cannot (guidance bends the trajectory away).

Grids and steps are exactly those of :func:`imagen_jax.diffusion.samplers.sample` (same
``steps``, ``t_start``, ``spacing``), so ``sample(model, invert(model, x0, ...), ...)``
reconstructs ``x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from imagen_jax.diffusion.samplers import (
  denoise,
  initial_aux,
  solver_step,
  time_grid,
)
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, as_schedule
from imagen_jax.diffusion.spacing import check_spacing

Array = jax.Array

INVERTIBLE_SAMPLERS = ("ddim", "dpmpp_2m")


def _check(sampler: str, steps: int, t_start: float, spacing: str) -> None:
  if sampler not in INVERTIBLE_SAMPLERS:
    raise ValueError(
      f"inversion needs a deterministic sampler: one of {INVERTIBLE_SAMPLERS}, got {sampler!r} "
      f"(ancestral sampling is not invertible)"
    )
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  if not 0.0 < float(t_start) <= 1.0:
    raise ValueError(f"t_start must be in (0, 1], got {t_start}")
  check_spacing(spacing)


def inverse_step(
  sampler: str,
  x_t: Array,
  x0: Array,
  eps: Array,
  aux: Any,
  logsnr_t: Array,
  logsnr_s: Array,
  first: Array,
) -> tuple[Array, Any]:
  """One move t → s *up* the grid (s noisier than t) with the model evaluated at t.

  DDIM: x_s = α_s x̂0 + σ_s ε̂. DPM-Solver++(2M) in the form that stays exact at t ≈ 0
  (σ_t → 0, where the forward form's σ_s / σ_t blows up): with D the multistep x̂0,

    x_s = α_s D + σ_s (ε̂ − (α_t / σ_t)(D − x̂0)),

  which equals (σ_s / σ_t) x_t − α_s (e^{−h} − 1) D for x_t = α_t x̂0 + σ_t ε̂.
  """
  if sampler == "ddim":
    return solver_step("ddim", x_t, x0, eps, aux, logsnr_t, logsnr_s, first, None, 0.0)
  x0_prev, h_prev = aux
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  h = 0.5 * (logsnr_s - logsnr_t)
  coef = jnp.where(first, 0.0, h / (2.0 * jnp.where(first, 1.0, h_prev)))
  delta = coef * (x0 - x0_prev)  # D − x̂0
  snr_t_sqrt = jnp.exp(0.5 * logsnr_t)  # α_t / σ_t
  x_s = alpha_s * (x0 + delta) + sigma_s * (eps - snr_t_sqrt * delta)
  return x_s, (x0.astype(x0_prev.dtype), h)


def invert(
  model_fn: Callable[[Array, Array], Array],
  x0: Array,
  *,
  sampler: str = "ddim",
  steps: int,
  schedule: Schedule | str,
  pred_type: str,
  thresholding: str = "none",
  percentile: float = 99.5,
  t_start: float = 1.0,
  return_trajectory: bool = False,
  spacing: str = "uniform",
) -> Array | tuple[Array, Array]:
  """Inverts ``x0`` to the latent at ``t_start`` for ``sample(..., sampler, steps, t_start)``.

  Args:
    model_fn: ``model_fn(x_t, t) -> pred`` (the conditional model, or a guided one).
    x0: the images, ``[B, ...]``.
    sampler: ``"ddim"`` (η = 0) or ``"dpmpp_2m"``: the sampler that will regenerate.
    steps, schedule, pred_type, thresholding, percentile, t_start, spacing: as for ``sample``
      (thresholding is off by default: clipping x̂0 of a real image loses information).
    return_trajectory: also return every point x_{t_i} of the grid, ``[N + 1, B, ...]`` in
      sampling order (index 0 = the latent, index N = ``x0``): the pivots of null-text inversion.

  Returns:
    The latent ``[B, ...]`` (and the trajectory).
  """
  _check(sampler, steps, t_start, spacing)
  schedule = as_schedule(schedule)
  x0 = jnp.asarray(x0)
  batch, dtype = x0.shape[0], x0.dtype
  ts = time_grid(steps, t_start, 0.0, spacing=spacing, schedule=schedule)  # [N + 1], t_N = 0
  logsnrs = schedule(ts)

  def body(carry, i):  # i = N, N−1, …, 1: move t_i → t_{i−1}
    x, aux, first = carry
    pred = model_fn(x, jnp.full((batch,), ts[i], jnp.float32))
    x0_hat, eps = denoise(pred, x, logsnrs[i], pred_type, thresholding, percentile)
    x_prev, aux = inverse_step(sampler, x, x0_hat, eps, aux, logsnrs[i], logsnrs[i - 1], first)
    x_prev = x_prev.astype(dtype)
    return (x_prev, aux, jnp.zeros((), bool)), x_prev

  carry = (x0, initial_aux(sampler, x0), jnp.ones((), bool))
  (latent, _, _), path = jax.lax.scan(body, carry, jnp.arange(steps, 0, -1))
  if not return_trajectory:
    return latent
  # path[k] is x_{t_{N−1−k}}: reverse to sampling order and end with x0 itself.
  return latent, jnp.concatenate([path[::-1], x0[None]], axis=0)


def null_text_inversion(
  guided_fn: Callable[[Array, Array, Any], Array],
  trajectory: Array,
  null_init: Any,
  *,
  sampler: str = "ddim",
  steps: int,
  schedule: Schedule | str,
  pred_type: str,
  thresholding: str = "none",
  percentile: float = 99.5,
  t_start: float = 1.0,
  inner_steps: int = 10,
  learning_rate: float = 1e-2,
  tolerance: float = 1e-5,
  spacing: str = "uniform",
) -> tuple[Any, Array]:
  """Per-step null conditions that make guided sampling retrace ``trajectory`` (Mokady et al.).

  For steps i = 0 … N−1 (sampling order), starting from z̄_0 = the latent: optimise the null
  condition ∅_i with Adam (``inner_steps`` updates, from ∅_{i−1}; an update stops counting once
  the loss is below ``tolerance · (1 + 2i)``, the paper's early stop) to minimise

    ‖ step(z̄_i, ∅_i) − z*_{i+1} ‖²   (mean over elements; the last step's target is x0),

  then z̄_{i+1} = step(z̄_i, ∅_i). ``step`` is the guided sampler step of ``sample`` exactly, so
  sampling with the returned conditions (one per step) reproduces z̄.

  Args:
    guided_fn: ``guided_fn(x_t, t, null) -> pred``: the model under guidance with ``null`` as
      the unconditional branch's condition (a pytree of float arrays).
    trajectory: ``[N + 1, B, ...]`` pivots from ``invert(..., return_trajectory=True)`` at w = 1.
    null_init: the initial null condition (pytree).
    sampler, steps, schedule, pred_type, thresholding, percentile, t_start, spacing: as for
      ``sample``.
    inner_steps, learning_rate, tolerance: the optimisation per step (the paper: 10, 1e-2, 1e-5).

  Returns:
    ``(nulls, final)``: the null condition per step (``null_init``'s leaves with a leading
    ``[N]``) and the guided reconstruction x̂0 ``[B, ...]``.
  """
  _check(sampler, steps, t_start, spacing)
  if trajectory.shape[0] != steps + 1:
    raise ValueError(
      f"trajectory has {trajectory.shape[0]} points; steps={steps} needs {steps + 1}"
    )
  schedule = as_schedule(schedule)
  batch = trajectory.shape[1]
  ts = time_grid(steps, t_start, 0.0, spacing=spacing, schedule=schedule)
  logsnrs = schedule(ts)
  opt = optax.adam(learning_rate)

  def guided_step(null, i, x, aux, first):
    pred = guided_fn(x, jnp.full((batch,), ts[i], jnp.float32), null)
    x0, eps = denoise(pred, x, logsnrs[i], pred_type, thresholding, percentile)
    x_next, aux = solver_step(
      sampler, x, x0, eps, aux, logsnrs[i], logsnrs[i + 1], first, None, 0.0
    )
    return jnp.where(i == steps - 1, x0, x_next).astype(x.dtype), aux

  def outer(carry, i):
    x, aux, first, null = carry
    target = trajectory[i + 1]

    def loss_fn(n):
      return jnp.mean((guided_step(n, i, x, aux, first)[0] - target) ** 2)

    def inner(_, c):
      n, opt_state = c
      loss, grad = jax.value_and_grad(loss_fn)(n)
      updates, new_state = opt.update(grad, opt_state, n)
      done = loss < tolerance * (1.0 + 2.0 * i.astype(jnp.float32))
      n = jax.tree.map(lambda a, b: jnp.where(done, a, b), n, optax.apply_updates(n, updates))
      return n, jax.tree.map(lambda a, b: jnp.where(done, a, b), opt_state, new_state)

    null, _ = jax.lax.fori_loop(0, inner_steps, inner, (null, opt.init(null)))
    x, aux = guided_step(null, i, x, aux, first)
    return (x, aux, jnp.zeros((), bool), null), null

  carry = (trajectory[0], initial_aux(sampler, trajectory[0]), jnp.ones((), bool), null_init)
  (final, _, _, _), nulls = jax.lax.scan(outer, carry, jnp.arange(steps))
  return nulls, final
