"""Classifier-free guidance (one doubled-batch forward) and static / dynamic thresholding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagen_jax.diffusion import guidance

B = 4


def _model(x_t, t, cond):
  """A nonlinear conditional model: the output depends on x_t, t and every cond leaf."""
  emb = cond["emb"].mean(axis=(1, 2))  # [B]
  return (
    jnp.tanh(x_t * (1.0 + t[:, None, None]) + emb[:, None, None]) + cond["scale"][:, None, None]
  )


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x_t, t = normal(B, 3, 2), jnp.asarray(rng.uniform(size=B), jnp.float32)
  cond = {"emb": normal(B, 5, 7), "scale": normal(B)}
  negative = {"emb": normal(B, 5, 7), "scale": jnp.zeros((B,))}
  return x_t, t, cond, negative


def test_guide_is_imagen_eq_2():
  c, u = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
  np.testing.assert_allclose(guidance.guide(c, u, 3.0), 3.0 * c - 2.0 * u)
  np.testing.assert_array_equal(guidance.guide(c, u, 0.0), u)


@pytest.mark.parametrize("scale", [1.0, 1, "array"])
def test_scale_one_equals_the_conditional_model(scale):
  """w = 1 returns the conditional prediction bit for bit, both on the Python-number fast path
  and through the doubled batch (w·c + (1 − w)·u with w = 1 is exactly c)."""
  x_t, t, cond, negative = _inputs()
  w = jnp.ones((B,)) if scale == "array" else scale
  guided = guidance.classifier_free_guidance(_model, cond, negative, w)
  np.testing.assert_array_equal(guided(x_t, t), _model(x_t, t, cond))


def test_one_forward_on_the_doubled_batch_with_negative_prompt():
  x_t, t, cond, negative = _inputs()
  calls = []

  def model(x, tt, c):
    calls.append((x.shape, tt.shape, jax.tree.map(jnp.shape, c)))
    return _model(x, tt, c)

  w = jnp.array([0.0, 1.0, 2.5, 7.0])
  out = guidance.classifier_free_guidance(model, cond, negative, w)(x_t, t)
  assert calls == [((2 * B, 3, 2), (2 * B,), {"emb": (2 * B, 5, 7), "scale": (2 * B,)})]
  pc, pu = _model(x_t, t, cond), _model(x_t, t, negative)
  np.testing.assert_allclose(out, w[:, None, None] * pc + (1 - w[:, None, None]) * pu, atol=1e-6)
  np.testing.assert_allclose(out[0], pu[0], atol=1e-6)  # w = 0 is the negative branch alone


def test_jits_without_recompiling_for_new_scales_or_conditioning():
  traces = []

  @jax.jit
  def run(x_t, t, cond, negative, w):
    traces.append(None)
    return guidance.classifier_free_guidance(_model, cond, negative, w)(x_t, t)

  for seed in range(3):
    x_t, t, cond, negative = _inputs(seed)
    w = jnp.full((B,), 1.5 + seed)
    eager = guidance.classifier_free_guidance(_model, cond, negative, w)(x_t, t)
    np.testing.assert_allclose(run(x_t, t, cond, negative, w), eager, atol=1e-6)
  assert len(traces) == 1


def test_bad_guidance_inputs():
  x_t, t, cond, negative = _inputs()
  with pytest.raises(ValueError, match="guidance_scale"):
    guidance.classifier_free_guidance(_model, cond, negative, -0.5)
  with pytest.raises(ValueError, match="guidance_scale"):
    guidance.classifier_free_guidance(_model, cond, negative, jnp.array([1.0, -1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match="guidance_scale"):
    guidance.classifier_free_guidance(_model, cond, negative, jnp.ones((B + 1,)))(x_t, t)
  with pytest.raises(ValueError, match="uncond"):
    guidance.classifier_free_guidance(_model, cond, {"emb": negative["emb"]}, 2.0)
  with pytest.raises(ValueError, match="cond"):
    bad = {"emb": negative["emb"][:, :3], "scale": negative["scale"]}
    guidance.classifier_free_guidance(_model, cond, bad, 2.0)(x_t, t)


# -- thresholding ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.5, 100.0))
def test_dynamic_leaves_in_range_samples_unchanged(seed, percentile):
  x0 = jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, (3, 4, 4, 2)), jnp.float32)
  np.testing.assert_array_equal(guidance.threshold(x0, "dynamic", percentile), x0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(1.5, 20.0), st.sampled_from([90.0, 99.5, 100.0]))
def test_dynamic_brings_out_of_range_samples_into_range(seed, spread, percentile):
  rng = np.random.default_rng(seed)
  x0 = (rng.standard_normal((3, 4, 4, 2)) * spread).astype(np.float32)
  x0[1] = np.clip(x0[1], -1.0, 1.0)  # an in-range sample next to out-of-range ones
  out = np.asarray(guidance.threshold(jnp.asarray(x0), "dynamic", percentile))
  assert np.all(np.abs(out) <= 1.0 + 1e-6)
  np.testing.assert_array_equal(out[1], x0[1])  # s is per sample
  s = np.maximum(np.percentile(np.abs(x0).reshape(3, -1), percentile, axis=1), 1.0)
  want = np.clip(x0, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
  st.integers(0, 2**31),
  st.integers(1, 300),
  st.floats(0.01, 100.0),
  st.sampled_from(["normal", "ties", "zeros"]),
)
def test_abs_percentile_equals_numpy(seed, d, percentile, kind):
  """The sort-free percentile is numpy's linear-interpolation percentile of |x|, ties included."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, d)) * 10.0 ** rng.uniform(-3, 3)
  if kind == "ties":
    x = np.round(x * 2) / 2  # few distinct values, many repeats
  elif kind == "zeros":
    x[:, : d // 2] = 0.0
  x = x.astype(np.float32)
  got = np.asarray(guidance.abs_percentile(jnp.asarray(x), percentile))
  np.testing.assert_allclose(got, np.percentile(np.abs(x), percentile, axis=1), rtol=2e-6)


def test_abs_percentile_nan_rows_and_bf16():
  x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
  x[1, 7] = np.nan
  got = np.asarray(guidance.abs_percentile(jnp.asarray(x), 99.5))
  assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all()
  xb = jnp.asarray(x[[0, 2]], jnp.bfloat16)
  want = np.percentile(np.abs(np.asarray(xb, np.float32)), 99.5, axis=1)
  np.testing.assert_allclose(np.asarray(guidance.abs_percentile(xb, 99.5)), want, rtol=1e-6)


def test_static_and_none():
  x0 = jnp.array([[-3.0, -0.5, 0.2, 1.7]])
  want = np.array([[-1.0, -0.5, 0.2, 1.0]], np.float32)
  np.testing.assert_array_equal(guidance.threshold(x0, "static"), want)
  np.testing.assert_array_equal(guidance.threshold(x0, "none"), x0)


def test_dynamic_example_by_hand():
  """|x| = 0, 1, ..., 4 ⇒ the 100th percentile is 4: clip to [−4, 4] and divide by 4."""
  x0 = jnp.array([[0.0, -1.0, 2.0, -3.0, 4.0]])
  np.testing.assert_allclose(guidance.threshold(x0, "dynamic", 100.0), x0 / 4.0)


def test_threshold_jits():
  x0 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)) * 3, jnp.float32)
  fn = jax.jit(guidance.threshold, static_argnames=("mode", "percentile"))
  for mode in guidance.THRESHOLD_MODES:
    np.testing.assert_allclose(fn(x0, mode, 99.5), guidance.threshold(x0, mode), atol=1e-6)


@pytest.mark.parametrize("percentile", [0.0, -5.0, 100.5, float("nan")])
def test_bad_percentile(percentile):
  with pytest.raises(ValueError, match="percentile"):
    guidance.threshold(jnp.ones((1, 2)), "dynamic", percentile)
  with pytest.raises(ValueError, match="percentile"):
    guidance.abs_percentile(jnp.ones((1, 2)), percentile)


def test_bad_mode():
  with pytest.raises(ValueError, match="thresholding mode"):
    guidance.threshold(jnp.ones((1, 2)), "clip")
