"""Step spacing (:mod:`imagen_jax.diffusion.spacing`) and the DPM-Solver++ variants (3M, 2M SDE).

Oracles from outside the code under test: the cosine schedule's closed form worked by hand with
``math`` (the grids), diffusers' ``DPMSolverMultistepScheduler`` on DeepFloyd IF's schedule (its
σ grids for ``use_karras_sigmas``, ``use_lu_lambdas`` and "trailing", and whole DPM-Solver++(2M),
(3M) and (2M) SDE sampling loops fed the same noise), and the exact Gaussian denoiser
(:mod:`imagen_jax.diffusion.oracle`) for the sample statistics.
"""

from __future__ import annotations

import math

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

from imagen_jax.diffusion import inversion, oracle, samplers, spacing  # noqa: E402
from imagen_jax.diffusion.discrete import DiscreteSchedule  # noqa: E402
from imagen_jax.diffusion.schedules import get_schedule  # noqa: E402
from imagen_jax.diffusion.spacing import time_grid  # noqa: E402

COSINE = get_schedule("cosine")
IF = DiscreteSchedule()  # squaredcos_cap_v2, N = 1000
SCHEDULES = {
  "cosine": COSINE,
  "if": IF,
  "linear": get_schedule("linear"),
  "shifted": get_schedule("shifted_cosine", image_size=256),
}
NEW = ("logsnr", "karras")


# ---- grids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, t_start, t_end", [(1, 1.0, 0.0), (7, 1.0, 0.0), (25, 0.6, 0.0)])
def test_uniform_is_todays_grid(steps, t_start, t_end):
  """The default spacing is the old ``jnp.linspace`` bit for bit, with or without a schedule."""
  old = jnp.linspace(t_start, t_end, steps + 1, dtype=jnp.float32)
  np.testing.assert_array_equal(time_grid(steps, t_start, t_end), old)
  np.testing.assert_array_equal(time_grid(steps, t_start, t_end, schedule=IF), old)
  assert samplers.time_grid is time_grid  # the samplers and inversion use this one


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kind", NEW)
def test_new_grids_are_monotone_and_hit_their_endpoints(name, kind):
  """t_0 = t_start, then strictly decreasing to t_{N−1} = t_min (1/N_train on IF: τ = 0, a
  valid table entry; 10⁻³ otherwise), then t_N = t_end; evenly spaced in λ (logsnr) or in
  σ^{1/7} (karras)."""
  schedule = SCHEDULES[name]
  for steps, t_start in ((1, 1.0), (2, 1.0), (13, 1.0), (13, 0.6)):
    ts = np.asarray(time_grid(steps, t_start, 0.0, spacing=kind, schedule=schedule))
    assert ts.shape == (steps + 1,) and ts.dtype == np.float32
    assert ts[0] == np.float32(t_start) and ts[-1] == 0.0
    if steps > 1:
      assert ts[-2] == np.float32(1e-3)  # IF: 1/N_train; continuous: DPM-Solver's ε
    assert np.all(np.diff(ts) < 0), ts
    assert np.all(ts[:-1] >= np.float32(1e-3))
    if name == "if":  # every evaluation at a valid timestep τ ≥ 0
      assert float(jnp.min(IF.timestep(ts[:-1]))) >= -1e-4
    if steps > 2:
      lam = np.asarray(schedule(ts[:-1]), np.float64)  # [N]
      var = lam if kind == "logsnr" else np.exp(-lam / (2 * spacing.KARRAS_RHO))
      step = np.diff(var)
      np.testing.assert_allclose(step, step.mean(), rtol=2e-3, atol=2e-3 * np.abs(var).max())


