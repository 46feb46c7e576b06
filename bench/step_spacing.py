"""Step spacing × sampler on exact-ε oracles: the fewest steps that reproduce the data's spread.

  python bench/step_spacing.py            # the table in bench/RESULTS.md ("Step spacing")
  python bench/step_spacing.py --quick    # DPM-Solver++(2M) only, to check the script (not
                                          # recorded)

The model is the exact denoiser (``oracle.mixture_pred``) of two data sets over 32 "pixels":

* ``gaussian``: x0 ~ N(μ, diag(s²)), μ ∈ [−0.5, 0.5], s ∈ [0.75, 0.25] (tests/diffusion's data);
* ``mixture``: 0.7 N(−0.4, 0.3² I) + 0.3 N(0.5, 0.05² I), a narrow mode: its spread is resolved
  only at λ ≳ 6, where few-step samplers under-disperse (x̂0 = E[x0 | x_t] shrinks a mode of std s
  by s / √(s² + σ²/α²) when the last evaluation is at noise σ/α).

For every schedule (cosine log-SNR in [−20, 20] as in the configs; DeepFloyd IF's discrete
squaredcos_cap_v2), sampler and spacing it walks a ladder of step counts and reports the first N
that passes *and* whose next ladder N passes too (:func:`first_stable_pass`), where "passes" is,
on ``B`` samples from fixed noise (sampling noise in brackets, B = 8192):

* gaussian: pixel-averaged std(z) within 3% of 1 and |mean(z)| ≤ 0.1, z = (x − μ) / s (0.002);
* mixture (modes split at pixel mean 0.05): each mode's pixel-averaged std within 3% of its s,
  each mode's |mean − μ_k| / s_k ≤ 0.1, and the narrow mode's weight within 0.02 of 0.3 (0.005).

One compiled program per (schedule, sampler, spacing, N) serves both data sets (the Gaussian is
a two-component "mixture" of identical components): 170 compiles of ~1.7 s dominate the run,
7.5 min of CPU (12 min wall on 2 shared cores at load 5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record
from imagen_jax.diffusion import oracle
from imagen_jax.diffusion.discrete import DiscreteSchedule
from imagen_jax.diffusion.samplers import sample
from imagen_jax.diffusion.schedules import get_schedule
from imagen_jax.diffusion.spacing import SPACINGS

PIXELS = 32
LADDER = (5, 7, 10, 15, 20, 25, 35, 50, 70, 100, 140, 200)
SPARSE = (10, 25, 50, 100, 200)  # walked first (see first_stable_pass)
REPORT_AT = (10, 25)
SCHEDULES = {"cosine": get_schedule("cosine"), "if_discrete": DiscreteSchedule()}
SAMPLER_NAMES = ("ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "ancestral")
# The ancestral sampler is a reference (first order: hundreds of steps on any grid), run with the
# default spacing only.
REFERENCE_ONLY = {"ancestral": ("uniform",)}
# A mean within a tenth of the mode's std: 0.005 for the narrow mode, under one 8-bit level (2/255).
STD_TOL, MEAN_TOL, WEIGHT_TOL = 0.03, 0.1, 0.02

# Data sets as (weights [2], means [2, P], stds [2, P]).
G_MEAN = np.linspace(-0.5, 0.5, PIXELS, dtype=np.float32)
G_STD = np.linspace(0.75, 0.25, PIXELS, dtype=np.float32)
MIX_W = np.asarray([0.7, 0.3], np.float32)
MIX_MU = np.asarray([-0.4, 0.5], np.float32)
MIX_S = np.asarray([0.3, 0.05], np.float32)
DATA = {
  "gaussian": (
    np.asarray([0.5, 0.5], np.float32),
    np.stack([G_MEAN, G_MEAN]),
    np.stack([G_STD, G_STD]),
  ),
  "mixture": (MIX_W, np.repeat(MIX_MU[:, None], PIXELS, 1), np.repeat(MIX_S[:, None], PIXELS, 1)),
}


def _sampler_fn(schedule, sampler, spacing, steps):
  """A jitted ``run(weights, means, stds, x_T, rng) -> x0`` for one configuration."""

  def go(weights, means, stds, x_T, rng):
    model = lambda x, t: oracle.mixture_pred(x, schedule(t), weights, means, stds, "eps")
    return sample(
      model,
      x_T,
      rng,
      sampler=sampler,
      steps=steps,
      schedule=schedule,
      pred_type="eps",
      thresholding="none",
      spacing=spacing,
    )

  return jax.jit(go)


def metrics(name: str, x: np.ndarray) -> dict:
  """The pass/fail numbers of one sample set ``x`` [B, P] (module docstring)."""
  if name == "gaussian":
    z = (x - G_MEAN) / G_STD
    std, mean = float(z.std(0).mean()), float(z.mean(0).mean())
    ok = abs(std - 1) <= STD_TOL and abs(mean) <= MEAN_TOL
    return {"std": round(std, 4), "mean_z": round(mean, 4), "ok": ok}
  narrow = x.mean(1) > 0.05  # [B]
  out, ok = {"weight": round(float(narrow.mean()), 4)}, abs(narrow.mean() - MIX_W[1]) <= WEIGHT_TOL
  for k, rows in ((0, ~narrow), (1, narrow)):
    if rows.sum() < 2:
      return {**out, "ok": False}
    std = float(x[rows].std(0).mean() / MIX_S[k])
    mean = float((x[rows].mean(0).mean() - MIX_MU[k]) / MIX_S[k])
    out[f"std{k}"], out[f"mean_z{k}"] = round(std, 4), round(mean, 4)
    ok = ok and abs(std - 1) <= STD_TOL and abs(mean) <= MEAN_TOL
  return {**out, "ok": bool(ok)}


def first_stable_pass(passes, ladder=LADDER, sparse=SPARSE) -> int | None:
  """The first N of ``ladder`` with ``passes(N)`` and ``passes(next N)`` (the last N needs no
  next), found by first walking ``sparse`` (a subset) and then the ladder points below the first
  stable sparse pass: fewer compiles, assuming that passing is monotone between sparse points."""
  for j, s in enumerate(sparse):
    if passes(s) and (j + 1 == len(sparse) or passes(sparse[j + 1])):
      low = sparse[j - 1] if j else 0
      for n in (n for n in ladder if low < n <= s):
        k = ladder.index(n)
        if passes(n) and (k + 1 == len(ladder) or passes(ladder[k + 1])):
          return n
  return None


def fewest_steps(schedule, sampler, spacing, x_T, rng) -> dict:
  """The fewest steps for each data set, and the metrics at ``REPORT_AT`` steps."""
  cache = {}

  def evaluate(steps):
    if steps not in cache:
      fn = _sampler_fn(schedule, sampler, spacing, steps)
      cache[steps] = {name: metrics(name, np.asarray(fn(*d, x_T, rng))) for name, d in DATA.items()}
    return cache[steps]

  for steps in REPORT_AT:
    evaluate(steps)
  fewest = {name: first_stable_pass(lambda n, name=name: evaluate(n)[name]["ok"]) for name in DATA}
  at = {f"{name}@{n}": evaluate(n)[name] for n in REPORT_AT for name in DATA}
  # Every evaluated N: (gaussian std, mixture wide std, narrow std, narrow weight, passes).
  trace = {
    n: [
      m["gaussian"]["std"],
      m["mixture"].get("std0"),
      m["mixture"].get("std1"),
      m["mixture"]["weight"],
      [m["gaussian"]["ok"], m["mixture"]["ok"]],
    ]
    for n, m in sorted(cache.items())
  }
  return {"fewest": fewest, "at": at, "trace": trace}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--quick", action="store_true", help="DPM-Solver++(2M) only")
  parser.add_argument("--no_record", action="store_true", help="do not append to results.jsonl")
  args = parser.parse_args()
  x_T = jax.random.normal(jax.random.key(0), (args.batch, PIXELS))
  rng = jax.random.key(1)
  samplers = ("dpmpp_2m",) if args.quick else SAMPLER_NAMES
  rows, t0 = [], time.time()
  for sched_name, schedule in SCHEDULES.items():
    for sampler in samplers:
      for spacing in REFERENCE_ONLY.get(sampler, SPACINGS):
        t = time.time()
        res = fewest_steps(schedule, sampler, spacing, x_T, rng)
        row = {"schedule": sched_name, "sampler": sampler, "spacing": spacing, **res}
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        f = res["fewest"]
        print(
          f"{sched_name:12s} {sampler:13s} {spacing:8s} gaussian {f['gaussian']!s:>5}"
          f"  mixture {f['mixture']!s:>5}  ({row['seconds']} s)",
          flush=True,
        )
  wall = time.time() - t0
  print(f"\nwall {wall:.0f} s\n")
  print(markdown(rows))
  if args.quick or args.no_record:  # --quick is a check of the script, not a result
    return
  record(
    {
      "bench": "step_spacing",
      "batch": args.batch,
      "ladder": list(LADDER),
      "criteria": {"std_rel": STD_TOL, "mean_z": MEAN_TOL, "weight_abs": WEIGHT_TOL},
      "wall_s": round(wall, 1),
      "rows": rows,
    }
  )


def _cell(n) -> str:
  return f">{LADDER[-1]}" if n is None else str(n)


def markdown(rows: list[dict]) -> str:
  """The fewest-steps table, then the mixture's narrow mode at 10 and 25 steps."""
  lines = [
    "| sampler | spacing | cosine: gaussian | cosine: mixture | IF: gaussian | IF: mixture |",
    "|---|---|---|---|---|---|",
  ]
  by = {(r["schedule"], r["sampler"], r["spacing"]): r for r in rows}
  keys = [(r["sampler"], r["spacing"]) for r in rows if r["schedule"] == "cosine"]
  for sampler, spacing in keys:
    cells = []
    for sched in SCHEDULES:
      f = by[(sched, sampler, spacing)]["fewest"]
      cells += [_cell(f["gaussian"]), _cell(f["mixture"])]
    lines.append(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "| sampler | spacing | cosine 10: narrow std / weight | cosine 25 | IF 10 | IF 25 |",
    "|---|---|---|---|---|---|",
  ]
  for sampler, spacing in keys:
    cells = []
    for sched in SCHEDULES:
      for n in (10, 25):
        m = by[(sched, sampler, spacing)]["at"].get(f"mixture@{n}", {})
        cells.append(f"{m.get('std1', float('nan')):.3f} / {m.get('weight', float('nan')):.3f}")
    lines.append(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
