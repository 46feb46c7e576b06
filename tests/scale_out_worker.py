"""Subprocess side of ``test_scale_out.py``: the tiny training run on several meshes.

  python tests/scale_out_worker.py meshes OUT            # one process, 8 simulated CPU devices
  python tests/scale_out_worker.py process OUT PORT PID  # one of two jax.distributed processes

Each run writes ``OUT/<name>/`` (the workdir) and ``OUT/<name>.npz`` (per-step losses and the final
params, read back from the Orbax checkpoint) for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS = 3


def tiny_config():
  from tests.train_utils import tiny_base_config

  # Global batch 16 in 2 micro-batches of 8: each micro-batch splits over 8 data-parallel devices.
  config = tiny_base_config(steps=STEPS, batch_size=16, grad_accum=2, ckpt_every=STEPS)
  config.stages.base.model.update(
    channel_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(16,)
  )
  config.stages.base.model.update(cross_attn_resolutions=(16,))
  return config


def run(out: str, name: str, mesh) -> None:
  from imagen_jax.train import train_and_evaluate

  train_and_evaluate(tiny_config(), os.path.join(out, name), mesh=mesh)


def _flat(params) -> dict[str, np.ndarray]:
  """``{"path/to/leaf": array}`` of a params tree, for ``np.savez``."""
  import jax

  return {
    jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def summarize(out: str, name: str) -> None:
  """Writes ``OUT/<name>.npz``: the logged losses and the final params from the checkpoint.

  Single-process only (Orbax restores are collective): the two-process test calls it itself.
  """

  from imagen_jax.tools.inspect_checkpoint import load_state

  workdir = os.path.join(out, name)
  with open(os.path.join(workdir, "base", "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  state = load_state(os.path.join(workdir, "base", "checkpoints", str(STEPS)))
  np.savez(os.path.join(out, f"{name}.npz"), losses=np.asarray(losses), **_flat(state["params"]))


def save_init(out: str) -> None:
  """Writes ``OUT/init.npz``: the params the trainer starts from (same seed and code path)."""
  import jax

  from imagen_jax.stage import model as model_lib

  config = tiny_config()
  model = model_lib.StageModel.create(config.stages.base, text_dim=64, seed=config.seed)
  params = jax.jit(model.init_params)()
  np.savez(os.path.join(out, "init.npz"), losses=np.zeros(0), **_flat(params))


def restore_onto(out: str, source: str) -> dict:
  """Restores ``source``'s checkpoint onto other meshes; reports equality and shard sizes."""
  import jax

  from imagen_jax import checkpoint as ckpt_lib
  from imagen_jax import config as config_lib
  from imagen_jax import sharding
  from imagen_jax.stage import model as model_lib
  from imagen_jax.stage import optim
  from imagen_jax.stage import step as step_lib
  from imagen_jax.tools.inspect_checkpoint import load_state

  config = tiny_config()
  stage = config.stages.base
  model = model_lib.StageModel.create(stage, text_dim=64, seed=config.seed)
  tx, _ = optim.make_optimizer(stage.optimizer, stage.total_steps)
  rules = config_lib.logical_rules(config)
  ckdir = os.path.join(out, source, "base", "checkpoints")
  saved = load_state(os.path.join(ckdir, str(STEPS)))
  report = {}
  targets = {
    "fsdp8": sharding.make_mesh({"data": 1, "fsdp": 8}),
    "fsdp4_tensor2": sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}),
    "one_device": sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
  }
  for name, mesh in targets.items():
    abstract = step_lib.abstract_state(model, tx, step_lib.state_shardings(model, tx, mesh, rules))
    ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1000)
    state = ckpt.restore(abstract)
    ckpt.close()
    same = all(
      np.array_equal(np.asarray(a), b)
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved))
    )
    # The largest kernel: how much of it one device holds, and where the state lives.
    big = max(jax.tree.leaves(state["params"]), key=lambda x: x.size)
    shard = big.addressable_shards[0].data
    report[name] = {
      "identical": same,
      "devices": len(big.sharding.device_set),
      "opt_devices": len(jax.tree.leaves(state["opt_state"])[-1].sharding.device_set),
      "fraction": shard.size / big.size,
      "spec": str(big.sharding.spec),
      "shape": list(big.shape),
    }
  return report


def main() -> None:
  mode, out = sys.argv[1], sys.argv[2]
  if mode == "process":
    port, pid = int(sys.argv[3]), int(sys.argv[4])
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from imagen_jax import sharding

    run(out, "two_processes", sharding.make_mesh({"data": 1, "fsdp": -1}))
    jax.distributed.shutdown()
    return
  import jax

  from imagen_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  meshes = {
    "one_device": sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
    "data2_fsdp2_tensor2": sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
  }
  for name, mesh in meshes.items():
    run(out, name, mesh)
    summarize(out, name)
  save_init(out)
  with open(os.path.join(out, "restore.json"), "w") as f:
    json.dump(restore_onto(out, "data2_fsdp2_tensor2"), f)
  # compile_check on the same mesh compiles the same program (a compilation-cache hit).
  from imagen_jax.tools.compile_check import check_stage

  with open(os.path.join(out, "compile_check.json"), "w") as f:
    json.dump(check_stage(tiny_config(), "base", meshes["data2_fsdp2_tensor2"]), f)


if __name__ == "__main__":
  main()
