"""Sampling speed of a trained cascade: compile time and steady-state time per image, per stage.

  python bench/sample.py --workdir=runs/shapes [--num_images=8] [--steps=25] [--sampler=dpmpp_2m]

Runs the cascade twice with the same settings (the first call compiles, the second is steady state)
and times each stage separately, CFG on. Appends the numbers to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/shapes")
  parser.add_argument("--num_images", type=int, default=8)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--sampler", default="dpmpp_2m")
  parser.add_argument("--guidance", type=float, default=5.0)
  args = parser.parse_args()
  from imagen_jax.evaluators.shapes import default_prompts
  from imagen_jax.sample.cascade import Cascade

  settings = {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance}
  probe = Cascade.from_workdir(args.workdir)
  names = [s.name for s in probe.stages]
  cascade = Cascade.from_workdir(args.workdir, settings={n: settings for n in names})
  prompts = default_prompts(args.num_images, seed=3)
  rows, low = [], None
  for stage in cascade.stages:
    # Each stage alone (an SR stage gets the previous stage's output as its low-res input).
    single = Cascade([stage], cascade.text, max_batch=len(prompts))
    kwargs = {} if stage.lowres_size is None else {"init_image": low}
    times = []
    for _ in range(2):  # the first call compiles, the second is steady state
      t0 = time.time()
      out = single(prompts, seed=0, progress=False, **kwargs)
      times.append(time.time() - t0)
    low = out[stage.name]
    rows.append((stage.name, times[0] - times[1], times[1] / len(prompts)))
  print(
    f"{'stage':8s} {'compile_s':>10s} {'s/image':>10s}   "
    f"({args.sampler}, {args.steps} steps, CFG w={args.guidance})"
  )
  for name, compile_s, per_image in rows:
    print(f"{name:8s} {compile_s:10.2f} {per_image:10.4f}")
  total = sum(r[2] for r in rows)
  print(f"{'total':8s} {'':10s} {total:10.4f}")
  record(
    {
      "bench": "sample",
      "workdir": os.path.abspath(args.workdir),
      "settings": settings,
      "num_images": len(prompts),
      "stages": {n: {"compile_s": round(c, 2), "s_per_image": round(p, 5)} for n, c, p in rows},
      "total_s_per_image": round(total, 5),
    }
  )


if __name__ == "__main__":
  main()
