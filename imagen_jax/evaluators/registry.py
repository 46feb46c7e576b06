"""One evaluator interface, chosen by config: ``config.evals.evaluators`` lists what to run.

An evaluator scores images sampled for prompts::

    class Evaluator(Protocol):
      name: str                      # its key in config.evals.evaluators
      prompts: list[str] | None      # prompts it must be run on (shapes: its grammar's), or None
      def run(self, images, prompts) -> dict[str, float | np.ndarray]

``images`` are ``[N, H, W, 3]`` floats in [-1, 1] (what the samplers return); ``prompts`` are the
N prompts they were sampled for. Scalars go to ``metrics.jsonl`` and TensorBoard; ``uint8``
``[H, W, 3]`` arrays are pictures, written as PNGs. The trainer runs the evaluators periodically
on EMA weights; ``python -m imagen_jax.evaluators`` runs them on a folder written by ``sample.py``.

Built in (``EVALUATOR_NAMES``), each with its settings in ``config.evals.<name>``:

* ``shapes``: prompt alignment on the ``shapes`` demo data (pixel evaluator; no model needed);
* ``clip_score``: CLIP score (torchmetrics' definition) with a CLIP checkpoint (``clip``);
* ``fid``: FID and KID against reference statistics (``inception`` weights, ``ref_stats``);
* ``grid``: a sample grid with each prompt printed under its image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from imagen_jax import metrics
from imagen_jax.evaluators.clip_score import ClipScoreEvaluator
from imagen_jax.evaluators.fid import FIDEvaluator
from imagen_jax.evaluators.shapes import ShapesAlignmentEvaluator

EVALUATOR_NAMES = ("shapes", "clip_score", "fid", "grid")


class Evaluator(Protocol):
  """What the trainer and ``python -m imagen_jax.evaluators`` call (see the module docstring)."""

  name: str
  prompts: list[str] | None

  def run(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]: ...


class GridEvaluator:
  """A captioned sample grid (``samples``): each prompt under its image."""

  name = "grid"
  prompts = None

  def __init__(self, max_images: int = 16, tile: int = 128):
    self.max_images, self.tile = int(max_images), int(tile)

  def run(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    n = min(len(images), self.max_images)
    return {"samples": metrics.captioned_grid(images[:n], list(prompts)[:n], tile=self.tile)}


def _shapes(cfg: Any) -> Evaluator:
  prompts = list(cfg.prompts) or None
  return ShapesAlignmentEvaluator(prompts=prompts, num_prompts=int(cfg.num_prompts), seed=0)


def _clip_score(cfg: Any) -> Evaluator:
  return ClipScoreEvaluator(cfg.clip_score.clip, batch_size=int(cfg.clip_score.batch_size))


def _fid(cfg: Any) -> Evaluator:
  f = cfg.fid
  return FIDEvaluator(f.inception, f.ref_stats, batch_size=int(f.batch_size))


def _grid(cfg: Any) -> Evaluator:
  return GridEvaluator(max_images=int(cfg.grid.max_images), tile=int(cfg.grid.tile))


_BUILDERS: dict[str, Callable[[Any], Evaluator]] = {
  "shapes": _shapes,
  "clip_score": _clip_score,
  "fid": _fid,
  "grid": _grid,
}
# Each evaluator's required settings: (field of config.evals.<name>, what to put there).
_REQUIRED = {
  "clip_score": (("clip", "a CLIP checkpoint dir (Hugging Face CLIPModel format) or hub id"),),
  "fid": (
    ("inception", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors of it)"),
    ("ref_stats", "reference statistics (.npz; python -m imagen_jax.evaluators --ref_stats_from)"),
  ),
}


def parse_names(names: str | Sequence[str], field: str = "config.evals.evaluators") -> list[str]:
  """``"shapes,grid"``, ``("shapes", "grid")`` or ``("shapes,grid",)`` → a checked list of names.

  Raises:
    ValueError: an unknown or repeated name; the message names ``field`` and the choices.
  """
  if isinstance(names, str):
    names = [names]
  # "a,b" anywhere: a flag override --config.evals.evaluators=a,b arrives as ("a,b",).
  names = [n for item in names for n in (s.strip() for s in str(item).split(",")) if n]
  unknown = [n for n in names if n not in EVALUATOR_NAMES]
  if unknown:
    raise ValueError(f"{field}: unknown evaluator(s) {unknown}; choose from {EVALUATOR_NAMES}")
  if len(set(names)) != len(names):
    raise ValueError(f"{field}: evaluators repeat: {names}")
  return names


def check_evals(evals: Any, data_source: str | None = None) -> None:
  """Fails fast on an evals config that cannot run; messages name the field and the fix.

  Args:
    evals: ``config.evals`` (``evaluators`` plus one sub-config per evaluator).
    data_source: ``config.data.source`` (the ``shapes`` evaluator needs ``shapes`` data).
  """
  names = parse_names(evals.evaluators)
  for name in names:
    for field, what in _REQUIRED.get(name, ()):
      if not str(evals[name][field]):
        raise ValueError(
          f"config.evals.{name}.{field} is empty: the {name!r} evaluator needs {what} "
          f"(or drop {name!r} from config.evals.evaluators)"
        )
  if "shapes" in names and data_source is not None and data_source != "shapes":
    raise ValueError(
      f"config.evals.evaluators has 'shapes', which scores only the shapes demo data, but "
      f"config.data.source = {data_source!r}; drop it (clip_score / fid score any data)"
    )


def build_evaluators(evals: Any, data_source: str | None = None) -> list[Evaluator]:
  """The evaluators ``evals.evaluators`` names, in order (checked by :func:`check_evals`)."""
  check_evals(evals, data_source)
  return [_BUILDERS[name](evals) for name in parse_names(evals.evaluators)]


def eval_prompts(evaluators: Sequence[Evaluator], default: Sequence[str]) -> list[str]:
  """The prompts to sample for: the one evaluator that fixes its own (``shapes``), else ``default``.

  Raises:
    ValueError: two evaluators fix different prompt lists.
  """
  fixed = [e for e in evaluators if e.prompts is not None]
  if len({tuple(e.prompts) for e in fixed}) > 1:
    raise ValueError(f"evaluators {[e.name for e in fixed]} each need their own prompts")
  return list(fixed[0].prompts) if fixed else list(default)


def run_evaluators(
  evaluators: Sequence[Evaluator], images: np.ndarray, prompts: Sequence[str]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Runs every evaluator: ``(scalars, pictures)``, keys prefixed ``eval/`` and by picture name."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  scalars: dict[str, float] = {}
  pictures: dict[str, np.ndarray] = {}
  for ev in evaluators:
    for key, value in ev.run(images, prompts).items():
      if isinstance(value, np.ndarray) and value.ndim == 3:
        pictures[key] = value
      else:
        scalars[f"eval/{key}"] = float(value)
  return scalars, pictures


def format_results(scalars: Mapping[str, float]) -> str:
  """One ``name  value`` line per scalar, sorted."""
  width = max((len(k) for k in scalars), default=0)
  return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(scalars.items()))
