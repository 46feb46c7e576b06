"""The Grain training pipeline: source -> shard -> shuffle -> repeat -> per-example ops -> batches.

``make_dataset`` returns a ``grain.IterDataset`` of fixed-shape numpy batches. It is

* deterministic: batch ``k`` depends only on (source, config, process_index, process_count); the
  shuffle and the random ops (crop, flip) are seeded from ``seed`` and the element's position;
* shardable: one global stream (shuffle, epochs and random ops seeded identically everywhere) is
  cut into global batches of ``P × batch_size``; process ``p`` of ``P`` loads only rows
  ``[p·b, (p+1)·b)`` of each. The global batch is the same for any process count, so a run on
  2 hosts matches a run on 1 (elements are loaded lazily: no process reads others' rows);
* checkpointable: its iterator's ``get_state()``/``set_state()`` (``{"next_index": k}``) and
  ``grain.checkpoint.CheckpointSave/CheckpointRestore`` resume at the exact next batch;
* robust to bad data (see ``DataConfig`` and ``_ExampleLoader``): a bad image is replaced by the
  next good one, so shapes never change, and every problem is counted in the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from imagen_jax.data import preprocess as pp
from imagen_jax.data.sources import TextEmbeddingLookup, lookup_text_embeddings

log = logging.getLogger(__name__)

# Per-example counters in every batch: int32 [B], summed by the trainer for metrics.
COUNTER_KEYS = tuple(f"bad_{r}" for r in pp.BAD_REASONS)
# Distinct bad keys logged per reason per process before going quiet (they are still counted).
LOG_LIMIT_PER_REASON = 100


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipeline produces. Fields mirror ``make_dataset``'s keyword arguments.

  Attributes:
    image_size: side of the (high-res) training image, e.g. 64, 256 or 1024.
    lowres_size: SR stages only: side of the antialiased low-res conditioning image.
    sr_crop_size: 1024 stage only: train on aligned random crops of this size of the high-res image
      (and ``sr_crop_size * lowres_size / image_size`` of the low-res one), e.g. 256 of 1024.
    batch_size: per-process batch size.
    seed: seeds the shuffle and the random ops.
    shuffle: global shuffle of each process's shard, reshuffled every epoch.
    crop: ``"center"`` or ``"random"`` square crop after resizing the shorter side.
    flip: random left-right flips (off by default: captions may say "left"/"right").
    max_pixels: images with more pixels (header size, before decoding) are ``too_large``.
    min_size_policy: an image with shorter side < ``image_size`` is counted as ``too_small`` and
      then either replaced (``"reject"``, default: upscaled images teach blur) or upscaled.
    resample: PIL filter for resizing and low-res images (``box|bilinear|bicubic|lanczos``).
    num_epochs: ``None`` repeats forever.
    keep_captions: also return ``"caption"``, a numpy object array of ``str`` (not jit-able).
    max_consecutive_bad: give up with an error after this many bad examples in a row.
    worker_count: >0 runs the per-example work in that many processes (``mp_prefetch``); the
      source must then be picklable by cloudpickle (all sources here are).
    read_threads: threads preparing batches in each process.
    prefetch_buffer_size: batches prepared ahead in each process.
  """

  image_size: int
  lowres_size: int | None = None
  sr_crop_size: int | None = None
  batch_size: int = 32
  seed: int = 0
  shuffle: bool = True
  crop: str = "center"
  flip: bool = False
  max_pixels: int | None = 1 << 26
  min_size_policy: str = "reject"
  resample: str = "bicubic"
  num_epochs: int | None = None
  keep_captions: bool = False
  max_consecutive_bad: int = 1000
  worker_count: int = 0
  read_threads: int = 4
  prefetch_buffer_size: int = 8

  def __post_init__(self):
    if self.crop not in ("center", "random"):
      raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
    if self.min_size_policy not in ("reject", "upscale"):
      raise ValueError(f"min_size_policy must be 'reject' or 'upscale': {self.min_size_policy!r}")
    if self.lowres_size is not None and not 0 < self.lowres_size < self.image_size:
      raise ValueError(f"lowres_size {self.lowres_size} must be in (0, {self.image_size})")
    if self.sr_crop_size is not None:
      if self.lowres_size is None:
        raise ValueError("sr_crop_size needs lowres_size (it crops SR pairs)")
      k, rem = divmod(self.image_size, self.lowres_size)
      if rem or self.sr_crop_size % k or not 0 < self.sr_crop_size <= self.image_size:
        raise ValueError(
          f"sr_crop_size {self.sr_crop_size} must divide by image_size/lowres_size and fit "
          f"image_size {self.image_size} (with lowres_size {self.lowres_size})"
        )
    if self.batch_size < 1 or self.max_consecutive_bad < 1:
      raise ValueError("batch_size and max_consecutive_bad must be positive")


