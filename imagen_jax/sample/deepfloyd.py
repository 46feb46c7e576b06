"""DeepFloyd IF checkpoints (diffusers format) as cascade stages and a text embedder.

An IF pipeline directory (``DeepFloyd/IF-I-XL-v1.0``, ``IF-II-L-v1.0``, or a fine-tuned copy)
holds ``unet/`` (config + safetensors, optionally ``fp16`` variant files), ``scheduler/`` (the
DDPM config) and, for stage I, ``text_encoder/`` + ``tokenizer/`` (T5-v1.1-XXL). Each becomes:

* a stage: :class:`~imagen_jax.stage.if_model.IFStageModel` on the scheduler's discrete
  schedule, with IF's sampling defaults (:data:`IF_STAGE_I_SETTINGS`,
  :data:`IF_STAGE_II_SETTINGS`: DDPM with the learned variance, 100 / 50 steps, guidance 7 / 4,
  dynamic thresholding at 95% capped at 1.5, stage II's augmentation at IF's noise level 250);
* the text: T5 at IF's 77 tokens, padding *not* zeroed (IF was trained on the raw hidden states
  of every position), and ``""`` as the unconditional prompt, as IF's pipelines encode it.

DeepFloyd IF's weights are under the DeepFloyd IF licence; nothing here ships or fetches them
unless a Hub id is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from huggingface_hub import hf_hub_download

from imagen_jax import sharding
from imagen_jax.diffusion.discrete import DiscreteSchedule
from imagen_jax.models.if_loading import load_if_unet
from imagen_jax.sample.stage import SamplerSettings
from imagen_jax.stage.if_model import IFStageModel
from imagen_jax.stage.text_cond import TextEmbedder
from imagen_jax.text import T5Encoder

IF_MAX_LENGTH = 77  # IF's pipelines pad and truncate prompts to 77 T5 tokens
IF_NULL_PROMPT = ""  # the unconditional branch: the embedding of the empty prompt
IF_NOISE_LEVEL = 250  # stage II's default augmentation timestep

IF_STAGE_I_SETTINGS = dict(
  sampler="ancestral", steps=100, guidance=7.0, thresholding="dynamic", percentile=95.0,
  threshold_max=1.5,
)  # fmt: skip
IF_STAGE_II_SETTINGS = dict(
  IF_STAGE_I_SETTINGS, steps=50, guidance=4.0, aug_level=(IF_NOISE_LEVEL + 1) / 1000
)


def noise_level_to_aug_level(noise_level: int, num_train_timesteps: int = 1000) -> float:
  """IF's stage-II ``noise_level`` (a timestep τ) as our ``aug_level`` t = (τ + 1) / N."""
  if not 0 <= int(noise_level) < num_train_timesteps:
    raise ValueError(f"noise_level must be in [0, {num_train_timesteps}), got {noise_level}")
  return (int(noise_level) + 1) / num_train_timesteps


def _read_json(path: str | os.PathLike, subfolder: str, name: str, revision: str | None) -> dict:
  local = Path(path)
  text = str(path)
  is_hub_id = not local.exists() and not os.path.isabs(text) and text.count("/") == 1
  if not is_hub_id:
    file = local / subfolder / name
    if not file.is_file():
      raise FileNotFoundError(
        f"{local}: no {subfolder}/{name}; expected the diffusers pipeline directory (unet/, "
        "scheduler/, ...) of a DeepFloyd IF stage"
      )
  else:  # "org/name" on the Hub (online, or in the local Hugging Face cache)
    file = Path(hf_hub_download(text, name, subfolder=subfolder, revision=revision))
  return json.loads(file.read_text())


def scheduler_settings(config: dict) -> tuple[DiscreteSchedule, dict, bool]:
  """A diffusers DDPM scheduler config → (schedule, thresholding settings, learned variance).

  Raises:
    ValueError: a prediction type or variance type this port does not sample with.
  """
  pred = config.get("prediction_type", "epsilon")
  if pred != "epsilon":
    raise ValueError(f"scheduler config: prediction_type={pred!r}; IF stages predict 'epsilon'")
  variance = config.get("variance_type", "fixed_small")
  if variance not in ("learned_range", "fixed_small"):
    raise ValueError(
      f"scheduler config: variance_type={variance!r} is not supported; IF uses 'learned_range' "
      "('fixed_small' is the ancestral sampler's own)"
    )
  if config.get("thresholding", False):
    thresh = dict(
      thresholding="dynamic",
      percentile=100.0 * float(config.get("dynamic_thresholding_ratio", 0.995)),
      threshold_max=float(config.get("sample_max_value", 1.0)),
    )
  elif config.get("clip_sample", True):
    thresh = dict(thresholding="static")
  else:
    thresh = dict(thresholding="none")
  return DiscreteSchedule.from_diffusers(config), thresh, variance == "learned_range"


