"""The learning proof on `shapes`: train a recipe, time it, and report the alignment it reaches.

  python bench/shapes_learning.py                 # the default demo (configs/shapes.py)
  python bench/shapes_learning.py --arg=long      # the longer recipe (configs/shapes.py:long)

Prints wall time per stage and the final EMA alignment metrics (pixel evaluator, 64 prompts), and
appends them with the machine description to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--arg", default="", help="configs/shapes.py argument ('' or 'long')")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  from imagen_jax.train import train_and_evaluate
  from tests.train_utils import load_config

  config = load_config("shapes", args.arg or None)
  workdir = args.workdir or tempfile.mkdtemp(prefix="shapes_bench_")
  t0 = time.time()
  out = train_and_evaluate(config, workdir)
  wall = time.time() - t0
  keys = ("alignment", "single_object_acc", "color_acc", "shape_acc", "position_acc", "size_acc")
  print(f"\nconfigs/shapes.py:{args.arg}  wall {wall / 60:.1f} min  workdir {workdir}")
  print(f"{'stage':6s} {'steps':>6s} " + " ".join(f"{k:>17s}" for k in keys))
  result = {"bench": "shapes_learning", "config": f"shapes:{args.arg}", "wall_s": round(wall, 1)}
  for name, s in out.items():
    ev = s["evals"]
    print(
      f"{name:6s} {s['step']:6d} "
      + " ".join(f"{ev.get('eval/' + k, float('nan')):17.3f}" for k in keys)
    )
    result[name] = {
      "steps": s["step"],
      **{k: round(ev.get("eval/" + k, float("nan")), 4) for k in keys},
    }
  record(result)


if __name__ == "__main__":
  main()