def test_grids_equal_hand_worked_cosine_values():
  """Cosine, 3 steps, λ ∈ [−20, 20]: a = atan(e^−10), b = atan(e^10), λ(t) = −2 log tan(a +
  t (b − a)), t(λ) = (atan(e^{−λ/2}) − a) / (b − a). λ(1) = −20 and λ(10⁻³) = 12.8555.

  logsnr: λ_1 = (−20 + 12.8555) / 2 = −3.5723, t_1 = 0.894303.
  karras: σ = e^{−λ/2} runs 22026.47 → σ_1 = ((22026.47^{1/7} + 0.0016161^{1/7}) / 2)^7
  = 326.213 → λ_1 = −11.5751, t_1 = 0.998077: σ_max = e^{10} puts most Karras steps at noise
  levels where x̂0 is still the data mean (see bench/RESULTS.md, "Step spacing").
  """
  a, b = math.atan(math.exp(-10.0)), math.atan(math.exp(10.0))
  t_of = lambda lam: (math.atan(math.exp(-lam / 2)) - a) / (b - a)
  lo = -2 * math.log(math.tan(a + 1e-3 * (b - a)))
  assert lo == pytest.approx(12.8555, abs=1e-4)
  assert t_of((lo - 20.0) / 2) == pytest.approx(0.894303, abs=1e-6)
  # float32 rounding: λ(1) is −20 only to ~1e-3 (tan near π/2), which moves t_1 by ~3e-5.
  ts = time_grid(3, spacing="logsnr", schedule=COSINE)
  np.testing.assert_allclose(ts, [1.0, 0.894303, 1e-3, 0.0], rtol=1e-4)
  sigma_1 = ((math.exp(10.0) ** (1 / 7) + math.exp(-lo / 2) ** (1 / 7)) / 2) ** 7
  assert sigma_1 == pytest.approx(326.213, rel=1e-5)
  ts = time_grid(3, spacing="karras", schedule=COSINE)
  np.testing.assert_allclose(ts, [1.0, 0.998077, 1e-3, 0.0], rtol=1e-4)
  np.testing.assert_allclose(COSINE(ts[1]), -2 * math.log(sigma_1), rtol=1e-4)


DIFFUSERS_SPACING = {
  "uniform": dict(timestep_spacing="trailing"),
  "logsnr": dict(use_lu_lambdas=True),
  "karras": dict(use_karras_sigmas=True),
}


def _dpm_scheduler(kind, steps, **kwargs):
  sched = diffusers.DPMSolverMultistepScheduler(
    beta_schedule="squaredcos_cap_v2", lower_order_final=False, **DIFFUSERS_SPACING[kind], **kwargs
  )
  sched.set_timesteps(steps)
  sched.set_begin_index(0)  # karras' truncated timesteps repeat (998, 998, …): index by step
  return sched


@pytest.mark.parametrize("kind", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [5, 25])
def test_if_grids_equal_diffusers_sigmas(kind, steps):
  """On IF's schedule every spacing is diffusers' σ = √((1 − ᾱ)/ᾱ) grid: N noise levels from
  τ = 999 down (to τ = 0 for karras and logsnr), then σ = 0, our t_N = 0."""
  ref = _dpm_scheduler(kind, steps).sigmas.numpy().astype(np.float64)  # [N + 1], ends with 0
  ts = time_grid(steps, spacing=kind, schedule=IF)
  ours = np.exp(-np.asarray(IF(ts), np.float64) / 2)
  np.testing.assert_allclose(ours[:-1], ref[:-1], rtol=1e-3)
  assert ref[-1] == 0.0 and float(ts[-1]) == 0.0


# ---- solvers against diffusers ---------------------------------------------------------------

LOOP_SHAPE = (2, 4, 4, 3)


def _eps(x, lam, lib):
  """ε of Gaussian data N(0.3, 0.5²) plus a smooth, level-dependent perturbation, the same in
  jax and torch (the perturbation is scaled by α, so x̂0 stays bounded at high noise)."""
  alpha = lib.sqrt(1 / (1 + lib.exp(-lam)))
  sigma = lib.sqrt(1 / (1 + lib.exp(lam)))
  return sigma / (alpha * alpha * 0.25 + sigma * sigma) * (x - alpha * 0.3) + 0.3 * alpha * lib.sin(
    3.0 * x + lam / 5.0
  )


@pytest.mark.parametrize(
  "sampler, kind",
  [
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m", "logsnr"),
    ("dpmpp_3m", "uniform"),
    ("dpmpp_3m", "logsnr"),
    ("dpmpp_3m", "karras"),
    ("dpmpp_2m_sde", "logsnr"),
    ("dpmpp_2m_sde", "karras"),
  ],
)
def test_sampling_loop_equals_diffusers(sampler, kind):
  """8 steps on IF's schedule: ours = diffusers' DPMSolverMultistepScheduler with the same
  solver (order 2/3, ``dpmsolver++`` / ``sde-dpmsolver++``), spacing and noise. Both end with
  x̂0 of the last evaluation (diffusers: a first-order step to σ = 0)."""
  steps, rng = 8, jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.key(7), LOOP_SHAPE))
  ours = samplers.sample(
    lambda x, t: _eps(x, IF(t)[:, None, None, None], jnp),
    jnp.asarray(x_T),
    rng,
    sampler=sampler,
    steps=steps,
    schedule=IF,
    pred_type="eps",
    thresholding="none",
    spacing=kind,
  )
  order = 3 if sampler == "dpmpp_3m" else 2
  algo = "sde-dpmsolver++" if sampler == "dpmpp_2m_sde" else "dpmsolver++"
  sched = _dpm_scheduler(kind, steps, solver_order=order, algorithm_type=algo)
  x = torch.from_numpy(x_T.copy())
  for k, tau in enumerate(sched.timesteps):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, k), LOOP_SHAPE))
    lam = torch.tensor(-2.0 * math.log(float(sched.sigmas[k])), dtype=torch.float32)
    out = sched.step(_eps(x, lam, torch), tau, x, variance_noise=torch.from_numpy(noise.copy()))
    x = out.prev_sample
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=5e-4, rtol=5e-4)


