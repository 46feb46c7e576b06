"""The learning-rate schedules and the parameter EMA of ``imagen_jax.stage.optim``, against their
closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from imagen_jax.stage import optim


def _cfg(schedule="cosine", lr=1e-3, warmup_steps=10, **extra) -> ml_collections.ConfigDict:
  """An optimizer config with just the fields ``learning_rate_schedule`` reads."""
  return ml_collections.ConfigDict(
    dict(schedule=schedule, lr=lr, warmup_steps=warmup_steps, **extra)
  )


def expected_lr(step: int, cfg, total_steps: int) -> float:
  """The documented schedule, in float64.

  The warmup is clamped to ``w = min(warmup_steps, max(T - 1, 0))`` so that a run shorter than
  its warmup still reaches the peak on its last update (step ``T - 1``). Cosine: ``lr·s/w`` for
  ``s < w``, then ``end + (lr − end)·½(1 + cos(π·(s − w)/(D − w)))`` with ``D = max(T, w + 1)``
  (the cosine spans warmup + decay, as in optax), and ``end`` from step ``D`` on. Constant:
  ``lr·min(s/w, 1)`` (``lr`` throughout when ``w = 0``).
  """
  lr, end = cfg.lr, cfg.get("end_lr", 0.0)
  w = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if step < w:
    return lr * step / w
  if cfg.schedule == "constant":
    return lr
  d = max(total_steps, w + 1)
  s = min(step, d)
  return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * (s - w) / (d - w)))


def _values(schedule, steps) -> np.ndarray:
  """``schedule`` at every step of ``steps`` (a constant schedule returns one scalar)."""
  steps = np.asarray(steps, np.int32)
  return np.broadcast_to(np.asarray(schedule(jnp.asarray(steps)), np.float64), steps.shape)


def _boundaries(w: int, total: int) -> list[int]:
  """The steps where a convention slip shows: the ends of warmup and decay, and beyond."""
  d = max(total, w + 1)
  near = [0, 1, w - 1, w, w + 1, (w + d) // 2, d - 1, d, d + 1, 2 * d + 7, 10 * d]
  return sorted({s for s in near if s >= 0})


@pytest.mark.parametrize(
  ("schedule", "lr", "warmup", "total", "end_lr"),
  [
    ("cosine", 1e-3, 10, 50, 0.0),
    ("cosine", 1e-3, 10, 50, 1e-5),  # decays to end_lr, not 0
    ("cosine", 2e-4, 0, 37, 0.0),  # no warmup: the cosine starts at step 0
    ("cosine", 1e-3, 100, 10, 1e-5),  # warmup >= total: clamped to T - 1
    ("cosine", 1e-3, 10, 11, 0.0),  # warmup = T - 1: one cosine step
    ("cosine", 1e-3, 5, 1, 0.0),  # a one-step run
    ("cosine", 1e-4, 10_000, 2_500_000, 0.0),  # the paper's recipe (Imagen App. F)
    ("constant", 1e-3, 10, 50, 0.0),
    ("constant", 1e-3, 0, 50, 0.0),
    ("constant", 1e-3, 100, 10, 0.0),
  ],
)
def test_learning_rate_schedule_matches_closed_form(schedule, lr, warmup, total, end_lr):
  cfg = _cfg(schedule, lr, warmup, end_lr=end_lr)
  sched = optim.learning_rate_schedule(cfg, total)
  w = min(warmup, max(total - 1, 0))
  steps = sorted(set(range(min(total, 200) + 3)) | set(_boundaries(w, total)))
  want = np.array([expected_lr(s, cfg, total) for s in steps])
  # float32 inside optax: ~1e-7 relative, plus the cos of a float32 phase near the end.
  np.testing.assert_allclose(_values(sched, steps), want, rtol=2e-6, atol=1e-6 * lr)
  # Scalar (Python int) steps, as the trainer logs them, agree with the array path.
  for s in _boundaries(w, total):
    assert float(sched(s)) == pytest.approx(want[steps.index(s)], rel=2e-6, abs=1e-6 * lr)


def test_schedule_landmarks():
  """The closed form's landmarks, spelled out: 0 at the start, lr at the end of warmup, the
  midpoint of the decay at (lr + end) / 2, end_lr from the last step on, and the last update of
  a run shorter than its warmup at the peak."""
  cfg = _cfg(lr=1e-3, warmup_steps=10, end_lr=1e-4)
  s = optim.learning_rate_schedule(cfg, 110)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4, rel=1e-6)
  assert float(s(10)) == pytest.approx(1e-3, rel=1e-6)
  assert float(s(60)) == pytest.approx(5.5e-4, rel=1e-6)
  assert float(s(110)) == pytest.approx(1e-4, rel=1e-6)
  assert float(s(10_000)) == pytest.approx(1e-4, rel=1e-6)
  short = optim.learning_rate_schedule(_cfg(warmup_steps=1000), 10)
  assert float(short(9)) == pytest.approx(1e-3, rel=1e-6) and float(short(10)) == 0.0
  # end_lr is optional and defaults to 0.
  assert float(optim.learning_rate_schedule(_cfg(), 50)(50)) == 0.0


def test_schedule_rejects_bad_configs():
  with pytest.raises(ValueError, match="schedule"):
    optim.learning_rate_schedule(_cfg("linear"), 10)
  with pytest.raises(ValueError, match="lr must be > 0"):
    optim.learning_rate_schedule(_cfg(lr=0.0), 10)


# ---------------------------------------------------------------------------------------------
# EMA of the parameters.


@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.5])
def test_ema_decay_warmup_closed_form(decay):
  # (1 + s) / (10 + s) reaches decay at s* = (10·decay − 1) / (1 − decay): 89991 for 0.9999.
  cross = (10 * decay - 1) / (1 - decay)
  steps = sorted({0, 1, 2, 9, 10, 100, 1000, int(cross) - 1, int(cross), int(cross) + 1, 10**7})
  for s in steps:
    got = optim.ema_decay(jnp.int32(s), decay, warmup=True)
    assert got.dtype == jnp.float32 and got.shape == ()
    want = min(decay, (1 + s) / (10 + s))
    assert float(got) == pytest.approx(want, rel=1e-6), s
  assert float(optim.ema_decay(0, decay)) == pytest.approx(min(decay, 0.1))  # warmup by default
  # Vectorised over steps, under jit (as in the train step).
  arr = jnp.asarray(steps, jnp.int32)
  got = jax.jit(lambda s: optim.ema_decay(s, decay))(arr)
  want = np.minimum(decay, (1.0 + np.asarray(steps)) / (10.0 + np.asarray(steps)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_ema_decay_without_warmup_is_constant():
  for s in (0, 1, 50, 10**6):
    got = optim.ema_decay(jnp.int32(s), 0.9999, warmup=False)
    assert got.dtype == jnp.float32 and float(got) == np.float32(0.9999)


def test_ema_update_closed_form_per_dtype():
  """``decay·ema + (1 − decay)·params`` computed in float32 and stored in the EMA's dtype."""
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  ema = {
    "w": f32(3, 4),
    "b": f32(4),
    "bf16": (f32(64) * 100).astype(ml_dtypes.bfloat16),  # a bf16 EMA leaf of f32 params
    "f32_of_bf16": f32(5),  # an f32 EMA of bf16 params
  }
  params = {
    "w": f32(3, 4),
    "b": f32(4),
    "bf16": f32(64) * 100,
    "f32_of_bf16": f32(5).astype(ml_dtypes.bfloat16),
  }
  decay = optim.ema_decay(jnp.int32(5), 0.999)  # 6 / 15 = 0.4 (warmup)
  d = np.float32(decay)
  assert d == np.float32(0.4)
  got = optim.ema_update(jax.tree.map(jnp.asarray, ema), jax.tree.map(jnp.asarray, params), decay)
  for k in ema:
    want = d * ema[k].astype(np.float32) + (np.float32(1) - d) * params[k].astype(np.float32)
    assert got[k].dtype == ema[k].dtype, k
    tol = 1e-6 if ema[k].dtype == np.float32 else 0.0
    np.testing.assert_allclose(
      np.asarray(got[k], np.float32), want.astype(ema[k].dtype).astype(np.float32), rtol=tol
    )


