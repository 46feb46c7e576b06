"""One prepared GPU benchmark: paper-preset train steps (images/s, MFU), cascade sampling, kernels.

  bash bench/gpu/run.sh                 # on the GPU machine (installs wheels, then runs this)
  python bench/gpu/gpu_bench.py --tiny  # CPU smoke run of every section, tiny presets (~2 min)

Sections, in this order, each skipped when the time left (``--budget_s``, default 420 s, so that
the whole run stays under 8 minutes) is below its estimate:

1. ``kernels``: every choice of :mod:`imagen_jax.kernels` timed on the device at the paper
   models' shapes (attention xla / jax_xla / cudnn, forward and forward + backward; GroupNorm + SiLU
   ours / flax; the dynamic-thresholding percentile bisect / sort), with the choice ``"auto"``
   makes here and whether it was the fastest, so the auto table can be confirmed.
2. ``train base64``: the 2.2B base U-Net's bf16 train step (``bench/train_step.py``'s ``main``):
   images/s and MFU = analytic model FLOPs (``imagen_jax.tools.flops``) / step time / the device's
   dense bf16 peak (``flops.PEAK_TFLOPS`` by ``device_kind``: H100 and H200 989 TFLOP/s). Out of
   memory, it retries with ``remat=block``, then at half the batch.
3. ``sample``: the 64→256→1024 cascade (random weights, random T5-XXL-shaped text), 25
   DPM-Solver++ steps per stage with CFG, seconds per image per stage and end to end, as
   ``bench/sample.py --configs`` measures it.
4. ``train sr256`` and ``train sr1024`` (256² crops), as 2.

Every result is printed and appended as one JSON line (with ``bench.common.machine_info()``) to
``--results`` (default ``bench/gpu/results.jsonl``; ``--tiny``: ``bench/gpu/results-tiny.jsonl``,
git-ignored), as soon as its section ends, so a run cut short keeps what it measured. A persistent
XLA compilation cache (``bench/gpu/.jax_cache``) makes a second run mostly compile-free.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
from flax import nnx

from bench import train_step as train_bench
from bench.common import machine_info
from bench.sample import stages_from_configs
from imagen_jax import kernels
from imagen_jax.data.shapes import default_prompts
from imagen_jax.diffusion import guidance
from imagen_jax.models import layers
from imagen_jax.sample.cascade import Cascade

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
  "base64": "configs/base64.py",
  "sr256": "configs/sr256.py",
  "sr1024": "configs/sr1024.py",
}
# Rough device seconds per section (compile-dominated) for the budget check; tiny runs ignore it.
ESTIMATE_S = {
  "kernels": 45,
  "train base64": 150,
  "sample": 150,
  "train sr256": 80,
  "train sr1024": 80,
}
# Attention cases: (name, batch, query length T, key length S, heads, head dim, masked). Full runs
# use the paper presets' layers: base64 at 32² (self + text, 128 tokens) and 16², sr256 at 16²
# (head dim 256), sr1024 sampled at 1024² (text-only cross-attention from 64² = 4096 queries).
ATTENTION_CASES = [
  ("base64 32² self+text", 16, 1024, 1024 + 128, 16, 64, True),
  ("base64 16² self+text", 16, 256, 256 + 128, 24, 64, True),
  ("sr256 16² self+text", 16, 256, 256 + 128, 8, 256, True),
  ("sr1024 64² text (1024² sampling)", 2, 4096, 128, 8, 256, True),
]
TINY_ATTENTION_CASES = [("tiny 16² self+text", 2, 256, 256 + 16, 2, 16, True)]
NORM_CASES = [("base64 64²x512", (16, 64, 64, 512)), ("sr256 256²x128", (16, 256, 256, 128))]
TINY_NORM_CASES = [("tiny 32²x32", (2, 32, 32, 32))]
PERCENTILE_CASES = [("64² x0", (8, 64 * 64 * 3)), ("256² x0", (8, 256 * 256 * 3)),
                    ("1024² x0", (2, 1024 * 1024 * 3))]  # fmt: skip
TINY_PERCENTILE_CASES = [("32² x0", (2, 32 * 32 * 3))]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny presets on any backend (CPU smoke run)")
  p.add_argument("--sections", default="kernels,train base64,sample,train sr256,train sr1024")
  p.add_argument(
    "--budget_s", type=float, default=420.0, help="skip sections past this (not --tiny)"
  )
  p.add_argument("--batch", type=int, default=0, help="train batch (default 16; --tiny 2)")
  p.add_argument("--steps", type=int, default=0, help="timed train steps (default 10; --tiny 2)")
  p.add_argument("--remat", default="none", help="first remat tried (OOM: then block)")
  p.add_argument("--num_images", type=int, default=0, help="images sampled (default 2; tiny 1)")
  p.add_argument("--sample_steps", type=int, default=0, help="steps per stage (default 25; tiny 4)")
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--reps", type=int, default=0, help="timed calls per kernel (default 20; tiny 3)")
  p.add_argument("--results", default="", help="JSON-lines file to append to")
  args = p.parse_args(argv)
  args.batch = args.batch or (2 if args.tiny else 16)
  args.steps = args.steps or (2 if args.tiny else 10)
  args.sample_steps = args.sample_steps or (4 if args.tiny else 25)
  args.num_images = args.num_images or (1 if args.tiny else 2)
  args.reps = args.reps or (3 if args.tiny else 20)
  name = "results-tiny.jsonl" if args.tiny else "results.jsonl"
  args.results = args.results or os.path.join(HERE, name)
  return args


class Recorder:
  """Appends each result, with the machine description, to the results file as it comes."""

  def __init__(self, path: str, tiny: bool):
    self.path, self.tiny, self.machine = path, tiny, machine_info()
    self.rows: list[dict] = []

  def __call__(self, result: dict) -> None:
    row = {**self.machine, "tiny": self.tiny, **result}
    self.rows.append(row)
    with open(self.path, "a") as f:
      f.write(json.dumps(row, default=str) + "\n")


def median_ms(fn: Callable, *args, reps: int) -> float:
  """Median wall time of ``fn(*args)`` in ms over ``reps`` synchronised calls, after a warm-up."""
  jax.block_until_ready(fn(*args))  # compile + first run
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def _timed(fn: Callable, *args, reps: int) -> tuple[float | None, str | None]:
  """(ms, None) or (None, the error's first line): a choice that cannot run here is recorded."""
  try:
    return median_ms(fn, *args, reps=reps), None
  except Exception as e:  # any failure of one kernel is a result, not a crash
    return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ------------------------------------------------------------------------------------------------
# 1. Kernels.


def _attention_fns(impl: str) -> tuple[Callable, Callable]:
  def fwd(q, k, v, mask):
    return layers.attention(q, k, v, mask, impl=impl)

  def loss(q, k, v, mask):
    return fwd(q, k, v, mask).astype(jnp.float32).sum()

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _norm_fns(channels: int, impl: str, dtype) -> tuple[Callable, Callable, nnx.State]:
  norm = layers.group_norm(channels, 32, rngs=nnx.Rngs(0), param_dtype=jnp.float32, impl=impl)
  graphdef, state = nnx.split(norm)

  def fwd(state, x):  # GroupNorm + SiLU, as every ResBlock runs it
    return jax.nn.silu(nnx.merge(graphdef, state)(x)).astype(dtype)

  def loss(state, x):
    return fwd(state, x).astype(jnp.float32).sum()

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1))), state


