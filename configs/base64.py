"""Imagen 64×64 text-to-image base stage (App. F.1): the 2B-parameter ADM U-Net.

Paper recipe (§4.1, App. F): Adafactor, lr 1e-4 with 10k linear warmup then cosine decay, batch
2048, 2.5M steps, 10% text dropout for classifier-free guidance, EMA 0.9999, cosine log-SNR
schedule, epsilon prediction, frozen T5-XXL text embeddings (length 128).

  python train.py --config=configs/base64.py --config.data.source=folder \\
      --config.data.path=/data/images --config.text.encoder=/ckpt/t5-v1_1-xxl --workdir=runs/base64
  python train.py --config=configs/base64.py:tiny --workdir=runs/base64_tiny   # CPU-sized, shapes

Parameter count from shapes only (last line `params: N`, ≈2.18B):

  python -m imagen_jax.tools.count_params --config configs/base64.py
"""

from __future__ import annotations

from imagen_jax.config import paper_config, stage_config, tiny_overrides


def get_config(arg: str | None = None):
  """``arg``: "" for the paper preset, "tiny" for the CPU-sized preset on the shapes data."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/base64.py: unknown arg {arg!r}; use nothing or 'tiny'")
  tiny = arg == "tiny"
  stage = stage_config("base", "tiny_base" if tiny else "base64", image_size=32 if tiny else 64)
  stage.optimizer.name = "adafactor"  # "default optax.adafactor parameters" (App. F)
  stage.compute_dtype = "float32" if tiny else "bfloat16"
  config = paper_config(stage)
  if tiny:
    tiny_overrides(config)
  return config
