"""The sampling command line (``sample.py``, ``imagen-jax-sample``): absl flags → PNGs.

  imagen-jax-sample --workdir=runs/shapes --prompt="a large blue square in the center"

What it does is :func:`imagen_jax.sample.cli.run`, :func:`imagen_jax.edit.cli.run`
(prompt-to-prompt, ``--edit_prompt``) or one of :mod:`imagen_jax.edit.image_cli`'s operations on
real images (``--mask``, ``--outpaint``, ``--variations``, ``--interpolate``, ``--text_diff``,
``--invert``: one per run, see :func:`~imagen_jax.edit.image_cli.check_flags`); every flag is
checked (and every input image read) before a checkpoint is loaded, and a mistake is one
``error: ...`` line (:mod:`imagen_jax.tools.cli`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NoReturn

import jax
from absl import flags
from absl import logging as absl_logging

from imagen_jax import sharding
from imagen_jax.clip import CLIP
from imagen_jax.edit import cli as edit_cli
from imagen_jax.edit import image_cli
from imagen_jax.edit.attention_edit import MODES, PromptToPrompt
from imagen_jax.sample import cli as sample_cli
from imagen_jax.sample.clip_guidance import ClipGuidance
from imagen_jax.tools import cli

_WORKDIR = flags.DEFINE_list(
  "workdir",
  ["runs/shapes"],
  "A train.py workdir, or several comma-separated (e.g. runs/base64,runs/sr256,runs/sr1024: "
  "stages trained as separate runs), whose stages form the cascade in that order.",
)
_IF_DIRS = flags.DEFINE_list(
  "if_dirs",
  None,
  "DeepFloyd IF pipeline directories (diffusers format), base first, instead of --workdir: "
  "e.g. /ckpt/IF-I-XL-v1.0,/ckpt/IF-II-L-v1.0 (the DeepFloyd IF licence applies).",
)
_IF_T5 = flags.DEFINE_string(
  "if_t5", None, "T5 for --if_dirs (default: text_encoder/ of the first)."
)
_IF_VARIANT = flags.DEFINE_string("if_variant", None, "--if_dirs weight variant, e.g. fp16.")
_IF_DTYPE = flags.DEFINE_enum("if_dtype", "float32", ["float32", "bfloat16"], "--if_dirs compute.")
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
  "Per-stage setting STAGE.FIELD=VALUE (sampler, steps, spacing, guidance, thresholding, "
  "percentile, aug_level, eta, noise_scale), e.g. --set=sr.steps=50; STAGE may be * for all.",
)
_STAGES = flags.DEFINE_list("stages", None, "Subset of stages to load (default: all).")
_START = flags.DEFINE_string("start_stage", None, "Start at this stage (needs --init_image).")
_INIT = flags.DEFINE_string("init_image", None, "PNG/JPEG: low-res input or img2img start.")
_STRENGTH = flags.DEFINE_float("strength", None, "img2img strength in (0, 1].")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Largest batch per compiled call.")
_CACHE = flags.DEFINE_string("compilation_cache", None, cli.COMPILATION_CACHE_HELP)
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
# Prompt-to-prompt editing (imagen_jax.edit): one --prompt (the source) and --edit_prompt(s).
_EDIT_PROMPT = flags.DEFINE_multi_string(
  "edit_prompt", None, "Prompt-to-prompt: an edited version of the one --prompt (repeatable)."
)
_EDIT = flags.DEFINE_enum("edit", "replace", MODES, "Edit: word swap, added words, reweight.")
_CROSS = flags.DEFINE_float("cross_replace", 0.8, "Fraction of steps with the source's text maps.")
_SELF = flags.DEFINE_float("self_replace", 0.4, "Fraction of steps with the source's self maps.")
_REWEIGHT = flags.DEFINE_multi_string("reweight", [], "WORD:SCALE attention scale (repeatable).")
_BLEND = flags.DEFINE_list("local_blend", None, "Words whose maps confine the edit: red,blue")
_EDIT_STAGES = flags.DEFINE_list("edit_stages", None, "Stages that get the edit (default: all).")
_MAPS = flags.DEFINE_bool("attention_maps", False, "Write per-word attention overlays (PNG).")
# Editing real images (imagen_jax.edit.image_cli): one operation per run.
_MASK = flags.DEFINE_string("mask", None, "Inpaint --init_image: a PNG, white = regenerate.")
_OUTPAINT = flags.DEFINE_list(
  "outpaint", None, "Outpaint --init_image by margins in last-stage pixels: left:16,right:8,top:8"
)
_RESAMPLE = flags.DEFINE_integer("resample", None, "In/outpainting: RePaint resamplings (1).")
_JUMP = flags.DEFINE_integer("jump", None, "In/outpainting: RePaint jump length, in steps (1).")
_VARIATIONS = flags.DEFINE_bool(
  "variations", False, "--num_images variations of --init_image (one --prompt: its caption)."
)
_STOCHASTICITY = flags.DEFINE_float("stochasticity", 0.5, "Variations: DDIM eta (0 = the image).")
_INTERPOLATE = flags.DEFINE_list(
  "interpolate", None, "Interpolate a.png,b.png (one --prompt for both, or one each); GIF too."
)
_FRAMES = flags.DEFINE_integer("frames", 8, "Interpolation frames, the two images included.")
_TEXT_DIFF = flags.DEFINE_string(
  "text_diff", None, "Text-diff edit of --init_image toward this prompt (--prompt: its caption)."
)
_ETA = flags.DEFINE_list("eta", ["0.5"], "Text diff: how far to go, e.g. 0,0.5,1 (an image each).")
_INVERT = flags.DEFINE_bool(
  "invert",
  False,
  "Invert --init_image under --prompt: its reconstruction and PSNR; with --edit_prompt, "
  "prompt-to-prompt on the image.",
)
_NULL_TEXT = flags.DEFINE_bool("null_text", True, "--invert: null-text inversion (under guidance).")
# CLIP guidance (GLIDE §2.3): imagen_jax.sample.clip_guidance.
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint dir or hub id, for --clip_guidance.")
_CLIP_SCALE = flags.DEFINE_float("clip_guidance", 0.0, "CLIP guidance scale s (0 = off).")
_CLIP_CUTOUTS = flags.DEFINE_integer("clip_cutouts", 0, "Random crops scored per step (0: whole).")
_CLIP_STAGES = flags.DEFINE_list("clip_stages", None, "Stages to guide (default: the first).")
flags.DEFINE_bool("debug", False, cli.DEBUG_HELP)
_EDIT_ONLY = ("edit", "cross_replace", "self_replace", "reweight", "local_blend", "edit_stages")


def _edit_settings() -> PromptToPrompt | None:
  """The edit flags as settings (``None`` without ``--edit_prompt``); misuse fails fast."""
  if not _EDIT_PROMPT.value:
    used = [f"--{n}" for n in _EDIT_ONLY + ("attention_maps",) if flags.FLAGS[n].present]
    if used:
      raise ValueError(f"{', '.join(used)} need --edit_prompt (prompt-to-prompt editing)")
    return None
  if len(_PROMPT.value or []) != 1 or _PROMPTS_FILE.value:
    raise ValueError("--edit_prompt edits exactly one --prompt (the source); pass one --prompt")
  if _NUM.value != 1:
    raise ValueError("--num_images does not apply to edits (source and edits share one noise)")
  return PromptToPrompt(
    mode=_EDIT.value,
    cross_replace=_CROSS.value,
    self_replace=_SELF.value,
    reweight=edit_cli.parse_reweight(_REWEIGHT.value) or None,
    local_blend=tuple(_BLEND.value) if _BLEND.value else None,
    stages=tuple(_EDIT_STAGES.value) if _EDIT_STAGES.value else None,
  )


def _edit_image(op: str, edit: PromptToPrompt | None, source: dict) -> dict:
  """Runs the image operation ``op`` (flags checked by :func:`image_cli.check_flags`)."""
  prompts, kw = list(_PROMPT.value or []), dict(seed=_SEED.value, outdir=_OUTDIR.value)
  if op in ("mask", "outpaint"):
    return image_cli.inpaint(
      source,
      init_image=_INIT.value,
      prompts=sample_cli.read_prompts(prompts, _PROMPTS_FILE.value, _WORKDIR.value),
      mask=_MASK.value,
      outpaint=image_cli.parse_outpaint(_OUTPAINT.value) if _OUTPAINT.value else None,
      num_images=_NUM.value,
      resample=_RESAMPLE.value or 1,
      jump=_JUMP.value or 1,
      negative_prompt=_NEGATIVE.value,
      **kw,
    )
  if op == "variations":
    return image_cli.variations(
      source,
      init_image=_INIT.value,
      prompt=prompts[0],
      num_images=_NUM.value,
      stochasticity=_STOCHASTICITY.value,
      **kw,
    )
  if op == "interpolate":
    return image_cli.interpolate(
      source, images=_INTERPOLATE.value, prompts=prompts, frames=_FRAMES.value, **kw
    )
  if op == "text_diff":
    return image_cli.text_diff(
      source,
      init_image=_INIT.value,
      source_prompt=prompts[0],
      target_prompt=_TEXT_DIFF.value,
      eta=image_cli.parse_eta(_ETA.value),
      **kw,
    )
  return image_cli.invert(
    source,
    init_image=_INIT.value,
    prompt=prompts[0],
    null_text=_NULL_TEXT.value,
    edit_prompts=_EDIT_PROMPT.value or (),
    edit=edit,
    attention_maps=_MAPS.value,
    **kw,
  )


def _if_args() -> dict:
  """The DeepFloyd IF flags (empty without ``--if_dirs``); misuse fails before any load."""
  if not _IF_DIRS.value:
    used = [f"--{n}" for n in ("if_t5", "if_variant", "if_dtype") if flags.FLAGS[n].present]
    if used:
      raise ValueError(f"{', '.join(used)} need --if_dirs (DeepFloyd IF stages)")
    return {}
  if flags.FLAGS["workdir"].present:
    raise ValueError("--if_dirs replaces --workdir: pass one of them")
  return dict(
    if_dirs=_IF_DIRS.value,
    if_t5=_IF_T5.value,
    if_variant=_IF_VARIANT.value,
    if_dtype=_IF_DTYPE.value,
  )


def _clip_guidance(op: str | None, edit: PromptToPrompt | None) -> ClipGuidance | None:
  """The CLIP guidance flags as a guide (``None`` when off); misuse fails before any load."""
  used = [f"--{n}" for n in ("clip", "clip_cutouts", "clip_stages") if flags.FLAGS[n].present]
  if _CLIP_SCALE.value == 0.0:
    if used:
      raise ValueError(f"{', '.join(used)} need --clip_guidance=SCALE (> 0)")
    return None
  if _CLIP_SCALE.value < 0 or _CLIP_CUTOUTS.value < 0:
    raise ValueError("--clip_guidance and --clip_cutouts must be >= 0")
  if not _CLIP.value:
    raise ValueError("--clip_guidance needs --clip=DIR (a CLIPModel checkpoint dir or hub id)")
  if op is not None or edit is not None:
    raise ValueError("--clip_guidance applies to plain sampling, not to edits or image operations")
  return ClipGuidance(
    CLIP.load(_CLIP.value),
    _CLIP_SCALE.value,
    cutouts=_CLIP_CUTOUTS.value,
    stages=_CLIP_STAGES.value,
    seed=_SEED.value,
  )


def main(argv: list[str]) -> None:
  """Samples from ``--workdir`` (absl main: flags are parsed)."""
  cli.reject_positional(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)
  # The flags that need no run are checked first: a typo costs nothing.
  settings = sample_cli.parse_settings(_SET.value)
  mesh = sharding.parse_mesh(_MESH.value) or None
  given = {n: flags.FLAGS[n].value for n in image_cli.FLAGS if flags.FLAGS[n].present}
  op = image_cli.check_flags(given)
  multihost = bool(_MULTIHOST.value or _COORDINATOR.value)
  if multihost:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # Before anything compiles (a --clip CLIP load too): JAX opens its cache at the first compile.
  shared = None
  if multihost and not _IF_DIRS.value:
    shared = os.path.join(_WORKDIR.value[0], ".jax_cache")
  cli.enable_compilation_cache(_CACHE.value, shared_dir=shared)
  edit = _edit_settings()
  guide = _clip_guidance(op, edit)
  if_args = _if_args()
  source = dict(
    workdir=None if if_args else _WORKDIR.value,
    settings=settings,
    stages=_STAGES.value,
    max_batch=_MAX_BATCH.value,
    mesh=mesh,
    **if_args,
  )
  common = dict(
    seed=_SEED.value,
    outdir=_OUTDIR.value,
    negative_prompt=_NEGATIVE.value,
    start_stage=_START.value,
    init_image=_INIT.value,
    strength=_STRENGTH.value,
    **source,
  )
  if op is not None:
    paths = _edit_image(op, edit, source)
  elif edit is not None:
    paths = edit_cli.run(
      source_prompt=_PROMPT.value[0],
      edit_prompts=_EDIT_PROMPT.value,
      edit=edit,
      attention_maps=_MAPS.value,
      **common,
    )
  else:
    prompts = sample_cli.read_prompts(_PROMPT.value, _PROMPTS_FILE.value, source["workdir"])
    paths = sample_cli.run(prompts=prompts, num_images=_NUM.value, guide=guide, **common)
  if jax.process_index() != 0:
    return
  print(f"Wrote {len(paths['images'])} images, grid {paths['grid']}")
  if paths.get("attention"):
    print(f"Wrote {len(paths['attention'])} attention-map images")
  for key in ("canvas", "mask", "gif"):
    if paths.get(key):
      print(f"Wrote {paths[key]}")
  for stage, db in (paths.get("psnr") or {}).items():
    print(f"Reconstruction PSNR ({stage}): " + ("exact" if db is None else f"{db} dB"))
  print(f"Images are in {paths['outdir']}")


def run(argv: Sequence[str] | None = None) -> NoReturn:
  """The ``imagen-jax-sample`` / ``python sample.py`` entry point: parse, sample, exit."""
  cli.run_absl(main, argv=argv, flags_module=__name__)