# ---- sample statistics on the exact denoiser --------------------------------------------------

B, SHAPE = 2048, (4, 4, 2)
MEAN = jnp.linspace(-0.5, 0.5, 32).reshape(SHAPE)
STD = jnp.linspace(0.75, 0.25, 32).reshape(SHAPE)
X_T = jnp.asarray(np.random.default_rng(1).standard_normal((B, *SHAPE)), jnp.float32)
RNG = jax.random.key(0)
SAMPLE = jax.jit(samplers.sample, static_argnames=samplers.SAMPLE_STATIC_ARGNAMES)


def _sample(model, sampler, steps, schedule, kind, x_T=X_T, pred_type="eps", **kw):
  return SAMPLE(
    model,
    x_T,
    RNG,
    sampler=sampler,
    steps=steps,
    schedule=schedule,
    pred_type=pred_type,
    thresholding="none",
    spacing=kind,
    **kw,
  )


@pytest.mark.parametrize(
  "sampler, kind, schedule, steps",
  [
    ("dpmpp_3m", "uniform", "cosine", 15),
    ("dpmpp_3m", "logsnr", "if", 25),
    ("dpmpp_2m_sde", "logsnr", "cosine", 50),
    ("dpmpp_2m", "karras", "if", 70),
  ],
)
def test_new_solvers_and_spacings_reproduce_the_gaussian(sampler, kind, schedule, steps):
  """Gaussian data N(μ, diag(s²)), s ∈ [0.25, 0.75] (tests/diffusion/test_samplers.py's), at the
  step counts bench/step_spacing.py measured: z = (x − μ)/s has per-pixel |mean| ≤ 4.5/√n and
  |std − 1| ≤ 0.03 + 4.5/√(2n), and pixel-averaged |std − 1| ≤ 0.03 (n = 2048; sampling noise
  0.002 on the average)."""
  schedule = SCHEDULES[schedule]
  x = _sample(
    oracle.oracle_model_fn(MEAN, STD, schedule, "v"), sampler, steps, schedule, kind, pred_type="v"
  )
  z = np.asarray((x - MEAN) / STD)
  z_mean, z_std = z.mean(axis=0), z.std(axis=0)
  assert np.abs(z_mean).max() <= 4.5 / np.sqrt(B), z_mean
  assert np.abs(z_std - 1.0).max() <= 0.03 + 4.5 / np.sqrt(2 * B), z_std
  assert abs(z_std.mean() - 1.0) <= 0.03, z_std.mean()


def test_log_snr_spacing_keeps_a_narrow_mode_that_uniform_spacing_shrinks():
  """0.7 N(−0.4, 0.3²) + 0.3 N(0.5, 0.05²) over 32 pixels, DPM-Solver++(2M), 25 steps, cosine:
  the uniform grid's last evaluation is at t = 1/25 (σ/α ≈ 0.063 > s = 0.05), so x̂0 = E[x0 | x_t]
  shrinks the narrow mode to ≈ 0.6 of its std (measured 0.61); the log-SNR grid ends at t = 10⁻³
  and keeps it within 3% (measured 1.02), with the mode weight (0.3) within 0.02."""
  weights = jnp.asarray([0.7, 0.3])
  means = jnp.stack([jnp.full(SHAPE, -0.4), jnp.full(SHAPE, 0.5)])
  stds = jnp.asarray([0.3, 0.05])
  model = lambda x, t: oracle.mixture_pred(x, COSINE(t), weights, means, stds, "eps")

  def narrow_stats(kind):
    x = np.asarray(_sample(model, "dpmpp_2m", 25, COSINE, kind)).reshape(B, -1)
    narrow = x.mean(axis=1) > 0.05
    return x[narrow].std(axis=0).mean() / 0.05, narrow.mean()

  std, weight = narrow_stats("uniform")
  assert std < 0.7, std
  std, weight = narrow_stats("logsnr")
  assert abs(std - 1.0) <= 0.03 and abs(weight - 0.3) <= 0.02, (std, weight)


