"""Run config schema: defaults for a run and for each cascade stage, validation, and loading.

``configs/*.py`` files build on :func:`run_config` and :func:`stage_config`, so every config has the
same fields and every field has one documented default. A run trains the stages named in
``config.stage_order`` in turn; each stage writes to ``workdir/<stage name>/``. The same config
(saved as ``config.json`` in the workdir) tells the sampler how to rebuild each stage.

:func:`load_config` reads ``path/to/config.py[:arg]`` or a built-in config by name
(``shapes:ci``, ``base64:tiny``): the repository's ``configs/`` ships in the wheel as
``imagen_jax.configs``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import ml_collections

from imagen_jax import sharding
from imagen_jax.diffusion import PRED_TYPES

SOURCES = ("shapes", "folder", "manifest", "tfds")
DTYPES = ("float32", "bfloat16")


def stage_config(
  name: str, preset: str, image_size: int, lowres_size: int | None = None, **overrides: Any
) -> ml_collections.ConfigDict:
  """Defaults for one cascade stage (the paper's recipe where it gives one).

  Args:
    name: stage name; its checkpoints go to ``workdir/<name>/checkpoints``.
    preset: ``UNetConfig`` preset (``base64``, ``sr256``, ``sr1024``, ``tiny_base``...).
    image_size: output resolution of the stage.
    lowres_size: conditioning resolution for super-resolution stages (None for the base).
    **overrides: any top-level stage field.
  """
  c = ml_collections.ConfigDict()
  c.name = name
  c.model = ml_collections.ConfigDict({"preset": preset})  # + any UNetConfig field override
  c.image_size = image_size
  c.lowres_size = lowres_size
  c.crop_size = 0  # >0: train on random crops of this size (Imagen's 1024 stage: 256 of 1024)
  c.schedule = "cosine"
  # "shifted_cosine" only: λ + 2 log(schedule_base_size / image_size) ("simple diffusion"); a
  # base size below image_size makes the schedule noisier (4× less SNR per halving).
  c.schedule_base_size = 64
  c.objective = "eps"  # Imagen: epsilon prediction (§2.2)
  c.min_snr_gamma = 0.0  # 0 disables min-SNR-gamma loss weighting
  c.batch_size = 2048  # global batch (paper)
  c.grad_accum = 1  # micro-batches per optimizer update
  c.total_steps = 2_500_000
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=1e-4,
      warmup_steps=10_000,
      schedule="cosine",
      end_lr=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=1.0,
    )
  )
  c.ema_decay = 0.9999
  c.ema_warmup = True
  c.text_drop_prob = 0.1  # Imagen §4.1: zero the text embeddings 10% of the time (for CFG)
  c.max_aug_level = 1.0  # SR stages: training aug_level ~ U(0, max_aug_level)
  c.lowres_blur = 0.0  # SR stages: training blur σ ~ U(0, lowres_blur) low-res pixels (CDM §4.2)
  c.compute_dtype = "float32"
  c.max_consecutive_nonfinite = 20  # skipped updates in a row before stopping
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.log_every = 50
  c.eval_every = 5000  # samples + evaluators on EMA weights; 0 disables periodic evals
  c.num_eval_samples = 16
  c.final_eval = True  # sample grid (+ evaluators) on EMA weights when the stage finishes
  c.init_from = ""
  c.sample = ml_collections.ConfigDict(
    dict(
      sampler="dpmpp_2m",
      spacing="auto",  # DPM-Solver++: uniform in log-SNR (bench/RESULTS.md, "Step spacing")
      steps=25,
      guidance=5.0,
      thresholding="dynamic",
      percentile=99.5,
      aug_level=0.2,  # Imagen: 0.1-0.3 for the best samples
    )
  )
  c.update(overrides)
  return c


def run_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Defaults for a whole run (data, text encoder, evals) without stages."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ml_collections.ConfigDict()
  c.stage_order = ()
  c.train_stages = ""  # comma-separated subset of stage_order; empty = all
  c.init_from = ""  # a previous run's workdir (or, with one stage, a stage checkpoint dir)
  # Device mesh (imagen_jax.sharding.make_mesh): sizes of the data / fsdp / tensor axes, -1 = the
  # rest. The same config runs on 1 CPU, 8 GPUs or a pod; only these numbers change.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis name → mesh axes (first match wins); None = replicated. See sharding.py.
  c.logical_rules = tuple(
    (name, list(axes) if isinstance(axes, tuple) else axes) for name, axes in sharding.DEFAULT_RULES
  )
  c.text = ml_collections.ConfigDict(
    dict(
      encoder="",  # "shapes_demo", a Hugging Face T5 checkpoint directory, or a hub id
      max_length=128,
      dtype="float32",
      embedding_cache="",  # directory written by `python -m imagen_jax.tools.encode_texts`
      # Zero the T5 states of padding (this project's U-Nets); False keeps them (DeepFloyd IF,
      # whose text dropout and unconditional branch are then the empty prompt's states).
      zero_padding=True,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source="shapes",
      path="",  # folder / manifest path, or tfds builder directory
      tfds_name="",
      tfds_data_dir="",
      split="train",
      image_key="image",
      caption_key="caption",
      shuffle=True,
      flip=False,
      crop="center",
      max_pixels=64_000_000,
      worker_count=0,
      shapes_two_object_prob=0.3,
      shapes_length=0,  # >0: a finite shapes dataset of this many scenes (0 = infinite)
    )
  )
  # Evaluators run on EMA weights every stage's eval_every steps and at its end (final_eval);
  # imagen_jax.evaluators.registry has the interface. Any of "shapes" (the demo data's alignment),
  # "clip_score", "fid", "grid" (a sample grid, each prompt under its image).
  c.evals = ml_collections.ConfigDict(
    dict(
      evaluators=("grid",),
      num_prompts=64,  # shapes: how many of its prompts to sample
      prompts=(),  # explicit evaluation prompts (default: the shapes mix, else dataset captions)
      clip_score=dict(clip="", batch_size=32),  # clip: a CLIPModel dir or hub id
      # inception: pytorch-fid's pt_inception-2015-12-05 weights; ref_stats: the real images' .npz
      # (python -m imagen_jax.evaluators --ref_stats_from=DIR --out=stats.npz). FID needs thousands
      # of samples to be meaningful: raise the stage's num_eval_samples accordingly.
      fid=dict(inception="", ref_stats="", batch_size=32),
      grid=dict(max_images=16, tile=128),
      # After the last stage of stage_order is trained: sample the final stage's eval prompts
      # through the whole cascade (each stage on the previous stage's samples, as sample.py
      # does) and score them: the numbers a user of the cascade gets ("cascade/..." metrics).
      cascade=True,
    )
  )
  c.update(overrides)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast on mistakes that would otherwise surface deep in XLA; messages name the field."""
  if not config.stage_order:
    raise ValueError("config.stage_order is empty: list at least one stage from config.stages")
  for name in config.stage_order:
    if name not in config.stages:
      raise ValueError(
        f"config.stage_order names {name!r}, but config.stages has {sorted(config.stages)}"
      )
  for name in selected_stages(config):
    s = config.stages[name]
    where = f"config.stages.{name}"
    if s.objective not in PRED_TYPES:
      raise ValueError(f"{where}.objective={s.objective!r}; choose one of {PRED_TYPES}")
    if s.compute_dtype not in DTYPES:
      raise ValueError(f"{where}.compute_dtype={s.compute_dtype!r}; choose one of {DTYPES}")
    for field in ("batch_size", "total_steps", "grad_accum", "ckpt_every", "log_every"):
      if int(s[field]) < 1:
        raise ValueError(f"{where}.{field} must be >= 1, got {s[field]}")
    if s.batch_size % s.grad_accum:
      raise ValueError(
        f"{where}.batch_size={s.batch_size} is not divisible by grad_accum={s.grad_accum}"
      )
    if not 0.0 <= s.text_drop_prob <= 1.0:
      raise ValueError(f"{where}.text_drop_prob must be in [0, 1], got {s.text_drop_prob}")
    if not 0.0 <= s.max_aug_level <= 1.0:
      raise ValueError(f"{where}.max_aug_level must be in [0, 1], got {s.max_aug_level}")
    if int(s.schedule_base_size) < 1 or int(s.schedule_base_size) != s.schedule_base_size:
      raise ValueError(
        f"{where}.schedule_base_size must be a positive int (pixels), got {s.schedule_base_size}"
      )
    if s.schedule_base_size != 64 and s.schedule != "shifted_cosine":
      raise ValueError(
        f"{where}.schedule_base_size={s.schedule_base_size} only shifts the shifted cosine: set "
        f"{where}.schedule='shifted_cosine' too (it is {s.schedule!r})"
      )
    if not 0.0 <= s.lowres_blur <= 8.0:
      raise ValueError(
        f"{where}.lowres_blur must be in [0, 8] low-res pixels (0 disables), got {s.lowres_blur}"
      )
    if s.lowres_blur and s.lowres_size is None:
      raise ValueError(
        f"{where}.lowres_blur={s.lowres_blur} blurs an SR stage's low-res input, but this stage "
        f"has no lowres_size: set it to 0"
      )
    if not 0.0 <= s.ema_decay < 1.0:
      raise ValueError(f"{where}.ema_decay must be in [0, 1), got {s.ema_decay}")
    if s.lowres_size is not None and s.lowres_size >= s.image_size:
      raise ValueError(
        f"{where}.lowres_size={s.lowres_size} must be smaller than image_size={s.image_size}"
      )
  if config.data.source not in SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; choose one of {SOURCES}")
  if config.data.source in ("folder", "manifest") and not config.data.path:
    raise ValueError(f"config.data.source={config.data.source!r} needs config.data.path")
  if config.data.source == "tfds" and not (config.data.tfds_name or config.data.path):
    raise ValueError("config.data.source='tfds' needs config.data.tfds_name or config.data.path")
  unknown = sorted(set(config.mesh) - set(sharding.MESH_AXES))
  if unknown:
    raise ValueError(
      f"config.mesh has unknown axes {unknown}; the axes are {list(sharding.MESH_AXES)}"
    )
  if not (config.text.encoder or config.text.embedding_cache):
    raise ValueError(
      "config.text.encoder is empty: set it to 'shapes_demo', a T5 checkpoint directory, or a hub "
      "id (or set config.text.embedding_cache)"
    )


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  """Stages this invocation trains, in ``stage_order``."""
  if not config.train_stages:
    return list(config.stage_order)
  wanted = [s.strip() for s in config.train_stages.split(",") if s.strip()]
  unknown = [s for s in wanted if s not in config.stage_order]
  if unknown:
    raise ValueError(
      f"config.train_stages names {unknown}, not in config.stage_order={list(config.stage_order)}"
    )
  return [s for s in config.stage_order if s in wanted]


def paper_config(*stages: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run of the given stages with the paper's text encoder (T5-XXL, 128 tokens).

  The data source must be set by the user (``--config.data.source/path``).
  """
  c = run_config()
  c.text.encoder = "google/t5-v1_1-xxl"
  c.text.max_length = 128
  c.text.dtype = "bfloat16"
  c.data.source = "folder"
  for s in stages:
    # Settable from the command line (UNetConfig.scan_blocks, scan_impl).
    for field, default in (("scan_blocks", False), ("scan_impl", "auto")):
      if field not in s.model:
        s.model[field] = default
    c.stages[s.name] = s
  c.stage_order = tuple(s.name for s in stages)
  return c


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a paper config to CPU size: shapes data, the demo text encoder, short schedules."""
  c.text.update(encoder="shapes_demo", max_length=16, dtype="float32")
  c.data.source = "shapes"
  c.data.shuffle = False
  for name in c.stage_order:
    c.stages[name].update(
      batch_size=8, total_steps=200, ckpt_every=100, log_every=10, eval_every=0, ema_decay=0.999
    )
    c.stages[name].optimizer.update(lr=1e-3, warmup_steps=20)
    c.stages[name].sample.update(steps=10, guidance=3.0)
  return c


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """``config.logical_rules`` as the ``(name, axes)`` pairs :mod:`imagen_jax.sharding` takes."""
  out = []
  for entry in config.logical_rules:
    if len(entry) != 2:
      raise ValueError(f"config.logical_rules entries are (logical_name, mesh_axes); got {entry!r}")
    name, axes = entry
    out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def builtin_configs_dir() -> Path:
  """The directory of the built-in configs: ``imagen_jax.configs`` (the repository's ``configs/``).

  Installed, the wheel maps ``configs/`` to the package ``imagen_jax.configs``; run from a source
  checkout without installing, it is the ``configs/`` beside the package.
  """
  spec = importlib.util.find_spec("imagen_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return Path(next(iter(spec.submodule_search_locations)))
  return Path(__file__).resolve().parent.parent / "configs"


def builtin_config_names() -> list[str]:
  """Names accepted by :func:`resolve_config` (``shapes``, ``base64``, ``sr256``, ``sr1024``)."""
  return sorted(p.stem for p in builtin_configs_dir().glob("*.py") if not p.stem.startswith("_"))


def resolve_config(spec: str) -> str:
  """``path.py[:arg]`` or ``name[:arg]`` → ``/abs/path.py[:arg]``.

  A path that exists wins; otherwise a bare name (no ``/``, ``.py`` optional) is looked up among
  the built-in configs, so ``--config=shapes:ci`` works from any directory once installed.

  Raises:
    ValueError: neither a config file nor a built-in name (the message lists the names).
  """
  path, sep, arg = str(spec).partition(":")
  if os.path.isfile(path):
    return os.path.abspath(path) + sep + arg
  name = path[: -len(".py")] if path.endswith(".py") else path
  name = name[len("configs/") :] if name.startswith("configs/") else name
  candidate = builtin_configs_dir() / f"{name}.py"
  if name and os.sep not in name and "/" not in name and candidate.is_file():
    return str(candidate) + sep + arg
  raise ValueError(
    f"--config={spec}: no config file {path!r} and no built-in config of that name; use "
    f"path/to/config.py[:arg] or one of {builtin_config_names()} (e.g. --config=shapes:ci)"
  )


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of ``path/to/config.py[:arg]`` or of a built-in config ``name[:arg]``."""
  path, _, arg = resolve_config(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
