"""A cascade stage's U-Net as a pure function: ``apply(params, ...)`` over a plain params pytree.

Params are a nested dict of arrays (``nnx.to_pure_dict``), which optax, Orbax and the train step
treat as an ordinary pytree; the graph definition stays static. The model is never built eagerly
with random weights on the host: ``init_params`` runs inside ``jax.jit``, so the weights are
created directly on device (and, with shardings, directly sharded).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import diffusion
from imagen_jax.diffusion.discrete import BETA_SCHEDULES, DiscreteSchedule
from imagen_jax.models.if_loading import read_if_unet_config, resolve_if_unet_dir
from imagen_jax.models.if_unet import IFUNetConfig
from imagen_jax.models.unet import build_unet
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.stage.if_model import IFStageModel
from imagen_jax.stage.pure import PureModel

MODEL_FAMILIES = ("imagen", "if")  # this project's U-Nets; DeepFloyd IF's (diffusers) U-Nets
_MODEL_KEYS = ("preset", "family")  # stage.model keys that are not architecture overrides


def unet_config_for_stage(stage: Any, text_dim: int) -> UNetConfig:
  """``UNetConfig`` of a stage: its preset + ``stage.model`` overrides, sized to the text encoder.

  ``text_dim`` always follows the text encoder actually used (the paper presets assume T5-XXL's
  4096), and ``dtype`` follows ``stage.compute_dtype``.
  """
  overrides = {k: v for k, v in dict(stage.model).items() if k not in _MODEL_KEYS}
  for k, v in list(overrides.items()):
    if isinstance(v, list):
      overrides[k] = tuple(v)
  if overrides.get("prediction", stage.objective) != stage.objective:
    raise ValueError(
      f"config.stages.{stage.name}.model.prediction={overrides['prediction']!r} but the stage "
      f"trains objective={stage.objective!r}; leave model.prediction unset (it follows the "
      "objective)"
    )
  overrides["prediction"] = stage.objective
  overrides.setdefault("text_dim", int(text_dim))
  overrides.setdefault("dtype", stage.compute_dtype)
  cfg = UNetConfig.from_preset(stage.model.preset, **overrides)
  is_sr = stage.lowres_size is not None
  if cfg.lowres_cond != is_sr:
    raise ValueError(
      f"config.stages.{stage.name}: model preset {stage.model.preset!r} has lowres_cond="
      f"{cfg.lowres_cond} but the stage lowres_size={stage.lowres_size}; use a super-resolution "
      "preset (sr256, sr1024, tiny_sr...) exactly when lowres_size is set"
    )
  if cfg.image_size != stage.image_size:
    # Attention resolutions are defined relative to the preset's image size, so it is never
    # silently changed (crops of a larger image are fine: see stage.crop_size).
    raise ValueError(
      f"config.stages.{stage.name}.image_size={stage.image_size} but model preset "
      f"{stage.model.preset!r} is built for {cfg.image_size}; set "
      f"config.stages.{stage.name}.model.image_size (and its attention resolutions) to match"
    )
  return cfg


def if_unet_config_for_stage(stage: Any, text_dim: int) -> IFUNetConfig:
  """``IFUNetConfig`` of an IF stage: the ``unet/config.json`` of ``stage.init_from`` when it is a
  diffusers checkpoint (the released IF configs), else ``stage.model.preset``; plus
  ``stage.model`` overrides, ``dtype`` from ``stage.compute_dtype``.

  A preset's text width follows the text encoder; a checkpoint's must equal it.
  """
  where = f"config.stages.{stage.name}"
  overrides = {k: v for k, v in dict(stage.model).items() if k not in _MODEL_KEYS}
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  overrides["dtype"] = jnp.dtype(overrides.get("dtype", stage.compute_dtype))
  init = str(stage.get("init_from", "") or "")
  if init and is_diffusers_unet(init):
    cfg = read_if_unet_config(resolve_if_unet_dir(init), **overrides)
    if cfg.encoder_hid_dim != int(text_dim):
      raise ValueError(
        f"{where}.init_from={init}: the U-Net reads text of width {cfg.encoder_hid_dim}, but the "
        f"text encoder gives {text_dim}; set config.text.encoder to the T5 it was trained with"
      )
  else:
    overrides.setdefault("encoder_hid_dim", int(text_dim))
    cfg = IFUNetConfig.from_preset(stage.model.preset, **overrides)
  if int(cfg.sample_size) != int(stage.image_size):
    raise ValueError(
      f"{where}.image_size={stage.image_size} but the IF U-Net is built for {cfg.sample_size}"
    )
  sr = cfg.in_channels == cfg.out_channels
  if sr != (stage.lowres_size is not None):
    raise ValueError(
      f"{where}: the IF U-Net is {'stage II (super-resolution)' if sr else 'stage I'}, but "
      f"lowres_size={stage.lowres_size}; set lowres_size exactly for stage II"
    )
  return cfg


def is_diffusers_unet(path: str) -> bool:
  """Whether ``path`` is a local diffusers pipeline (``unet/config.json``) or U-Net directory."""
  for config in (os.path.join(path, "unet", "config.json"), os.path.join(path, "config.json")):
    if os.path.isfile(config):
      with open(config) as f:
        return json.load(f).get("_class_name") == "UNet2DConditionModel"
  return False


def create_stage_model(stage: Any, *, text_dim: int, seed: int = 0) -> Any:
  """The stage's model by ``stage.model.family``: :class:`StageModel` (``imagen``, default) or
  :class:`~imagen_jax.stage.if_model.IFStageModel` (``if``: DeepFloyd IF's U-Net)."""
  family = stage.model.get("family", "imagen")
  if family == "imagen":
    return StageModel.create(stage, text_dim=text_dim, seed=seed)
  if family == "if":
    cfg = if_unet_config_for_stage(stage, text_dim)
    return IFStageModel.create(cfg, schedule=stage_schedule(stage), seed=seed)
  raise ValueError(
    f"config.stages.{stage.name}.model.family={family!r}; choose one of {MODEL_FAMILIES}"
  )


def stage_schedule(stage: Any) -> diffusion.Schedule:
  """The noise schedule named by ``stage.schedule`` (shifted cosine is shifted by
  2 log(``stage.schedule_base_size`` / image size);
  ``ddpm_<beta schedule>``, e.g. ``ddpm_squaredcos_cap_v2`` (DeepFloyd IF's), is a discrete
  1000-step DDPM table)."""
  if str(stage.schedule).startswith("ddpm_"):
    beta = str(stage.schedule)[len("ddpm_") :]
    if beta not in BETA_SCHEDULES:
      raise ValueError(
        f"config.stages.{stage.name}.schedule={stage.schedule!r}; the DDPM tables are "
        f"{['ddpm_' + b for b in BETA_SCHEDULES]}"
      )
    return DiscreteSchedule(beta_schedule=beta)
  kwargs = {}
  if stage.schedule == "shifted_cosine":
    kwargs = {"image_size": int(stage.image_size)}
    if "schedule_base_size" in stage:  # runs saved before the field keep the schedule's default
      kwargs["base_size"] = int(stage.schedule_base_size)
  return diffusion.get_schedule(stage.schedule, **kwargs)


@dataclasses.dataclass(frozen=True)
class StageModel(PureModel):
  """The static half of a stage's U-Net (config + graph) with pure ``init_params`` / ``apply``."""

  config: UNetConfig
  graphdef: Any
  abstract_state: Any  # nnx.State of ShapeDtypeStructs: the template params are merged into
  seed: int

  @classmethod
  def create(cls, stage: Any, *, text_dim: int, seed: int = 0) -> StageModel:
    cfg = unet_config_for_stage(stage, text_dim)
    abstract = nnx.eval_shape(lambda: build_unet(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    return cls(cfg, graphdef, abstract_state, seed)

  def init_params(self) -> dict:
    """Random initial params as a pure dict (call inside ``jax.jit``)."""
    model = build_unet(self.config, rngs=nnx.Rngs(self.seed))
    return nnx.to_pure_dict(nnx.state(model))

  def apply(self, params: dict, x, logsnr, text_emb, text_mask, **kwargs) -> jax.Array:
    """The U-Net forward as a pure function of ``params`` (see ``UNet.__call__``)."""
    return self.merge(params)(x, logsnr, text_emb, text_mask, **kwargs)

  @property
  def learned_variance(self) -> bool:
    """This project's U-Nets predict the mean only."""
    return False

  def prepare_lowres(self, lowres: Any, size: int) -> Any:
    """The previous stage's images as this stage's low-res input: unchanged (the U-Net
    resizes them itself, after noise augmentation at the low resolution)."""
    return lowres
