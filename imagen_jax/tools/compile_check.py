"""Will it fit? Compile a config's full-size train step from shapes alone and report memory.

  python -m imagen_jax.tools.compile_check --config configs/base64.py --devices 8 \\
      --mesh data=1,fsdp=8                        # 8 simulated CPU devices
  python -m imagen_jax.tools.compile_check --config configs/sr256.py --batch 2048 --grad_accum 32
  python -m imagen_jax.tools.compile_check --config configs/base64.py --topology v5e:2x4  # libtpu
  python -m imagen_jax.tools.compile_check --config configs/sr256.py --batch 2 --scan_blocks on

Nothing is allocated: the train state and the batch are ``jax.ShapeDtypeStruct`` with their
shardings, the step is lowered and compiled for the mesh (``config.mesh``, or ``--mesh``), and
XLA's memory analysis gives the per-device bytes. Printed per stage, per device:

* ``params``, ``ema_params``, ``opt_state``: the sharded train state (exact: shapes × shardings);
* ``batch``: this device's share of the global batch;
* ``temporaries``: XLA's scratch for activations and gradients (backend-specific: a CPU
  compile approximates a GPU's; use ``--topology`` with libtpu for TPU numbers);
* ``total``: state + batch + temporaries — compare it with the accelerator's memory.

Backend choices resolve for the machine that compiles: with ``--scan_blocks on``, pass
``--scan_impl loop`` to compile the looped runs a GPU/TPU would run (a CPU unrolls them).

``--devices N`` simulates N CPU devices (``jax_num_cpu_devices``, set before JAX starts its
backends).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from imagen_jax import config as config_lib
from imagen_jax import sharding
from imagen_jax.models.if_unet import IFUNetConfig
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.stage import step as step_lib
from imagen_jax.tools import cli
from imagen_jax.tools.flops import text_encoder_config

GiB = 2**30


def _devices(topology: str | None) -> list | None:
  if not topology:
    return None
  platform, _, shape = topology.partition(":")
  try:
    topo = topologies.get_topology_desc(platform=platform, topology_name=shape or platform)
  except Exception as e:  # the message names what is missing (plugin, topology name)
    raise SystemExit(
      f"--topology {topology!r}: cannot build it ({e}). Compiling for a TPU topology needs "
      "libtpu (`pip install -e '.[tpu]'`); names look like 'tpu:v5e:2x4' or 'v4:2x2x1'."
    ) from e
  return list(topo.devices)


def check_stage(
  config: Any,
  name: str,
  mesh: Any,
  *,
  batch_size: int | None = None,
  grad_accum: int | None = None,
  remat: str | None = None,
  scan_blocks: bool | None = None,
  scan_impl: str | None = None,
) -> dict:
  """Compiles stage ``name``'s train step on ``mesh`` from shapes; returns per-device bytes.

  ``batch_size``, ``grad_accum``, ``remat`` and ``scan_blocks`` override the stage's config
  (``remat``: the U-Net's rematerialisation, ``"block"`` to recompute activations inside each
  block; ``scan_blocks``: ``UNetConfig.scan_blocks``, Imagen U-Nets only), and ``scan_impl``
  picks how stacked runs are applied (``UNetConfig.scan_impl``).
  """
  stage = config.stages[name]
  if batch_size:
    stage.batch_size = int(batch_size)
  if grad_accum:
    stage.grad_accum = int(grad_accum)
  if remat:  # IF's U-Net takes remat on/off per block
    is_if = stage.model.get("family", "imagen") == "if"
    stage.model.remat = (remat != "none") if is_if else remat
  if (scan_blocks is not None or scan_impl) and stage.model.get("family", "imagen") == "if":
    raise ValueError("--scan_blocks/--scan_impl: the DeepFloyd IF U-Net has no stacked runs")
  if scan_blocks is not None:
    stage.model.scan_blocks = bool(scan_blocks)
  if scan_impl:
    stage.model.scan_impl = scan_impl
  rules = config_lib.logical_rules(config)
  # The text encoder's width when it can be told offline (demo, local checkpoint, known hub
  # name), else the preset's (T5-XXL's 4096 in the paper presets).
  t5 = text_encoder_config(config.text.encoder)
  if t5:
    text_dim = t5.d_model
  elif stage.model.get("family", "imagen") == "if":  # DeepFloyd IF: T5-XXL's width
    text_dim = IFUNetConfig.from_preset(stage.model.preset).encoder_hid_dim
  else:
    text_dim = UNetConfig.from_preset(stage.model.preset).text_dim
  program = step_lib.build_stage_program(
    stage, text_dim=text_dim, seed=config.seed, mesh=mesh, rules=rules
  )
  model, shardings, state = program.model, program.shardings, program.abstract_state

  b, length, s = int(stage.batch_size), int(config.text.max_length), int(stage.image_size)
  crop = int(stage.crop_size) or s
  dtype = jnp.bfloat16 if config.text.dtype == "bfloat16" else jnp.float32
  shapes = {
    "image": ((b, crop, crop, 3), jnp.float32),
    "text_emb": ((b, length, text_dim), dtype),
    "text_mask": ((b, length), jnp.bool_),
  }
  if stage.lowres_size is not None:
    lr = int(stage.lowres_size) * crop // s
    shapes["lowres"] = ((b, lr, lr, 3), jnp.float32)
  batch = {
    k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
    for k, (shape, dt) in shapes.items()
  }
  t0 = time.time()
  lowered = program.train_step.lower(state, batch)  # the trainer's own step, from shapes
  compiled = lowered.compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  out: dict[str, Any] = {"stage": name, "preset": stage.model.preset, "params": model.num_params()}
  for key in ("params", "ema_params", "opt_state"):
    out[f"{key}_bytes"] = sharding.bytes_per_device(shardings[key], state[key])[0]
  out["batch_bytes"] = sharding.bytes_per_device({k: v.sharding for k, v in batch.items()}, batch)[
    0
  ]
  out["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
  out["total_bytes"] = sum(
    out[k] or 0 for k in ("params_bytes", "ema_params_bytes", "opt_state_bytes", "batch_bytes")
  ) + (out["temp_bytes"] or 0)
  out.update(
    mesh=dict(mesh.shape),
    batch=b,
    grad_accum=int(stage.grad_accum),
    remat=stage.model.get("remat", "none"),
    scan_blocks=bool(stage.model.get("scan_blocks", False)),
    scan_impl=stage.model.get("scan_impl", "auto"),
    per_device_batch=b // int(stage.grad_accum) // (mesh.shape["data"] * mesh.shape["fsdp"]),
    compile_s=round(seconds, 1),
    platform=next(iter(mesh.devices.flat)).platform,
  )
  return out


def _size(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / GiB:9.2f} GiB" if n >= GiB else f"{n / 2**20:9.1f} MiB"


def format_report(r: dict) -> str:
  lines = [
    f"[{r['stage']}] {r['preset']}: {r['params']:,} params, mesh {r['mesh']} on "
    f"{r['platform']}, global batch {r['batch']} in {r['grad_accum']} micro-batches "
    f"({r['per_device_batch']} per device each), remat {r['remat']}, "
    f"scan_blocks {r['scan_blocks']} ({r['scan_impl']}), "
    f"compiled in {r['compile_s']} s",
    "  per device:",
  ]
  for key in ("params", "ema_params", "opt_state", "batch", "temp", "total"):
    lines.append(f"    {key:<12} {_size(r[f'{key}_bytes'])}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg] or a built-in name")
  parser.add_argument("--stage", default="", help="stage name (default: every stage)")
  parser.add_argument("--mesh", default="", help="mesh override, e.g. data=1,fsdp=8,tensor=1")
  parser.add_argument("--batch", type=int, default=0, help="global batch override")
  parser.add_argument("--grad_accum", type=int, default=0, help="micro-batches per step override")
  parser.add_argument("--remat", default="", help="U-Net remat override: none, block, or a policy")
  parser.add_argument(
    "--scan_blocks", choices=("on", "off"), default="", help="UNetConfig.scan_blocks override"
  )
  parser.add_argument("--scan_impl", default="", help="UNetConfig.scan_impl: auto, loop, unrolled")
  parser.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
  parser.add_argument("--topology", default="", help="compile for a TPU topology (libtpu)")
  parser.add_argument("--json", action="store_true", help="also print one JSON line per stage")
  parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
  args = parser.parse_args(argv)
  if args.devices:  # simulated CPU devices; JAX refuses this once its backends have started
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)

  config = cli.load_config_flag(args.config)
  if args.mesh:
    config.mesh.update(sharding.parse_mesh(args.mesh))
  checked = config.copy_and_resolve_references()
  checked.data.path = checked.data.path or "unused"  # no data is read: only the model is checked
  checked.data.tfds_name = checked.data.tfds_name or "unused"
  config_lib.validate(checked)
  mesh = sharding.make_mesh(dict(config.mesh), devices=_devices(args.topology))
  stages = [args.stage] if args.stage else config_lib.selected_stages(config)
  for name in stages:
    if name not in config.stages:
      raise ValueError(f"--stage={name}: not in the config; stages: {sorted(config.stages)}")
  for name in stages:
    report = check_stage(
      config,
      name,
      mesh,
      batch_size=args.batch or None,
      grad_accum=args.grad_accum or None,
      remat=args.remat or None,
      scan_blocks={"on": True, "off": False}.get(args.scan_blocks),
      scan_impl=args.scan_impl or None,
    )
    print(format_report(report), flush=True)
    if args.json:
      print(json.dumps(report))
  return 0


if __name__ == "__main__":
  cli.run_tool(main)
