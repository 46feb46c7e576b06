"""What ``sample.py`` does, as library functions: prompts in, PNGs + grid + metadata.json out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from imagen_jax import diffusion, metrics
from imagen_jax.data import shapes
from imagen_jax.data.preprocess import BadExample, to_rgb
from imagen_jax.sample import deepfloyd
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.clip_guidance import ClipGuidance
from imagen_jax.sample.runs import Workdirs, load_run_configs
from imagen_jax.sample.stage import SPACING_CHOICES

log = logging.getLogger(__name__)

_SETTING_TYPES = {
  "sampler": str,
  "steps": int,
  "guidance": float,
  "thresholding": str,
  "percentile": float,
  "aug_level": float,
  "eta": float,
  "noise_scale": float,
  "spacing": str,
}
# Checked here, so that a typo fails before any checkpoint is loaded (the samplers check too).
_SETTING_CHOICES = {
  "sampler": diffusion.ALL_SAMPLERS,
  "thresholding": diffusion.THRESHOLD_MODES,
  "spacing": SPACING_CHOICES,
}


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
  """``["sr.steps=50", "*.guidance=5"]`` → ``{"sr": {"steps": 50}, "*": {"guidance": 5.0}}``."""
  out: dict[str, dict[str, Any]] = {}
  for item in items:
    try:
      lhs, value = item.split("=", 1)
      stage, field = lhs.split(".", 1)
    except ValueError:
      raise ValueError(f"--set={item!r}: expected STAGE.FIELD=VALUE, e.g. sr.steps=50") from None
    if field not in _SETTING_TYPES:
      raise ValueError(
        f"--set={item!r}: unknown field {field!r}; choose from {list(_SETTING_TYPES)}"
      )
    try:
      typed = _SETTING_TYPES[field](value)
    except ValueError:
      raise ValueError(
        f"--set={item!r}: {field} must be a {_SETTING_TYPES[field].__name__}"
      ) from None
    choices = _SETTING_CHOICES.get(field)
    if choices and typed not in choices:
      raise ValueError(f"--set={item!r}: unknown {field} {typed!r}; choose one of {list(choices)}")
    if field == "steps" and typed < 1:
      raise ValueError(f"--set={item!r}: steps must be >= 1")
    out.setdefault(stage, {})[field] = typed
  return out


def read_prompts(
  prompts: Sequence[str] | None, prompts_file: str | None, workdir: Workdirs
) -> list[str]:
  """Prompts from flags and/or a file (non-UTF-8 bytes replaced and warned); demo defaults.

  The demo defaults apply when the (first) run in ``workdir`` trained on the shapes data.
  """
  out = list(prompts or [])
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise FileNotFoundError(f"--prompts_file={prompts_file}: no such file")
    with open(prompts_file, "rb") as f:
      raw = f.read().splitlines()
    bad = 0
    for line in raw:
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        text, bad = line.decode("utf-8", errors="replace"), bad + 1
      if text.strip():
        out.append(text.strip())
    if bad:
      log.warning(
        "%s: %d line(s) were not valid UTF-8; bad bytes replaced by U+FFFD", prompts_file, bad
      )
  if out:
    return out
  if workdir is None:  # DeepFloyd IF stages: no demo prompts
    raise ValueError("no prompts: pass --prompt=... (repeatable) or --prompts_file=...")
  config = load_run_configs(workdir)[0][1]
  if config.data.source == "shapes":
    return shapes.default_prompts(8, seed=1)
  raise ValueError("no prompts: pass --prompt=... (repeatable) or --prompts_file=...")


def load_image(path: str, flag: str = "--init_image") -> np.ndarray:
  """An image file given by ``flag`` as ``[1, H, W, 3]`` float32 in [-1, 1].

  Raises:
    ValueError: the file is missing, unreadable or not a decodable image (names the flag).
  """
  if not os.path.isfile(path):
    raise ValueError(f"{flag}={path}: no such file; pass a PNG or JPEG image")
  try:
    with Image.open(path) as img:
      rgb = to_rgb(img)  # decodes: a truncated file fails here, not at open
  except (OSError, SyntaxError, Image.DecompressionBombError, BadExample) as e:
    # PIL reports a corrupt file as UnidentifiedImageError (an OSError), a broken chunk as
    # OSError or SyntaxError; to_rgb reports an unconvertible mode as BadExample.
    raise ValueError(f"{flag}={path}: not a readable image ({e}); pass a PNG or JPEG") from e
  return np.asarray(rgb, np.float32)[None] / 127.5 - 1.0


def _check_start(
  stage_configs: dict[str, Any],
  names: Sequence[str],
  start_stage: str | None,
  init_image: str | None,
  strength: float | None,
) -> Any:
  """``--start_stage``, ``--init_image`` and ``--strength`` make a plan the cascade can run.

  The same rules as :meth:`Cascade.__call__`, with the flags' names. Returns the config of the
  first stage to run.
  """
  if start_stage is not None and start_stage not in names:
    raise ValueError(f"--start_stage={start_stage}: not a stage of the cascade; stages: {names}")
  first = stage_configs[start_stage or names[0]]
  if strength is not None and not 0.0 < strength <= 1.0:
    raise ValueError(f"--strength must be in (0, 1], got {strength}")
  if init_image is None:
    if strength is not None:
      raise ValueError("--strength needs --init_image (the image to start img2img from)")
    if first.lowres_size is not None:
      raise ValueError(
        f"stage {first.name!r} is super-resolution: pass --init_image (its "
        f"{first.lowres_size}² low-res input), or start at the base stage"
      )
  elif strength is None and first.lowres_size is None:
    raise ValueError(
      f"--init_image without --strength upscales it, but stage {first.name!r} is not "
      "super-resolution: pass --strength for img2img, or --start_stage=<a super-resolution stage>"
    )
  return first


def _check_init_size(image: np.ndarray, path: str, first: Any, strength: float | None) -> None:
  """The image is the first stage's input: its low-res size (upscale) or its size (img2img)."""
  size = int(first.image_size if strength is not None else first.lowres_size)
  h, w = image.shape[1:3]
  if (h, w) != (size, size):
    use = "img2img start" if strength is not None else "low-res input"
    raise ValueError(
      f"--init_image={path} is {w}x{h}; stage {first.name!r} takes a {size}x{size} {use}: resize it"
    )


