"""The sampling command line (``sample.py``, ``imagen-jax-sample``): absl flags → PNGs.

  imagen-jax-sample --workdir=runs/shapes --prompt="a large blue square in the center"

What it does is :func:`imagen_jax.sample.cli.run`; every flag is checked (and ``--init_image``
read) before a checkpoint is loaded, and a mistake is one ``error: ...`` line
(:mod:`imagen_jax.tools.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import jax
from absl import flags
from absl import logging as absl_logging

from imagen_jax import sharding
from imagen_jax.sample import cli as sample_cli
from imagen_jax.tools import cli

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
_MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Device mesh axis sizes, e.g. data=2,fsdp=4 (weights FSDP-sharded over 4 devices); "
  "default data over all devices (weights replicated). Same axes as config.mesh.",
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize() (multi-process GPU / TPU pod)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_bool("debug", False, cli.DEBUG_HELP)


def main(argv: list[str]) -> None:
  """Samples from ``--workdir`` (absl main: flags are parsed)."""
  cli.reject_positional(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)
  # The flags that need no run are checked first: a typo costs nothing.
  settings = sample_cli.parse_settings(_SET.value)
  mesh = sharding.parse_mesh(_MESH.value) or None
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  prompts = sample_cli.read_prompts(_PROMPT.value, _PROMPTS_FILE.value, _WORKDIR.value)
  paths = sample_cli.run(
    workdir=_WORKDIR.value,
    prompts=prompts,
    num_images=_NUM.value,
    seed=_SEED.value,
    outdir=_OUTDIR.value,
    settings=settings,
    negative_prompt=_NEGATIVE.value,
    stages=_STAGES.value,
    start_stage=_START.value,
    init_image=_INIT.value,
    strength=_STRENGTH.value,
    max_batch=_MAX_BATCH.value,
    compilation_cache=_CACHE.value,
    mesh=mesh,
  )
  if jax.process_index() != 0:
    return
  print(f"Wrote {len(paths['images'])} images, grid {paths['grid']}")
  print(f"Images are in {paths['outdir']}")


def run(argv: Sequence[str] | None = None) -> NoReturn:
  """The ``imagen-jax-sample`` / ``python sample.py`` entry point: parse, sample, exit."""
  cli.run_absl(main, argv=argv, flags_module=__name__)
