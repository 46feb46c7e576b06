"""q_sample and the ε / x0 / v conversions: closed-form values and hypothesis round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import alpha_sigma

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw, logsnr_range=(-20.0, 20.0)):
  """(x0, eps, logsnr) with a random batch size, trailing shape and per-example log-SNR."""
  # A few shapes rather than arbitrary ones: every new shape costs a compile of each op.
  batch = draw(st.sampled_from([1, 3]))
  trailing = draw(st.sampled_from([(), (4,), (2, 3, 2)]))
  logsnr = draw(st.lists(st.floats(*logsnr_range, width=32), min_size=batch, max_size=batch))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  x0 = rng.uniform(-1.5, 1.5, (batch, *trailing)).astype(np.float32)
  eps = rng.standard_normal((batch, *trailing)).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(logsnr, jnp.float32)


def _alpha_sigma64(logsnr, ndim):
  lam = np.asarray(logsnr, np.float64).reshape(-1, *([1] * (ndim - 1)))
  return np.sqrt(1.0 / (1.0 + np.exp(-lam))), np.sqrt(1.0 / (1.0 + np.exp(lam)))


def _roundoff_tol(x_t, x0, eps, logsnr):
  """Float32 error bound of the conversions: a few ulps of |x_t|, |x0|, |ε|, amplified by 1/α
  (ε → x0 divides by α) or 1/σ (x0 → ε divides by σ). At |λ| = 20 that is ~2e4×."""
  alpha, sigma = _alpha_sigma64(logsnr, x_t.ndim)
  scale = np.abs(x_t) + np.abs(x0) + np.abs(eps) + 1.0
  return 1e-6 + 4e-7 * scale * (1.0 / alpha + 1.0 / sigma)


@SETTINGS
@given(batches())
def test_q_sample_matches_closed_form(data):
  x0, eps, logsnr = data
  alpha, sigma = _alpha_sigma64(logsnr, x0.ndim)
  expected = alpha * np.asarray(x0, np.float64) + sigma * np.asarray(eps, np.float64)
  np.testing.assert_allclose(gaussian.q_sample(x0, logsnr, eps), expected, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(batches(), st.sampled_from(gaussian.PRED_TYPES))
def test_prediction_round_trip(data, pred_type):
  """target(x0, ε) → to_x0_eps(target, x_t) recovers (x0, ε) for every parameterisation."""
  x0, eps, logsnr = data
  x_t = gaussian.q_sample(x0, logsnr, eps)
  pred = gaussian.pred_from_x0_eps(x0, eps, logsnr, pred_type)
  x0_back, eps_back = gaussian.to_x0_eps(pred, x_t, logsnr, pred_type)
  tol = _roundoff_tol(x_t, x0, eps, logsnr)
  assert np.all(np.abs(np.asarray(x0_back) - np.asarray(x0)) <= tol)
  assert np.all(np.abs(np.asarray(eps_back) - np.asarray(eps)) <= tol)
  np.testing.assert_array_equal(gaussian.predict_x0(pred, x_t, logsnr, pred_type), x0_back)
  np.testing.assert_array_equal(gaussian.predict_eps(pred, x_t, logsnr, pred_type), eps_back)


@SETTINGS
@given(batches())
def test_v_is_a_rotation(data):
  """(x0, ε) → (x_t, v) is a rotation by φ with (cos φ, sin φ) = (α, σ): exact at any λ."""
  x0, eps, logsnr = data
  x_t = gaussian.q_sample(x0, logsnr, eps)
  v = gaussian.v_from_x0_eps(x0, eps, logsnr)
  np.testing.assert_allclose(gaussian.x0_from_v(v, x_t, logsnr), x0, atol=2e-5)
  np.testing.assert_allclose(gaussian.eps_from_v(v, x_t, logsnr), eps, atol=2e-5)
  np.testing.assert_allclose(jnp.sum(x_t**2 + v**2), jnp.sum(x0**2 + eps**2), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(batches(logsnr_range=(-8.0, 8.0)))
def test_eps_x0_conversions_invert_each_other(data):
  x0, eps, logsnr = data
  x_t = gaussian.q_sample(x0, logsnr, eps)
  np.testing.assert_allclose(gaussian.x0_from_eps(eps, x_t, logsnr), x0, atol=2e-4)
  np.testing.assert_allclose(gaussian.eps_from_x0(x0, x_t, logsnr), eps, atol=2e-4)


def test_known_values_at_logsnr_zero():
  """λ = 0 ⇒ α = σ = 1/√2: x_t = (x0 + ε)/√2 and v = (ε − x0)/√2."""
  x0, eps, lam = jnp.array([[1.0, -2.0]]), jnp.array([[3.0, 0.5]]), jnp.zeros((1,))
  r2 = np.sqrt(2.0)
  np.testing.assert_allclose(gaussian.q_sample(x0, lam, eps), (x0 + eps) / r2, rtol=1e-6)
  np.testing.assert_allclose(gaussian.v_from_x0_eps(x0, eps, lam), (eps - x0) / r2, rtol=1e-6)
  alpha, sigma = alpha_sigma(0.0)
  assert float(alpha) == pytest.approx(1 / r2) and float(sigma) == pytest.approx(1 / r2)


def test_scalar_logsnr_broadcasts():
  x0, eps = jnp.ones((3, 2, 2)), jnp.zeros((3, 2, 2))
  np.testing.assert_allclose(
    gaussian.q_sample(x0, jnp.array(1.0), eps), gaussian.q_sample(x0, jnp.ones(3), eps)
  )


def test_jit_matches_eager():
  x0, eps, lam = jnp.ones((2, 3)), jnp.full((2, 3), 0.5), jnp.array([-3.0, 4.0])
  x_t = gaussian.q_sample(x0, lam, eps)
  fn = jax.jit(gaussian.to_x0_eps, static_argnames="pred_type")
  for pred_type in gaussian.PRED_TYPES:
    pred = gaussian.pred_from_x0_eps(x0, eps, lam, pred_type)
    for a, b in zip(
      fn(pred, x_t, lam, pred_type=pred_type), gaussian.to_x0_eps(pred, x_t, lam, pred_type)
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="pred_type"):
    gaussian.to_x0_eps(x, x, jnp.zeros(2), "score")
  with pytest.raises(ValueError, match="logsnr"):
    gaussian.q_sample(x, jnp.zeros(3), x)
  with pytest.raises(ValueError, match="eps"):
    gaussian.q_sample(x, jnp.zeros(2), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="pred"):
    gaussian.to_x0_eps(jnp.ones((2, 4)), x, jnp.zeros(2), "eps")