def example_ops(cfg: DataConfig) -> list[tuple[str, pp.Op]]:
  """The per-example map, as named ops: decode|to_rgb|min_size|resize|crop|flip|sr|value_range."""
  spec: list[tuple[str, dict[str, Any]]] = [
    ("decode", {"max_pixels": cfg.max_pixels, "draft_size": cfg.image_size}),
    ("to_rgb", {}),
    ("min_size", {"size": cfg.image_size, "policy": cfg.min_size_policy}),
    ("resize_shorter", {"size": cfg.image_size, "resample": cfg.resample}),
    ("crop", {"size": cfg.image_size, "mode": cfg.crop}),
  ]
  if cfg.flip:
    spec.append(("random_flip", {}))
  if cfg.lowres_size is not None:
    spec.append(("sr_pair", {"lowres_size": cfg.lowres_size, "resample": cfg.resample}))
    if cfg.sr_crop_size is not None:
      spec.append(("crop_pair", {"crop_size": cfg.sr_crop_size}))
  spec.append(("value_range", {}))
  return pp.build_ops(spec)


# Log-once bookkeeping is per process and shared by all pipelines (thread-safe).
_LOG_LOCK = threading.Lock()
_LOGGED: set[tuple[str, str, str]] = set()
_LOGGED_PER_REASON: dict[str, int] = {}


def _log_once(source: str, key: str, reason: str, detail: str, action: str) -> None:
  with _LOG_LOCK:
    n = _LOGGED_PER_REASON.get(reason, 0)
    if n >= LOG_LIMIT_PER_REASON or (source, key, reason) in _LOGGED:
      return
    _LOGGED.add((source, key, reason))
    _LOGGED_PER_REASON[reason] = n = n + 1
  log.warning("Bad example %r in %s: %s (%s); %s.", key, source, reason, detail, action)
  if n == LOG_LIMIT_PER_REASON:
    log.warning("Logged %d %r examples; further ones are counted, not logged.", n, reason)


