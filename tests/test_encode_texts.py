"""``python -m imagen_jax.tools.encode_texts``: round trip, resume, inputs and bad input."""

from __future__ import annotations

import json
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.data import text_cache
from imagen_jax.data.text_cache import EmbeddingCache, caption_key
from imagen_jax.text import T5Encoder, TruncationWarning
from imagen_jax.tools import encode_texts

try:
  from tests.t5_fixtures import make_tiny_t5_dir
except ImportError:
  from t5_fixtures import make_tiny_t5_dir

L, BATCH = 16, 4
CAPTIONS = [
  "a photo of a corgi",
  "an oil painting of a cat",
  "a corgi 🐶 on the beach",
  "un café à Zürich",
  "two dogs playing in the snow",
  "a photo of a corgi",  # duplicate: encoded once
  "a red car",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  pytest.importorskip("torch")
  return make_tiny_t5_dir(tmp_path_factory.mktemp("t5"), "v1_1")


@pytest.fixture(scope="module")
def encoder(t5_dir):
  return T5Encoder.from_pretrained(t5_dir, max_length=L, progress=False)


def _direct(encoder, captions):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", TruncationWarning)
    emb, mask = encoder.encode_text(list(captions))
  return np.asarray(emb, np.float32), np.asarray(mask)


def _assert_same(cached, direct, storage_dtype=np.float16):
  """Cached == direct up to the storage rounding (XLA may round fp32 differently per batch
  shape, which can flip the last bit of a float16), and padding is exactly zero."""
  np.testing.assert_allclose(
    cached.astype(np.float32), direct, rtol=float(ml_dtypes.finfo(storage_dtype).eps), atol=1e-6
  )
  assert (cached.astype(np.float32)[direct == 0] == 0).all()


def _run(*args) -> dict:
  return encode_texts.main([*map(str, args)])


def test_cli_round_trip_text_file(t5_dir, encoder, tmp_path):
  src = tmp_path / "captions.txt"
  lines = [c.encode() for c in CAPTIONS] + [b"", b"bad bytes \xff\xfe here", b"  padded  \r"]
  src.write_bytes(b"\n".join(lines) + b"\n")
  out = tmp_path / "cache"
  common = ("--encoder", t5_dir, "--output_dir", out, "--max_length", L, "--batch_size", BATCH)
  stats = _run("--captions", src, *common, "--shard_size", 3)
  # 6 unique + replaced-bytes + "padded" + the always-present "" = 9 captions, 3 per shard.
  assert stats["replaced_utf8"] == 1
  assert stats["captions"] == stats["encoded"] == 9 and stats["shards_written"] == 3
  cache = EmbeddingCache(out, max_length=L, d_model=32)
  assert len(cache) == 9 and "padded" in cache and "bad bytes \ufffd\ufffd here" in cache
  queries = [*CAPTIONS, "", "bad bytes \ufffd\ufffd here", "padded"]
  emb, mask = cache.lookup(queries)
  want_emb, want_mask = _direct(encoder, queries)
  assert emb.dtype == np.float16 and emb.shape == (len(queries), L, 32)
  np.testing.assert_array_equal(mask, want_mask)
  _assert_same(emb, want_emb)
  assert stats["truncated"] == 2  # the two long captions, counted once for the run
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["max_length"] == L and manifest["storage_dtype"] == "float16"
  # Re-running is a no-op: every caption is already cached.
  assert _run("--captions", src, *common, "--shard_size", 3)["encoded"] == 0


def test_interrupted_run_resumes(encoder, tmp_path, monkeypatch):
  out = tmp_path / "cache"
  real_write = text_cache._write_shard
  calls = []

  def crash_on_second_shard(path, keys, emb, mask):
    calls.append(path)
    if len(calls) == 2:
      path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
      raise KeyboardInterrupt
    real_write(path, keys, emb, mask)

  monkeypatch.setattr(text_cache, "_write_shard", crash_on_second_shard)
  kw = dict(shard_size=3, batch_size=BATCH, progress=False)
  with pytest.raises(KeyboardInterrupt):
    text_cache.encode_to_cache(CAPTIONS, encoder, out, **kw)
  assert [p.name for p in sorted(out.glob("shard-*.safetensors"))] == ["shard-00000.safetensors"]
  assert not (out / "index.json").exists()
  with pytest.raises(FileNotFoundError, match="not a finished"):
    EmbeddingCache(out)

  monkeypatch.setattr(text_cache, "_write_shard", real_write)
  encoded = []
  real_encode = encoder.encode_text
  monkeypatch.setattr(encoder, "encode_text", lambda p: encoded.extend(p) or real_encode(p))
  stats = text_cache.encode_to_cache(CAPTIONS, encoder, out, **kw)
  assert stats["cached"] == 3 and stats["encoded"] == 4  # 6 unique + "" = 7
  assert not list(out.glob("*.tmp"))
  done = {t for t in encoded if t}
  assert "a photo of a corgi" not in done  # it was in the completed first shard
  emb, mask = EmbeddingCache(out).lookup(CAPTIONS)
  want_emb, want_mask = _direct(encoder, CAPTIONS)
  _assert_same(emb, want_emb)
  np.testing.assert_array_equal(mask, want_mask)


def test_jsonl_input_bfloat16_storage(t5_dir, encoder, tmp_path):
  src = tmp_path / "caps.jsonl"
  rows = [{"text": "a cat"}, {"text": ["a dog", "a red car"]}, {"text": None}]
  src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  out = tmp_path / "cache"
  stats = _run(
    "--captions", src, "--caption_key", "text", "--encoder", t5_dir, "--output_dir", out,
    "--max_length", L, "--batch_size", BATCH, "--storage_dtype", "bfloat16",
  )  # fmt: skip
  assert stats["captions"] == 4  # a cat, a dog, a red car, ""
  emb, _ = EmbeddingCache(out).lookup(["a red car", "a cat"])
  assert emb.dtype == ml_dtypes.bfloat16
  _assert_same(emb, _direct(encoder, ["a red car", "a cat"])[0], ml_dtypes.bfloat16)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
    text_cache.read_caption_file(bad, "text")


def test_image_folder_source(t5_dir, encoder, tmp_path):
  """Captions read through the data pipeline's source, normalized as the pipeline does."""
  from PIL import Image

  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, caption in enumerate([b"a cat\n", b"a dog \xff", None]):
    Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    if caption is not None:
      (folder / f"{i}.txt").write_bytes(caption)
  out = tmp_path / "cache"
  stats = _run(
    "--image_folder", folder, "--encoder", t5_dir, "--output_dir", out, "--max_length", L,
    "--batch_size", BATCH,
  )  # fmt: skip
  assert stats["replaced_utf8"] == 1 and stats["captions"] == 3  # "a cat", "a dog \ufffd", ""
  from imagen_jax.data.preprocess import normalize_caption

  key = normalize_caption(b"a dog \xff")[0]
  _assert_same(EmbeddingCache(out).lookup([key])[0], _direct(encoder, [key])[0])


def test_mismatches_and_missing_captions(t5_dir, encoder, tmp_path):
  out = tmp_path / "cache"
  text_cache.encode_to_cache(["a cat"], encoder, out, batch_size=BATCH, progress=False)
  with pytest.raises(ValueError, match="max_length=16, but 64 was requested"):
    EmbeddingCache(out, max_length=64)
  with pytest.raises(ValueError, match="d_model=32, but 4096 was requested"):
    EmbeddingCache(out, d_model=4096)
  with pytest.raises(KeyError, match="1 of 2 captions are not in the cache"):
    EmbeddingCache(out).lookup(["a cat", "never encoded"])
  with pytest.raises(ValueError, match="other settings.*storage_dtype"):
    text_cache.encode_to_cache(
      ["a dog"], encoder, out, storage_dtype="float32", batch_size=BATCH, progress=False
    )
  assert caption_key("  a cat\n") == caption_key("a cat")
  cache = EmbeddingCache(out)
  cache.lookup(["a cat"])  # opens a shard handle
  clone = pickle.loads(pickle.dumps(cache))  # as a data-loader worker would receive it
  np.testing.assert_array_equal(clone.lookup(["a cat"])[0], cache.lookup(["a cat"])[0])
