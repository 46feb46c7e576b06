"""The editing part of ``sample.py``: ``--prompt=SRC --edit_prompt=TGT [...]`` → PNGs, grid, maps.

  python sample.py --workdir=runs/shapes --prompt="a small red circle at the top left" \\
    --edit_prompt="a small blue circle at the top left" --edit=replace \\
    --cross_replace=0.8 --self_replace=0.4 --local_blend=red,blue --attention_maps

Writes, besides ``sample.py``'s usual files (``{i:03d}_{stage}.png``, row 0 = the source), a
``grid.png`` with the source and each edit side by side (one row per stage),
``attention_{stage}_{i:03d}.png`` (one captioned row of word overlays per prompt) and
``attention_{stage}_{i:03d}_{word}.png`` (one overlay per word) with ``--attention_maps``, and
the edit settings in ``metadata.json`` under ``"edit"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from imagen_jax.edit.attention_edit import PromptToPrompt
from imagen_jax.edit.attention_maps import overlay
from imagen_jax.edit.prompt_to_prompt import prompt_to_prompt
from imagen_jax.sample import cli as sample_cli
from imagen_jax.sample.inversion import CascadeInversion


def parse_reweight(items: Sequence[str]) -> dict[str, float]:
  """``["large:2", "small:-1"]`` → ``{"large": 2.0, "small": -1.0}`` (names the flag on error)."""
  out = {}
  for item in items:
    word, sep, scale = item.rpartition(":")
    try:
      if not sep or not word.strip():
        raise ValueError
      out[word.strip()] = float(scale)
    except ValueError:
      raise ValueError(f"--reweight={item!r}: expected WORD:SCALE, e.g. large:2") from None
  return out


def run(
  *,
  workdir: Any,
  source_prompt: str,
  edit_prompts: Sequence[str],
  edit: PromptToPrompt,
  attention_maps: bool = False,
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
  **if_args: Any,
) -> dict[str, Any]:
  """Edits ``source_prompt`` into each of ``edit_prompts`` and writes the files (see module doc).

  ``if_args`` (``if_dirs``, ``if_t5``, ``if_variant``, ``if_dtype``) edit on DeepFloyd IF stages
  instead of ``workdir`` (see :func:`imagen_jax.sample.cli.prepare`).

  Returns:
    The written paths (as :func:`imagen_jax.sample.cli.run`), plus ``"attention"``: the map PNGs.
  """
  prep = sample_cli.prepare(
    workdir=workdir,
    settings=settings,
    stages=stages,
    start_stage=start_stage,
    init_image=init_image,
    strength=strength,
    max_batch=max(max_batch, 1 + len(edit_prompts)),
    compilation_cache=compilation_cache,
    mesh=mesh,
    **if_args,
  )
  return edit_prepared(
    prep,
    source_prompt=source_prompt,
    edit_prompts=edit_prompts,
    edit=edit,
    attention_maps=attention_maps,
    seed=seed,
    outdir=outdir,
    negative_prompt=negative_prompt,
    start_stage=start_stage,
    init_image=init_image,
    strength=strength,
  )


def edit_prepared(
  prep: sample_cli.Prepared,
  *,
  source_prompt: str,
  edit_prompts: Sequence[str],
  edit: PromptToPrompt,
  attention_maps: bool = False,
  seed: int = 0,
  outdir: str | None = None,
  negative_prompt: str | None = None,
  start_stage: str | None = None,
  init_image: str | None = None,
  strength: float | None = None,
  inversion: CascadeInversion | None = None,
  meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """:func:`run` on a loaded cascade (``prep.init``: the ``init_image`` read, or None).

  Args:
    prep: the cascade and inputs (:func:`imagen_jax.sample.cli.prepare`).
    inversion: edit a real image: its inversion under ``source_prompt`` (passed through to
      :func:`prompt_to_prompt`; see :func:`imagen_jax.edit.image_cli.invert`).
    meta: more ``metadata.json`` entries (they override the defaults).
    source_prompt, edit_prompts, edit, attention_maps, seed, outdir, negative_prompt,
      start_stage, init_image, strength: as for :func:`run`.

  Returns:
    The written paths, as :func:`run`.
  """
  n = 1 + len(edit_prompts)
  init = None if prep.init is None else prep.init.repeat(n, axis=0)
  result = prompt_to_prompt(
    prep.cascade,
    source_prompt,
    list(edit_prompts),
    edit=edit,
    seed=seed,
    negative_prompt=negative_prompt,
    start_stage=start_stage,
    init_image=init,
    strength=strength,
    inversion=inversion,
  )
  meta = {
    "seed": seed,
    "negative_prompt": negative_prompt,
    "start_stage": start_stage,
    "init_image": init_image,
    "strength": strength,
    "edit": {"source_prompt": source_prompt, "edit_prompts": list(edit_prompts), **edit.as_dict()},
    **(meta or {}),
  }
  grid = sample_cli.stage_grid(result.images, by_stage_rows=True, captions=result.prompts)
  paths = sample_cli.write_outputs(result.images, result.prompts, prep, outdir, meta, grid=grid)
  paths["attention"] = []
  if attention_maps and jax.process_index() == 0:
    for stage in result.attention:
      for row, image in enumerate(result.attention_rows(stage)):
        path = os.path.join(paths["outdir"], f"attention_{stage}_{row:03d}.png")
        image.save(path)
        paths["attention"].append(path)
        for word, m in result.word_maps(stage, row).items():
          safe = re.sub(r"[^A-Za-z0-9_-]+", "_", word)
          path = os.path.join(paths["outdir"], f"attention_{stage}_{row:03d}_{safe}.png")
          overlay(result.images[stage][row], m).save(path)
          paths["attention"].append(path)
  return paths
