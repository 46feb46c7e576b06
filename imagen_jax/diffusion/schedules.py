"""Continuous-time noise schedules t ∈ [0, 1] → log-SNR λ(t) (VDM, Kingma et al. 2021).

The forward process is variance preserving: q(z_t | x) = N(α_t x, σ_t² I) with α_t² + σ_t² = 1
and λ_t = log(α_t² / σ_t²) decreasing in t (Imagen App. A). Given λ, α² = sigmoid(λ) and
σ² = sigmoid(−λ) (VDM's variance-preserving case, α² = sigmoid(−γ) with γ = −λ), so a schedule is
one monotone function t → λ.

Every schedule is a frozen, hashable dataclass, so it can be a static argument of ``jax.jit``.
Each one clips to a finite log-SNR range ``[logsnr_min, logsnr_max]`` at t = 1 and t = 0 (the
usual clipping; λ = ±∞ would give α = 0 or σ = 0 and divide by zero in the ε ↔ x0 conversions).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def alpha_sigma(logsnr: Array) -> tuple[Array, Array]:
  """Signal and noise scales from log-SNR: α² = sigmoid(λ), σ² = sigmoid(−λ) (VDM, VP case).

  Args:
    logsnr: λ, any shape.

  Returns:
    ``(alpha, sigma)``, each with the shape of ``logsnr``; α² + σ² = 1.
  """
  logsnr = jnp.asarray(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


class Schedule(abc.ABC):
  """A decreasing map t ∈ [0, 1] → λ(t), with λ(0) = ``logsnr_max`` and λ(1) = ``logsnr_min``."""

  @abc.abstractmethod
  def __call__(self, t: Array) -> Array:
    """Returns λ(t) with the shape of ``t``."""

  @abc.abstractmethod
  def t_from_logsnr(self, logsnr: Array) -> Array:
    """The closed-form inverse t(λ), for λ in ``[logsnr_min, logsnr_max]``."""

  @property
  @abc.abstractmethod
  def logsnr_min(self) -> float:
    """λ(1): the noisiest end."""

  @property
  @abc.abstractmethod
  def logsnr_max(self) -> float:
    """λ(0): the cleanest end."""


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """Cosine schedule α_t = cos(πt/2) in log-SNR form, λ(t) = −2 log tan(πt/2) (Nichol & Dhariwal
  2021; Imagen's 64² and 64→256 models), with the usual t clipping of Salimans & Ho 2022:

    λ(t) = −2 log tan(a + t (b − a)),  a = atan(exp(−λ_max/2)),  b = atan(exp(−λ_min/2)),

  so λ(0) = λ_max and λ(1) = λ_min exactly (the ``logsnr_schedule_cosine`` of progressive
  distillation). Between the endpoints this is the offset-free cosine.
  """

  min_logsnr: float = -20.0
  max_logsnr: float = 20.0

  def __post_init__(self):
    if not self.min_logsnr < self.max_logsnr:
      raise ValueError(
        f"min_logsnr must be < max_logsnr, got min_logsnr={self.min_logsnr}, "
        f"max_logsnr={self.max_logsnr}"
      )

  def _angles(self) -> tuple[float, float]:
    return math.atan(math.exp(-0.5 * self.max_logsnr)), math.atan(math.exp(-0.5 * self.min_logsnr))

  def __call__(self, t: Array) -> Array:
    a, b = self._angles()
    return -2.0 * jnp.log(jnp.tan(a + jnp.asarray(t) * (b - a)))

  def t_from_logsnr(self, logsnr: Array) -> Array:
    a, b = self._angles()
    return (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(logsnr))) - a) / (b - a)

  @property
  def logsnr_min(self) -> float:
    return self.min_logsnr

  @property
  def logsnr_max(self) -> float:
    return self.max_logsnr


@dataclasses.dataclass(frozen=True)
class ShiftedCosineSchedule(Schedule):
  """Resolution-shifted cosine (Hoogeboom et al. 2023, "simple diffusion", shifted schedule):

    λ_shifted(t) = λ_cosine(t) + 2 log(base_size / image_size).

  Averaging a 2×2 block of pixels with independent noise divides the noise variance by 4, so
  lowering the SNR 4× per doubling of resolution gives a 256² model the same SNR per "64² pixel"
  as the 64² model has per pixel. The endpoints move with the shift.
  """

  image_size: int = 64
  base_size: int = 64
  min_logsnr: float = -20.0
  max_logsnr: float = 20.0

  def __post_init__(self):
    for name in ("image_size", "base_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    CosineSchedule(self.min_logsnr, self.max_logsnr)  # validates the range

  @property
  def shift(self) -> float:
    return 2.0 * math.log(self.base_size / self.image_size)

  def _cosine(self) -> CosineSchedule:
    return CosineSchedule(self.min_logsnr, self.max_logsnr)

  def __call__(self, t: Array) -> Array:
    return self._cosine()(t) + self.shift

  def t_from_logsnr(self, logsnr: Array) -> Array:
    return self._cosine().t_from_logsnr(jnp.asarray(logsnr) - self.shift)

  @property
  def logsnr_min(self) -> float:
    return self.min_logsnr + self.shift

  @property
  def logsnr_max(self) -> float:
    return self.max_logsnr + self.shift


@dataclasses.dataclass(frozen=True)
class LinearBetaSchedule(Schedule):
  """DDPM's linear β schedule (Ho et al. 2020; Imagen's 256→1024 model: 1000 steps, β 1e-4 → 0.02)
  in continuous time, as the VP-SDE of Song et al. 2021 (eq. (11) and its Gaussian perturbation
  kernel) with β(t) = N(β_0 + (β_1 − β_0) t):

    −log α_t² = ∫_0^t β(s) ds = N (β_0 t + (β_1 − β_0) t² / 2) =: c(t),
    λ(t) = log(α²/σ²) = −log(exp(c) − 1) = −log(expm1(c(t))).

  At t = n/N this matches the discrete ᾱ_n = ∏(1 − β_i) to within ~0.1 in λ (the sum of β_i vs.
  the integral, and log(1 − β) ≈ −β). λ(0) = +∞, so t is clamped below at the t where
  λ = ``max_logsnr``; λ(1) = −log(expm1(10.05)) ≈ −10.05 for the default β values.
  """

  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_steps: int = 1000
  max_logsnr: float = 20.0

  def __post_init__(self):
    if not 0.0 < self.beta_start <= self.beta_end:
      raise ValueError(
        f"need 0 < beta_start <= beta_end, got beta_start={self.beta_start}, "
        f"beta_end={self.beta_end}"
      )
    if (
      isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1
    ):
      raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
    if self.max_logsnr <= self.logsnr_min:
      raise ValueError(f"max_logsnr must be > {self.logsnr_min}, got {self.max_logsnr}")

  def _c(self, t):
    b0, b1 = self.num_steps * self.beta_start, self.num_steps * self.beta_end
    return b0 * t + 0.5 * (b1 - b0) * t * t

  def _t_from_c(self, c, sqrt=jnp.sqrt):
    # Positive root of ½(b1 − b0) t² + b0 t − c = 0, written as 2c / (b0 + √(b0² + 2(b1 − b0)c))
    # so that it stays exact when b1 == b0 and loses no digits for small c.
    b0, b1 = self.num_steps * self.beta_start, self.num_steps * self.beta_end
    return 2.0 * c / (b0 + sqrt(b0 * b0 + 2.0 * (b1 - b0) * c))

  def _t_min(self) -> float:
    c = math.log1p(math.exp(-self.max_logsnr))  # c(λ) = log(1 + e^{−λ}) inverts λ = −log expm1(c)
    return self._t_from_c(c, sqrt=math.sqrt)

  def __call__(self, t: Array) -> Array:
    t = jnp.maximum(jnp.asarray(t), self._t_min())
    return -jnp.log(jnp.expm1(self._c(t)))

  def t_from_logsnr(self, logsnr: Array) -> Array:
    return self._t_from_c(jax.nn.softplus(-jnp.asarray(logsnr)))

  @property
  def logsnr_min(self) -> float:
    return -math.log(math.expm1(self._c(1.0)))

  @property
  def logsnr_max(self) -> float:
    return self.max_logsnr


_SCHEDULES = {
  "cosine": CosineSchedule,
  "linear": LinearBetaSchedule,
  "shifted_cosine": ShiftedCosineSchedule,
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get_schedule(name: str, **kwargs) -> Schedule:
  """Builds a schedule by name.

  Args:
    name: one of ``"cosine"`` (kwargs ``min_logsnr=-20``, ``max_logsnr=20``), ``"linear"``
      (kwargs ``beta_start=1e-4``, ``beta_end=0.02``, ``num_steps=1000``, ``max_logsnr=20``) or
      ``"shifted_cosine"`` (kwargs ``image_size``, ``base_size=64``, ``min_logsnr``,
      ``max_logsnr``).
    **kwargs: the schedule's parameters.

  Returns:
    A hashable :class:`Schedule`.

  Raises:
    ValueError: unknown ``name``, unknown keyword, or invalid parameter values.
  """
  if name not in _SCHEDULES:
    raise ValueError(f"unknown schedule name {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
  cls = _SCHEDULES[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f"unknown keyword(s) {unknown} for schedule {name!r}; valid: {', '.join(sorted(fields))}"
    )
  if name == "shifted_cosine" and "image_size" not in kwargs:
    raise ValueError("schedule 'shifted_cosine' needs the keyword image_size")
  return cls(**kwargs)


def as_schedule(schedule: Schedule | str) -> Schedule:
  """Accepts a :class:`Schedule` or a schedule name (built with default parameters)."""
  if isinstance(schedule, Schedule):
    return schedule
  if isinstance(schedule, str):
    return get_schedule(schedule)
  raise ValueError(f"schedule must be a Schedule or a name, got {type(schedule).__name__}")
