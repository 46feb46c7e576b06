"""The image-editing part of ``sample.py``: edit a real image (or two) → PNGs, grid, metadata.

  python sample.py --init_image=x.png --mask=m.png --prompt="..." [--resample=10 --jump=10]
  python sample.py --init_image=x.png --outpaint=left:16,right:16 --prompt="..."
  python sample.py --init_image=x.png --variations --prompt="its caption" --num_images=4 \\
    --stochasticity=0.5
  python sample.py --interpolate=a.png,b.png --frames=8 --prompt="a's caption" --prompt="b's"
  python sample.py --init_image=x.png --prompt="its caption" --text_diff="the target" \\
    --eta=0,0.5,1
  python sample.py --init_image=x.png --invert --prompt="its caption"     # reconstruction, PSNR
  python sample.py --init_image=x.png --invert --prompt="its caption" --edit_prompt="..."

One operation per run (:func:`check_flags`), each a function here on top of
:mod:`imagen_jax.edit.image_ops`. The input images are resized to the last stage's size (square;
the mask of ``--mask`` first to the image's size, nearest); each stage takes them at its own.
Besides ``sample.py``'s usual files (``{i:03d}_{stage}.png``, ``grid.png``, ``metadata.json``
with the operation's settings under its flag's name) they write: ``outpaint_canvas.png`` and
``outpaint_mask.png`` (white = generated); the interpolation's ``interpolation.gif`` (last
stage; ``grid.png`` is then its frames in one row); the inversion's PSNR per stage (in
``metadata.json``; ``grid.png``: the input above its reconstruction). ``--invert`` with
``--edit_prompt`` is prompt-to-prompt on the inverted image (:mod:`imagen_jax.edit.cli`'s files).

Every input is checked and read before the cascade is loaded. ``source`` is either
:func:`imagen_jax.sample.cli.prepare`'s keyword arguments (``workdir``, ``settings``,
``stages``, ``max_batch``, ``compilation_cache``, ``mesh``, or ``if_dirs`` and the other
``if_*`` arguments for DeepFloyd IF stages) or a loaded
:class:`~imagen_jax.sample.cli.Prepared` (what tests and notebooks reuse).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from imagen_jax import metrics
from imagen_jax.edit import image_ops as ops
from imagen_jax.edit.attention_edit import PromptToPrompt
from imagen_jax.edit.cli import edit_prepared
from imagen_jax.sample import cli as sample_cli
from imagen_jax.sample.inversion import resize

Source = sample_cli.Prepared | Mapping[str, Any]

# The operations, by flag: one per run.
OPERATIONS = {
  "mask": "inpainting",
  "outpaint": "outpainting",
  "variations": "variations of --init_image",
  "interpolate": "interpolation between two images",
  "text_diff": "a text-diff edit",
  "invert": "inversion",
}
# Options of some operations only.
OPTIONS = {
  "resample": ("mask", "outpaint"),
  "jump": ("mask", "outpaint"),
  "stochasticity": ("variations",),
  "frames": ("interpolate",),
  "eta": ("text_diff",),
  "null_text": ("invert",),
}
# Every flag that check_flags reads.
FLAGS = (
  *OPERATIONS,
  *OPTIONS,
  "init_image",
  "strength",
  "start_stage",
  "edit_prompt",
  "negative_prompt",
  "num_images",
  "prompt",
  "prompts_file",
)
MARGINS = ("left", "right", "top", "bottom")
GIF = "interpolation.gif"
CANVAS, CANVAS_MASK = "outpaint_canvas.png", "outpaint_mask.png"
_INPAINTING = ("mask", "outpaint")
_ONE_PROMPT = {
  "variations": "the caption of --init_image",
  "text_diff": "the caption of --init_image; the target is --text_diff's",
  "invert": "the caption of --init_image",
}
_NUM_HINT = {"interpolate": ": the frames are --frames", "text_diff": ": one image per --eta"}


def check_flags(given: Mapping[str, Any]) -> str | None:
  """Which operation the flags ask for (None: plain sampling, img2img, prompt-to-prompt).

  Args:
    given: flag name → value of the flags (of :data:`FLAGS`) given on the command line.

  Returns:
    The operation's flag name (a key of :data:`OPERATIONS`), or None.

  Raises:
    ValueError: two operations, an option without its operation, a flag the operation does not
      take, or a missing or bad value (the message names the flags).
  """
  ops_given = [n for n in OPERATIONS if n in given and given[n] is not False]
  if len(ops_given) > 1:
    a, b = ops_given[:2]
    raise ValueError(
      f"--{a} and --{b} are separate operations ({OPERATIONS[a]}, {OPERATIONS[b]}): "
      "pass one of them"
    )
  op = ops_given[0] if ops_given else None
  for name, owners in OPTIONS.items():
    if name in given and op not in owners:
      need = " or ".join(f"--{o}" for o in owners)
      if op is None:
        raise ValueError(f"--{name} needs {need} (it is an option of {OPERATIONS[owners[0]]})")
      raise ValueError(f"--{name} does not apply to --{op}: it is an option of {need}")
  if op is None:
    return None
  if op == "interpolate":
    if "init_image" in given:
      raise ValueError(
        "--init_image does not apply to --interpolate: pass both images as "
        "--interpolate=a.png,b.png"
      )
  elif not given.get("init_image"):
    raise ValueError(f"--{op} needs --init_image (the image for {OPERATIONS[op]})")
  for name, what in (("strength", "img2img's"), ("start_stage", "upscaling's and img2img's")):
    if name in given:
      raise ValueError(f"--{name} does not apply to --{op} (it is {what}): drop it")
  if "edit_prompt" in given and op != "invert":
    raise ValueError(
      f"--edit_prompt does not apply to --{op}: prompt-to-prompt on a real image is "
      "--invert --init_image=... --prompt=CAPTION --edit_prompt=..."
    )
  if "negative_prompt" in given and op not in _INPAINTING:
    raise ValueError(
      f"--negative_prompt does not apply to --{op}: an inverted image is sampled with its own "
      "null conditions"
    )
  num = given.get("num_images", 1)
  if op in (*_INPAINTING, "variations"):
    if num < 1:
      raise ValueError(f"--num_images must be >= 1, got {num}")
  elif num != 1:
    raise ValueError(f"--num_images does not apply to --{op}{_NUM_HINT.get(op, '')}")
  if "prompts_file" in given and op not in _INPAINTING:
    raise ValueError(f"--prompts_file does not apply to --{op}: pass its caption as --prompt")
  k = len(given.get("prompt") or [])
  if op in _ONE_PROMPT and k != 1:
    raise ValueError(f"--{op} takes exactly one --prompt ({_ONE_PROMPT[op]}), got {k}")
  if op == "interpolate" and k not in (1, 2):
    raise ValueError(
      f"--interpolate takes one --prompt (both images' caption) or two (a's, then b's), got {k}"
    )
  _check_values(op, given)
  return op


def _check_values(op: str, given: Mapping[str, Any]) -> None:
  for name in ("resample", "jump"):
    if given.get(name, 1) < 1:
      raise ValueError(f"--{name} must be >= 1 (RePaint's; 1 = no resampling), got {given[name]}")
  if given.get("stochasticity", 0.0) < 0:
    raise ValueError(f"--stochasticity (DDIM eta) must be >= 0, got {given['stochasticity']}")
  if given.get("frames", 2) < 2:
    raise ValueError(f"--frames must be >= 2 (the two images included), got {given['frames']}")
  if "eta" in given:
    parse_eta(given["eta"])
  if op == "outpaint":
    parse_outpaint(given["outpaint"])
  if op == "interpolate" and len(given["interpolate"]) != 2:
    raise ValueError(
      f"--interpolate={','.join(given['interpolate'])}: expected two images, a.png,b.png"
    )
  if op == "text_diff" and not str(given["text_diff"]).strip():
    raise ValueError("--text_diff is empty: pass the target prompt, --text_diff='a blue circle'")


def parse_outpaint(items: Sequence[str]) -> dict[str, int]:
  """``["left:16", "top:8"]`` → ``{"left": 16, "top": 8}`` (names the flag on error)."""
  out: dict[str, int] = {}
  for item in items:
    side, sep, value = item.partition(":")
    try:
      if not sep or side.strip() not in MARGINS or side.strip() in out:
        raise ValueError
      out[side.strip()] = int(value)
    except ValueError:
      raise ValueError(
        f"--outpaint={','.join(items)}: expected SIDE:PIXELS for sides {list(MARGINS)}, each "
        "at most once, e.g. left:16,right:8"
      ) from None
    if out[side.strip()] < 0:
      raise ValueError(f"--outpaint={item}: margins must be >= 0 pixels")
  if not any(out.values()):
    raise ValueError("--outpaint: give at least one margin > 0, e.g. --outpaint=left:16")
  return out


def parse_eta(items: Sequence[str] | float) -> list[float]:
  """``["0", "0.5"]`` (or one number) → ``[0.0, 0.5]`` (names the flag on error)."""
  items = [items] if isinstance(items, int | float) else list(items)
  try:
    etas = [float(x) for x in items]
  except ValueError:
    raise ValueError(f"--eta={','.join(map(str, items))}: expected numbers, e.g. 0,0.5,1") from None
  if not etas:
    raise ValueError("--eta: give at least one value, e.g. --eta=0.5")
  return etas


def load_mask(path: str, size: tuple[int, int]) -> np.ndarray:
  """``--mask`` as ``[H, W]`` bool at ``size`` (H, W): white (> 127 in grayscale) = regenerate.

  A mask of another size is resized to ``size`` (nearest).
  """
  rgb = metrics.to_uint8(sample_cli.load_image(path, "--mask")[0])
  gray = Image.fromarray(rgb).convert("L")
  if gray.size != (size[1], size[0]):
    gray = gray.resize((size[1], size[0]), Image.Resampling.NEAREST)
  mask = np.asarray(gray) > 127
  if not mask.any():
    raise ValueError(f"--mask={path} has no white pixels (white = regenerate): nothing to do")
  return mask


def psnr(reference: np.ndarray, images: np.ndarray) -> float | None:
  """PSNR (dB) of ``images`` against ``reference`` (both in [-1, 1]) as the 8-bit PNGs hold
  them; None where they are equal."""
  diff = metrics.to_uint8(images).astype(np.float64) - metrics.to_uint8(reference)
  mse = float(np.mean(diff**2))
  return None if mse == 0 else round(10.0 * np.log10(255.0**2 / mse), 2)


def final_size(source: Source) -> int:
  """The last stage's resolution (from the runs' or IF stages' configs: nothing is loaded).

  Raises:
    ValueError: ``--stages`` names unknown stages or starts at a super-resolution stage.
  """
  if isinstance(source, sample_cli.Prepared):
    return int(source.cascade.stages[-1].image_size)
  names, configs = sample_cli.plan_stages(
    source.get("workdir"), source.get("stages"), source.get("if_dirs"),
    source.get("if_dtype", "float32"),
  )  # fmt: skip
  if configs[names[0]].lowres_size is not None:
    raise ValueError(
      f"--stages={','.join(names)} starts at the super-resolution stage {names[0]!r}: editing "
      "an image runs the cascade from its base stage"
    )
  return int(configs[names[-1]].image_size)


def _load(source: Source, min_batch: int = 1) -> sample_cli.Prepared:
  if isinstance(source, sample_cli.Prepared):
    return source
  args = dict(source)
  if args.get("max_batch", 16) >= 1:  # a bad value stays for prepare to report
    args["max_batch"] = max(args.get("max_batch", 16), min_batch)
  return sample_cli.prepare(**args)


def _image(path: str, size: int, flag: str = "--init_image") -> np.ndarray:
  return resize(sample_cli.load_image(path, flag), size)


def _save(image: np.ndarray, path: str) -> None:
  if jax.process_index() == 0:
    Image.fromarray(image).save(path)


def inpaint(
  source: Source,
  *,
  init_image: str,
  prompts: Sequence[str],
  mask: str | None = None,
  outpaint: Mapping[str, int] | None = None,
  num_images: int = 1,
  resample: int = 1,
  jump: int = 1,
  seed: int = 0,
  negative_prompt: str | None = None,
  outdir: str | None = None,
) -> dict[str, Any]:
  """Inpaints ``init_image`` where ``mask`` is white, or outpaints it by ``outpaint``'s margins
  (pixels of the last stage), ``num_images`` per prompt.

  Returns:
    The written paths (as :func:`imagen_jax.sample.cli.write_outputs`), with ``"canvas"`` and
    ``"mask"`` (outpainting).
  """
  if (mask is None) == (outpaint is None):
    raise ValueError("inpainting takes one of --mask and --outpaint")
  image = sample_cli.load_image(init_image)
  size = final_size(source)
  if mask is not None:
    where = load_mask(mask, image.shape[1:3])
    known, region = resize(image, size), ops.resize_mask(where[None], size)
    meta = {"inpaint": {"mask": mask, "resample": resample, "jump": jump}}
  else:
    margins = {side: int(outpaint.get(side, 0)) for side in MARGINS}
    if margins["left"] + margins["right"] >= size or margins["top"] + margins["bottom"] >= size:
      raise ValueError(
        f"--outpaint={','.join(f'{k}:{v}' for k, v in outpaint.items())}: the margins leave no "
        f"room for the image in the last stage's {size}x{size} canvas"
      )
    known, region = ops.outpaint_canvas(image, size, **margins)
    meta = {
      "inpaint": {"mask": CANVAS_MASK, "resample": resample, "jump": jump},
      "outpaint": {**margins, "canvas": CANVAS},
    }
  prep = _load(source)
  rows = [p for p in prompts for _ in range(num_images)]
  n = len(rows)
  out = ops.inpaint(
    prep.cascade,
    known.repeat(n, axis=0),
    region.repeat(n, axis=0),
    rows,
    seed=seed,
    resample=resample,
    jump=jump,
    negative_prompts=None if negative_prompt is None else [negative_prompt] * n,
  )
  meta = {"seed": seed, "negative_prompt": negative_prompt, "init_image": init_image, **meta}
  grid = sample_cli.stage_grid(out, captions=rows)
  paths = sample_cli.write_outputs(out, rows, prep, outdir, meta, grid=grid)
  if outpaint is not None:
    paths["canvas"] = os.path.join(paths["outdir"], CANVAS)
    paths["mask"] = os.path.join(paths["outdir"], CANVAS_MASK)
    _save(metrics.to_uint8(known[0]), paths["canvas"])
    _save(region[0].astype(np.uint8) * 255, paths["mask"])
  return paths


def variations(
  source: Source,
  *,
  init_image: str,
  prompt: str,
  num_images: int = 4,
  stochasticity: float = 0.5,
  seed: int = 0,
  outdir: str | None = None,
) -> dict[str, Any]:
  """``num_images`` variations of ``init_image`` (caption ``prompt``), DDIM η =
  ``stochasticity`` from its inverted latents; the grid has them side by side."""
  image = _image(init_image, final_size(source))
  prep = _load(source)
  out = ops.variations(
    prep.cascade, image, prompt, num=num_images, stochasticity=stochasticity, seed=seed
  )
  meta = {
    "seed": seed,
    "init_image": init_image,
    "variations": {"num": num_images, "stochasticity": stochasticity},
  }
  grid = sample_cli.stage_grid(out, by_stage_rows=True)
  return sample_cli.write_outputs(out, [prompt] * num_images, prep, outdir, meta, grid=grid)


def interpolate(
  source: Source,
  *,
  images: Sequence[str],
  prompts: Sequence[str],
  frames: int = 8,
  seed: int = 0,
  outdir: str | None = None,
  frame_ms: int = 200,
) -> dict[str, Any]:
  """``frames`` images from ``images[0]`` to ``images[1]`` (captions: ``prompts``, one for both
  or one each); ``grid.png`` is the last stage's frames in one row, ``interpolation.gif`` the
  same as an animation (``frame_ms`` per frame, looping).

  Returns:
    The written paths, with ``"gif"``.
  """
  if len(images) != 2:
    raise ValueError(f"--interpolate={','.join(images)}: expected two images, a.png,b.png")
  if len(prompts) not in (1, 2):
    raise ValueError(f"--interpolate takes one or two --prompt values, got {len(prompts)}")
  if frames < 2:
    raise ValueError(f"--frames must be >= 2 (the two images included), got {frames}")
  size = final_size(source)
  a, b = (_image(path, size, "--interpolate") for path in images)
  prompt_a, prompt_b = prompts[0], prompts[-1]
  prep = _load(source, min_batch=2)
  out = ops.interpolate(prep.cascade, a, b, prompt_a, prompt_b, frames=frames, seed=seed)
  alphas = [float(x) for x in np.linspace(0.0, 1.0, frames)]
  labels = [f"{prompt_a} → {prompt_b} ({x:.2f})" for x in alphas]
  last = metrics.to_uint8(out[list(out)[-1]])
  meta = {
    "seed": seed,
    "interpolate": {
      "images": list(images),
      "prompts": [prompt_a, prompt_b],
      "frames": frames,
      "alphas": alphas,
      "gif": GIF,
    },
  }
  grid = metrics.image_grid(last, ncols=frames)
  paths = sample_cli.write_outputs(out, labels, prep, outdir, meta, grid=grid)
  paths["gif"] = os.path.join(paths["outdir"], GIF)
  if jax.process_index() == 0:
    pil = [Image.fromarray(x) for x in last]
    pil[0].save(paths["gif"], save_all=True, append_images=pil[1:], duration=frame_ms, loop=0)
  return paths


def text_diff(
  source: Source,
  *,
  init_image: str,
  source_prompt: str,
  target_prompt: str,
  eta: Sequence[float] = (0.5,),
  seed: int = 0,
  outdir: str | None = None,
) -> dict[str, Any]:
  """Moves ``init_image`` (caption ``source_prompt``) toward ``target_prompt`` by each ``eta``
  (0 = the image, 1 = the target's text): one image per value, side by side in the grid."""
  etas = parse_eta(eta)
  image = _image(init_image, final_size(source))
  prep = _load(source)
  out = ops.text_diff(prep.cascade, image, source_prompt, target_prompt, eta=etas, seed=seed)
  labels = [f"{source_prompt} → {target_prompt} (η={e:.2f})" for e in etas]
  meta = {
    "seed": seed,
    "init_image": init_image,
    "text_diff": {"source_prompt": source_prompt, "target_prompt": target_prompt, "eta": etas},
  }
  grid = sample_cli.stage_grid(out, by_stage_rows=True)
  return sample_cli.write_outputs(out, labels, prep, outdir, meta, grid=grid)


def invert(
  source: Source,
  *,
  init_image: str,
  prompt: str,
  null_text: bool = True,
  edit_prompts: Sequence[str] = (),
  edit: PromptToPrompt | None = None,
  attention_maps: bool = False,
  seed: int = 0,
  outdir: str | None = None,
) -> dict[str, Any]:
  """Inverts ``init_image`` under its caption ``prompt`` (null-text inversion with
  ``null_text``). Without ``edit_prompts``: writes the reconstruction and its PSNR per stage;
  with them: prompt-to-prompt from the inverted image (``edit``, default replace) — row 0
  reconstructs the image, the rest are its edits (:func:`imagen_jax.edit.cli.edit_prepared`).

  Returns:
    The written paths, with ``"psnr"`` (stage → dB, None = exact) without ``edit_prompts``.
  """
  image = _image(init_image, final_size(source))
  prep = _load(source, min_batch=1 + len(edit_prompts))
  cascade = prep.cascade
  inv = ops.invert(cascade, image, [prompt], seed=seed, null_text=null_text)
  meta: dict[str, Any] = {"seed": seed, "init_image": init_image}
  if edit_prompts:
    return edit_prepared(
      prep,
      source_prompt=prompt,
      edit_prompts=edit_prompts,
      edit=edit or PromptToPrompt(),
      attention_maps=attention_maps,
      seed=seed,
      outdir=outdir,
      inversion=inv,
      meta={**meta, "invert": {"null_text": null_text, "settings": inv.settings}},
    )
  out = ops.reconstruct(cascade, inv, [prompt])
  refs = {s.name: resize(image, s.image_size) for s in cascade.stages if s.name in out}
  scores = {name: psnr(refs[name], images) for name, images in out.items()}
  meta["invert"] = {"null_text": null_text, "psnr": scores, "settings": inv.settings}
  grid = sample_cli.stage_grid({k: np.concatenate([refs[k], v]) for k, v in out.items()})
  paths = sample_cli.write_outputs(out, [prompt], prep, outdir, meta, grid=grid)
  paths["psnr"] = scores
  return paths
