"""Discrete-time (DDPM) noise schedules as continuous ones, and DDPM's learned-range variance.

DeepFloyd IF (and every ``DDPMScheduler`` checkpoint) was trained on N = 1000 discrete timesteps
τ ∈ {0, …, N − 1} with ᾱ_τ = Π_{i ≤ τ} (1 − β_i). Table entry τ is the continuous time

  t = (τ + 1) / N,    and τ = −1 (t = 0) is the clean image (ᾱ = 1),

because the betas are differences of a continuous ᾱ(t) on the grid i/N (Nichol & Dhariwal 2021,
eq. (17): β_i = 1 − ᾱ((i + 1)/N) / ᾱ(i/N)). Between table entries λ(t) is linear in t, so every
sampler of :mod:`imagen_jax.diffusion.samplers` runs on such a model; a uniform grid of S steps
visits τ = N − 1, N − 1 − N/S, … (diffusers' ``timestep_spacing="trailing"``) and ends on the
clean image, as DDPM's last step (``prev_t = −1``) does.

Tables equal diffusers' bit for bit (float32 betas, their product accumulated in float64), so a
model sees the noise levels it was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(beta_schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
  """ᾱ_τ, τ = 0 … n − 1, float32 ``[n]``, bit-equal to diffusers' ``DDPMScheduler`` table."""
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64).astype(np.float32)
  elif beta_schedule == "scaled_linear":
    betas = (np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2).astype(
      np.float32
    )
  else:  # squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. (17); β capped at 0.999)

    def alpha_bar(t):  # ᾱ(t) = cos²((t + s) / (1 + s) · π/2), s = 0.008
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.asarray(
      [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32
    )
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  # torch.cumprod of float32 on CPU accumulates in float64: this is bit-equal to it.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule(Schedule):
  """A DDPM beta schedule on N discrete steps, as a continuous log-SNR schedule (module doc).

  Attributes:
    beta_schedule: ``"squaredcos_cap_v2"`` (IF's), ``"linear"`` or ``"scaled_linear"``.
    num_train_timesteps: N.
    beta_start: β_0 of the linear schedules.
    beta_end: β_{N−1} of the linear schedules.
    max_logsnr: λ at t = 0 (τ = −1, the clean image; the table itself ends at τ = 0). Only the
      last step of a sampler lands there, so any value well above λ_0 is "clean".
  """

  beta_schedule: str = "squaredcos_cap_v2"
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  max_logsnr: float = 20.0

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(
        f"beta_schedule={self.beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}"
      )
    n = self.num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
      raise ValueError(f"num_train_timesteps must be an int >= 2, got {n!r}")
    if not self.max_logsnr > float(self.table_logsnr()[0]):
      raise ValueError(
        f"max_logsnr={self.max_logsnr} must exceed the table's cleanest log-SNR "
        f"{float(self.table_logsnr()[0]):.3f} (τ = 0)"
      )

  @classmethod
  def from_diffusers(cls, config: dict) -> DiscreteSchedule:
    """The schedule of a diffusers scheduler config (``scheduler/scheduler_config.json``).

    Raises:
      ValueError: a ``beta_schedule`` this port does not implement, or ``trained_betas``.
    """
    if config.get("trained_betas") is not None:
      raise ValueError("scheduler config: trained_betas is not supported; use a beta_schedule")
    return cls(
      beta_schedule=str(config.get("beta_schedule", "linear")),
      num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
      beta_start=float(config.get("beta_start", 0.0001)),
      beta_end=float(config.get("beta_end", 0.02)),
    )

  def alphas_cumprod(self) -> np.ndarray:
    """ᾱ_τ for τ = 0 … N − 1, float32 ``[N]`` (diffusers' ``scheduler.alphas_cumprod``)."""
    return _alphas_cumprod(
      self.beta_schedule, self.num_train_timesteps, float(self.beta_start), float(self.beta_end)
    )

  def table_logsnr(self) -> np.ndarray:
    """λ_τ = log(ᾱ_τ / (1 − ᾱ_τ)), float64 ``[N]`` (decreasing)."""
    a = self.alphas_cumprod().astype(np.float64)
    return np.log(a) - np.log1p(-a)

  def _knots(self) -> tuple[np.ndarray, np.ndarray]:
    """(t, λ) knots: t = 0 (clean, ``max_logsnr``) then t = (τ + 1)/N for every table entry."""
    n = self.num_train_timesteps
    ts = np.arange(n + 1, dtype=np.float64) / n  # [N + 1]
    lam = np.concatenate([[self.max_logsnr], self.table_logsnr()])  # [N + 1]
    return ts.astype(np.float32), lam.astype(np.float32)

  def __call__(self, t: Array) -> Array:
    ts, lam = self._knots()
    t = jnp.asarray(t, jnp.float32)
    return jnp.interp(t, jnp.asarray(ts), jnp.asarray(lam))

  def t_from_logsnr(self, logsnr: Array) -> Array:
    ts, lam = self._knots()
    # λ decreases in t; interpolate −λ, which increases.
    return jnp.interp(-jnp.asarray(logsnr, jnp.float32), jnp.asarray(-lam), jnp.asarray(ts))

  def timestep(self, t: Array) -> Array:
    """The (continuous) discrete timestep τ = t·N − 1 that a DDPM-trained model reads."""
    return jnp.asarray(t, jnp.float32) * self.num_train_timesteps - 1.0

  def t_from_timestep(self, timestep: Array) -> Array:
    """t = (τ + 1) / N."""
    return (jnp.asarray(timestep, jnp.float32) + 1.0) / self.num_train_timesteps

  @property
  def logsnr_min(self) -> float:
    return float(self.table_logsnr()[-1])

  @property
  def logsnr_max(self) -> float:
    return float(self.max_logsnr)


def learned_range_log_variance(v: Array, logsnr_t: Array, logsnr_s: Array) -> Array:
  """The log-variance of a step t → s from a model's learned-range output (Nichol & Dhariwal
  2021, eq. (15); diffusers' ``variance_type="learned_range"``):

    log Σ = f · log β + (1 − f) · log β̃,   f = (v + 1) / 2,

  with the step's β = 1 − ᾱ_t / ᾱ_s (ᾱ = α² = sigmoid(λ)) and the posterior variance
  β̃ = (1 − r) σ_s² (r = SNR_t / SNR_s), the ancestral sampler's own variance (v = −1).

  Args:
    v: the model's variance channels, ``[B, ...]`` (≈ [−1, 1]).
    logsnr_t: λ_t (the noisier end), broadcastable to ``v``.
    logsnr_s: λ_s > λ_t, the step's target.

  Returns:
    log Σ with the shape of ``v``.
  """
  a2_t, a2_s = jax.nn.sigmoid(logsnr_t), jax.nn.sigmoid(logsnr_s)
  beta = 1.0 - a2_t / a2_s
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  beta_tilde = jnp.maximum(one_minus_r * jax.nn.sigmoid(-logsnr_s), 1e-20)  # diffusers' clamp
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  return frac * jnp.log(beta) + (1.0 - frac) * jnp.log(beta_tilde)