def bench_kernels(args, record: Recorder) -> None:
  dtype = jnp.float32 if args.tiny and jax.default_backend() == "cpu" else jnp.bfloat16
  key = jax.random.key(0)
  auto = {kind: kernels.resolve(kind) for kind in kernels.CHOICES}
  print(f"auto here ({kernels.backend_name()}): {auto}")
  for name, b, t, s, n, d, masked in TINY_ATTENTION_CASES if args.tiny else ATTENTION_CASES:
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, n, d), dtype)
    k, v = (jax.random.normal(x, (b, s, n, d), dtype) for x in (kk, kv))
    mask = (jnp.arange(s) < s - 8)[None, None, None, :] if masked else None
    why = kernels.cudnn_attention_unsupported(dtype, d, t, s, masked)
    rows = {}
    for impl in kernels.CHOICES["attention"]:
      fwd, grad = _attention_fns(impl)
      f_ms, err = _timed(fwd, q, k, v, mask, reps=args.reps)
      g_ms, _ = _timed(grad, q, k, v, mask, reps=args.reps) if err is None else (None, err)
      rows[impl] = (f_ms, g_ms, err)
    _record_kernel(record, "attention", name, [b, t, s, n, d], dtype, rows, auto, cudnn_why=why)
  for name, shape in TINY_NORM_CASES if args.tiny else NORM_CASES:
    x = jax.random.normal(key, shape, dtype) * 2 + 1
    rows = {}
    for impl in kernels.CHOICES["norm"]:
      fwd, grad, state = _norm_fns(shape[-1], impl, dtype)
      f_ms, err = _timed(fwd, state, x, reps=args.reps)
      g_ms, _ = _timed(grad, state, x, reps=args.reps) if err is None else (None, err)
      rows[impl] = (f_ms, g_ms, err)
    _record_kernel(record, "norm", name, list(shape), dtype, rows, auto)
  for name, shape in TINY_PERCENTILE_CASES if args.tiny else PERCENTILE_CASES:
    x = jax.random.normal(key, shape, jnp.float32) * 1.5
    rows = {}
    for impl in kernels.CHOICES["percentile"]:
      fn = jax.jit(lambda x, impl=impl: guidance.abs_percentile(x, 99.5, impl=impl))
      f_ms, err = _timed(fn, x, reps=args.reps)
      rows[impl] = (f_ms, None, err)
    _record_kernel(record, "percentile", name, list(shape), jnp.float32, rows, auto)