class _ExampleLoader:
  """``(source index, rng) -> example``, replacing a bad image by the next good index.

  Counters describe the record *at the requested index* (1 if it had that problem), so summed over
  an epoch they equal the number of records with each problem; records skipped while looking for a
  replacement are counted when their own index comes up. Bad indices are remembered (per process)
  so a bad file is not decoded again next epoch.
  """

  def __init__(self, source: Any, ops: list[tuple[str, pp.Op]], max_consecutive_bad: int):
    self.source, self.ops, self.max_bad = source, ops, max_consecutive_bad
    self.name = repr(source)
    self._bad: dict[int, tuple[str, str, str, tuple[str, ...]]] = {}

  def _load(self, j: int, rng: np.random.Generator) -> tuple[dict | None, str, tuple[str, ...]]:
    """Returns ``(example or None, image reason or "", caption issues)``."""
    if j in self._bad:
      _, reason, _, issues = self._bad[j]
      return None, reason, issues
    key, issues = str(j), ()
    try:
      rec = self.source[j]
    except Exception as e:  # The source could not produce the record at all (IO, permissions).
      reason, detail = "unreadable", f"{type(e).__name__}: {e}"
    else:
      key = str(rec.get("key", rec.get("id", j)))
      caption, issues = pp.normalize_caption(rec.get("caption"))
      for r in issues:
        _log_once(self.name, key, r, repr(rec.get("caption"))[:80], f"kept as {caption[:40]!r}")
      try:
        ex = pp.apply_ops(self.ops, {"image": rec.get("image")}, rng)
      except pp.BadExample as e:
        reason, detail = e.reason, e.detail
      else:
        for r in ex.pop("issues", ()):
          _log_once(self.name, key, r, "shorter side < image_size", "upscaled")
          issues = (*issues, r)
        return {**ex, "caption": caption}, "", issues
    self._bad[j] = (key, reason, detail, issues)
    _log_once(self.name, key, reason, detail, "replaced by the next good example")
    return None, reason, issues

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    n = len(self.source)
    counts = dict.fromkeys(pp.BAD_REASONS, 0)
    for attempt in range(min(self.max_bad, n)):
      j = (int(index) + attempt) % n
      ex, reason, issues = self._load(j, rng)
      if attempt == 0:
        for r in issues:
          counts[r] += 1
        if reason:
          counts[reason] += 1
      if ex is not None:
        return {**ex, "counts": counts}
    key, reason, detail, _ = self._bad[j]
    raise RuntimeError(
      f"{attempt + 1} consecutive bad examples from index {index} in {self.name} (of {n}); "
      f"last: {key!r} {reason}: {detail}. Check the data, or raise max_consecutive_bad."
    )


class _Collate:
  """Stacks examples into a batch; adds tokens / cached text embeddings for the captions."""

  def __init__(self, keep_captions: bool, tokenize_fn: Callable | None, cache: Any):
    self.keep_captions, self.tokenize_fn, self.cache = keep_captions, tokenize_fn, cache

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {"image": np.stack([e["image"] for e in examples])}
    if "lowres" in examples[0]:
      batch["lowres"] = np.stack([e["lowres"] for e in examples])
    for r, k in zip(pp.BAD_REASONS, COUNTER_KEYS):
      batch[k] = np.asarray([e["counts"][r] for e in examples], np.int32)
    captions = [e["caption"] for e in examples]
    extra = {}
    if self.tokenize_fn is not None:
      for k, v in self.tokenize_fn(captions).items():
        v = np.asarray(v)
        # int64 ids would be silently truncated (and warned about) by jax without x64.
        extra[k] = v.astype(np.int32) if v.dtype.kind in "iu" and v.dtype.itemsize > 4 else v
    if self.cache is not None:
      extra.update(lookup_text_embeddings(self.cache, captions))
    clash = set(extra) & (set(batch) | {"caption"})
    if clash:
      raise ValueError(f"tokenize_fn/embedding cache keys {sorted(clash)} clash with batch keys")
    batch.update(extra)
    if self.keep_captions:
      batch["caption"] = np.asarray(captions, dtype=object)
    return batch


class _ProcessRows(grain.MapDataset):
  """Process ``p``'s rows of each global batch: element ``j`` is global element
  ``(j // b)·P·b + p·b + j % b`` (``b`` rows per process, ``P`` processes)."""

  def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int):
    super().__init__(parent)
    self._rows, self._index, self._count = rows, index, count
    self._length = len(parent) // (rows * count) * rows  # whole global batches only

  def __len__(self) -> int:
    return self._length

  def _global(self, j: int) -> int:
    k, r = divmod(j, self._rows)
    return (k * self._count + self._index) * self._rows + r

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]

  def __str__(self) -> str:
    return f"ProcessRows(rows={self._rows}, process={self._index}/{self._count})"