@dataclasses.dataclass
class Prepared:
  """A loaded cascade and the checked inputs of one ``sample.py`` run."""

  cascade: Cascade
  workdirs: list[str]  # the training runs (or DeepFloyd IF directories) of the stages
  init: np.ndarray | None  # [1, H, W, 3] in [-1, 1] (--init_image), not yet repeated
  default_outdir: str | None = None  # default: <first workdir>/samples_cli


def plan_stages(
  workdir: Workdirs | None,
  stages: Sequence[str] | None = None,
  if_dirs: Sequence[str] | None = None,
  if_dtype: str = "float32",
) -> tuple[list[str], dict[str, ml_collections.ConfigDict]]:
  """The stages a command line will run, from configs alone (nothing loads): ``(names,
  configs)`` with each config's ``name``, ``image_size`` and ``lowres_size``.

  ``workdir`` is one ``train.py`` run or several (``stages`` picks among their stages);
  ``if_dirs`` are DeepFloyd IF stage directories instead (their U-Nets' ``config.json``).

  Raises:
    ValueError: naming the flag: neither source, unknown stages, ``--stages`` with
      ``--if_dirs``, a bad ``--if_dtype``, a missing IF config.
  """
  if if_dirs:
    if stages:
      raise ValueError("--stages does not apply to --if_dirs: list just the stages' directories")
    if if_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"--if_dtype={if_dtype}; choose float32 or bfloat16")
    try:
      sizes = deepfloyd.stage_sizes(list(if_dirs))
    except FileNotFoundError as e:
      raise ValueError(f"--if_dirs: {e}") from None
    names = [name for name, _, _ in sizes]
    stage_configs = {
      name: ml_collections.ConfigDict(dict(name=name, image_size=size, lowres_size=lowres))
      for name, size, lowres in sizes
    }
    return names, stage_configs
  if workdir is None:
    raise ValueError("pass --workdir (a train.py run) or --if_dirs (DeepFloyd IF stages)")
  runs = load_run_configs(workdir)
  stage_configs = {n: config.stages[n] for _, config in runs for n in config.stage_order}
  names = list(stages or stage_configs)
  unknown = [n for n in names if n not in stage_configs]
  if unknown:
    raise ValueError(
      f"--stages={','.join(names)}: unknown stage(s) {unknown}; the runs have {list(stage_configs)}"
    )
  return names, stage_configs


