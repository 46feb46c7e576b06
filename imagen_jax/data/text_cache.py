"""The text-embedding cache: T5 embeddings of a dataset's captions, on disk, looked up by caption.

Training can look text embeddings up by caption instead of holding the T5 (9.5 GB for XXL in bf16)
in accelerator memory. :func:`encode_to_cache` writes a cache (``python -m
imagen_jax.tools.encode_texts`` is its command line); :class:`EmbeddingCache` reads it.

Directory layout:

* ``shard-00000.safetensors``, ...: ``embeddings`` ``[N, Ls, D]`` (the storage dtype, default
  float16 to halve the disk; ``Ls`` is the longest caption of the shard, padding is zero and is
  restored on lookup), ``mask`` bool ``[N, Ls]`` and ``keys`` uint8 ``[N, 20]`` (caption SHA-1);
* ``index.json``: caption SHA-1 -> (shard, row); ``manifest.json``: encoder, max_length, d_model,
  dtypes.

Each shard is written to a temporary file and renamed, so an interrupted run leaves only complete
shards; re-running encodes only the captions that are in none of them. The empty caption is always
included (it is the unconditional input of classifier-free guidance). Captions are keyed by
:func:`caption_key` (SHA-1 of the stripped UTF-8 text); invalid UTF-8 is replaced and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from imagen_jax.data.preprocess import normalize_caption
from imagen_jax.text import TruncationWarning

FORMAT = "imagen_jax.text_cache/v1"
STORAGE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_MANIFEST_KEYS = ("encoder", "max_length", "d_model", "storage_dtype", "compute_dtype")
log = logging.getLogger(__name__)


def caption_key(caption: str) -> str:
  """Cache key of a caption: SHA-1 hex of its whitespace-stripped UTF-8 text."""
  return hashlib.sha1(caption.strip().encode("utf-8")).hexdigest()


def _normalize(raw: Any) -> tuple[str, bool]:
  """(caption, had invalid UTF-8), normalized exactly like the training pipeline does."""
  text, issues = normalize_caption(raw)
  return text, "caption_encoding" in issues


# ---------------------------------------------------------------------------------------------
# Reading captions.


def read_caption_file(path: str | os.PathLike, caption_field: str = "caption") -> tuple[list, int]:
  """Captions of a ``.txt`` (one per line) or ``.jsonl`` file, and how many had bad UTF-8.

  Blank lines are skipped. Undecodable bytes become U+FFFD instead of failing the file.
  """
  path = Path(path)
  raw_lines = path.read_bytes().splitlines()
  captions, replaced = [], 0
  jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
  for lineno, raw in enumerate(raw_lines, start=1):
    if not raw.strip():
      continue
    if not jsonl:
      text, bad = _normalize(raw)
      captions.append(text)
      replaced += bad
      continue
    line, bad_line = _normalize(raw)  # decode (with replacement) before parsing the JSON
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
    if not isinstance(row, dict) or caption_field not in row:
      raise ValueError(f"{path}:{lineno}: no {caption_field!r} field")
    values = row[caption_field] if isinstance(row[caption_field], list) else [row[caption_field]]
    for value in values:
      text, bad = _normalize(value)
      captions.append(text)
      replaced += bad or bad_line
  return captions, replaced


def read_source_captions(source: Any, *, progress: bool = True) -> tuple[list, int]:
  """Captions of a data-pipeline source (``len`` + ``source[i]["caption"]``), normalized."""
  captions, replaced = [], 0
  for i in tqdm(range(len(source)), desc="reading captions", disable=not progress, leave=False):
    text, bad = _normalize(source[i].get("caption"))
    captions.append(text)
    replaced += bad
  return captions, replaced


# ---------------------------------------------------------------------------------------------
# Writing the cache.


def _atomic_write(path: Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)  # readers and resumes never see a half-written file


def _shard_paths(directory: Path) -> list[Path]:
  return sorted(directory.glob("shard-[0-9][0-9][0-9][0-9][0-9].safetensors"))


def _read_shard_keys(path: Path) -> list[str]:
  try:
    with safe_open(str(path), framework="numpy") as f:
      return [bytes(row).hex() for row in f.get_tensor("keys")]
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{path}: unreadable cache shard ({e}); delete it and re-run") from None


def _check_manifest(directory: Path, manifest: dict) -> None:
  path = directory / "manifest.json"
  if path.exists():
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), manifest[k]) for k in _MANIFEST_KEYS if old.get(k) != manifest[k]}
    if diff:
      raise ValueError(
        f"{directory} already holds a cache made with other settings {diff} (old, new); use "
        "another --output_dir"
      )
  _atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))


def _write_shard(path: Path, keys: Sequence[str], emb: np.ndarray, mask: np.ndarray) -> None:
  # Trim to the longest caption of the shard: padded embeddings are zero and cost no information.
  width = max(1, int(mask.any(axis=0).nonzero()[0].max(initial=0)) + 1)
  tensors = {
    "embeddings": np.ascontiguousarray(emb[:, :width]),
    "mask": np.ascontiguousarray(mask[:, :width]),
    "keys": np.stack([np.frombuffer(bytes.fromhex(k), np.uint8) for k in keys]),
  }
  _atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))


def _encode_batches(encoder, texts: list[str], batch_size: int, storage, bar) -> tuple:
  embs, masks = [], []
  for start in range(0, len(texts), batch_size):
    batch = texts[start : start + batch_size]
    padded = batch + [""] * (batch_size - len(batch))  # one compiled shape for every batch
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", TruncationWarning)  # counted once for the whole run
      emb, mask = encoder.encode_text(padded)
    emb = np.asarray(emb, np.float32)[: len(batch)]
    if not np.isfinite(emb).all():
      raise FloatingPointError("T5 produced non-finite embeddings (try --compute_dtype float32)")
    stored = emb.astype(storage)
    if not np.isfinite(stored.astype(np.float32)).all():
      raise OverflowError("embeddings overflow --storage_dtype; use bfloat16 or float32")
    embs.append(stored)
    masks.append(np.asarray(mask)[: len(batch)])
    bar.update(len(batch))
  return np.concatenate(embs), np.concatenate(masks)


def encode_to_cache(
  captions: Iterable[str],
  encoder: Any,
  output_dir: str | os.PathLike,
  *,
  shard_size: int = 1024,
  batch_size: int = 32,
  storage_dtype: str = "float16",
  encoder_name: str | None = None,
  progress: bool = True,
) -> dict[str, int]:
  """Encodes the captions not cached yet in ``output_dir`` and (re)writes the index.

  Args:
    captions: normalized captions (duplicates are encoded once; ``""`` is always added).
    encoder: an :class:`imagen_jax.text.T5Encoder` with a tokenizer.
    output_dir: cache directory (created; resumed if it already holds shards).
    shard_size: captions per shard file.
    batch_size: captions per T5 call.
    storage_dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
    encoder_name: recorded in the manifest (defaults to ``encoder.source``).
    progress: show a tqdm bar.

  Returns:
    Counts: ``captions`` (unique), ``cached`` (already there), ``encoded``, ``shards_written``,
    ``truncated``.
  """
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}: {storage_dtype!r}")
  directory = Path(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  manifest = {
    "format": FORMAT,
    "encoder": str(encoder_name or encoder.source),
    "max_length": encoder.max_length,
    "d_model": encoder.d_model,
    "storage_dtype": storage_dtype,
    "compute_dtype": np.dtype(encoder.dtype).name,
  }
  _check_manifest(directory, manifest)
  for stale in directory.glob("*.tmp"):  # left by an interrupted run
    stale.unlink()

  unique: dict[str, str] = {caption_key(""): ""}
  for text in captions:
    unique.setdefault(caption_key(text), text.strip())
  shards = _shard_paths(directory)
  done = {k for path in shards for k in _read_shard_keys(path)}
  todo = [(k, t) for k, t in unique.items() if k not in done]

  next_shard = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
  tokenizer = encoder.tokenizer
  truncated_before = getattr(tokenizer, "num_truncated", 0)
  storage = STORAGE_DTYPES[storage_dtype]
  with tqdm(total=len(todo), desc="encoding captions", unit="caption", disable=not progress) as bar:
    for start in range(0, len(todo), shard_size):
      chunk = todo[start : start + shard_size]
      emb, mask = _encode_batches(encoder, [t for _, t in chunk], batch_size, storage, bar)
      path = directory / f"shard-{next_shard:05d}.safetensors"
      _write_shard(path, [k for k, _ in chunk], emb, mask)
      next_shard += 1
  truncated = getattr(tokenizer, "num_truncated", 0) - truncated_before
  if truncated:
    log.warning("%d captions exceeded max_length=%d and were truncated", truncated,
                encoder.max_length)  # fmt: skip
  write_index(directory)
  return {
    "captions": len(unique), "cached": len(unique) - len(todo), "encoded": len(todo),
    "shards_written": -(-len(todo) // shard_size), "truncated": truncated,
  }  # fmt: skip


def write_index(directory: str | os.PathLike) -> dict:
  """Rebuilds ``index.json`` (caption SHA-1 -> [shard, row]) from the shards on disk."""
  directory = Path(directory)
  shards = _shard_paths(directory)
  keys: dict[str, list[int]] = {}
  for s, path in enumerate(shards):
    for row, k in enumerate(_read_shard_keys(path)):
      keys.setdefault(k, [s, row])
  index = {"format": FORMAT, "shards": [p.name for p in shards], "keys": keys}
  _atomic_write(directory / "index.json", lambda p: p.write_text(json.dumps(index)))
  return index


# ---------------------------------------------------------------------------------------------
# Reading the cache (what training uses).


class EmbeddingCache:
  """Looks pre-encoded T5 embeddings up by caption.

  Args:
    directory: a cache written by :func:`encode_to_cache`.
    max_length: if given, must equal the cache's token length ``L``.
    d_model: if given, must equal the cache's embedding width ``D``.
  """

  def __init__(
    self, directory: str | os.PathLike, *, max_length: int | None = None, d_model: int | None = None
  ):
    self.directory = Path(directory)
    for name in ("manifest.json", "index.json"):
      if not (self.directory / name).is_file():
        raise FileNotFoundError(
          f"{self.directory / name} not found: not a finished text-embedding cache (re-run "
          "python -m imagen_jax.tools.encode_texts to complete it)"
        )
    self.manifest = json.loads((self.directory / "manifest.json").read_text())
    index = json.loads((self.directory / "index.json").read_text())
    self.max_length, self.d_model = self.manifest["max_length"], self.manifest["d_model"]
    for name, want, have in (("max_length", max_length, self.max_length),
                             ("d_model", d_model, self.d_model)):  # fmt: skip
      if want is not None and want != have:
        raise ValueError(f"{self.directory}: cache has {name}={have}, but {want} was requested")
    self.dtype = np.dtype(STORAGE_DTYPES[self.manifest["storage_dtype"]])
    self._shards = [self.directory / name for name in index["shards"]]
    self._keys = index["keys"]
    self._handles: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._keys)

  def __getstate__(self) -> dict:
    # Data-loader workers (Grain multiprocessing) pickle the cache: reopen shards lazily there.
    return {**self.__dict__, "_handles": {}}

  def __contains__(self, caption: str) -> bool:
    return caption_key(caption) in self._keys

  def _shard(self, s: int):
    if s not in self._handles:
      self._handles[s] = safe_open(str(self._shards[s]), framework="numpy")
    return self._handles[s]

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings [B, L, D] in the storage dtype, mask bool [B, L])`` for the captions.

    Raises:
      KeyError: some captions are not in the cache (the message shows a few).
    """
    locs = [self._keys.get(caption_key(c)) for c in captions]
    missing = [c for c, loc in zip(captions, locs) if loc is None]
    if missing:
      raise KeyError(
        f"{len(missing)} of {len(captions)} captions are not in the cache {self.directory}, e.g. "
        f"{[m[:60] for m in missing[:3]]}; run python -m imagen_jax.tools.encode_texts on them"
      )
    emb = np.zeros((len(captions), self.max_length, self.d_model), self.dtype)
    mask = np.zeros((len(captions), self.max_length), bool)
    for i, (s, row) in enumerate(locs):
      f = self._shard(s)
      e = f.get_slice("embeddings")[row : row + 1][0]  # reads one row, not the shard
      emb[i, : e.shape[0]] = e
      mask[i, : e.shape[0]] = f.get_slice("mask")[row : row + 1][0]
    return emb, mask