def load_if_stage(
  path: str | os.PathLike,
  *,
  lowres_size: int | None = None,
  variant: str | None = None,
  dtype: Any = jnp.float32,
  mesh: Any = None,
  rules: sharding.Rules | None = None,
  revision: str | None = None,
) -> dict[str, Any]:
  """One IF stage from its pipeline directory: the fields of a ``CascadeStage``.

  Args:
    path: the pipeline directory (``unet/`` + ``scheduler/``) or a Hub id.
    lowres_size: stage II's input size (the previous stage's image size; default: a quarter of
      its own, IF's ×4).
    variant: weight-file variant, e.g. ``"fp16"``.
    dtype: compute dtype (``jnp.bfloat16`` on accelerators; norms and softmax stay fp32).
    mesh: the mesh the weights are read onto (FSDP-sharded by their logical axis names).
    rules: logical axis rules for ``mesh``.
    revision: Hub revision.

  Returns:
    ``name``, ``model``, ``params``, ``schedule``, ``pred_type``, ``image_size``,
    ``lowres_size``, ``settings`` (a dict of sampler settings), ``learned_variance``.
  """
  loaded = load_if_unet(
    path, variant=variant, dtype=dtype, mesh=mesh, rules=rules, revision=revision
  )
  schedule, thresh, learned = scheduler_settings(
    _read_json(path, "scheduler", "scheduler_config.json", revision)
  )
  model = IFStageModel.create(loaded.config, schedule=schedule)
  if learned and not model.learned_variance:
    raise ValueError(
      f"{path}: the scheduler has variance_type='learned_range' but the U-Net has "
      f"out_channels={loaded.config.out_channels} (need 2 × the image channels)"
    )
  size = int(loaded.config.sample_size)
  if model.is_super_resolution:  # (stage_sizes reads the same rule from config.json)
    lowres_size = size // 4 if lowres_size is None else int(lowres_size)
    settings = dict(IF_STAGE_II_SETTINGS, **thresh)
  else:
    if lowres_size is not None:
      raise ValueError(f"{path} is an IF stage I: it takes no low-res input")
    settings = dict(IF_STAGE_I_SETTINGS, **thresh)
  name = Path(str(path).rstrip("/")).name or "if"
  return dict(
    name=name,
    model=model,
    params=loaded.params,
    schedule=schedule,
    pred_type="eps",
    image_size=size,
    lowres_size=lowres_size,
    settings=settings,
    learned_variance=learned,
  )


def load_if_text(
  path: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  shardings: Any = None,
  revision: str | None = None,
) -> TextEmbedder:
  """IF's text conditioning: T5 at 77 tokens with raw (not zeroed) padding states.

  Args:
    path: an IF stage-I pipeline directory (``text_encoder/`` + ``tokenizer/``), or a T5
      checkpoint directory / Hub id holding its own tokenizer (``google/t5-v1_1-xxl``).
    dtype: T5 compute dtype.
    shardings: T5 weight placement, e.g. ``(mesh, rules)``.
    revision: Hub revision.
  """
  local = Path(path)
  if (local / "text_encoder").is_dir():
    encoder = T5Encoder.from_pretrained(
      local,
      dtype=dtype,
      max_length=IF_MAX_LENGTH,
      shardings=shardings,
      subfolder="text_encoder",
      tokenizer_path=local / "tokenizer",
      revision=revision,
    )
  else:
    encoder = T5Encoder.from_pretrained(
      path, dtype=dtype, max_length=IF_MAX_LENGTH, shardings=shardings, revision=revision
    )
  return TextEmbedder(encoder, zero_padding=False)


def stage_names(paths: Sequence[str | os.PathLike]) -> list[str]:
  """The stage names of IF pipeline directories: each directory's name, made unique."""
  names: list[str] = []
  for path in paths:
    name = Path(str(path).rstrip("/")).name or "if"
    names.append(f"{name}_{len(names)}" if name in names else name)
  return names


def stage_sizes(
  paths: Sequence[str | os.PathLike], revision: str | None = None
) -> list[tuple[str, int, int | None]]:
  """``(name, image_size, lowres_size)`` per stage from the U-Nets' configs alone (no weights):
  the checks a command line makes before anything loads."""
  out: list[tuple[str, int, int | None]] = []
  for name, path in zip(stage_names(paths), paths, strict=True):
    cfg = _read_json(path, "unet", "config.json", revision)
    size = int(cfg.get("sample_size", 64))
    sr = int(cfg.get("in_channels", 3)) == int(cfg.get("out_channels", 6))
    out.append((name, size, (out[-1][1] if out else size // 4) if sr else None))
  return out


def load_if_stages(
  paths: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  t5: str | os.PathLike | None = None,
  settings: dict[str, dict] | None = None,
  variant: str | None = None,
  dtype: Any = jnp.float32,
  mesh: Any = None,
) -> tuple[list[dict[str, Any]], TextEmbedder]:
  """IF stages (base first) and their text embedder: what ``Cascade.from_diffusers`` wraps.

  Stages are named by their directory (``IF-I-XL-v1.0``); each stage II reads the previous
  stage's image size. ``settings`` overrides IF's sampling defaults by stage name.

  Returns:
    ``(stages, text)``: ``CascadeStage`` fields per stage (``settings`` a ``SamplerSettings``),
    and T5 from ``t5`` or the first directory's ``text_encoder/`` + ``tokenizer/``.
  """
  paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
  if not paths:
    raise ValueError("DeepFloyd IF needs at least one pipeline directory")
  rules = sharding.DEFAULT_RULES
  text = load_if_text(t5 if t5 is not None else paths[0], dtype=dtype, shardings=(mesh, rules))
  stages: list[dict[str, Any]] = []
  for name, path in zip(stage_names(paths), paths, strict=True):
    lowres = stages[-1]["image_size"] if stages else None
    fields = load_if_stage(path, lowres_size=lowres, variant=variant, dtype=dtype, mesh=mesh)
    stages.append({**fields, "name": name})
  names = [s["name"] for s in stages]
  unknown = sorted(set(settings or {}) - set(names))
  if unknown:
    raise ValueError(f"settings for unknown stages {unknown}; stages: {names}")
  for fields in stages:
    overrides = (settings or {}).get(fields["name"], {})
    fields["settings"] = SamplerSettings.from_config({**fields["settings"], **overrides})
  return stages, text
