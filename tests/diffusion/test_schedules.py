"""Schedules: monotone, documented endpoints, closed-form inverses, and the DDPM golden values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import schedules
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule

SHIFT_256 = 2.0 * math.log(64 / 256)
# (schedule, λ(0), λ(1)): the documented endpoints.
CASES = {
  "cosine": (get_schedule("cosine"), 20.0, -20.0),
  "linear": (get_schedule("linear"), 20.0, -math.log(math.expm1(1000 * (1e-4 + 0.5 * 0.0199)))),
  "shifted_cosine_256": (
    get_schedule("shifted_cosine", image_size=256),
    20.0 + SHIFT_256,
    -20.0 + SHIFT_256,
  ),
}


@pytest.mark.parametrize("name", CASES)
def test_strictly_decreasing_and_finite(name):
  schedule, _, _ = CASES[name]
  lam = np.asarray(schedule(jnp.linspace(0.0, 1.0, 10_001)))
  assert np.all(np.isfinite(lam))
  assert np.all(np.diff(lam) < 0)


@pytest.mark.parametrize("name", CASES)
def test_documented_endpoints(name):
  schedule, lam0, lam1 = CASES[name]
  assert schedule.logsnr_max == pytest.approx(lam0, abs=1e-6)
  assert schedule.logsnr_min == pytest.approx(lam1, abs=1e-6)
  # float32 tan near π/2 costs a few 1e-3 at t = 1; the clipping itself is exact.
  np.testing.assert_allclose(schedule(0.0), lam0, atol=1e-3)
  np.testing.assert_allclose(schedule(1.0), lam1, atol=1e-2)


@pytest.mark.parametrize("name", CASES)
def test_inverse_round_trip(name):
  schedule, _, _ = CASES[name]
  t = jnp.linspace(0.001, 0.999, 999)
  np.testing.assert_allclose(schedule.t_from_logsnr(schedule(t)), t, atol=2e-4)
  lam = jnp.linspace(schedule.logsnr_min + 0.5, schedule.logsnr_max - 0.5, 101)
  np.testing.assert_allclose(schedule(schedule.t_from_logsnr(lam)), lam, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("name", CASES)
def test_shape_preserved(name, shape):
  schedule, _, _ = CASES[name]
  assert schedule(jnp.full(shape, 0.3)).shape == shape


def test_cosine_is_alpha_cos_and_symmetric():
  """λ_cosine is α_t = cos(πt/2) (Nichol & Dhariwal without offset); the t clipping moves the
  angle by at most atan(e^{-10}) ≈ 4.5e-5."""
  schedule = get_schedule("cosine")
  t = jnp.linspace(0.05, 0.95, 91)
  alpha, sigma = alpha_sigma(schedule(t))
  np.testing.assert_allclose(alpha, jnp.cos(0.5 * jnp.pi * t), atol=6e-5)
  np.testing.assert_allclose(sigma, jnp.sin(0.5 * jnp.pi * t), atol=6e-5)
  np.testing.assert_allclose(schedule(t), -schedule(1.0 - t), atol=1e-4)
  assert float(schedule(0.5)) == pytest.approx(0.0, abs=1e-6)


def test_linear_matches_discrete_ddpm_schedule():
  """Golden values: the continuous schedule at t = n/1000 tracks ᾱ_n = ∏(1 − β_i) of the discrete
  1000-step β ∈ [1e-4, 0.02] schedule to within 0.12 in log-SNR (Σβ vs. ∫β, log(1 − β) ≈ −β)."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alphas_bar = np.cumprod(1.0 - betas)
  discrete = np.log(alphas_bar / (1.0 - alphas_bar))
  continuous = np.asarray(get_schedule("linear")(jnp.arange(1, 1001) / 1000.0))
  np.testing.assert_allclose(continuous, discrete, atol=0.12)
  assert discrete[0] == pytest.approx(math.log(0.9999 / 1e-4))  # ≈ 9.21 at the first step


def test_shifted_cosine_is_cosine_plus_shift():
  t = jnp.linspace(0.0, 1.0, 11)
  cosine = get_schedule("cosine")
  shifted = get_schedule("shifted_cosine", image_size=256, base_size=64)
  np.testing.assert_allclose(shifted(t), cosine(t) + SHIFT_256, atol=1e-5)
  same = get_schedule("shifted_cosine", image_size=64)
  np.testing.assert_allclose(same(t), cosine(t), atol=1e-6)


def test_alpha_sigma_variance_preserving():
  lam = jnp.linspace(-20.0, 20.0, 81)
  alpha, sigma = alpha_sigma(lam)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  mid = jnp.abs(lam) < 10
  np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2)[mid], lam[mid], atol=1e-4, rtol=1e-5)


def test_hashable_and_jittable_as_static_argument():
  assert get_schedule("cosine") == get_schedule("cosine")
  assert hash(get_schedule("linear")) == hash(get_schedule("linear"))
  fn = jax.jit(lambda t, schedule: schedule(t), static_argnames="schedule")
  for name in CASES:
    schedule = CASES[name][0]
    np.testing.assert_allclose(fn(jnp.array([0.25]), schedule), schedule(jnp.array([0.25])))


def test_bad_names_and_kwargs():
  with pytest.raises(ValueError, match=r"unknown schedule name 'cosin'.*cosine, linear"):
    get_schedule("cosin")
  with pytest.raises(ValueError, match="image_size"):
    get_schedule("shifted_cosine")
  with pytest.raises(ValueError, match="unknown keyword"):
    get_schedule("cosine", image_size=64)
  with pytest.raises(ValueError, match="min_logsnr"):
    get_schedule("cosine", min_logsnr=5.0, max_logsnr=-5.0)
  with pytest.raises(ValueError, match="beta_start"):
    get_schedule("linear", beta_start=0.1, beta_end=0.01)
  with pytest.raises(ValueError, match="image_size"):
    get_schedule("shifted_cosine", image_size=0)
  with pytest.raises(ValueError, match="schedule"):
    schedules.as_schedule(3)
