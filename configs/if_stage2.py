"""Fine-tuning DeepFloyd IF's stage II (64² → 256²) on your images, with this project's trainer.

The U-Net's architecture and weights come from the IF-II checkpoint (``init_from``: a diffusers
pipeline directory with ``unet/`` and ``scheduler/``). IF-II ships no text encoder: T5 comes from
``config.text.encoder`` (IF-I's pipeline directory, whose ``text_encoder/`` + ``tokenizer/`` are
read, or a T5-v1.1-XXL checkpoint / hub id). As in IF's pipeline, the 64² input is upscaled to
256² (bilinear, ``align_corners=True``) before it is noise-augmented, and the U-Net reads the
augmentation level as its class label. The loss is IF's L_simple on ε; the learned-variance head
is kept as loaded. The DeepFloyd IF licence applies to the weights (see README, "DeepFloyd IF").

  python train.py --config=configs/if_stage2.py --config.init_from=/ckpt/IF-II-L-v1.0 \\
    --config.text.encoder=/ckpt/IF-I-XL-v1.0 --config.data.path=/data/my_images \\
    --workdir=runs/if2_ft
  python train.py --config=configs/if_stage2.py:tiny --workdir=runs/if2_tiny   # CPU smoke run
  python sample.py --workdir=runs/if2_ft --init_image=dog64.png --prompt="a photo of sks dog"

Args (``--config=configs/if_stage2.py:ARG``): ``""`` (a real IF stage II from ``init_from``; the
data is an image folder with captions, see README "Training on your own images"), ``tiny``
(a tiny random IF-II-like U-Net, 16² → 32², on the ``shapes`` demo data, or ``init_from`` a tiny
checkpoint).
"""

from __future__ import annotations

import ml_collections

from imagen_jax.config import run_config, stage_config
from imagen_jax.text import DEFAULT_T5


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/if_stage2.py: unknown arg {arg!r}; choose '' or 'tiny'")
  tiny = arg == "tiny"
  config = run_config()
  config.init_from = ml_collections.FieldReference("")
  stage = stage_config(
    "if_stage2",
    "tiny_sr" if tiny else "IF-II-L",  # used only when init_from is not a diffusers checkpoint
    32 if tiny else 256,
    16 if tiny else 64,
    schedule="ddpm_squaredcos_cap_v2",  # IF's 1000-step table (also for the augmentation)
    objective="eps",
    batch_size=4 if tiny else 8,
    total_steps=4 if tiny else 2_000,
    ema_decay=0.999,
    max_aug_level=1.0,  # IF-II was trained on every noise level of its input (0-999)
    ckpt_every=2 if tiny else 500,
    log_every=1 if tiny else 50,
    eval_every=0 if tiny else 500,
    num_eval_samples=4 if tiny else 8,
    final_eval=not tiny,
    compute_dtype="float32" if tiny else "bfloat16",  # params and optimizer state stay fp32
  )
  stage.model.family = "if"
  stage.init_from = config.get_ref("init_from")
  stage.optimizer.update(
    name="adamw", lr=1e-5, schedule="constant", warmup_steps=0 if tiny else 100
  )
  # IF-II's sampling defaults: 50 DDPM steps with the learned variance, guidance 4, noise
  # level 250 of 1000 on the upscaled input.
  stage.sample.update(
    sampler="ancestral",
    steps=4 if tiny else 50,
    guidance=4.0,
    percentile=95.0,
    threshold_max=1.5,
    aug_level=0.251,
  )
  config.stages = ml_collections.ConfigDict({"if_stage2": stage})
  config.stage_order = ("if_stage2",)
  config.text.max_length = 77
  config.text.zero_padding = False  # IF's null condition: the empty prompt's states
  if tiny:
    config.text.encoder = "shapes_demo"
    config.text.max_length = 16
    config.data.source = "shapes"
    config.data.shuffle = False
  else:
    config.text.encoder = DEFAULT_T5  # IF's T5; or IF-I's pipeline dir
    config.text.dtype = "bfloat16"
    config.data.source = "folder"
    config.data.crop = "center"
  return config
