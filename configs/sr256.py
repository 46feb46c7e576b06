"""Imagen 64→256 super-resolution stage (App. F.2): the 600M-parameter Efficient U-Net.

Paper recipe (§4.1, App. F): Adam (0.9, 0.999, 1e-8), lr 1e-4 with 10k warmup, batch 2048, 2.5M
steps, 10% text dropout, EMA, cosine schedule, noise-conditioning augmentation of the 64² input
(random aug level in training).

  python train.py --config=configs/sr256.py --config.data.source=folder \\
      --config.data.path=/data/images --config.text.encoder=/ckpt/t5-v1_1-xxl --workdir=runs/sr256
  python train.py --config=configs/sr256.py:tiny --workdir=runs/sr256_tiny     # CPU-sized, shapes

Parameter count from shapes only (last line `params: N`, ≈572M):

  python -m imagen_jax.tools.count_params --config configs/sr256.py
"""

from __future__ import annotations

from imagen_jax.config import paper_config, stage_config, tiny_overrides


def get_config(arg: str | None = None):
  """``arg``: "" for the paper preset, "tiny" for the CPU-sized 32²→128² preset on shapes.

  The tiny presets chain like the paper's: ``base64:tiny`` makes 32², ``sr256:tiny`` takes it to
  128², ``sr1024:tiny`` to 512², so ``sample.py --workdir=a,b,c`` samples the three runs.
  """
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/sr256.py: unknown arg {arg!r}; use nothing or 'tiny'")
  tiny = arg == "tiny"
  if tiny:
    stage = stage_config("sr256", "tiny_sr", image_size=128, lowres_size=32)
    # tiny_sr is built for 64²; at 128² its attention stays on the deepest level (16²).
    stage.model.update(
      image_size=128, lowres_size=32, attn_resolutions=(16,), cross_attn_resolutions=(16,)
    )
  else:
    stage = stage_config("sr256", "sr256", image_size=256, lowres_size=64)
    stage.compute_dtype = "bfloat16"
  stage.optimizer.name = "adam"
  config = paper_config(stage)
  if tiny:
    tiny_overrides(config)
  return config
