"""The learning proof on `shapes`: train a recipe, time it, and report the alignment it reaches.

  python bench/shapes_learning.py                 # the default demo (configs/shapes.py)
  python bench/shapes_learning.py --arg=long      # the longer recipe (configs/shapes.py:long)

Trains the stages one after another, prints wall time per stage and the final EMA alignment
metrics (pixel evaluator, the config's eval prompts; SR stages are scored on real low-res renders
of those prompts, and the "cascade" row scores the final stage on the base's own samples, as
sample.py runs it) with their chance levels, and appends them with the machine description to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record

KEYS = (
  "alignment",
  "single_object_alignment",
  "single_object_acc",
  "color_acc",
  "shape_acc",
  "position_acc",
  "size_acc",
  "two_object_alignment",
  "two_object_acc",
  "relation_acc",
  "count_acc",
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--arg", default="", help="configs/shapes.py argument ('' or 'long')")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  from imagen_jax import config as config_lib
  from imagen_jax.train import train_and_evaluate

  config = config_lib.load_config(f"shapes:{args.arg}" if args.arg else "shapes")
  workdir = args.workdir or tempfile.mkdtemp(prefix="shapes_bench_")
  out, stage_wall = {}, {}
  t0 = time.time()
  for name in config_lib.selected_stages(config):  # one stage at a time, to time each
    config.train_stages = name
    t = time.time()
    out.update(train_and_evaluate(config, workdir))
    stage_wall[name] = time.time() - t
  wall = time.time() - t0
  print(f"\nconfigs/shapes.py:{args.arg}  wall {wall / 60:.1f} min  workdir {workdir}")
  result = {"bench": "shapes_learning", "config": f"shapes:{args.arg}", "wall_s": round(wall, 1)}
  chance = {}
  rows = dict(out)
  last = list(out)[-1]
  if out[last].get("cascade_evals"):  # the final stage on the base's own samples
    rows["cascade"] = {"step": out[last]["step"], "evals": out[last]["cascade_evals"]}
    stage_wall["cascade"] = 0.0  # included in the final stage's wall time
  for name, s in rows.items():
    ev = s["evals"]
    chance = chance or {k: ev.get("eval/chance_" + k) for k in KEYS if "eval/chance_" + k in ev}
    print(
      f"\n{name}: {s['step']} steps, {stage_wall[name] / 60:.1f} min, grid {ev.get('grid', '')}"
    )
    for k in KEYS:
      c = ev.get("eval/chance_" + k)
      print(
        f"  {k:<24s} {ev.get('eval/' + k, float('nan')):6.3f}"
        + (f"  (chance {c:.3f})" if c else "")
      )
    result[name] = {
      "steps": s["step"],
      "wall_s": round(stage_wall[name], 1),
      "num_prompts": ev.get("eval/num_prompts"),
      **{k: round(ev.get("eval/" + k, float("nan")), 4) for k in KEYS},
    }
  result["chance"] = {k: round(v, 4) for k, v in chance.items()}
  record(result)


if __name__ == "__main__":
  main()