def test_bf16_ema_is_computed_in_float32():
  """A bf16 EMA leaf is updated in float32 and rounded once: in bf16 arithmetic decay 0.999
  would itself round to 0.99609375 and the update (1 − decay)·p would be ~4x too large."""
  ema = jnp.zeros(3, jnp.bfloat16)
  params = jnp.array([256.0, -512.0, 1000.0], jnp.float32)
  got = optim.ema_update(ema, params, jnp.float32(0.999))
  want = (np.float32(1 - np.float32(0.999)) * np.asarray(params)).astype(ml_dtypes.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), want)
  bf16_arithmetic = (1 - np.float32(ml_dtypes.bfloat16(0.999))) * np.asarray(params)
  assert not np.allclose(np.asarray(got, np.float32), bf16_arithmetic, rtol=0.5)


def test_ema_update_endpoints():
  """decay 1 keeps the EMA, decay 0 copies the params (exactly, in float32)."""
  ema, params = {"a": jnp.arange(4.0)}, {"a": jnp.arange(4.0) * -3 + 0.5}
  np.testing.assert_array_equal(optim.ema_update(ema, params, jnp.float32(1.0))["a"], ema["a"])
  np.testing.assert_array_equal(optim.ema_update(ema, params, jnp.float32(0.0))["a"], params["a"])
