"""Sampling speed of a cascade: compile time and steady-state time per image, per stage and in all.

  python bench/sample.py --workdir=runs/shapes [--num_images=8] [--steps=25] [--sampler=dpmpp_2m]
  python bench/sample.py --configs=configs/base64.py,configs/sr256.py,configs/sr1024.py \\
      --num_images=4 --steps=25 --sampler=dpmpp_2m --guidance=5      # paper cascade, GPU

Two sources of models:

* ``--workdir``: a trained run (``Cascade.from_workdir``, EMA weights, its own text encoder);
* ``--configs``: untrained U-Nets built from config files (random weights: speed does not depend
  on the values), chained in the order given (64² → 256² → 1024² for the paper presets, each in
  the config's compute dtype, bf16 for the paper presets; ``--dtype`` overrides). The text
  embeddings are random ``[N, text.max_length, d_model]`` of the config's T5 (T5-XXL: 128 × 4096),
  so T5 encoding is not included there (``python -m imagen_jax.tools.flops`` gives its cost).

Every stage is sampled through the library's ``Cascade`` with classifier-free guidance (one
doubled batch per step) at the same settings. Each stage runs twice with the same inputs: the
first call compiles, the second is steady state; "compile" is first minus second (compile plus
one-time transfers). An SR stage gets the previous stage's output as its low-res input. The
end-to-end time per image is the sum over stages. Appends the numbers to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record


class RandomText:
  """A stand-in text conditioner: random (deterministic) embeddings of a T5's width and length."""

  def __init__(self, d_model: int, length: int):
    self.d_model, self.length = int(d_model), int(length)

  def encode_prompts(self, prompts):
    import jax
    import jax.numpy as jnp

    n = len(prompts)
    emb = jax.random.normal(jax.random.key(0), (n, self.length, self.d_model), jnp.float32)
    mask = jnp.broadcast_to(jnp.arange(self.length) < self.length // 2, (n, self.length))
    return emb, mask


def stages_from_configs(specs: list[str], dtype: str, settings: dict):
  """CascadeStages with random weights from config files (one stage each, chained in order)."""
  import jax

  from imagen_jax.config import load_config
  from imagen_jax.sample.cascade import CascadeStage
  from imagen_jax.stage.model import StageModel
  from imagen_jax.tools.flops import text_encoder_config

  stages, text = [], None
  for spec in specs:
    config = load_config(spec)
    t5 = text_encoder_config(config.text.encoder)
    d_model = t5.d_model if t5 else 4096
    if text is None:
      text = RandomText(d_model, config.text.max_length)
    elif d_model != text.d_model:
      raise ValueError(f"{spec}: text width {d_model} differs from the first config's")
    for name in config.stage_order:
      stage = config.stages[name]
      if dtype:
        stage.compute_dtype = dtype
      model = StageModel.create(stage, text_dim=d_model, seed=0)
      params = jax.jit(model.init_params)()
      stages.append(
        CascadeStage.from_stage_config(stage, model, params, settings=settings, name=name)
      )
  return stages, text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/shapes", help="a trained run (default source)")
  parser.add_argument("--configs", default="", help="comma list of config files: random weights")
  parser.add_argument("--dtype", default="", help="--configs only: compute dtype override")
  parser.add_argument("--num_images", type=int, default=8)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--sampler", default="dpmpp_2m")
  parser.add_argument("--guidance", type=float, default=5.0)
  parser.add_argument("--no_record", action="store_true")
  args = parser.parse_args()
  import jax

  from imagen_jax.data.shapes import default_prompts
  from imagen_jax.sample.cascade import Cascade

  settings = {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance}
  if args.configs:
    stages, text = stages_from_configs(args.configs.split(","), args.dtype, settings)
    cascade = Cascade(stages, text, max_batch=args.num_images)
    source = {"configs": args.configs, "dtype": args.dtype or "config", "weights": "random"}
  else:
    probe = Cascade.from_workdir(args.workdir)
    names = [s.name for s in probe.stages]
    cascade = Cascade.from_workdir(args.workdir, settings={n: settings for n in names})
    source = {"workdir": os.path.abspath(args.workdir), "weights": "trained (EMA)"}
  prompts = default_prompts(args.num_images, seed=3)
  rows, low = [], None
  for stage in cascade.stages:
    # Each stage alone (an SR stage gets the previous stage's output as its low-res input).
    single = Cascade([stage], cascade.text, max_batch=len(prompts))
    kwargs = {} if stage.lowres_size is None else {"init_image": low}
    times = []
    for _ in range(2):  # the first call compiles, the second is steady state
      t0 = time.perf_counter()
      out = single(prompts, seed=0, progress=False, **kwargs)
      times.append(time.perf_counter() - t0)
    low = out[stage.name]
    rows.append((stage.name, stage.image_size, times[0] - times[1], times[1] / len(prompts)))
  dev = jax.devices()[0]
  print(
    f"{args.num_images} images, {args.sampler}, {args.steps} steps/stage, CFG w={args.guidance}, "
    f"on {jax.device_count()}x {dev.device_kind}"
  )
  print(f"{'stage':8s} {'size':>6s} {'compile_s':>10s} {'s/image':>10s}")
  for name, size, compile_s, per_image in rows:
    print(f"{name:8s} {size:>5d}² {compile_s:10.2f} {per_image:10.4f}")
  total = sum(r[3] for r in rows)
  print(f"{'total':8s} {'':6s} {sum(r[2] for r in rows):10.2f} {total:10.4f}   (end to end)")
  if not args.no_record:
    record(
      {
        "bench": "sample",
        **source,
        "settings": settings,
        "num_images": len(prompts),
        "stages": {
          n: {"size": s, "compile_s": round(c, 2), "s_per_image": round(p, 5)}
          for n, s, c, p in rows
        },
        "total_s_per_image": round(total, 5),
      }
    )


if __name__ == "__main__":
  main()
