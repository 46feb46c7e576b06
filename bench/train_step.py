"""Steady-state training-step speed of one cascade stage: time, images/s, compile, memory, MFU.

  python bench/train_step.py --config configs/base64.py:tiny --stage base --batch 8 --steps 10
  python bench/train_step.py --config configs/base64.py --batch 64 --steps 20          # GPU, bf16
  python bench/train_step.py --config configs/sr256.py --batch 32 --remat block --peak_tflops 989

The step is the library's own (``StageModel`` + ``make_optimizer`` + ``init_state`` +
``make_train_step``, jitted with the state donated, exactly as ``imagen_jax.train.trainer`` runs
it) on a synthetic batch of the stage's shapes: images (crops for the 1024 stage), text embeddings
of the config's text length and width, and low-res images for SR stages. No data pipeline or text
encoder runs, so this measures the device step alone.

Compile time is measured separately (``lower().compile()``); ``--warmup`` steps after it are
excluded; each timed step is synchronised (``block_until_ready``) and the median is reported.
MFU = analytic model FLOPs (``imagen_jax.tools.flops.train_step_flops``: 3 × forward, no remat
recompute) / median step time / peak FLOP/s of all devices. The peak comes from ``--peak_tflops``
(per device) or the table in ``imagen_jax.tools.flops.PEAK_TFLOPS`` (H100/H200 bf16 dense: 989);
on CPU MFU is "n/a" unless ``--peak_tflops`` is given. Peak memory is the device allocator's
``peak_bytes_in_use`` where it reports one (GPU/TPU), else the process max RSS (CPU).
Appends one JSON line to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/base64.py:tiny", help="path/to/config.py[:arg]")
  parser.add_argument("--stage", default="", help="stage name (default: the first in stage_order)")
  parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--dtype", default="", help="compute dtype override: float32 | bfloat16")
  parser.add_argument("--remat", default="", help="UNetConfig.remat override (none, block, ...)")
  parser.add_argument(
    "--attention_impl", default="", help="auto | xla | jax_xla | cudnn (imagen_jax.kernels)"
  )
  parser.add_argument(
    "--scan_blocks", choices=("on", "off"), default="", help="UNetConfig.scan_blocks override"
  )
  parser.add_argument("--grad_accum", type=int, default=0, help="override stage.grad_accum")
  parser.add_argument("--text_length", type=int, default=0, help="default: config.text.max_length")
  parser.add_argument("--text_dim", type=int, default=0, help="default: the config's T5 width")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s per device")
  parser.add_argument("--no_record", action="store_true", help="don't append to results.jsonl")
  return parser.parse_args(argv)


def peak_memory_bytes() -> tuple[int, str]:
  """(bytes, source): the device allocator's peak where reported, else the process max RSS."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def synthetic_batch(stage, batch: int, text_length: int, text_dim: int, seed: int = 0) -> dict:
  """A device batch with the shapes and dtypes the trainer feeds ``train_step``."""
  import jax
  import jax.numpy as jnp

  size = int(stage.crop_size or stage.image_size)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  # Half of the tokens valid: masks matter for the cost only through their shape.
  mask = jnp.arange(text_length)[None, :] < max(text_length // 2, 1)
  out = {
    "image": jax.random.uniform(k1, (batch, size, size, 3), minval=-1.0, maxval=1.0),
    "text_emb": jax.random.normal(k2, (batch, text_length, text_dim), jnp.float32),
    "text_mask": jnp.broadcast_to(mask, (batch, text_length)),
  }
  if stage.lowres_size is not None:
    low = int(stage.lowres_size) * size // int(stage.image_size)
    out["lowres"] = jax.random.uniform(k3, (batch, low, low, 3), minval=-1.0, maxval=1.0)
  return out


def build_train_step(stage, batch_size: int, text_length: int, text_dim: int, seed: int = 0):
  """The trainer's construction of a stage's jitted, donated step, compiled for a synthetic batch.

  Returns:
    ``(model, compiled_step, state, batch, compile_seconds)``.
  """
  import jax

  from imagen_jax.stage import model as model_lib
  from imagen_jax.stage import optim
  from imagen_jax.stage import step as step_lib

  # As imagen_jax/train/trainer.py train_stage §1, step for step.
  model = model_lib.StageModel.create(stage, text_dim=text_dim, seed=seed)
  schedule = model_lib.stage_schedule(stage)
  tx, lr_schedule = optim.make_optimizer(stage.optimizer, stage.total_steps)
  rng = jax.random.key(seed)
  state = jax.jit(lambda: step_lib.init_state(model.init_params(), tx, rng))()
  step_fn = jax.jit(
    step_lib.make_train_step(model.apply, tx, lr_schedule, stage, schedule), donate_argnums=0
  )
  batch = synthetic_batch(stage, batch_size, text_length, text_dim, seed)
  jax.block_until_ready((state, batch))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return model, compiled, state, batch, time.perf_counter() - t0


def run_steps(compiled, state, batch, steps: int) -> tuple[dict, list[float]]:
  """Runs ``steps`` steps, each synchronised on its loss; returns the state and the step times."""
  import jax

  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return state, times


def main(argv=None) -> dict:
  args = parse_args(argv)
  import flax
  import jax

  from imagen_jax.config import load_config
  from imagen_jax.tools import flops

  config = load_config(args.config)
  name = args.stage or config.stage_order[0]
  stage = config.stages[name]
  stage.batch_size = args.batch
  if args.dtype:
    stage.compute_dtype = args.dtype
  if args.remat:
    stage.model.remat = args.remat
  if args.attention_impl:
    stage.model.attention_impl = args.attention_impl
  if args.scan_blocks:
    stage.model.scan_blocks = args.scan_blocks == "on"
  if args.grad_accum:
    stage.grad_accum = args.grad_accum
  t5 = flops.text_encoder_config(config.text.encoder)
  text_dim = args.text_dim or (t5.d_model if t5 else 4096)
  text_length = args.text_length or int(config.text.max_length)

  model, compiled, state, batch, compile_s = build_train_step(
    stage, args.batch, text_length, text_dim
  )
  state, _ = run_steps(compiled, state, batch, args.warmup)
  state, times = run_steps(compiled, state, batch, args.steps)
  step_s = statistics.median(times)
  mem, mem_src = peak_memory_bytes()

  cfg = model.config
  size = int(stage.crop_size or stage.image_size)
  step_flops = flops.train_step_flops(
    cfg, args.batch, image_size=size, text_length=text_length, remat=False
  )
  dev = jax.devices()[0]
  dtype = cfg.dtype
  peak = args.peak_tflops or flops.peak_tflops(dev.device_kind, dtype)
  achieved = step_flops / step_s / 1e12
  mfu = achieved / (peak * jax.device_count()) if peak else None
  result = {
    "bench": "train_step",
    "config": args.config,
    "stage": name,
    "preset": cfg.name,
    "image_size": size,
    "batch": args.batch,
    "grad_accum": int(stage.grad_accum),
    "dtype": dtype,
    "remat": cfg.remat,
    "scan_blocks": cfg.scan_blocks,
    "optimizer": stage.optimizer.name,
    "text_length": text_length,
    "text_dim": text_dim,
    "params": model.num_params(),
    "compile_s": round(compile_s, 2),
    "step_s_median": round(step_s, 5),
    "step_s_min": round(min(times), 5),
    "step_s_max": round(max(times), 5),
    "images_per_s": round(args.batch / step_s, 2),
    "train_gflops_per_step": round(step_flops / 1e9, 3),
    "achieved_tflops": round(achieved, 4),
    "peak_tflops_per_device": peak,
    "mfu": round(mfu, 4) if mfu is not None else None,
    "peak_mem_gib": round(mem / 2**30, 3),
    "peak_mem_source": mem_src,
    "steps": args.steps,
    "warmup": args.warmup,
    "flax_version": flax.__version__,
  }
  print(
    f"{args.config} stage {name} ({cfg.name}, {size}², {dtype}, remat {cfg.remat}), "
    f"batch {args.batch}, {result['params']:,} params, on {jax.device_count()}x {dev.device_kind}"
  )
  rows = [
    ("compile", f"{compile_s:.2f} s"),
    ("step (median)", f"{step_s * 1e3:.1f} ms  [min {min(times) * 1e3:.1f}, max "
     f"{max(times) * 1e3:.1f}, {args.steps} steps]"),
    ("images/s", f"{args.batch / step_s:.2f}"),
    ("model FLOPs/step", f"{step_flops / 1e9:.2f} GFLOP (3 x forward)"),
    ("achieved", f"{achieved:.3f} TFLOP/s"),
    ("MFU", f"{mfu:.1%} of {peak:g} TFLOP/s x {jax.device_count()}" if mfu is not None else
     "n/a (pass --peak_tflops)"),
    ("peak memory", f"{mem / 2**30:.2f} GiB ({mem_src})"),
  ]  # fmt: skip
  for k, v in rows:
    print(f"  {k:18s} {v}")
  if not args.no_record:
    record(result)
  return result


if __name__ == "__main__":
  main()
