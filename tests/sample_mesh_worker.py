"""Subprocess side of tests/test_sample_mesh.py: samples one run on several meshes of 8 devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sample_mesh_worker.py WORKDIR OUT

Writes ``OUT/<case>.npz`` (one array per stage) for each case: the same prompts and seed on one
device, on data=8 and on data=2 × fsdp=2 × tensor=2, plus upscale-only and img2img on data=8,
and inpainting and null-text inversion + reconstruction (imagen_jax.edit.image_ops) on one device
and on data=2 × fsdp=2 × tensor=2; ``OUT/placement.json`` records how the weights were laid out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from imagen_jax import sharding
from imagen_jax.edit import image_ops
from imagen_jax.sample.cascade import Cascade

PROMPTS = ["a small red circle at the top left", "a large blue square in the center", "a cat"]


def main(workdir: str, out: str) -> None:
  out_dir = Path(out)
  assert jax.device_count() == 8, jax.devices()
  meshes = {
    "one": sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
    "data8": {"data": 8},
    "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
  }
  placement = {}
  for case, mesh in meshes.items():
    cascade = Cascade.from_workdir(workdir, max_batch=4, mesh=mesh)
    images = cascade(PROMPTS, seed=3, progress=False)  # 3 images: padded to the data axis
    np.savez(out_dir / f"{case}.npz", **images)
    params = cascade.stages[0].params
    leaves = jax.tree.leaves(params)
    biggest = max(leaves, key=lambda x: x.size)
    placement[case] = {
      "devices": len(cascade.mesh.devices.flat),
      "text_devices": len(jax.tree.leaves(cascade.text.encoder.state)[0].sharding.device_set),
      "largest_param_shard_fraction": float(
        np.prod(biggest.sharding.shard_shape(biggest.shape)) / biggest.size
      ),
    }
    if case == "one":
      low = images["base"]
  cascade = Cascade.from_workdir(workdir, max_batch=4, mesh={"data": 8})
  up = cascade(PROMPTS, seed=3, start_stage="sr", init_image=low, progress=False)
  np.savez(out_dir / "upscale_data8.npz", **up)
  i2i = cascade(PROMPTS, seed=3, init_image=np.tanh(low), strength=0.6, progress=False)
  np.savez(out_dir / "img2img_data8.npz", **i2i)
  one = Cascade.from_workdir(workdir, max_batch=4, mesh=meshes["one"])
  np.savez(
    out_dir / "upscale_one.npz",
    **one(PROMPTS, seed=3, start_stage="sr", init_image=low, progress=False),
  )
  np.savez(
    out_dir / "img2img_one.npz",
    **one(PROMPTS, seed=3, init_image=np.tanh(low), strength=0.6, progress=False),
  )
  mask = np.zeros((len(PROMPTS), 64, 64), bool)
  mask[:, 16:48, 8:40] = True
  steps = {"base": {"steps": 4}, "sr": {"steps": 4}}
  for case in ("one", "d2f2t2"):
    c = Cascade.from_workdir(workdir, max_batch=4, mesh=meshes[case])
    np.savez(
      out_dir / f"inpaint_{case}.npz",
      **image_ops.inpaint(c, up["sr"], mask, PROMPTS[::-1], seed=1, resample=2, jump=1,
                          settings=steps, progress=False),
    )  # fmt: skip
    inv = image_ops.invert(c, up["sr"], PROMPTS, settings=steps, null_text=True, inner_steps=3)
    plain = inv.inputs(null_text=False)
    full = {k: {**steps[k], **v} for k, v in inv.settings.items()}
    rec = c.generate(PROMPTS, seed=inv.seed, settings=full, inputs=plain, progress=False)[0]
    np.savez(out_dir / f"reconstruct_{case}.npz", **rec)
    np.savez(out_dir / f"inversion_{case}.npz", **{k: v.latent for k, v in inv.stages.items()})
  (out_dir / "placement.json").write_text(json.dumps(placement))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