@pytest.mark.parametrize("sampler, min_ratio", [("ddim", 1.7), ("dpmpp_2m", 4.0)])
def test_inversion_on_the_log_snr_grid(sampler, min_ratio):
  """``invert(..., spacing="logsnr")`` walks that grid backwards (its latent differs from the
  uniform grid's), and regenerating on the same grid converges at the solver's order: DDIM
  0.183 → 0.099 for 20 → 40 steps, DPM-Solver++(2M) 0.0048 → 0.0002 (measured)."""
  model = oracle.oracle_model_fn(MEAN, STD, COSINE, "eps")
  x0 = MEAN + STD * jax.random.normal(jax.random.key(0), (16, *SHAPE))

  def error(steps):
    kw = dict(sampler=sampler, steps=steps, schedule=COSINE, pred_type="eps", spacing="logsnr")
    z = inversion.invert(model, x0, **kw)
    rec = samplers.sample(model, z, None, thresholding="none", **kw)
    return float(jnp.sqrt(jnp.mean((rec - x0) ** 2))), z

  (e20, z), (e40, _) = error(20), error(40)
  assert e20 / e40 >= min_ratio, (e20, e40)
  uniform = inversion.invert(model, x0, sampler=sampler, steps=20, schedule=COSINE, pred_type="eps")
  assert float(jnp.max(jnp.abs(uniform - z))) > 1e-3


def test_multistep_history_restarts_and_zero_length_steps_stay_finite():
  """3M under RePaint jumps (its two-step history restarts after every jump) gives a finite
  sample that keeps the known pixels; 3M and 2M SDE with t_end above the grid's floor
  (t_{N−1} = t_N: a last step of length 0, where 3M's divided differences must not be 0/0)
  give finite samples."""
  model = oracle.oracle_model_fn(MEAN, STD, COSINE, "eps")
  x_T, known = X_T[:8], jnp.broadcast_to(MEAN, X_T[:8].shape)
  mask = jnp.arange(32).reshape(1, *SHAPE) < 16
  kw = dict(known=known, mask=mask, resample=2, jump=3)
  x = _sample(model, "dpmpp_3m", 12, COSINE, "logsnr", x_T, **kw)
  assert bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_array_equal(jnp.where(mask, 0.0, x), jnp.where(mask, 0.0, known))
  ts = time_grid(6, 1.0, 0.3, spacing="karras", schedule=COSINE)
  assert ts[-2] == ts[-1] == np.float32(0.3)
  for sampler in ("dpmpp_3m", "dpmpp_2m_sde"):
    x = _sample(model, sampler, 6, COSINE, "karras", x_T, t_end=0.3)
    assert bool(jnp.all(jnp.isfinite(x)))


def test_invalid_spacing_and_missing_rng_are_errors():
  model = oracle.oracle_model_fn(MEAN, STD, COSINE, "eps")
  kw = dict(sampler="ddim", steps=4, schedule=COSINE, pred_type="eps")
  with pytest.raises(ValueError, match=r"spacing must be one of \('uniform', 'logsnr', 'karras'\)"):
    samplers.sample(model, X_T[:2], None, spacing="trailing", **kw)
  with pytest.raises(ValueError, match="spacing must be one of"):
    inversion.invert(model, X_T[:2], spacing="Karras", **kw)
  with pytest.raises(ValueError, match="spacing='karras' needs the schedule"):
    time_grid(4, spacing="karras")
  with pytest.raises(ValueError, match="rng is required for sampler='dpmpp_2m_sde'"):
    samplers.sample(model, X_T[:2], None, **{**kw, "sampler": "dpmpp_2m_sde"})


def test_first_order_sde_step_is_the_ancestral_step():
  """(σ_s/σ_t) e^{−h} = r α_s/α_t and 1 − e^{−2h} = 1 − r: DPM-Solver++(1) SDE is DDPM's step."""
  x, x0, z = (jax.random.normal(jax.random.key(k), (3, 5)) for k in range(3))
  lt, ls = jnp.float32(-1.3), jnp.float32(0.4)
  sde, _ = samplers.dpmpp_2m_sde_step(x, x0, 0 * x0, lt, ls, jnp.float32(0), jnp.bool_(True), z)
  np.testing.assert_allclose(sde, samplers.ancestral_step(x, x0, lt, ls, z), rtol=1e-5, atol=1e-6)
