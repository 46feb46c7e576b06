"""A cascade stage (its U-Net, diffusion setup and sampling settings) and its per-call inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from imagen_jax.sample.stage import SamplerSettings
from imagen_jax.stage.model import stage_schedule


@dataclasses.dataclass
class CascadeStage:
  """One stage: a U-Net (static part + params), its diffusion setup and sampling settings."""

  name: str
  model: Any  # imagen_jax.stage.model.StageModel
  params: Any
  schedule: Any
  pred_type: str
  image_size: int
  lowres_size: int | None
  settings: SamplerSettings
  checkpoint_step: int | None = None
  workdir: str | None = None  # the training run it was restored from
  learned_variance: bool = False  # the U-Net also outputs a learned-range variance (IF)

  @classmethod
  def from_stage_config(
    cls, stage: Any, model: Any, params: Any, *, settings: dict | None = None, **fields: Any
  ) -> CascadeStage:
    """A stage from its training config (``config.stages.<name>``): schedule, objective, sizes
    and the ``sample`` settings (updated by ``settings``); ``fields`` set the rest."""
    fields.setdefault("name", stage.name)
    return cls(
      model=model,
      params=params,
      schedule=stage_schedule(stage),
      pred_type=stage.objective,
      image_size=int(stage.image_size),
      lowres_size=stage.lowres_size,
      settings=SamplerSettings.from_config({**dict(stage.sample), **(settings or {})}),
      learned_variance=model.learned_variance,
      **fields,
    )


@dataclasses.dataclass(frozen=True)
class StageInputs:
  """Per-stage inputs of :meth:`Cascade.generate` beyond prompts and seed (host arrays, N rows).

  Attributes:
    latent: ``[N, H, W, 3]``: start from this x_1 instead of seeded noise (an inverted image).
    known: ``[N, H, W, 3]`` in [-1, 1]: inpainting's known image at this stage's resolution.
    mask: ``[N, H, W]`` bool, True = generate (with ``known``).
    null_emb: ``[steps, N, L, D]``: the unconditional condition of every step (null-text
      inversion), with ``null_mask`` ``[N, L]``.
    null_mask: see ``null_emb``.
    aug_eps: ``[N, h, w, 3]``: the noise that augments an SR stage's low-res input (an
      inversion's, so that sampling undoes it exactly; default: drawn from the seed).
  """

  latent: np.ndarray | None = None
  known: np.ndarray | None = None
  mask: np.ndarray | None = None
  null_emb: np.ndarray | None = None
  null_mask: np.ndarray | None = None
  aug_eps: np.ndarray | None = None
