"""Gradient accumulation in the train step (``stage.grad_accum``): the update of ``n``
micro-batches is the update of the whole batch.

The step draws noise, t and the text dropout per micro-batch (``fold_in(rng, i)``), so a
``grad_accum=2`` step and a ``grad_accum=1`` step on the same batch see different random draws.
Two tests separate the accumulation from the randomness:

* with the training inputs (t, ε) made a deterministic function of each example alone, the
  ``grad_accum=2`` and ``grad_accum=1`` steps must agree to 1e-6;
* with the real random draws, the ``grad_accum=2`` step must equal the mean of the per-micro-batch
  gradients of the step's own loss, computed here with the rows and keys the step is documented
  to use (micro-batch ``i`` = rows ``i, i+n, ...`` with key ``fold_in(fold_in(key, step), i)``).

The optimizer is SGD with lr 1, so ``params − new_params`` is exactly the accumulated gradient (an
Adam step would hide a wrong scale: its first update is ≈ lr·sign(g)). The model is a small
nonlinear MLP over a params dict, which keeps the test fast (~10 s, mostly compilation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagen_jax import diffusion
from imagen_jax.config import stage_config
from imagen_jax.diffusion import gaussian, get_schedule
from imagen_jax.stage import step as step_lib

B, H, C, L, D, HIDDEN = 8, 4, 3, 3, 5, 16
SCHEDULE = get_schedule("cosine")


def apply_fn(params, x_t, logsnr, emb, mask, lowres=None, aug_logsnr=None):
  """A nonlinear per-example model that uses every input the step feeds a U-Net."""
  b = x_t.shape[0]
  text = (emb * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)  # [B, D]
  feats = [x_t.reshape(b, -1), jnp.tanh(logsnr / 4)[:, None], text]
  if lowres is not None:
    feats += [lowres.reshape(b, -1), jnp.tanh(aug_logsnr / 4)[:, None]]
  h = jnp.tanh(jnp.concatenate(feats, -1) @ params["w1"] + params["b1"])  # [B, HIDDEN]
  return (h @ params["w2"]).reshape(x_t.shape)


def init_params(sr: bool) -> dict:
  """Random MLP parameters for :func:`apply_fn` (``sr``: it also reads the low-res image)."""
  n_in = H * H * C + 1 + D + (H * H * C + 1 if sr else 0)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  return {
    "w1": jax.random.normal(k1, (n_in, HIDDEN)) / np.sqrt(n_in),
    "b1": 0.1 * jax.random.normal(k2, (HIDDEN,)),
    "w2": jax.random.normal(k3, (HIDDEN, H * H * C)) / np.sqrt(HIDDEN),
  }


def make_batch(sr: bool) -> dict:
  """Eight clearly different examples (so a dropped or repeated micro-batch changes the mean)."""
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.uniform(-1, 1, (B, H, H, C)).astype(np.float32),
    "text_emb": rng.normal(size=(B, L, D)).astype(np.float32),
    "text_mask": np.arange(L)[None, :] < rng.integers(1, L + 1, (B, 1)),
  }
  if sr:
    batch["lowres"] = rng.uniform(-1, 1, (B, H, H, C)).astype(np.float32)
  return jax.tree.map(jnp.asarray, batch)


def make_stage(grad_accum: int, sr: bool = False, text_drop_prob: float = 0.0):
  """A base (or SR) stage config with just the fields under test changed."""
  if sr:
    return stage_config(
      "sr", "tiny_sr", H, lowres_size=H // 2, grad_accum=grad_accum, text_drop_prob=text_drop_prob
    )
  return stage_config("base", "tiny_base", H, grad_accum=grad_accum, text_drop_prob=text_drop_prob)


def run_step(grad_accum: int, sr: bool = False, text_drop_prob: float = 0.0, step: int = 3):
  """One jitted train step (SGD, lr 1) from a fixed state; returns (params, new state, metrics)."""
  tx = optax.sgd(1.0)
  stage = make_stage(grad_accum, sr, text_drop_prob)
  train_step = jax.jit(step_lib.make_train_step(apply_fn, tx, lambda s: 1.0, stage, SCHEDULE))
  params = init_params(sr)
  state = step_lib.init_state(params, tx, jax.random.key(42))
  state["step"] = jnp.asarray(step, jnp.int32)
  new_state, metrics = train_step(state, make_batch(sr))
  return params, new_state, metrics


def applied_grads(params, new_state) -> dict:
  """The gradient an SGD(lr=1) update applied: ``params − new_params``."""
  return jax.tree.map(lambda p, q: np.asarray(p - q), params, new_state["params"])


def per_example_training_inputs(rng, x0, schedule):
  """``sample_training_inputs`` with t and ε functions of each example alone (rng unused)."""
  flat = x0.reshape(x0.shape[0], -1)
  t = 0.05 + 0.9 * jnp.abs(jnp.sin(7.0 * flat.sum(-1) + 0.5))  # [B], over all 4 t buckets
  eps = jnp.cos(13.0 * x0 + 0.3)  # [B, ...]
  logsnr = schedule(t)
  return gaussian.q_sample(x0, logsnr, eps), t, logsnr, eps


def test_split_micro_is_strided():
  """Micro-batch i is rows i, i+n, i+2n, ... of every leaf (the step's documented split)."""
  batch = {"a": jnp.arange(8), "b": {"c": jnp.arange(16).reshape(8, 2)}}
  micro = step_lib._split_micro(batch, 2)
  np.testing.assert_array_equal(micro["a"], [[0, 2, 4, 6], [1, 3, 5, 7]])
  np.testing.assert_array_equal(micro["b"]["c"][1], np.arange(16).reshape(8, 2)[1::2])
  np.testing.assert_array_equal(
    step_lib._split_micro(batch, 4)["a"], [[0, 4], [1, 5], [2, 6], [3, 7]]
  )


def test_two_micro_batches_equal_one_full_batch(monkeypatch):
  """With per-example (rng-free) t and ε and no text dropout, 2 micro-batches of 4 = 1 batch of 8.

  Fails if the micro-batch gradients (or losses) are summed instead of averaged (a factor 2), if
  a micro-batch is dropped or one is used twice (the mean over 4 different examples is not the
  mean over 8), or if the split misses rows. The t-bucket sums and counts must add up over the
  micro-batches.
  """
  monkeypatch.setattr(diffusion, "sample_training_inputs", per_example_training_inputs)
  params, one, m1 = run_step(grad_accum=1)
  _, two, m2 = run_step(grad_accum=2)
  g1, g2 = applied_grads(params, one), applied_grads(params, two)
  for k in g1:
    assert np.abs(g1[k]).max() > 1e-3, k  # a real gradient, not a vacuous match of zeros
    np.testing.assert_allclose(g2[k], g1[k], atol=1e-6, rtol=1e-6, err_msg=k)
  for k in ("loss", "grad_norm", "update_norm", "loss_t_sum", "loss_t_count"):
    np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), atol=1e-6, rtol=1e-6)
  assert float(m2["loss_t_count"].sum()) == B
  assert (np.asarray(m2["loss_t_count"]) > 0).sum() >= 2  # the examples span several buckets


