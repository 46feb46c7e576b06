"""Step spacing: where a sampler's time grid t_0 = t_start > t_1 > … > t_N = t_end puts its steps.

Every sampler of :mod:`imagen_jax.diffusion.samplers` evaluates the model at t_0 … t_{N−1} and
returns x̂0 from the last evaluation, so a grid is N evaluation times plus the end t_N:

* ``"uniform"``: uniform in t, t_i = t_start − i (t_start − t_end) / N (DDIM's and VDM's grid;
  on a :class:`~imagen_jax.diffusion.discrete.DiscreteSchedule` it is diffusers'
  ``timestep_spacing="trailing"``). The last evaluation is one step above t_end.
* ``"logsnr"``: the N evaluations uniform in log-SNR λ from λ(t_start) to λ(t_min) (DPM-Solver's
  "logSNR" spacing, Lu et al. 2022a §3.3; diffusers' ``use_lu_lambdas``).
* ``"karras"``: the N evaluations uniform in σ^{1/ρ}, ρ = 7, with σ = √(e^{−λ}) = σ_t / α_t the
  variance-exploding noise level (Karras et al. 2022, eq. (5); diffusers' ``use_karras_sigmas``):
  long steps at high noise, short ones near the data.

The two new spacings end their evaluations *at* t_min, the cleanest time the model is evaluated
at, then step to t_N = t_end, as diffusers does (its last σ is 0, ``final_sigmas_type="zero"``).
t_min is 1/N_train on a ``DiscreteSchedule`` (τ = 0, the cleanest table entry: times in
(0, 1/N_train) lie between the table and the appended clean knot, noise levels the model never
saw), so on IF's schedule both grids equal diffusers' σ grids; on a continuous schedule it is
DPM-Solver's end time ε = 10⁻³ (Lu et al. 2022a, whose discrete-time models end at 1/N, i.e. the
same t as τ = 0 of a 1000-step model; cosine: λ ≈ 12.9, σ ≈ 0.0016, about EDM's σ_min = 0.002).
Ending at λ_max = 20 instead would spend the last steps on σ < 10⁻³, where x̂0 is x_t. (t_min is
raised to t_end if that is larger.)

The grid is computed in the spacing's variable and mapped back with the schedule's exact inverse
t(λ); the samplers then read λ = λ(t_i), so the model and the solver see the same noise level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.discrete import DiscreteSchedule
from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array

SPACINGS = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5) and §3: ρ = 7 throughout; diffusers' too
MIN_EVAL_T = 1e-3  # DPM-Solver's ε: the cleanest evaluation on a continuous schedule


def check_spacing(spacing: str) -> None:
  """Raises ``ValueError`` naming the argument unless ``spacing`` is one of ``SPACINGS``."""
  if spacing not in SPACINGS:
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def min_eval_time(schedule: Schedule, t_start: float, t_end: float) -> float:
  """t_min: the cleanest time the model is evaluated at by the ``logsnr``/``karras`` grids.

  1/N_train on a :class:`DiscreteSchedule`, ``MIN_EVAL_T`` otherwise (module docstring), raised
  to t_end; t_end itself when that floor is not below t_start (a grid that starts that clean).
  """
  if isinstance(schedule, DiscreteSchedule):
    floor = 1.0 / schedule.num_train_timesteps
  else:
    floor = MIN_EVAL_T
  return max(float(t_end), floor) if floor < t_start else float(t_end)


def logsnr_uniform(logsnr_hi: Array, logsnr_lo: Array, n: int) -> Array:
  """n log-SNRs uniform from λ_hi (noisiest, first) to λ_lo (cleanest, last), ``[n]``:

  λ_i = λ_hi + i/(n − 1) (λ_lo − λ_hi).
  """
  return jnp.linspace(logsnr_hi, logsnr_lo, n, dtype=jnp.float32)


def karras_logsnr(logsnr_hi: Array, logsnr_lo: Array, n: int, rho: float = KARRAS_RHO) -> Array:
  """n log-SNRs of Karras et al.'s σ grid (2022, eq. (5)), ``[n]``, noisiest first:

    σ_i = (σ_max^{1/ρ} + i/(n − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,   σ = e^{−λ/2},

  so λ_i = −2ρ log(σ_i^{1/ρ}), with σ^{1/ρ} = e^{−λ/(2ρ)} (no overflow for λ = ±20).
  """
  root_max = jnp.exp(-jnp.asarray(logsnr_hi, jnp.float32) / (2.0 * rho))  # σ_max^{1/ρ}
  root_min = jnp.exp(-jnp.asarray(logsnr_lo, jnp.float32) / (2.0 * rho))  # σ_min^{1/ρ}
  ramp = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)  # [n]
  return -2.0 * rho * jnp.log(root_max + ramp * (root_min - root_max))


def time_grid(
  steps: int,
  t_start: float = 1.0,
  t_end: float = 0.0,
  *,
  spacing: str = "uniform",
  schedule: Schedule | None = None,
) -> Array:
  """The ``steps + 1`` times t_0 = t_start > … > t_N = t_end of a sampler, ``[N + 1]`` float32.

  Args:
    steps: N, the number of model evaluations (≥ 1).
    t_start: first time (the noisiest), in (t_end, 1].
    t_end: last time, in [0, t_start).
    spacing: ``"uniform"`` (in t), ``"logsnr"`` or ``"karras"`` (module docstring).
    schedule: the noise schedule; needed by ``"logsnr"`` and ``"karras"`` (their grids live in
      λ), ignored by ``"uniform"``.

  Returns:
    The grid, non-increasing: strictly decreasing, except that the ``"logsnr"``/``"karras"``
    grids repeat t_{N−1} = t_N = t_end when t_end is above their floor t_min (a last step of
    length 0, which is harmless: the last step returns x̂0).

  Raises:
    ValueError: an unknown ``spacing``, or no ``schedule`` for a spacing in λ.
  """
  check_spacing(spacing)
  if spacing == "uniform":  # today's grid, bit for bit
    return jnp.linspace(t_start, t_end, steps + 1, dtype=jnp.float32)
  if not isinstance(schedule, Schedule):
    raise ValueError(f"spacing={spacing!r} needs the schedule (its grid is in log-SNR)")
  t_min = min_eval_time(schedule, t_start, t_end)
  hi, lo = schedule(jnp.float32(t_start)), schedule(jnp.float32(t_min))
  logsnrs = (logsnr_uniform if spacing == "logsnr" else karras_logsnr)(hi, lo, steps)  # [N]
  ts = jnp.clip(schedule.t_from_logsnr(logsnrs), t_min, t_start)  # [N]
  # The endpoints exactly (t(λ(t)) is t only up to rounding), then the end of the grid.
  ts = ts.at[0].set(t_start)
  if steps > 1:
    ts = ts.at[-1].set(t_min)
  return jnp.concatenate([ts, jnp.full((1,), t_end, jnp.float32)]).astype(jnp.float32)