def _ms(fwd: float | None, fwd_bwd: float | None) -> str:
  if fwd is None:
    return "n/a"
  return f"{fwd:.3f}/{fwd_bwd:.3f} ms" if fwd_bwd is not None else f"{fwd:.3f} ms"


def _record_kernel(record, kind, case, shape, dtype, rows, auto, cudnn_why=None) -> None:
  """One line per case: each choice's times, the auto choice, and whether it was the fastest."""
  # Train-step cost (forward + backward) decides where there is one, else the forward.
  cost = {i: (g if g is not None else f) for i, (f, g, e) in rows.items() if e is None}
  fastest = min(cost, key=cost.get) if cost else None
  chosen = auto[kind]
  if kind == "attention" and chosen == "cudnn" and cudnn_why is not None:
    chosen = "xla"  # what layers.attention runs under "auto" for this shape
  times = "  ".join(f"{i}: {_ms(f, g)}" for i, (f, g, _) in rows.items())
  print(f"  {kind:10s} {case:34s} {times}  | auto={chosen} fastest={fastest}")
  record({
    "bench": "gpu/kernels", "kind": kind, "case": case, "shape": shape,
    "dtype": jnp.dtype(dtype).name, "auto": chosen, "fastest": fastest,
    "auto_is_fastest": fastest is not None and chosen == fastest, "cudnn_unsupported": cudnn_why,
    "ms": {i: {"fwd": f, "fwd_bwd": g, "error": e} for i, (f, g, e) in rows.items()},
  })  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 2. and 4. Train steps.


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def bench_train(args, record: Recorder, preset: str) -> None:
  """``bench/train_step.py``'s measurement, retried with remat / half the batch when out of memory,
  and with XLA attention when the first try fails otherwise (a cuDNN refusal at compile time)."""
  config = CONFIGS[preset] + (":tiny" if args.tiny else "")
  tries = [(args.batch, args.remat), (args.batch, "block"), (max(args.batch // 2, 1), "block")]
  attention, errors = "", []
  while tries:
    batch, remat = tries[0]
    argv = ["--config", config, "--batch", str(batch), "--steps", str(args.steps),
            "--warmup", "1" if args.tiny else "2", "--remat", remat, "--no_record"]  # fmt: skip
    argv += ["--attention_impl", attention] if attention else []
    try:
      result = train_bench.main(argv)
      break
    except Exception as e:  # recorded, then retried
      errors.append(f"batch {batch} remat {remat} attention {attention or 'auto'}: {e}"[:500])
      print(f"  failed: {errors[-1].splitlines()[0]}")
      if _is_oom(e):
        tries.pop(0)
      elif not attention:
        attention = "xla"
      else:
        traceback.print_exc()
        tries = []
      gc.collect()
  else:
    record({"bench": "gpu/train_step", "preset": preset, "config": config, "errors": errors})
    return
  result = {**result, "bench": "gpu/train_step", "preset": preset, "errors": errors}
  result["attention_impl"] = attention or "auto"
  record(result)
  gc.collect()  # the train state goes before the next section allocates


# ------------------------------------------------------------------------------------------------
# 3. Cascade sampling.


def bench_sample(args, record: Recorder) -> None:
  """Per stage and end to end seconds per image, as ``bench/sample.py --configs`` measures them
  (its ``stages_from_configs``; each stage alone, first call compiles, second is timed)."""
  specs = [CONFIGS[p] + (":tiny" if args.tiny else "") for p in ("base64", "sr256", "sr1024")]
  settings = {"steps": args.sample_steps, "sampler": "dpmpp_2m", "guidance": args.guidance}
  stages, text = stages_from_configs(specs, "", settings)
  prompts = default_prompts(args.num_images, seed=3)
  rows, low = {}, None
  for stage in stages:
    single = Cascade([stage], text, max_batch=len(prompts))
    kwargs = {} if stage.lowres_size is None else {"init_image": low}
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      out = single(prompts, seed=0, progress=False, **kwargs)
      times.append(time.perf_counter() - t0)
    low = out[stage.name]
    rows[stage.name] = {
      "size": stage.image_size,
      "compile_s": round(times[0] - times[1], 2),
      "s_per_image": round(times[1] / len(prompts), 4),
    }
    print(f"  {stage.name:8s} {stage.image_size:5d}²  compile {times[0] - times[1]:7.2f} s  "
          f"{times[1] / len(prompts):8.4f} s/image")  # fmt: skip
  total = sum(r["s_per_image"] for r in rows.values())
  print(f"  end to end {total:.4f} s/image ({args.sample_steps} dpmpp_2m steps/stage, CFG)")
  record({
    "bench": "gpu/sample", "configs": specs, "settings": settings, "num_images": len(prompts),
    "stages": rows, "total_s_per_image": round(total, 4),
  })  # fmt: skip
  del stages, single, out, low
  gc.collect()


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  jax.config.update("jax_compilation_cache_dir", os.path.join(HERE, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.tiny:  # a smoke run of the code paths: XLA's slow optimisation passes buy nothing here
    jax.config.update("jax_disable_most_optimizations", True)
  record = Recorder(args.results, args.tiny)
  dev = jax.devices()[0]
  print(f"{jax.device_count()}x {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__};"
        f" results -> {args.results}")  # fmt: skip
  start = time.perf_counter()
  for section in [s.strip() for s in args.sections.split(",") if s.strip()]:
    if section not in ESTIMATE_S:
      raise SystemExit(f"--sections: unknown {section!r}; choose from {', '.join(ESTIMATE_S)}")
    elapsed = time.perf_counter() - start
    if not args.tiny and elapsed + ESTIMATE_S[section] > args.budget_s:
      print(f"== {section}: skipped ({elapsed:.0f} s used of --budget_s {args.budget_s:.0f})")
      record({"bench": "gpu/skipped", "section": section, "elapsed_s": round(elapsed, 1)})
      continue
    print(f"== {section} ({elapsed:.0f} s elapsed)")
    t0 = time.perf_counter()
    if section == "kernels":
      bench_kernels(args, record)
    elif section == "sample":
      bench_sample(args, record)
    else:
      bench_train(args, record, section.split()[1])
    print(f"   {section}: {time.perf_counter() - t0:.0f} s")
  _summary(record.rows, time.perf_counter() - start)
  return record.rows


def _summary(rows: list[dict], wall_s: float) -> None:
  print(f"== summary ({wall_s:.0f} s)")
  for r in rows:
    if r["bench"] == "gpu/train_step" and "images_per_s" in r:
      mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
      peak = r["peak_tflops_per_device"] or "n/a"
      print(f"  train {r['preset']:7s} {r['image_size']}² batch {r['batch']} remat {r['remat']}: "
            f"{r['images_per_s']:.2f} images/s, MFU {mfu} (peak {peak} TFLOP/s)")  # fmt: skip
    elif r["bench"] == "gpu/sample":
      per = ", ".join(f"{k} {v['s_per_image']:.3f}" for k, v in r["stages"].items())
      print(f"  sample  {per}; end to end {r['total_s_per_image']:.3f} s/image")
    elif r["bench"] == "gpu/kernels" and not r["auto_is_fastest"]:
      print(f"  kernel  {r['kind']} {r['case']}: auto={r['auto']} but fastest={r['fastest']}")


if __name__ == "__main__":
  main()