def test_accumulated_update_is_mean_of_micro_batch_grads():
  """The real random draws: the grad_accum=2 update is the mean of the two micro-batch gradients
  of the step's own loss on rows ``i::2`` with key ``fold_in(fold_in(key, step), i)``.

  Fails if the gradients are summed, if a micro-batch is dropped, if the split is contiguous
  (rows ``:4``/``4:`` would meet other noise draws than rows ``0::2``/``1::2``), if the low-res
  images are split unlike the images, or if the micro-batches share one key (the same noise, t,
  augmentation level and text dropout for both). An SR stage, so that the low-res leaf and the
  noise augmentation go through the split too (the base stage's path is a subset); text dropout
  is on (p = 0.5) so that it is drawn per micro-batch as well.
  """
  step, n, sr = 3, 2, True
  params, two, metrics = run_step(grad_accum=n, sr=sr, text_drop_prob=0.5, step=step)
  loss_fn = step_lib.make_loss_fn(apply_fn, make_stage(n, sr, 0.5), SCHEDULE)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  key = jax.random.fold_in(jax.random.key(42), step)
  batch = make_batch(sr)
  losses, grads = [], []
  for i in range(n):
    micro = jax.tree.map(lambda x, i=i: x[i::n], batch)
    (loss, _), g = grad_fn(params, micro, jax.random.fold_in(key, i))
    losses.append(float(loss))
    grads.append(g)
  want = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *grads)
  got = applied_grads(params, two)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6, err_msg=k)
  # The two micro-batches really differ (else a dropped or repeated one would go unnoticed).
  assert max(np.abs(np.asarray(grads[0][k] - grads[1][k])).max() for k in want) > 1e-2
  assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
