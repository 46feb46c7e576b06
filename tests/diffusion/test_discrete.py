"""DDPM's discrete schedules and learned-range variance against diffusers' ``DDPMScheduler``.

DeepFloyd IF's scheduler config (squaredcos_cap_v2, learned_range variance, dynamic thresholding
at ratio 0.95 capped at 1.5) is the oracle: the table, one step, and a whole sampling loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

try:
  from tests.torch_oracles import declare_torchvision_ops
except ImportError:  # pragma: no cover
  from torch_oracles import declare_torchvision_ops

declare_torchvision_ops()

import diffusers  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from imagen_jax import diffusion  # noqa: E402
from imagen_jax.diffusion.discrete import DiscreteSchedule, learned_range_log_variance  # noqa: E402

IF_SCHEDULER = dict(
  beta_schedule="squaredcos_cap_v2",
  num_train_timesteps=1000,
  variance_type="learned_range",
  prediction_type="epsilon",
  thresholding=True,
  dynamic_thresholding_ratio=0.95,
  sample_max_value=1.5,
  clip_sample=True,
  clip_sample_range=1.0,
)


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(x):
  return np.asarray(x.numpy()).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear", "scaled_linear"])
def test_table_equals_diffusers(beta_schedule):
  ours = DiscreteSchedule(beta_schedule=beta_schedule)
  ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule).alphas_cumprod.numpy()
  if beta_schedule == "squaredcos_cap_v2":
    np.testing.assert_array_equal(ours.alphas_cumprod(), ref)  # bit for bit
  else:
    np.testing.assert_allclose(ours.alphas_cumprod(), ref, rtol=2e-6)
  # The continuous schedule passes through every table entry at t = (τ + 1) / N ...
  tau = jnp.arange(1000.0)
  lam = np.asarray(ours(ours.t_from_timestep(tau)))
  alpha2 = 1.0 / (1.0 + np.exp(-lam.astype(np.float64)))
  # float32 interpolation: ᾱ within 5e-5 relative where λ is steep (the tail), far tighter elsewhere
  np.testing.assert_allclose(alpha2, ref, rtol=5e-5, atol=1e-9)
  np.testing.assert_allclose(alpha2[:900], ref[:900], rtol=2e-6)
  # ... is monotone, inverts, and ends on the clean image at t = 0.
  assert np.all(np.diff(lam) < 0)
  np.testing.assert_allclose(ours.timestep(ours.t_from_logsnr(lam)), tau, atol=2e-3)
  assert float(ours(jnp.float32(0.0))) == ours.logsnr_max


def test_schedule_errors_name_the_field():
  with pytest.raises(ValueError, match="beta_schedule='cosine'"):
    DiscreteSchedule(beta_schedule="cosine")
  with pytest.raises(ValueError, match="max_logsnr"):
    DiscreteSchedule(max_logsnr=5.0)
  with pytest.raises(ValueError, match="trained_betas"):
    DiscreteSchedule.from_diffusers({"trained_betas": [0.1, 0.2]})
  got = DiscreteSchedule.from_diffusers({**IF_SCHEDULER, "_class_name": "DDPMScheduler"})
  assert got == DiscreteSchedule()


def _our_step(x, eps, v, tau, prev, schedule):
  """One DDPM step τ → prev, composed as the ancestral sampler composes it."""
  lt = schedule(schedule.t_from_timestep(jnp.float32(tau)))
  ls = schedule(schedule.t_from_timestep(jnp.float32(prev)))
  x0, _ = diffusion.denoise(eps, x, lt, "eps", "dynamic", 95.0, 1.5)
  return x0, lt, ls, learned_range_log_variance(v, lt, ls)


@pytest.mark.parametrize("tau,prev", [(999, 979), (499, 479), (239, 219), (39, 19)])
def test_one_step_equals_ddpm_scheduler(tau, prev, monkeypatch):
  rng = np.random.default_rng(tau)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  eps = (0.9 * x + 0.6 * rng.normal(size=x.shape)).astype(np.float32)
  v = rng.uniform(-1, 1, size=x.shape).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  sched = diffusers.DDPMScheduler(**IF_SCHEDULER, timestep_spacing="trailing")
  sched.set_timesteps(50)  # trailing: 999, 979, …, 19
  assert prev == sched.previous_timestep(tau)
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: _nchw(noise))
  out = sched.step(torch.cat([_nchw(eps), _nchw(v)], 1), tau, _nchw(x))
  schedule = DiscreteSchedule()
  x0, lt, ls, log_var = _our_step(x, eps, v, tau, prev, schedule)
  np.testing.assert_allclose(np.asarray(x0), _nhwc(out.pred_original_sample), atol=1e-5)
  ours = diffusion.ancestral_step(x, x0, lt, ls, noise, log_var)
  np.testing.assert_allclose(np.asarray(ours), _nhwc(out.prev_sample), atol=1e-5, rtol=1e-5)
  # v = −1 is the posterior variance: the ancestral sampler's own step.
  plain = diffusion.ancestral_step(x, x0, lt, ls, noise)
  fixed = diffusion.ancestral_step(
    x, x0, lt, ls, noise, learned_range_log_variance(-1 + 0 * v, lt, ls)
  )
  np.testing.assert_allclose(np.asarray(plain), np.asarray(fixed), atol=1e-5)


def _model(x, tau, lib):
  """A deterministic stand-in model, the same in torch and jax: ε and a learned-range v."""
  eps = 0.8 * x + 0.3 * lib.sin(x * 3.0 + tau / 150.0)
  # The last step (τ = 99 → clean) gets v = −1: diffusers still adds noise there, of std
  # exp(½ log 1e-20) for v = −1, while the sampler returns x̂0.
  if lib is jnp:
    return eps, jnp.where(tau > 99, jnp.tanh(x) * 0.8, -1.0)
  return eps, torch.tanh(x) * 0.8 if tau > 99 else torch.full_like(x, -1.0)


def test_sampling_loop_equals_ddpm_scheduler(monkeypatch):
  """10 trailing-spaced DDPM steps with IF's thresholding and learned variance, fed the same
  noise: our ancestral sampler on the discrete schedule gives diffusers' samples."""
  schedule = DiscreteSchedule()
  shape = (2, 8, 8, 3)
  rng = jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.key(7), shape)) * 1.4
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, k), shape)) for k in range(10)]

  def model_fn(x, t):
    tau = schedule.timestep(t[0])
    eps, v = _model(x, jnp.round(tau), jnp)
    return jnp.concatenate([eps, v], -1)

  ours = diffusion.sample(
    model_fn,
    jnp.asarray(x_T),
    rng,
    sampler="ancestral",
    steps=10,
    schedule=schedule,
    pred_type="eps",
    thresholding="dynamic",
    percentile=95.0,
    threshold_max=1.5,
    learned_variance=True,
  )
  sched = diffusers.DDPMScheduler(**IF_SCHEDULER, timestep_spacing="trailing")
  sched.set_timesteps(10)
  queue = [_nchw(n) for n in noises]
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
  x = _nchw(x_T)
  for tau in sched.timesteps:
    eps, v = _model(x, float(tau), torch)
    x = sched.step(torch.cat([eps, v], 1), tau, x).prev_sample
  np.testing.assert_allclose(np.asarray(ours), _nhwc(x), atol=1e-4)
  assert np.abs(np.asarray(ours)).max() <= 1.0 + 1e-6  # thresholded x̂0 ends in [−1, 1]


def test_learned_variance_cfg_keeps_the_conditional_variance():
  def model_fn(x, t, cond):
    return jnp.concatenate([x * cond, x + cond], -1)

  x = jnp.ones((2, 4, 4, 3))
  guided = diffusion.classifier_free_guidance(
    model_fn, jnp.full((2, 1, 1, 1), 2.0), jnp.zeros((2, 1, 1, 1)), 3.0, learned_variance=True
  )(x, jnp.zeros(2))
  np.testing.assert_allclose(guided[..., :3], 6.0)  # u + w (c − u) = 0 + 3·2
  np.testing.assert_allclose(guided[..., 3:], 3.0)  # the conditional branch's x + 2
