"""Random-access sources of raw image-text records for the training pipeline.

Every source has ``__len__`` and ``__getitem__(i) -> {"image", "caption", "key"}`` where
``image`` is encoded bytes, a path or a ``uint8`` array, ``caption`` is ``str``/``bytes``/``None``
(left raw so the pipeline can count missing and non-UTF-8 captions), and ``key`` names the record in
logs. Sources do no decoding and raise nothing for bad data: that is the pipeline's job
(``preprocess.py``). Any object with that interface works, e.g. ``data.shapes.ShapesSource``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderSource:
  """Images under ``root`` (recursively), each captioned by a same-name ``.txt`` file.

  ``a/b/x.png`` pairs with ``a/b/x.txt``; a missing ``.txt`` gives ``caption=None`` (the pipeline
  counts it and trains the example unconditionally). Files are sorted by relative path, so the
  index order is the same on every machine.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    exts: Sequence[str] = IMAGE_EXTS,
    *,
    caption_ext: str = ".txt",
  ):
    self.root = os.fspath(root)
    self.caption_ext = caption_ext
    exts = tuple(e.lower() for e in exts)
    found = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()
      for name in filenames:
        if os.path.splitext(name)[1].lower() in exts:
          found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
    if not found:
      raise ValueError(f"No images with extensions {exts} under {self.root}")
    self._files = sorted(p.replace(os.sep, "/") for p in found)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel = self._files[index]
    path = os.path.join(self.root, rel)
    try:
      with open(os.path.splitext(path)[0] + self.caption_ext, "rb") as f:
        caption = f.read()
    except FileNotFoundError:
      caption = None
    return {"image": path, "caption": caption, "key": rel}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, n={len(self)})"


