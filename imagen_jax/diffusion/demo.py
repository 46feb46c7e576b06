"""Demo: every sampler on a 2-D Gaussian "dataset" with its closed-form optimal denoiser.

  python -m imagen_jax.diffusion.demo

The model is the exact posterior mean for x0 ~ N(μ, diag(s²)) (:mod:`oracle`), so a correct
sampler must return samples with mean μ and std s; the table compares them. The last row wraps
the oracle in classifier-free guidance with a negative prompt, whose exact target is
N(w μ_c + (1 − w) μ_u, s²). Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import oracle
from imagen_jax.diffusion.guidance import classifier_free_guidance
from imagen_jax.diffusion.samplers import sample
from imagen_jax.diffusion.schedules import get_schedule

BATCH = 16384
MEAN = jnp.array([0.5, -0.3])
STD = jnp.array([0.3, 0.6])
NEGATIVE_MEAN = jnp.array([0.0, 0.2])
GUIDANCE = 3.0
MEAN_TOL, STD_RTOL = 0.05, 0.05


def _runs(schedule):
  """(label, sampler, steps, pred_type, eta, model_fn, target mean)."""
  exact = lambda pred_type: oracle.oracle_model_fn(MEAN, STD, schedule, pred_type)
  cond = {"mean": jnp.broadcast_to(MEAN, (BATCH, 2))}
  negative = {"mean": jnp.broadcast_to(NEGATIVE_MEAN, (BATCH, 2))}
  guided = classifier_free_guidance(
    oracle.oracle_cond_model_fn(STD, schedule, "eps"), cond, negative, GUIDANCE
  )
  return [
    ("ancestral", "ancestral", 400, "eps", 0.0, exact("eps"), MEAN),
    ("ddim eta=0", "ddim", 100, "v", 0.0, exact("v"), MEAN),
    ("ddim eta=1", "ddim", 400, "x0", 1.0, exact("x0"), MEAN),
    ("dpmpp_2m", "dpmpp_2m", 25, "v", 0.0, exact("v"), MEAN),
    (f"dpmpp_2m+cfg w={GUIDANCE:g}", "dpmpp_2m", 25, "eps", 0.0, guided,
     GUIDANCE * MEAN + (1 - GUIDANCE) * NEGATIVE_MEAN),
  ]  # fmt: skip


def _fmt(v) -> str:
  return "(" + ", ".join(f"{float(x):+.3f}" for x in v) + ")"


def main() -> int:
  schedule = get_schedule("cosine")
  x_T = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 2))
  rng = jax.random.PRNGKey(1)
  print(f"data: x0 ~ N(mean={_fmt(MEAN)}, std={_fmt(STD)}), {BATCH} samples, cosine schedule")
  header = (
    f"{'sampler':<20} {'steps':>5} {'pred':>4}  {'mean target':>16} {'mean sampled':>16}  "
    f"{'std target':>16} {'std sampled':>16}  {'compile+run':>11} {'run':>7}  ok"
  )
  print(header)
  print("-" * len(header))
  failures = []
  for label, sampler, steps, pred_type, eta, model_fn, target in _runs(schedule):
    fn = jax.jit(
      lambda x, r, m=model_fn, s=sampler, n=steps, p=pred_type, e=eta: sample(
        m, x, r, sampler=s, steps=n, schedule=schedule, pred_type=p, thresholding="none", eta=e
      )
    )
    start = time.perf_counter()
    jax.block_until_ready(fn(x_T, rng))
    first = time.perf_counter() - start
    start = time.perf_counter()
    x = jax.block_until_ready(fn(x_T, rng))
    run = time.perf_counter() - start
    mean, std = np.asarray(x.mean(axis=0)), np.asarray(x.std(axis=0))
    ok = np.all(np.abs(mean - target) <= MEAN_TOL) and np.all(np.abs(std / STD - 1) <= STD_RTOL)
    failures += [] if ok else [label]
    print(
      f"{label:<20} {steps:>5} {pred_type:>4}  {_fmt(target):>16} {_fmt(mean):>16}  "
      f"{_fmt(STD):>16} {_fmt(std):>16}  {first:>10.2f}s {run:>6.3f}s  {'yes' if ok else 'NO'}"
    )
  tol = f"|mean error| <= {MEAN_TOL}, |std/target - 1| <= {STD_RTOL}"
  if failures:
    print(f"FAIL: {', '.join(failures)} outside tolerance ({tol})")
    return 1
  print(f"OK: all {len(_runs(schedule))} sampler runs match the target distribution ({tol})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
