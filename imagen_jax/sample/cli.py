"""What ``sample.py`` does, as library functions: prompts in, PNGs + grid + metadata.json out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax import metrics
from imagen_jax.sample.cascade import Cascade, Workdirs, load_run_configs

log = logging.getLogger(__name__)

_SETTING_TYPES = {
  "sampler": str,
  "steps": int,
  "guidance": float,
  "thresholding": str,
  "percentile": float,
  "aug_level": float,
  "eta": float,
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
      out.setdefault(stage, {})[field] = _SETTING_TYPES[field](value)
    except ValueError:
      raise ValueError(
        f"--set={item!r}: {field} must be a {_SETTING_TYPES[field].__name__}"
      ) from None
  return out


def read_prompts(
  prompts: Sequence[str] | None, prompts_file: str | None, workdir: Workdirs
) -> list[str]:
  """Prompts from flags and/or a file (non-UTF-8 bytes replaced and warned); demo defaults.

  The demo defaults apply when the (first) run in ``workdir`` trained on the shapes data.
  """
  out = list(prompts or [])
  if prompts_file:
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
  config = load_run_configs(workdir)[0][1]
  if config.data.source == "shapes":
    from imagen_jax.evaluators.shapes import default_prompts

    return default_prompts(8, seed=1)
  raise ValueError("no prompts: pass --prompt=... (repeatable) or --prompts_file=...")


def _load_image(path: str) -> np.ndarray:
  from imagen_jax.data.preprocess import to_rgb

  img = to_rgb(Image.open(path))
  return np.asarray(img, np.float32)[None] / 127.5 - 1.0


def run(
  *,
  workdir: Workdirs,
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
) -> dict[str, Any]:
  """Samples ``num_images`` per prompt and writes ``outdir/{i:03d}_{stage}.png``, ``grid.png``
  and ``metadata.json``. Returns the written paths.

  ``workdir`` is one ``train.py`` workdir or several (one run per stage, in cascade order; see
  :meth:`Cascade.from_workdir`); ``outdir`` defaults to ``<first workdir>/samples_cli``.
  """
  if num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {num_images}")
  if compilation_cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache)
  settings = dict(settings or {})
  common = settings.pop("*", {})
  runs = load_run_configs(workdir)
  names = list(stages or [n for _, config in runs for n in config.stage_order])
  per_stage = {n: {**common, **settings.get(n, {})} for n in names}
  unknown = sorted(set(settings) - set(names))
  if unknown:
    raise ValueError(f"--set names stages {unknown}; the cascade has {names}")
  workdirs = [d for d, _ in runs]
  cascade = Cascade.from_workdir(workdirs, stages=names, settings=per_stage, max_batch=max_batch)
  all_prompts = [p for p in prompts for _ in range(num_images)]
  n = len(all_prompts)
  init = None
  if init_image:
    init = np.repeat(_load_image(init_image), n, axis=0)
  out = cascade(
    all_prompts,
    seed=seed,
    negative_prompts=[negative_prompt] * n if negative_prompt is not None else None,
    start_stage=start_stage,
    init_image=init,
    strength=strength,
  )
  outdir = outdir or os.path.join(workdirs[0], "samples_cli")
  os.makedirs(outdir, exist_ok=True)
  files, final = [], []
  for name, images in out.items():
    for i, img in enumerate(metrics.to_uint8(images)):
      fname = f"{i:03d}_{name}.png"
      Image.fromarray(img).save(os.path.join(outdir, fname))
      files.append({"file": fname, "prompt": all_prompts[i], "stage": name, "index": i})
      if name == list(out)[-1]:
        final.append({"file": fname, "prompt": all_prompts[i]})
  grid_path = os.path.join(outdir, "grid.png")
  Image.fromarray(_stage_grid(out)).save(grid_path)
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
    "seed": seed,
    "prompts": all_prompts,
    "negative_prompt": negative_prompt,
    "start_stage": start_stage,
    "init_image": init_image,
    "strength": strength,
    "stages": stage_info,
    "images": final,  # final-stage images (what the shapes evaluator scores)
    "files": files,
  }
  with open(os.path.join(outdir, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return {"outdir": outdir, "grid": grid_path, "images": files}


def _stage_grid(out: dict[str, np.ndarray]) -> np.ndarray:
  """One row per image, one column per stage, every stage upscaled (nearest) to the last size."""
  size = max(x.shape[1] for x in out.values())
  cols = []
  for images in out.values():
    k = size // images.shape[1]
    cols.append(np.repeat(np.repeat(metrics.to_uint8(images), k, axis=1), k, axis=2))
  tiles = np.stack(cols, axis=1).reshape((-1, size, size, 3))  # [N * stages, S, S, 3]
  return metrics.image_grid(tiles, ncols=len(out))