class ManifestSource:
  """Image paths and captions listed in a JSONL or CSV/TSV manifest.

  JSONL: one object per line, e.g. ``{"image": "imgs/1.jpg", "caption": "a cat"}``. CSV/TSV: a
  header row naming the columns. ``file_format`` ("jsonl" | "csv" | "tsv") defaults from the suffix.
  Relative image paths are resolved against ``root`` (default: the manifest's
  directory). A missing, ``null`` or empty caption gives ``caption=None``. The file is read with
  ``errors="surrogateescape"`` so one non-UTF-8 caption is counted by the pipeline (and repaired)
  instead of failing the whole manifest; a malformed line or a row without an image is an error.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    file_format: str | None = None,
    root: str | os.PathLike | None = None,
  ):
    self.path = os.fspath(path)
    self.root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.path))
    fmt = file_format or os.path.splitext(self.path)[1].lower().lstrip(".")
    fmt = {"json": "jsonl", "ndjson": "jsonl"}.get(fmt, fmt)
    if fmt not in ("jsonl", "csv", "tsv"):
      raise ValueError(f"Manifest format must be jsonl, csv or tsv; got {fmt!r} for {self.path}")
    rows = self._read_jsonl() if fmt == "jsonl" else self._read_csv("\t" if fmt == "tsv" else ",")
    self._images: list[str] = []
    self._captions: list[str | None] = []
    for line, row in rows:
      image = row.get(image_key)
      if not image:
        raise ValueError(f"{self.path}:{line}: no {image_key!r} field in {row!r}")
      caption = row.get(caption_key)
      self._images.append(str(image))
      self._captions.append(None if caption is None or caption == "" else str(caption))
    if not self._images:
      raise ValueError(f"Manifest {self.path} lists no images")

  def _open(self):
    return open(self.path, encoding="utf-8", errors="surrogateescape", newline="")

  def _read_jsonl(self) -> list[tuple[int, dict]]:
    rows = []
    with self._open() as f:
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.path}:{line}: invalid JSON: {e}") from e
        if not isinstance(row, dict):
          raise ValueError(f"{self.path}:{line}: expected a JSON object, got {type(row).__name__}")
        rows.append((line, row))
    return rows

  def _read_csv(self, delimiter: str) -> list[tuple[int, dict]]:
    with self._open() as f:
      return [(i + 2, row) for i, row in enumerate(csv.DictReader(f, delimiter=delimiter))]

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image = self._images[index]
    path = image if os.path.isabs(image) else os.path.join(self.root, image)
    return {"image": path, "caption": self._captions[index], "key": image}

  def __repr__(self) -> str:
    return f"ManifestSource({self.path!r}, n={len(self)})"


def _get_path(record: Any, key: str) -> Any:
  for part in key.split("/"):
    record = record[part]
  return record


def _nested(key: str, value: Any) -> dict[str, Any]:
  for part in reversed(key.split("/")):
    value = {part: value}
  return value


class TfdsSource:
  """A tensorflow-datasets image-text dataset read with random access (no TensorFlow needed).

  Reads a prepared dataset by registered name (``tfds.builder(name, data_dir=...)``) or from a
  builder directory (``.../my_ds/1.0.0``, via ``tfds.builder_from_directory``), then
  ``as_data_source(split)`` (ArrayRecord files). Image features are read *encoded*
  (``tfds.decode.SkipDecoding``) so the pipeline's decoder applies the pixel limit and counts
  corrupt images, instead of tfds decoding (or failing on) them inside ``__getitem__``.

  Args:
    name_or_builder_dir: registered/prepared dataset name (``"coco_captions"``) or builder dir.
    split: split name or slice (``"train[:90%]"``).
    data_dir: where prepared datasets live (ignored for a builder directory).
    image_key: image feature, ``/`` for nesting (``"image"``, ``"image/encoded"``).
    caption_key: caption feature, ``/`` for nesting (``"captions/text"``); a sequence feature uses
      its first caption.
    key_key: optional feature to use as the record key in logs (default ``"<name>/<split>/<i>"``).
      Note ``data_source`` index order is not generation order; store an id feature if it matters.
  """

  def __init__(
    self,
    name_or_builder_dir: str | os.PathLike,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    key_key: str | None = None,
  ):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:  # an optional dependency: only this source needs it
      raise ImportError(
        'data.source="tfds" needs tensorflow-datasets: pip install "imagen-jax[tfds]"'
      ) from e

    name = os.fspath(name_or_builder_dir)
    if os.path.isfile(os.path.join(name, "dataset_info.json")):
      builder = tfds.builder_from_directory(name)
    else:
      builder = tfds.builder(name, data_dir=data_dir)
    feature = builder.info.features
    for part in image_key.split("/"):
      feature = feature[part]
    decoders = None
    if isinstance(feature, tfds.features.Image):
      decoders = _nested(image_key, tfds.decode.SkipDecoding())
    self._ds = builder.as_data_source(split=split, decoders=decoders)
    self.name, self.split = builder.info.name, split
    self.image_key, self.caption_key, self.key_key = image_key, caption_key, key_key

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = self._ds[index]
    try:
      caption = _get_path(rec, self.caption_key)
    except KeyError:
      caption = None
    key = f"{self.name}/{self.split}/{index}"
    if self.key_key is not None:
      key = str(_get_path(rec, self.key_key))
    return {"image": _get_path(rec, self.image_key), "caption": caption, "key": key}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class TextEmbeddingLookup(Protocol):
  """What the pipeline needs from a text-embedding cache (``tools.encode_texts.EmbeddingCache``)."""

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


def lookup_text_embeddings(cache: TextEmbeddingLookup, captions: Sequence[str]) -> dict:
  """Precomputed embeddings for a batch of (normalized) captions.

  Args:
    cache: any object with ``lookup(captions) -> (emb [B, L, D], mask [B, L])``.
    captions: the batch's captions, after ``preprocess.normalize_caption``.

  Returns:
    ``{"text_emb": emb [B, L, D] (the cache's dtype), "text_mask": bool [B, L]}``.
  """
  emb, mask = cache.lookup(list(captions))
  emb, mask = np.asarray(emb), np.asarray(mask).astype(bool)
  if emb.ndim != 3 or mask.shape != emb.shape[:2] or emb.shape[0] != len(captions):
    raise ValueError(
      f"Embedding cache returned emb {emb.shape} / mask {mask.shape} for {len(captions)} captions; "
      "expected [B, L, D] and [B, L]"
    )
  return {"text_emb": emb, "text_mask": mask}
