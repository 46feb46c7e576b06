"""Per-example losses, min-SNR-γ weighting and the training-input sampler."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagen_jax.diffusion import gaussian, losses
from imagen_jax.diffusion.schedules import get_schedule

OBJECTIVES = gaussian.PRED_TYPES


# Jitted once so the random ops compile as one program, not one per eager op.
SAMPLE_INPUTS = jax.jit(
  losses.sample_training_inputs, static_argnames=("schedule", "low_discrepancy")
)


@functools.cache
def _training_batch(seed=0, shape=(8, 4, 4, 3)):
  x0 = jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)
  return x0, SAMPLE_INPUTS(jax.random.PRNGKey(seed + 1), x0, get_schedule("cosine"))


@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_zero_for_the_perfect_predictor(objective, gamma):
  x0, (_, _, logsnr, eps) = _training_batch()
  pred = gaussian.pred_from_x0_eps(x0, eps, logsnr, objective)
  loss = losses.diffusion_loss(pred, x0, eps, logsnr, objective=objective, min_snr_gamma=gamma)
  assert loss.shape == (8,)
  np.testing.assert_array_equal(loss, 0.0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_unweighted_is_per_example_mse(objective):
  x0, (_, _, logsnr, eps) = _training_batch()
  offsets = jnp.arange(1.0, 9.0).reshape(8, 1, 1, 1) * 0.1
  pred = gaussian.pred_from_x0_eps(x0, eps, logsnr, objective) + offsets
  loss = losses.diffusion_loss(pred, x0, eps, logsnr, objective=objective)
  np.testing.assert_allclose(loss, (np.arange(1.0, 9.0) * 0.1) ** 2, rtol=1e-4)


@pytest.mark.parametrize(
  "logsnr, expected",
  [(math.log(10.0), (0.5, 5.0 / 11.0, 5.0)), (math.log(2.0), (1.0, 2.0 / 3.0, 2.0))],
)
def test_min_snr_weights_by_hand(logsnr, expected):
  """Hang et al.: eps min(SNR,γ)/SNR, v min(SNR,γ)/(SNR+1), x0 min(SNR,γ); here γ = 5."""
  for objective, want in zip(("eps", "v", "x0"), expected):
    got = losses.min_snr_weight(jnp.array(logsnr), objective, 5.0)
    assert float(got) == pytest.approx(want, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
  st.lists(st.floats(-8.0, 8.0, width=32), min_size=4, max_size=4),
  st.integers(0, 2**31),
  st.sampled_from([1.0, 5.0]),
)
def test_objectives_agree_in_x0_space(logsnr, seed, gamma):
  """At fixed x_t an x0 error δ is an ε error −(α/σ)δ and a v error −δ/σ, so
  L_eps = SNR·L_x0 and L_v = (SNR + 1)·L_x0; with min-SNR-γ all three equal min(SNR, γ)·L_x0."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  rng = np.random.default_rng(seed)
  x0, eps, delta = (jnp.asarray(rng.standard_normal((4, 6)), jnp.float32) for _ in range(3))
  x_t = gaussian.q_sample(x0, logsnr, eps)
  x0_hat = x0 + 0.1 * delta
  preds = {
    "x0": x0_hat,
    "eps": gaussian.eps_from_x0(x0_hat, x_t, logsnr),
    "v": gaussian.v_from_x0_eps(x0_hat, gaussian.eps_from_x0(x0_hat, x_t, logsnr), logsnr),
  }
  loss = {k: losses.diffusion_loss(p, x0, eps, logsnr, objective=k) for k, p in preds.items()}
  snr = np.exp(np.asarray(logsnr, np.float64))
  np.testing.assert_allclose(loss["eps"], snr * loss["x0"], rtol=2e-3)
  np.testing.assert_allclose(loss["v"], (snr + 1) * loss["x0"], rtol=2e-3)
  weighted = {
    k: losses.diffusion_loss(p, x0, eps, logsnr, objective=k, min_snr_gamma=gamma)
    for k, p in preds.items()
  }
  for k in OBJECTIVES:
    np.testing.assert_allclose(weighted[k], np.minimum(snr, gamma) * loss["x0"], rtol=2e-3)


def test_min_snr_weights_are_finite_at_the_schedule_ends():
  for objective in OBJECTIVES:
    w = losses.min_snr_weight(jnp.array([-20.0, 20.0]), objective, 5.0)
    assert np.all(np.isfinite(w)) and np.all(np.asarray(w) >= 0)


def test_sample_training_inputs():
  x0, (x_t, t, logsnr, eps) = _training_batch(shape=(4096, 2))
  schedule = get_schedule("cosine")
  assert x_t.shape == eps.shape == x0.shape and t.shape == logsnr.shape == (4096,)
  assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
  assert abs(float(t.mean()) - 0.5) < 0.02 and abs(float(t.var()) - 1 / 12) < 0.005
  np.testing.assert_allclose(logsnr, schedule(t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_t, gaussian.q_sample(x0, logsnr, eps), rtol=1e-5, atol=1e-5)
  assert abs(float(eps.std()) - 1.0) < 0.03


def test_low_discrepancy_times_are_stratified():
  x0 = jnp.zeros((16, 3))
  _, t, _, _ = SAMPLE_INPUTS(
    jax.random.PRNGKey(3), x0, get_schedule("linear"), low_discrepancy=True
  )
  gaps = np.diff(np.sort(np.asarray(t)))
  np.testing.assert_allclose(gaps, 1 / 16, atol=1e-6)


def test_jit_matches_eager():
  x0, (x_t, _, logsnr, eps) = _training_batch()
  fn = jax.jit(functools.partial(losses.diffusion_loss, objective="v", min_snr_gamma=5.0))
  pred = x_t * 0.3
  np.testing.assert_allclose(
    fn(pred, x0, eps, logsnr),
    losses.diffusion_loss(pred, x0, eps, logsnr, objective="v", min_snr_gamma=5.0),
    rtol=1e-6,
  )
  eager = losses.sample_training_inputs(jax.random.PRNGKey(1), x0, "cosine")
  for a, b in zip(eager, _training_batch()[1]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
  x0, (_, _, logsnr, eps) = _training_batch()
  with pytest.raises(ValueError, match="objective"):
    losses.diffusion_loss(x0, x0, eps, logsnr, objective="score")
  with pytest.raises(ValueError, match="pred"):
    losses.diffusion_loss(x0[:, :2], x0, eps, logsnr, objective="eps")
  with pytest.raises(ValueError, match="logsnr"):
    losses.diffusion_loss(x0, x0, eps, logsnr[:3], objective="eps")
  with pytest.raises(ValueError, match="min_snr_gamma"):
    losses.diffusion_loss(x0, x0, eps, logsnr, objective="eps", min_snr_gamma=0.0)
  with pytest.raises(ValueError, match="schedule"):
    losses.sample_training_inputs(jax.random.PRNGKey(0), x0, "quadratic")
