"""Imagen 256→1024 super-resolution stage (App. F.3): the 400M-parameter Efficient U-Net.

No self-attention; text cross-attention in the last block. Trained on 256² crops of 1024² images
with the matching 64² crops of the 256² input (§2.5), Adam, lr 1e-4, 10k warmup, batch 2048, and
the 1000-step linear β schedule (1e-4 → 0.02) in continuous time. Samples take the full 256² input.

  python train.py --config=configs/sr1024.py --config.data.source=folder \\
      --config.data.path=/data/images --config.text.encoder=/ckpt/t5-v1_1-xxl --workdir=runs/sr1024
  python train.py --config=configs/sr1024.py:tiny --workdir=runs/sr1024_tiny   # CPU-sized, shapes

Parameter count from shapes only (last line `params: N`, ≈445M):

  python -m imagen_jax.tools.count_params --config configs/sr1024.py
"""

from __future__ import annotations

from imagen_jax.config import paper_config, stage_config, tiny_overrides


def get_config(arg: str | None = None):
  """``arg``: "" for the paper preset, "tiny" for the CPU-sized 128²→512² preset (128² crops).

  As in the paper (§2.5), the stage trains on crops (a quarter of the side) and samples at the full
  size; ``base64:tiny`` → ``sr256:tiny`` → ``sr1024:tiny`` chain 32² → 128² → 512².
  """
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/sr1024.py: unknown arg {arg!r}; use nothing or 'tiny'")
  tiny = arg == "tiny"
  if tiny:
    stage = stage_config("sr1024", "tiny_sr1024", image_size=512, lowres_size=128, crop_size=128)
    # tiny_sr1024 is built for 64²; at 512² its text attention stays on the deepest level (64²).
    stage.model.update(image_size=512, lowres_size=128, cross_attn_resolutions=(64,))
  else:
    stage = stage_config("sr1024", "sr1024", image_size=1024, lowres_size=256, crop_size=256)
    stage.compute_dtype = "bfloat16"
  stage.schedule = "linear"
  stage.optimizer.name = "adam"
  config = paper_config(stage)
  if tiny:
    tiny_overrides(config)
  return config
