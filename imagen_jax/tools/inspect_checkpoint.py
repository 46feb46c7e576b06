"""Print what a training checkpoint holds: step, stage, parameter count and weight digests.

  python -m imagen_jax.tools.inspect_checkpoint runs/shapes             # every stage of a run
  python -m imagen_jax.tools.inspect_checkpoint runs/shapes/base         # one stage (latest step)
  python -m imagen_jax.tools.inspect_checkpoint runs/shapes/base/checkpoints/1500

One ``key: value`` per line, e.g. ``params_sha256: 3f2a…``. The digests cover every parameter's
path, dtype, shape and bytes, so two runs that should be identical (exact resume) can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from imagen_jax.checkpoint_integrity import saved_state_metadata
from imagen_jax.tools import cli


def tree_digest(tree: Any) -> str:
  """sha256 over ``(path, dtype, shape, bytes)`` of every leaf, in sorted path order."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  items = sorted((jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in leaves)
  for path, x in items:
    arr = np.ascontiguousarray(np.asarray(x))
    h.update(f"{path}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _step_dirs(path: str) -> list[tuple[str, str]]:
  """(stage name, step directory) pairs for a run workdir, a stage dir, or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return [(os.path.basename(os.path.dirname(os.path.dirname(path))), path)]
  ckdir = (
    os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  )
  steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
  if steps:
    stage = os.path.basename(os.path.dirname(ckdir)) if ckdir.endswith("checkpoints") else ""
    return [(stage, os.path.join(ckdir, str(max(steps))))]
  out = []
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      sub = os.path.join(path, name, "checkpoints")
      if os.path.isdir(sub):
        out.extend(_step_dirs(sub))
  return out


def load_state(step_dir: str) -> dict:
  """The saved train state of one step directory as host numpy arrays (no devices needed)."""
  ckptr = ocp.PyTreeCheckpointer()
  path = os.path.join(step_dir, "state")
  meta = saved_state_metadata(step_dir)
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def inspect(step_dir: str) -> dict[str, Any]:
  """Reads one step directory (no model or config needed) and returns the summary fields."""
  state = load_state(step_dir)
  info: dict[str, Any] = {"checkpoint": step_dir, "step": int(np.asarray(state["step"]))}
  config_file = os.path.join(step_dir, "config", "metadata")
  if os.path.isfile(config_file):
    with open(config_file) as f:
      info["config_stages"] = ",".join(json.load(f).get("stage_order", []))
  info["params"] = sum(int(np.size(x)) for x in jax.tree.leaves(state["params"]))
  info["params_sha256"] = tree_digest(state["params"])
  info["ema_params_sha256"] = tree_digest(state["ema_params"])
  info["skipped_steps"] = int(np.asarray(state.get("skipped", 0)))
  return info


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("path", help="run workdir, stage directory, or checkpoint step directory")
  parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
  args = parser.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)
  found = _step_dirs(args.path)
  if not found:
    raise FileNotFoundError(
      f"no checkpoint under {args.path}: pass a run workdir, a stage directory or a checkpoint "
      "step directory"
    )
  for stage, step_dir in found:
    info = inspect(step_dir)
    print(f"stage: {stage}")
    for k, v in info.items():
      print(f"{k}: {v}")
  return 0


if __name__ == "__main__":
  cli.run_tool(main)
