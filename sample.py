"""Sample images from a trained cascade (every stage), write PNGs, a grid and metadata.json.

  python sample.py                                   # the latest `python train.py` demo run
  python sample.py --workdir=runs/shapes --prompt="a large blue square in the center" --num_images=4
  python sample.py --prompts_file=prompts.txt --set=sr.steps=50 --set=base.guidance=7
  python sample.py --start_stage=sr --init_image=low.png      # upscale-only
  python sample.py --start_stage=base --init_image=x.png --strength=0.6   # img2img
  python sample.py --workdir=runs/base64,runs/sr256,runs/sr1024 --prompt="a corgi"  # run/stage

See README.md ("Sampling") for every option.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

_WORKDIR = flags.DEFINE_list(
  "workdir",
  ["runs/shapes"],
  "A train.py workdir, or several comma-separated (e.g. runs/base64,runs/sr256,runs/sr1024: "
  "stages trained as separate runs), whose stages form the cascade in that order.",
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt for every image.")
_NUM = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (same seed + settings = same PNGs).")
_OUTDIR = flags.DEFINE_string(
  "outdir", None, "Output directory (default <first workdir>/samples_cli)."
)
_SET = flags.DEFINE_multi_string(
  "set",
  [],
  "Per-stage setting STAGE.FIELD=VALUE (sampler, steps, guidance, thresholding, "
  "percentile, aug_level, eta), e.g. --set=sr.steps=50; STAGE may be * for all stages.",
)
_STAGES = flags.DEFINE_list("stages", None, "Subset of stages to load (default: all).")
_START = flags.DEFINE_string("start_stage", None, "Start at this stage (needs --init_image).")
_INIT = flags.DEFINE_string("init_image", None, "PNG/JPEG: low-res input or img2img start.")
_STRENGTH = flags.DEFINE_float("strength", None, "img2img strength in (0, 1].")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Largest batch per compiled call.")
_CACHE = flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache dir.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from imagen_jax.sample import cli

  prompts = cli.read_prompts(_PROMPT.value, _PROMPTS_FILE.value, _WORKDIR.value)
  paths = cli.run(
    workdir=_WORKDIR.value,
    prompts=prompts,
    num_images=_NUM.value,
    seed=_SEED.value,
    outdir=_OUTDIR.value,
    settings=cli.parse_settings(_SET.value),
    negative_prompt=_NEGATIVE.value,
    stages=_STAGES.value,
    start_stage=_START.value,
    init_image=_INIT.value,
    strength=_STRENGTH.value,
    max_batch=_MAX_BATCH.value,
    compilation_cache=_CACHE.value,
  )
  print(f"Wrote {len(paths['images'])} images, grid {paths['grid']}")
  print(f"Images are in {paths['outdir']}")


if __name__ == "__main__":
  app.run(main)
