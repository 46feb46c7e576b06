"""Prompt-to-prompt on a trained shapes cascade: edit quality (pixel evaluator) and cost.

  python bench/p2p_edits.py --workdir=runs/shapes_long [--num=32] [--steps=25] [--sampler=ddim]

Quality (meaningful on a model that draws the prompts, e.g. ``configs/shapes.py:long``): for
``--num`` random single-object prompts, swap the colour word and compare, over the final stage,

* the prompt-to-prompt edit (``cross_replace=0.8, self_replace=0.4``), and
* plain resampling of the edited prompt from the same seed (no injection),

on "the colour changed to the new one" and "shape, size and position kept" (the shapes
evaluator's ``analyze_image`` on the source and the edit). Reweighting: the mean detected radius
of "a large …" prompts with the weight of "large" at 0.25 / 1 / 4 (monotone is the aim).

Cost: steady-state seconds of one edit (1 source + 1 target) vs plain sampling of the same 2
prompts, same steps and settings, side by side in one process. Appends to bench/results.jsonl;
the quality run writes ``docs/p2p_colour_swaps.png`` (rows: source | prompt-to-prompt edit |
plain resampling of the edited prompt) and ``docs/p2p_reweight.png`` (rows: "large" at
weight 0.25 | 1 | 4, then "small" likewise).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from bench.common import machine_info, record
from imagen_jax import metrics
from imagen_jax.data import shapes as ds
from imagen_jax.edit import prompt_to_prompt
from imagen_jax.evaluators.shapes import analyze_image
from imagen_jax.sample.cascade import Cascade


def _timed(fn, repeats=3):
  fn()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _largest(image):
  objs = analyze_image(image)
  return objs[0] if objs else None


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=32)
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--cost_only", action="store_true", help="skip the quality measurement")
  args = p.parse_args()
  cascade = Cascade.from_workdir(args.workdir, max_batch=4)
  settings = {s.name: {"sampler": args.sampler, "steps": args.steps} for s in cascade.stages}
  final = cascade.stages[-1].name
  src, tgt = "a small red circle at the top left", "a small blue circle at the top left"

  plain_s = _timed(lambda: cascade([src, tgt], seed=0, settings=settings, progress=False))
  edit_s = _timed(
    lambda: prompt_to_prompt(cascade, src, tgt, seed=0, settings=settings, progress=False)
  )
  result = {
    "bench": "p2p_edits",
    "workdir": os.path.abspath(args.workdir),
    "sampler": args.sampler,
    "steps": args.steps,
    "plain_2_prompts_s": plain_s,
    "edit_1_plus_1_s": edit_s,
    "edit_over_plain": edit_s / plain_s,
    **machine_info(),
  }
  print(f"plain sampling of 2 prompts: {plain_s:.2f} s; edit 1+1: {edit_s:.2f} s "
        f"(x{edit_s / plain_s:.2f})")  # fmt: skip

  if not args.cost_only:
    rng = np.random.default_rng(0)
    colours = list(ds.COLORS)
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    swaps, reweights = [], {}
    kept = {"p2p": [], "plain": []}
    recoloured = {"p2p": [], "plain": []}
    for i in range(args.num):
      colour, new = rng.choice(colours, 2, replace=False)
      shape, size, pos = rng.choice(ds.SHAPES), rng.choice(ds.SIZES), rng.choice(ds.POSITIONS)
      source = f"a {size} {colour} {shape} {ds.POSITION_PHRASES[pos]}"
      target = source.replace(f" {colour} ", f" {new} ")
      edit = prompt_to_prompt(cascade, source, target, seed=i, settings=settings, progress=False)
      plain = cascade([target], seed=i, settings=settings, progress=False)[final][0]
      base = _largest(edit.images[final][0])
      if i < 8:
        swaps += [edit.images[final][0], edit.images[final][1], plain]
      for name, image in (("p2p", edit.images[final][1]), ("plain", plain)):
        obj = _largest(image)
        recoloured[name].append(obj is not None and obj.color == new)
        kept[name].append(
          obj is not None
          and base is not None
          and (obj.shape, obj.size, obj.position) == (base.shape, base.size, base.position)
        )
    sizes = {"large": {}, "small": {}}
    for word in ("large", "small"):
      for w in (0.25, 1.0, 4.0):
        radii = []
        for i in range(min(args.num, 8)):
          prompt = f"a {word} {colours[i % len(colours)]} circle in the center"
          r = prompt_to_prompt(cascade, prompt, prompt, seed=i, settings=settings, progress=False,
                               mode="reweight", reweight={word: w})  # fmt: skip
          obj = _largest(r.images[final][1])
          if i < 4:
            reweights.setdefault((word, i), []).append(r.images[final][1])
          radii.append(obj.radius if obj is not None else np.nan)
        found = [r for r in radii if np.isfinite(r)]
        sizes[word][w] = float(np.mean(found)) if found else float("nan")
    for name in ("p2p", "plain"):
      result[f"{name}_recolour_rate"] = float(np.mean(recoloured[name]))
      result[f"{name}_kept_rate"] = float(np.mean(kept[name]))
    for word, by_w in sizes.items():
      result[f"reweight_{word}_radius"] = {str(k): v for k, v in by_w.items()}
    grid = metrics.image_grid(np.stack(swaps), ncols=3)
    Image.fromarray(grid).save(os.path.join(docs, "p2p_colour_swaps.png"))
    rows = [im for i in sorted(reweights) for im in reweights[i]]
    Image.fromarray(metrics.image_grid(np.stack(rows), ncols=3)).save(
      os.path.join(docs, "p2p_reweight.png")
    )
    print({k: v for k, v in result.items() if "rate" in k or "radius" in k})
  record(result)


if __name__ == "__main__":
  main()