def prepare(
  *,
  workdir: Workdirs | None,
  settings: dict[str, dict] | None = None,
  stages: Sequence[str] | None = None,
  start_stage: str | None = None,
  init_image: str | None = None,
  strength: float | None = None,
  max_batch: int = 16,
  compilation_cache: str | None = None,
  mesh: dict[str, int] | None = None,
  if_dirs: Sequence[str] | None = None,
  if_t5: str | None = None,
  if_variant: str | None = None,
  if_dtype: str = "float32",
) -> Prepared:
  """Checks every flag, reads ``--init_image``, then loads the cascade (in that order: a mistake
  costs no checkpoint load). ``if_dirs`` loads DeepFloyd IF stages instead of ``workdir``."""
  if max_batch < 1:
    raise ValueError(f"--max_batch must be >= 1, got {max_batch}")
  if compilation_cache:
    jax.config.update("jax_compilation_cache_dir", compilation_cache)
  settings = dict(settings or {})
  common = settings.pop("*", {})
  names, stage_configs = plan_stages(workdir, stages, if_dirs, if_dtype)
  per_stage = {n: {**common, **settings.get(n, {})} for n in names}
  unknown = sorted(set(settings) - set(names))
  if unknown:
    raise ValueError(f"--set names stages {unknown}; the cascade has {names}")
  first = _check_start(stage_configs, names, start_stage, init_image, strength)
  init = None
  if init_image:
    init = load_image(init_image)
    _check_init_size(init, init_image, first, strength)
  if if_dirs:
    cascade = Cascade.from_diffusers(
      list(if_dirs),
      t5=if_t5,
      settings=per_stage,
      variant=if_variant,
      dtype=jnp.bfloat16 if if_dtype == "bfloat16" else jnp.float32,
      max_batch=max_batch,
      mesh=mesh,
    )
    return Prepared(cascade, list(if_dirs), init, default_outdir="samples_if")
  workdirs = [d for d, _ in load_run_configs(workdir)]
  cascade = Cascade.from_workdir(
    workdirs, stages=names, settings=per_stage, max_batch=max_batch, mesh=mesh
  )
  return Prepared(cascade, workdirs, init)


def run(
  *,
  workdir: Workdirs | None,
  prompts: Sequence[str],
  num_images: int = 1,
  seed: int = 0,
  outdir: str | None = None,
  settings: dict[str, dict] | None = None,
  negative_prompt: str | None = None,
  stages: Sequence[str] | None = None,
  start_stage: str | None = None,
  init_image: str | None = None,
  strength: float | None = None,
  max_batch: int = 16,
  compilation_cache: str | None = None,
  mesh: dict[str, int] | None = None,
  guide: ClipGuidance | None = None,
  **if_args: Any,
) -> dict[str, Any]:
  """Samples ``num_images`` per prompt and writes ``outdir/{i:03d}_{stage}.png``, ``grid.png``
  and ``metadata.json``. Returns the written paths.

  ``workdir`` is one ``train.py`` workdir or several (one run per stage, in cascade order; see
  :meth:`Cascade.from_workdir`); ``outdir`` defaults to ``<first workdir>/samples_cli``.
  ``mesh`` gives the device mesh's axis sizes (``{"data": 2, "fsdp": 4}``; default data over all
  devices). In a multi-process run every process samples its part and process 0 writes the files.
  ``guide`` adds CLIP guidance (``--clip_guidance``). ``if_args`` (``if_dirs``, ``if_t5``,
  ``if_variant``, ``if_dtype``) sample DeepFloyd IF stages instead (see :func:`prepare`); their
  files go to ``samples_if/`` by default.
  """
  if num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {num_images}")
  prep = prepare(
    workdir=workdir,
    settings=settings,
    stages=stages,
    start_stage=start_stage,
    init_image=init_image,
    strength=strength,
    max_batch=max_batch,
    compilation_cache=compilation_cache,
    mesh=mesh,
    **if_args,
  )
  all_prompts = [p for p in prompts for _ in range(num_images)]
  n = len(all_prompts)
  init = None if prep.init is None else np.repeat(prep.init, n, axis=0)
  out, _ = prep.cascade.generate(
    all_prompts,
    seed=seed,
    negative_prompts=[negative_prompt] * n if negative_prompt is not None else None,
    start_stage=start_stage,
    init_image=init,
    strength=strength,
    guide=guide,
  )
  meta = {
    "seed": seed,
    "negative_prompt": negative_prompt,
    "start_stage": start_stage,
    "init_image": init_image,
    "strength": strength,
    "clip_guidance": guide.describe() if guide is not None else None,
  }
  grid = stage_grid(out, captions=all_prompts)
  return write_outputs(out, all_prompts, prep, outdir, meta, grid=grid)


