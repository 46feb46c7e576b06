"""Counts U-Net parameters from shapes only (``nnx.eval_shape``: no weights are allocated).

  python -m imagen_jax.tools.count_params --config configs/base64.py
  python -m imagen_jax.tools.count_params --config configs/sr256.py:tiny

Prints one line per top-level module, then ``params: N`` as the last line. The config file's
``get_config(arg)`` must return a ``ConfigDict`` with ``model`` (a U-Net preset name plus
``UNetConfig`` overrides) or ``stages.<name>.model`` for several stages (then N is their sum).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from imagen_jax.models.unet import build_unet
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.tools import cli


def unet_config(model: Mapping[str, Any]) -> UNetConfig:
  """``UNetConfig`` from a ``config.model`` mapping: ``preset`` plus field overrides."""
  fields = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  if "preset" not in fields:
    raise ValueError(f"config.model needs a 'preset' field, got {sorted(fields)}")
  return UNetConfig.from_preset(fields.pop("preset"), **fields)


def model_configs(config: Any) -> dict[str, UNetConfig]:
  """The U-Net configs a run config describes, by stage name (``"model"`` for one model)."""
  if "model" in config:
    return {"model": unet_config(config.model)}
  if "stages" in config:
    order = list(config.get("stage_order", ())) or list(config.stages)
    return {name: unet_config(config.stages[name].model) for name in order}
  raise ValueError("config has neither 'model' nor 'stages.<name>.model'")


def count_params(config: UNetConfig) -> tuple[int, dict[str, int]]:
  """Total parameter count and the count per top-level module, from shapes only."""
  abstract = nnx.eval_shape(lambda: build_unet(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  breakdown = {
    str(name): sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(sub))
    for name, sub in params.items()
  }
  return sum(breakdown.values()), breakdown


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg] or a built-in name")
  parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
  args = parser.parse_args(argv)
  total = 0
  for stage, cfg in model_configs(cli.load_config_flag(args.config)).items():
    n, breakdown = count_params(cfg)
    total += n
    print(f"[{stage}] preset {cfg.name} ({cfg.kind}, {cfg.image_size}²): {n:,}")
    for name, count in breakdown.items():
      print(f"  {name:<12} {count:>15,}")
  print(f"params: {total}")
  return 0


if __name__ == "__main__":
  cli.run_tool(main)
