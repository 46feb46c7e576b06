"""From ``config.data`` to the training iterator of a stage, and fixed inputs for periodic evals."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax.data import pipeline, shapes, sources


def make_source(config: ml_collections.ConfigDict) -> Any:
  """The random-access source named by ``config.data.source``."""
  d = config.data
  if d.source == "shapes":
    # The largest stage resolution is rendered; lower stages and low-res inputs are downsampled
    # from it by the pipeline, so every stage sees the same scenes.
    size = max(int(config.stages[n].image_size) for n in config.stage_order)
    kwargs = {"length": int(d.shapes_length)} if d.shapes_length else {}
    return shapes.ShapesSource(
      seed=config.seed, image_size=size, two_object_prob=d.shapes_two_object_prob, **kwargs
    )
  if d.source == "folder":
    return sources.ImageFolderSource(d.path)
  if d.source == "manifest":
    return sources.ManifestSource(d.path, image_key=d.image_key, caption_key=d.caption_key)
  return sources.TfdsSource(
    d.tfds_name or d.path,
    split=d.split,
    data_dir=d.tfds_data_dir or None,
    image_key=d.image_key,
    caption_key=d.caption_key,
  )


def make_train_iterator(config: ml_collections.ConfigDict, stage: Any, text: Any):
  """A checkpointable Grain iterator of this process's share of the stage's global batch."""
  n_proc = jax.process_count()
  if stage.batch_size % n_proc:
    raise ValueError(
      f"config.stages.{stage.name}.batch_size={stage.batch_size} must divide by the "
      f"{n_proc} processes"
    )
  d = config.data
  ds = pipeline.make_dataset(
    make_source(config),
    image_size=int(stage.image_size),
    lowres_size=stage.lowres_size,
    sr_crop_size=int(stage.crop_size) or None,
    batch_size=stage.batch_size // n_proc,
    seed=config.seed,
    shuffle=d.shuffle,
    crop=d.crop,
    flip=d.flip,
    max_pixels=d.max_pixels,
    worker_count=d.worker_count,
    **text.pipeline_kwargs(),
  )
  return iter(ds)


def eval_prompts(config: ml_collections.ConfigDict, n: int) -> list[str]:
  """``n`` fixed captions from the training source (the first items) for sample grids."""
  src = make_source(config)
  out = []
  for i in range(min(len(src), 4 * n)):
    cap = src[i].get("caption")
    if isinstance(cap, bytes):
      cap = cap.decode("utf-8", errors="replace")
    out.append(cap or "")
    if len(out) == n:
      break
  return out


def eval_lowres(config: ml_collections.ConfigDict, stage: Any, prompts: list[str]) -> np.ndarray:
  """Low-res conditioning images ``[N, s, s, 3]`` in [-1, 1] matching ``prompts`` for SR evals.

  On the shapes data the scenes are rendered from the prompts themselves (so the alignment
  evaluator can score the SR output); otherwise the training source's first images are used.
  """
  s = int(stage.lowres_size)
  if config.data.source == "shapes":
    rng = np.random.default_rng(config.seed)
    imgs = [shapes.render(shapes.scene_from_spec(shapes.parse_caption(p), rng), s) for p in prompts]
    return np.stack(imgs).astype(np.float32) / 127.5 - 1.0
  ds = pipeline.make_map_dataset(
    make_source(config),
    image_size=int(stage.image_size),
    lowres_size=s,
    batch_size=len(prompts),
    seed=config.seed,
    shuffle=False,
  )
  return np.asarray(ds[0]["lowres"])