def write_outputs(
  out: dict[str, np.ndarray],
  prompts: Sequence[str],
  prep: Prepared,
  outdir: str | None,
  meta: dict[str, Any],
  *,
  grid: np.ndarray,
) -> dict[str, Any]:
  """Writes every stage's PNGs, ``grid.png`` and ``metadata.json`` (process 0 only).

  Returns:
    ``{"outdir", "grid", "images": [{"file", "prompt", "stage", "index"}, ...]}``.
  """
  cascade, workdirs = prep.cascade, prep.workdirs
  outdir = outdir or prep.default_outdir or os.path.join(workdirs[0], "samples_cli")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(outdir, exist_ok=True)
  files, final = [], []
  for name, images in out.items():
    for i, img in enumerate(metrics.to_uint8(images)):
      fname = f"{i:03d}_{name}.png"
      if writer:
        Image.fromarray(img).save(os.path.join(outdir, fname))
      files.append({"file": fname, "prompt": prompts[i], "stage": name, "index": i})
      if name == list(out)[-1]:
        final.append({"file": fname, "prompt": prompts[i]})
  grid_path = os.path.join(outdir, "grid.png")
  if writer:
    Image.fromarray(grid).save(grid_path)
  stage_info = {
    s.name: {
      "image_size": s.image_size,
      "workdir": os.path.abspath(s.workdir) if s.workdir else None,
      "checkpoint_step": s.checkpoint_step,
      "settings": dataclasses.asdict(cascade._settings(s, None)),
    }
    for s in cascade.stages
    if s.name in out
  }
  meta = {
    "workdir": os.path.abspath(workdirs[0]),  # the first run (text encoder); all in "workdirs"
    "workdirs": [os.path.abspath(d) for d in workdirs],
    "seed": meta.get("seed"),
    "prompts": list(prompts),
    **{k: v for k, v in meta.items() if k != "seed"},
    "stages": stage_info,
    "mesh": dict(cascade.mesh.shape),
    "images": final,  # final-stage images (what the shapes evaluator scores)
    "files": files,
  }
  if writer:
    with open(os.path.join(outdir, "metadata.json"), "w") as f:
      json.dump(meta, f, indent=2)
  return {"outdir": outdir, "grid": grid_path, "images": files}


def stage_grid(
  out: dict[str, np.ndarray],
  *,
  by_stage_rows: bool = False,
  captions: Sequence[str] | None = None,
) -> np.ndarray:
  """Every stage upscaled (nearest) to the last size; one row per image and one column per
  stage, or (``by_stage_rows``: edits side by side) one row per stage, one column per image.

  Args:
    out: stage name → images ``[N, h, w, 3]``, in cascade order.
    by_stage_rows: the layout (see above).
    captions: N texts (the prompts), printed under the final stage's tiles; the other stages'
      tiles are labelled with the stage's name and size.
  """
  size = max(x.shape[1] for x in out.values())
  cols = []
  for images in out.values():
    k = size // images.shape[1]
    cols.append(np.repeat(np.repeat(metrics.to_uint8(images), k, axis=1), k, axis=2))
  labels = None
  if captions is not None:
    last = list(out)[-1]
    labels = [
      # ASCII: PIL's default font has no "²".
      list(captions) if name == last else [f"{name} {x.shape[1]}x{x.shape[2]}"] * len(x)
      for name, x in out.items()
    ]  # [stages][N]
  if by_stage_rows:
    tiles = np.concatenate(cols)  # [stages * N, S, S, 3]
    flat = None if labels is None else [c for row in labels for c in row]
    return metrics.image_grid(tiles, ncols=cols[0].shape[0], captions=flat)
  tiles = np.stack(cols, axis=1).reshape((-1, size, size, 3))  # [N * stages, S, S, 3]
  flat = None if labels is None else [c for per_image in zip(*labels) for c in per_image]
  return metrics.image_grid(tiles, ncols=len(out), captions=flat)
