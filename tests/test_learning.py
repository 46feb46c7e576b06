"""The trainer provably learns: a short run on a trivial subset of `shapes` beats chance.

The full learning number (the demo and the longer recipe on the whole dataset) lives in
`bench/shapes_learning.py`; this is its small CI form: four scenes, memorised by the real
`train_and_evaluate`, then sampled from their captions and scored by the pixel evaluator.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagen_jax.data.shapes import ShapesSource
from imagen_jax.train import train_and_evaluate
from tests.train_utils import tiny_base_config

STEPS = 300


@pytest.mark.slow
def test_short_run_on_a_trivial_subset_learns(tmp_path):
  config = tiny_base_config(steps=STEPS)
  config.data.update(shapes_length=4, shapes_two_object_prob=0.0, shuffle=True)
  src = ShapesSource(seed=config.seed, image_size=32, length=4, two_object_prob=0.0)
  prompts = [src[i]["caption"] for i in range(4)]
  config.evals.update(evaluators=("shapes", "grid"), prompts=tuple(prompts * 2))
  s = config.stages.base
  s.update(batch_size=8, log_every=10, ckpt_every=STEPS, final_eval=True, ema_decay=0.99)
  s.optimizer.update(lr=3e-3, warmup_steps=20)
  s.sample.update(steps=20, guidance=3.0)

  out = train_and_evaluate(config, str(tmp_path))

  records = [json.loads(line) for line in open(tmp_path / "base" / "metrics.jsonl")]
  losses = [r["loss"] for r in records if "loss" in r]
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2]), losses
  ev = out["base"]["evals"]
  assert ev["eval/color_acc"] >= 0.5 > ev["eval/chance_color_acc"], ev
  assert ev["eval/alignment"] > ev["eval/chance_alignment"] + 0.2, ev
