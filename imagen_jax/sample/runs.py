"""Training runs as the source of a cascade: their configs, checked to chain into one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from imagen_jax.stage.text_cond import DEMO_ENCODER


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` a training run wrote into its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: --workdir must be a training run's workdir (python train.py "
      f"--workdir=...). Train the demo first with `python train.py`."
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


Workdirs = str | os.PathLike | Sequence[str | os.PathLike]


def load_run_configs(workdir: Workdirs) -> list[tuple[str, ml_collections.ConfigDict]]:
  """``(workdir, config)`` of one or several training runs, checked to form one cascade.

  Each run contributes the stages of its ``stage_order``. Stage names must be unique across the
  runs, and every run must have been trained with the first run's text encoder
  (``config.text.encoder`` and ``max_length``): a stage conditioned on embeddings from another
  encoder than the one it was trained with produces garbage, silently.

  Args:
    workdir: a ``train.py`` workdir, or a sequence of them (e.g. one run per stage).

  Raises:
    ValueError: no workdir, a stage name in two runs, or different text encoders.
    FileNotFoundError: a workdir without ``config.json``.
  """
  dirs = as_workdirs(workdir)
  runs = [(d, load_run_config(d)) for d in dirs]
  owner: dict[str, str] = {}
  for d, config in runs:
    for name in config.stage_order:
      if name in owner:
        raise ValueError(
          f"stage {name!r} is in two runs, {owner[name]} and {d}: stage names must be unique "
          f"across the workdirs of a cascade"
        )
      owner[name] = d
  (first, ref), rest = runs[0], runs[1:]
  for d, config in rest:
    want_id, got_id = _text_identity(ref), _text_identity(config)
    for field in {**want_id, **got_id}:
      want, got = want_id.get(field), got_id.get(field)
      if want != got:
        raise ValueError(
          f"runs {first} and {d} were trained with different text encoders: {field} is "
          f"{want!r} in {first} but {got!r} in {d}. Every stage must be sampled with the text "
          f"encoder it was trained with; the cascade uses the first run's."
        )
  return runs


def as_workdirs(workdir: Workdirs) -> list[str]:
  dirs = [workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir)
  if not dirs:
    raise ValueError("no workdir given")
  return [os.fspath(d) for d in dirs]


def _text_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What determines the text embeddings a run's stages were trained on."""
  t = config.text
  out = {"config.text.encoder": t.encoder, "config.text.max_length": int(t.max_length)}
  if not t.encoder:
    out["config.text.embedding_cache"] = t.embedding_cache
  if t.encoder == DEMO_ENCODER:  # its frozen random weights are generated from the seed
    out["config.seed (the shapes_demo encoder's weights)"] = int(config.seed)
  return out


def check_chain(stages: Sequence[tuple[str, int, int | None]]) -> None:
  """``(name, image_size, lowres_size)`` in cascade order: each stage takes the previous' output."""
  for (prev, prev_size, _), (cur, _, cur_lowres) in zip(stages, stages[1:]):
    if cur_lowres is None:
      raise ValueError(
        f"stage {cur!r} is a base stage (no low-res input) but comes after stage {prev!r}: the "
        f"stages do not chain (order them base first, e.g. base64, sr256, sr1024)"
      )
    if cur_lowres != prev_size:
      raise ValueError(
        f"stage {cur!r} takes {cur_lowres}² low-res input but the previous stage "
        f"{prev!r} produces {prev_size}²: the stages do not chain"
      )
