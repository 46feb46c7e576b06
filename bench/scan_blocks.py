"""``UNetConfig.scan_blocks`` on this machine: compile and gradient-step time per layout.

  python bench/scan_blocks.py [--preset tiny_sr] [--blocks 2,2,4] [--batch 4] [--rounds 2]

Side by side in one process, alternating for ``--rounds`` rounds: the U-Net's gradient
(``jax.grad`` of a mean-square output) with the same random weights, per-block weights
("unstacked") vs stacked runs applied as a ``lax.scan`` loop ("loop") or as the unrolled scan
("unrolled", ``scan_impl``): first call (compile + run) and the median of 5 steady-state calls.
Then the same for a bare stack of four
3×3 convolutions (pure JAX, no imagen_jax code), with the gradient taken with respect to the
weights and with respect to the input alone, which isolates where a scanned backward pass loses
time on this backend. The paper-size compile times come from ``tools.compile_check
--scan_blocks on|off`` (bench/RESULTS.md, "Compile time"). Appends one JSON line to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record


def _timed(fn, *args) -> tuple[float, float]:
  """(first call seconds, median steady-state seconds of 5 calls)."""
  import jax

  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def unet_grad(preset: str, blocks: tuple[int, ...], batch: int, impl: str):
  """The jitted U-Net gradient and its weights (``impl`` "unstacked", or a ``scan_impl`` for
  the same weights, stacked)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from imagen_jax.models.unet import build_unet, with_scan_blocks
  from imagen_jax.models.unet_config import UNetConfig

  scan_impl = "auto" if impl == "unstacked" else impl
  cfg = UNetConfig.from_preset(preset, num_res_blocks=blocks, scan_impl=scan_impl)
  model = with_scan_blocks(build_unet(cfg, rngs=nnx.Rngs(0)), impl != "unstacked")
  graphdef, state = nnx.split(model)
  ks = jax.random.split(jax.random.key(1), 3)
  s = cfg.image_size
  x = jax.random.normal(ks[0], (batch, s, s, cfg.in_channels))
  text = jax.random.normal(ks[1], (batch, 8, cfg.text_dim))
  mask = jnp.ones((batch, 8), bool)
  kw = {}
  if cfg.lowres_cond:
    r = cfg.lowres_size
    kw = dict(lowres=jax.random.normal(ks[2], (batch, r, r, 3)), aug_logsnr=jnp.zeros(batch))

  def loss(state):
    out = nnx.merge(graphdef, state)(x, jnp.zeros(batch), text, mask, **kw)
    return jnp.mean(out**2)

  return jax.jit(jax.grad(loss)), state


def conv_stack(n: int = 4, size: int = 16, channels: int = 64, batch: int = 4) -> dict:
  """Median gradient ms of n residual 3×3 convs, unrolled vs ``lax.scan``, w.r.t. w and x."""
  import jax
  import jax.numpy as jnp

  ws = 0.05 * jax.random.normal(jax.random.key(0), (n, 3, 3, channels, channels))
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  dn = ("NHWC", "HWIO", "NHWC")

  def layer(h, w):
    return jax.nn.silu(jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dn)) + h

  def unrolled(ws, x):
    for i in range(n):
      x = layer(x, ws[i])
    return jnp.mean(x**2)

  def scanned(ws, x):
    return jnp.mean(jax.lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0] ** 2)

  out = {}
  for name, f in (("unrolled", unrolled), ("scanned", scanned)):
    for wrt, arg in (("weights", 0), ("input", 1)):
      _, t = _timed(jax.jit(jax.grad(f, argnums=arg)), ws, x)
      out[f"{name}_grad_{wrt}_ms"] = round(t * 1e3, 2)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny_sr")
  p.add_argument("--blocks", default="2,2,4", help="num_res_blocks per level")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--no_record", action="store_true")
  args = p.parse_args(argv)
  blocks = tuple(int(b) for b in args.blocks.split(","))

  impls = ("unstacked", "loop", "unrolled")
  rows = {impl: [] for impl in impls}
  for _ in range(args.rounds):
    for impl in impls:
      fn, state = unet_grad(args.preset, blocks, args.batch, impl)
      rows[impl].append(_timed(fn, state))
  result = {"bench": "scan_blocks", "preset": args.preset, "num_res_blocks": blocks}
  print(f"{args.preset}, num_res_blocks {blocks}, batch {args.batch}: U-Net gradient")
  for name in impls:
    first = statistics.median(r[0] for r in rows[name])
    step = statistics.median(r[1] for r in rows[name])
    result[f"{name}_first_call_s"] = round(first, 2)
    result[f"{name}_step_ms"] = round(step * 1e3, 1)
    print(f"  {name:10s} first call {first:6.2f} s   step {step * 1e3:8.1f} ms")
  convs = conv_stack()
  result.update(convs)
  print("4 residual 3x3 convs (64 ch, 16², batch 4), gradient, median ms:")
  for name in ("unrolled", "scanned"):
    print(
      f"  {name:9s} w.r.t. weights {convs[f'{name}_grad_weights_ms']:7.2f}   "
      f"w.r.t. input {convs[f'{name}_grad_input_ms']:7.2f}"
    )
  if not args.no_record:
    record(result)
  return result


if __name__ == "__main__":
  main()
