"""Fine-tuning DeepFloyd IF's stage I (64²) on your images, with this project's trainer.

The U-Net's architecture and weights come from the IF checkpoint (``init_from``: a diffusers
pipeline directory with ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``), T5 from
the same directory; the trainer is the one every stage uses (Orbax checkpoints, exact resume,
the device mesh). The loss is IF's L_simple on ε; the learned-variance head is kept as loaded.
The DeepFloyd IF licence applies to the weights (see README, "DeepFloyd IF").

  python train.py --config=configs/if_stage1.py --config.init_from=/ckpt/IF-I-XL-v1.0 \\
    --config.data.path=/data/my_images --workdir=runs/if_ft
  python train.py --config=configs/if_stage1.py:tiny --workdir=runs/if_tiny   # CPU smoke run
  python sample.py --workdir=runs/if_ft --prompt="a photo of sks dog"

Args (``--config=configs/if_stage1.py:ARG``): ``""`` (a real IF stage I from ``init_from``; the
data is an image folder with captions, see README "Training on your own images"), ``tiny``
(a tiny random IF-like U-Net on the ``shapes`` demo data, or ``init_from`` a tiny checkpoint).
"""

from __future__ import annotations

import ml_collections

from imagen_jax.config import run_config, stage_config


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/if_stage1.py: unknown arg {arg!r}; choose '' or 'tiny'")
  tiny = arg == "tiny"
  config = run_config()
  # init_from is shared: the stage's U-Net and (for the real model) T5 come from it.
  config.init_from = ml_collections.FieldReference("")
  stage = stage_config(
    "if_stage1",
    "tiny" if tiny else "IF-I-XL",  # used only when init_from is not a diffusers checkpoint
    32 if tiny else 64,
    schedule="ddpm_squaredcos_cap_v2",  # IF's 1000-step table
    objective="eps",
    batch_size=4 if tiny else 16,
    total_steps=4 if tiny else 2_000,
    ema_decay=0.999,
    ckpt_every=2 if tiny else 500,
    log_every=1 if tiny else 50,
    eval_every=0 if tiny else 500,
    num_eval_samples=4 if tiny else 8,
    final_eval=not tiny,
    compute_dtype="float32" if tiny else "bfloat16",  # params and optimizer state stay fp32
  )
  stage.model.family = "if"
  stage.init_from = config.get_ref("init_from")
  # A constant learning rate after warmup, as diffusers' fine-tuning scripts default to.
  stage.optimizer.update(
    name="adamw", lr=1e-5, schedule="constant", warmup_steps=0 if tiny else 100
  )
  stage.sample.update(
    sampler="ancestral", steps=4 if tiny else 100, guidance=7.0, percentile=95.0, threshold_max=1.5
  )
  config.stages = ml_collections.ConfigDict({"if_stage1": stage})
  config.stage_order = ("if_stage1",)
  # IF's text: T5 states of 77 tokens, padding not zeroed; text dropout gives the empty prompt.
  config.text.max_length = 77
  config.text.zero_padding = False
  if tiny:
    config.text.encoder = "shapes_demo"
    config.text.max_length = 16
    config.data.source = "shapes"
    config.data.shuffle = False
  else:
    config.text.encoder = config.get_ref("init_from")
    config.text.dtype = "bfloat16"
    config.data.source = "folder"
    config.data.crop = "center"
  return config