def make_map_dataset(
  source: Any,
  config: DataConfig | None = None,
  *,
  tokenize_fn: Callable[[list[str]], dict] | None = None,
  embedding_cache: TextEmbeddingLookup | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  **overrides: Any,
) -> grain.MapDataset:
  """Like ``make_dataset`` but returns the random-access ``MapDataset`` of batches (``ds[k]``)."""
  cfg = DataConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  n = len(source)
  global_batch = cfg.batch_size * process_count
  if cfg.num_epochs is not None and n * cfg.num_epochs < global_batch:
    raise ValueError(
      f"{source!r} has {n} examples: too few for {process_count} processes x batch "
      f"{cfg.batch_size} x {cfg.num_epochs} epochs"
    )
  ds = grain.MapDataset.range(n).seed(cfg.seed)  # Derives the shuffle and random-op seeds.
  if cfg.shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(cfg.num_epochs)  # Reseeds the shuffle and random ops each epoch.
  # Random ops are seeded by the position in the *global* stream, before the process split.
  ds = ds.random_map(_ExampleLoader(source, example_ops(cfg), cfg.max_consecutive_bad))
  if process_count > 1:
    ds = _ProcessRows(ds, cfg.batch_size, process_index, process_count)
  collate = _Collate(cfg.keep_captions, tokenize_fn, embedding_cache)
  return ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=collate)


def make_dataset(
  source: Any,
  config: DataConfig | None = None,
  *,
  tokenize_fn: Callable[[list[str]], dict] | None = None,
  embedding_cache: TextEmbeddingLookup | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  **overrides: Any,
) -> grain.IterDataset:
  """Builds the training input pipeline.

  Args:
    source: random-access records ``{"image", "caption", "key"}`` (see ``sources.py``).
    config: a ``DataConfig``; or omit it and pass its fields as keywords (``image_size=64, ...``).
      Keywords also override fields of a given config.
    tokenize_fn: ``list[str] -> {name: [B, L] array}`` applied to each batch's captions (int64
      outputs are cast to int32), e.g. ``input_ids``/``attention_mask``.
    embedding_cache: an object with ``lookup(captions) -> (emb, mask)``; adds ``text_emb`` and
      ``text_mask`` (bool).
    process_index: this process's shard (default ``jax.process_index()``).
    process_count: number of shards (default ``jax.process_count()``).
    **overrides: ``DataConfig`` fields.

  Returns:
    A ``grain.IterDataset`` of batches: ``image`` float32 [B, S, S, 3] in [-1, 1] (S =
    ``sr_crop_size or image_size``); ``lowres`` float32 [B, s, s, 3] if ``lowres_size``; the
    ``COUNTER_KEYS`` (``bad_<reason>``) int32 [B]; tokens / ``text_emb`` + ``text_mask`` if asked;
    ``caption`` (object array of str) if ``keep_captions``. ``iter(ds)`` is a
    ``grain.DatasetIterator`` with ``get_state``/``set_state``.

    ``bad_<reason>[b]`` is 1 if the record at slot ``b``'s source index had that problem:
    ``corrupt``/``too_large``/``too_small``/``unreadable`` images were replaced by the next good
    record (index + 1, + 2, ...), ``missing_caption`` became ``""`` and ``caption_encoding``
    (non-UTF-8) was decoded with U+FFFD, both kept. Summed over an epoch they count the records
    with each problem. The saved iterator state only resumes exactly with the same source,
    config, ``process_count`` and ``worker_count``.
  """
  cfg = DataConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
  ds = make_map_dataset(
    source,
    cfg,
    tokenize_fn=tokenize_fn,
    embedding_cache=embedding_cache,
    process_index=process_index,
    process_count=process_count,
  )
  read = grain.ReadOptions(
    num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
  )
  it = ds.to_iter_dataset(read)
  if cfg.worker_count > 0:
    # Grain reads absl flags when starting workers; outside an absl app (tests, notebooks) they
    # are unparsed and it raises UnparsedFlagAccessError, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return it
