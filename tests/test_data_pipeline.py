"""The Grain pipeline: bad-data policy, determinism, resume (incl. Orbax), sharding, SR pairs."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from imagen_jax.data import COUNTER_KEYS, DataConfig, make_dataset, make_map_dataset, pipeline
from imagen_jax.data import preprocess as pp
from imagen_jax.data.pipeline import example_ops
from imagen_jax.data.shapes import ShapesSource
from imagen_jax.data.sources import ImageFolderSource

SIZE = 16
ONE = {"process_index": 0, "process_count": 1}


class ArraySource:
  """In-memory records: smooth random-ish images with unique captions."""

  def __init__(self, n: int, hw=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    self.images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "caption": f"caption {i}", "key": f"k{i}"}


def _bomb_png() -> bytes:
  """A tiny PNG whose header claims 20000 x 20000 pixels."""
  buf = io.BytesIO()
  Image.new("L", (8, 8), 1).save(buf, format="PNG")
  data = bytearray(buf.getvalue())
  data[16:24] = struct.pack(">II", 20000, 20000)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


# key -> reason for every problem planted in the messy folder.
PLANTED = {
  "bad_corrupt_random.png": "corrupt",
  "bad_corrupt_trunc.jpg": "corrupt",
  "bad_too_large.png": "too_large",
  "bad_too_small.png": "too_small",
  "bad_unreadable.png": "unreadable",
  "zz_badenc.png": "caption_encoding",
  "zz_nocap.png": "missing_caption",
}


@pytest.fixture
def messy(tmp_path) -> str:
  """20 images: 13 good (RGB and every awkward mode), 5 bad images, 2 bad captions."""
  root = tmp_path / "messy"
  root.mkdir()
  rng = np.random.default_rng(0)

  def save(name, img, caption=None, **kw):
    img.save(root / name, **kw)
    if caption is not None:
      (root / name).with_suffix(".txt").write_bytes(caption)

  for i in range(8):
    arr = rng.integers(0, 256, (SIZE + 3 * i, SIZE + 5, 3), dtype=np.uint8)
    save(f"good_{i}.png", Image.fromarray(arr), f"good {i}\n".encode())
  save("mode_cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), b"cmyk")
  save("mode_gray.png", Image.new("L", (20, 18), 77), b"gray")
  save("mode_i16.png", Image.fromarray(np.full((18, 18), 30000, np.uint16)), b"i16")
  pal = Image.new("P", (18, 20), 0)
  pal.putpalette([0, 0, 255] * 256)
  save("mode_palette.png", pal, b"palette", transparency=0)
  save("mode_rgba.png", Image.new("RGBA", (24, 24), (255, 0, 0, 128)), b"rgba")
  jpeg = root / "tmp.jpg"
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(jpeg)
  data = jpeg.read_bytes()
  jpeg.unlink()
  (root / "bad_corrupt_trunc.jpg").write_bytes(data[: len(data) // 2])
  (root / "bad_corrupt_random.png").write_bytes(rng.bytes(300))
  (root / "bad_too_large.png").write_bytes(_bomb_png())
  save("bad_too_small.png", Image.new("RGB", (SIZE - 4, SIZE + 10), 5))
  os.symlink(root / "does_not_exist.png", root / "bad_unreadable.png")
  for name in [k for k in PLANTED if k.startswith("bad_")]:
    (root / name).with_suffix(".txt").write_text(f"caption of {name}")
  save("zz_badenc.png", Image.new("RGB", (20, 20), 200), b"caf\xe9 au lait")
  save("zz_nocap.png", Image.new("RGB", (20, 20), 100))
  return str(root)


def _collect(ds) -> list[dict]:
  return [dict(b) for b in ds]


def _cat(batches, key):
  return np.concatenate([b[key] for b in batches])


def test_bad_data_counted_replaced_and_shapes_constant(messy):
  src = ImageFolderSource(messy)
  keys = [src[i]["key"] for i in range(len(src))]
  assert len(src) == 20
  cfg = DataConfig(image_size=SIZE, batch_size=4, shuffle=False, num_epochs=1, keep_captions=True)
  batches = _collect(make_dataset(src, cfg, max_pixels=10_000, **ONE))
  assert len(batches) == 5
  for b in batches:
    assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert set(b) == {"image", "caption", *COUNTER_KEYS}
    assert all(b[k].dtype == np.int32 and b[k].shape == (4,) for k in COUNTER_KEYS)
    assert np.isfinite(b["image"]).all() and np.abs(b["image"]).max() <= 1.0
  # Counters sit exactly at the slots of the planted records (shuffle=False: slot = index).
  for r in pp.BAD_REASONS:
    want = [int(PLANTED.get(k) == r) for k in keys]
    np.testing.assert_array_equal(_cat(batches, f"bad_{r}"), want, err_msg=r)
  # A bad image is replaced by the next good record; bad captions are repaired and kept.
  captions = list(_cat(batches, "caption"))
  bad_img = {k for k, r in PLANTED.items() if r in pp.IMAGE_REASONS}
  good_after = lambda i: next(j for j in range(i, 40) if keys[j % 20] not in bad_img) % 20
  ref = [src[good_after(i)]["caption"] for i in range(20)]
  assert captions == [pp.normalize_caption(c)[0] for c in ref]
  assert "" in captions and "caf\ufffd au lait" in captions
  assert not any("caption of" in c for c in captions)
  # Good examples are exactly what the ops make of them alone.
  images = _cat(batches, "image")
  ops = example_ops(cfg)
  for i, k in enumerate(keys):
    if k not in bad_img:
      want = pp.apply_ops(ops, {"image": src[i]["image"]}, np.random.default_rng(0))["image"]
      np.testing.assert_array_equal(images[i], want, err_msg=k)
  # Modes came out right: palette (transparent index 0) -> white, CMYK red, 16-bit grey.
  u8 = np.rint((images + 1) * 127.5).astype(int)
  assert (u8[keys.index("mode_palette.png")] == 255).all()
  assert np.abs(u8[keys.index("mode_cmyk.jpg")] - (255, 0, 0)).max() <= 8
  assert (u8[keys.index("mode_i16.png")] == round(30000 * 255 / 65535)).all()
  assert np.abs(u8[keys.index("mode_rgba.png")] - (255, 127, 127)).max() <= 1


def test_each_bad_record_logged_once(messy, caplog, monkeypatch):
  # Fresh per-process log bookkeeping, so earlier tests cannot have used up the per-reason cap.
  monkeypatch.setattr(pipeline, "_LOGGED", set())
  monkeypatch.setattr(pipeline, "_LOGGED_PER_REASON", {})
  src = ImageFolderSource(messy)
  ds = make_dataset(src, image_size=SIZE, batch_size=4, seed=1, num_epochs=3, max_pixels=10_000)
  with caplog.at_level(logging.WARNING, logger="imagen_jax.data.pipeline"):
    batches = _collect(ds)
  assert len(batches) == 15
  for r in pp.BAD_REASONS:  # counted every epoch...
    assert _cat(batches, f"bad_{r}").sum() == 3 * list(PLANTED.values()).count(r), r
  msgs = [rec.getMessage() for rec in caplog.records]
  for key, reason in PLANTED.items():  # ...but logged once
    hits = [m for m in msgs if f"'{key}'" in m and f": {reason} (" in m]
    assert len(hits) == 1, (key, reason, msgs)
  assert len(msgs) == len(PLANTED)


def test_upscale_policy_keeps_small_images(messy):
  src = ImageFolderSource(messy)
  cfg = DataConfig(image_size=SIZE, batch_size=4, shuffle=False, num_epochs=1, keep_captions=True)
  batches = _collect(make_dataset(src, cfg, min_size_policy="upscale", max_pixels=10_000, **ONE))
  assert _cat(batches, "bad_too_small").sum() == 1
  assert "caption of bad_too_small.png" in list(_cat(batches, "caption"))


def test_gives_up_after_consecutive_bad(messy, tmp_path):
  src = ImageFolderSource(messy)  # its five bad_* images sort next to each other
  ds = make_map_dataset(src, image_size=SIZE, batch_size=4, shuffle=False, max_consecutive_bad=3)
  with pytest.raises(RuntimeError, match=r"3 consecutive bad examples.*ImageFolderSource"):
    ds[0]
  ds = make_map_dataset(src, image_size=SIZE, batch_size=4, shuffle=False, max_consecutive_bad=6)
  assert ds[0]["image"].shape == (4, SIZE, SIZE, 3)
  (tmp_path / "allbad").mkdir()
  for i in range(3):
    (tmp_path / "allbad" / f"{i}.png").write_bytes(b"not a png")
  ds = make_map_dataset(ImageFolderSource(tmp_path / "allbad"), image_size=SIZE, batch_size=2)
  with pytest.raises(RuntimeError, match="3 consecutive bad"):
    ds[0]


# ----------------------------------------------------------------------------------------------
# Determinism, resume, Orbax.
# ----------------------------------------------------------------------------------------------

AUG = dict(image_size=SIZE, batch_size=3, seed=7, crop="random", flip=True, max_pixels=10_000)


def _assert_same(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_deterministic_and_seeded(messy):
  src = ImageFolderSource(messy)
  a = _take(iter(make_dataset(src, **AUG, **ONE)), 8)  # 24 examples: crosses an epoch
  b = _take(iter(make_dataset(src, **AUG, **ONE)), 8)
  _assert_same(a, b)
  c = _take(iter(make_dataset(src, **{**AUG, "seed": 8}, **ONE)), 8)
  assert not np.array_equal(_cat(a, "image"), _cat(c, "image"))


def test_resume_from_state_is_bit_identical(messy):
  src = ImageFolderSource(messy)
  ds = make_dataset(src, **AUG, **ONE)
  it = iter(ds)
  _take(it, 4)
  state = it.get_state()
  assert state == {"next_index": 4}
  expected = _take(it, 5)  # crosses the epoch boundary (20 examples / 3)
  fresh = iter(make_dataset(src, **AUG, **ONE))  # a rebuilt pipeline, as after a restart
  fresh.set_state(state)
  _assert_same(_take(fresh, 5), expected)


def test_resume_through_orbax_checkpoint_manager(messy, tmp_path):
  src = ImageFolderSource(messy)
  it = iter(make_dataset(src, **AUG, **ONE))
  _take(it, 3)
  opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=opts) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    # The iterator moves on while the save may still be in flight: the saved state must not.
    expected = _take(it, 4)
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    fresh = iter(make_dataset(src, **AUG, **ONE))
    restored = mngr.restore(
      mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )
    assert restored["data"] is fresh
  _assert_same(_take(fresh, 4), expected)
  # The equivalent without grain's handler: the state is plain JSON.
  with ocp.CheckpointManager(tmp_path / "json") as mngr:
    mngr.save(0, args=ocp.args.Composite(data=ocp.args.JsonSave(fresh.get_state())))
    mngr.wait_until_finished()
    state = mngr.restore(0, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  assert state == {"next_index": 7}


# ----------------------------------------------------------------------------------------------
# Sharding, SR pairs, text features.
# ----------------------------------------------------------------------------------------------


def _captions(ds):
  return [c for b in ds for c in b["caption"]]


@pytest.mark.parametrize("n", [12, 13])
def test_process_shards_are_the_rows_of_the_single_process_global_batch(n):
  src = ArraySource(n, hw=(SIZE, SIZE))
  kw = dict(image_size=SIZE, seed=3, num_epochs=1, keep_captions=True, shuffle=True)
  shards = [
    list(make_dataset(src, **kw, batch_size=2, process_index=p, process_count=2)) for p in range(2)
  ]
  whole = list(make_dataset(src, **kw, batch_size=4, **ONE))
  assert len(shards[0]) == len(shards[1]) == len(whole) == n // 4  # no host waits for another
  for b0, b1, b in zip(*shards, whole):
    # Process 0 holds global rows [0, 2), process 1 rows [2, 4): one global batch, any P.
    assert list(b0["caption"]) + list(b1["caption"]) == list(b["caption"])
    np.testing.assert_array_equal(np.concatenate([b0["image"], b1["image"]]), b["image"])
  seen = [c for shard in shards for batch in shard for c in batch["caption"]]
  assert len(set(seen)) == len(seen) == n - n % 4  # disjoint, and cover all whole batches


def test_sr_pairs_are_antialiased_downsamples():
  src = ArraySource(4)
  b = make_map_dataset(src, image_size=32, lowres_size=8, batch_size=4, crop="random", **ONE)[0]
  assert b["image"].shape == (4, 32, 32, 3) and b["lowres"].shape == (4, 8, 8, 3)
  assert b["lowres"].dtype == np.float32
  for hr, lr in zip(b["image"], b["lowres"]):
    hr8 = np.rint((hr + 1) * 127.5).astype(np.uint8)
    ref = np.asarray(Image.fromarray(hr8).resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.rint((lr + 1) * 127.5).astype(np.uint8), ref)


def test_sr_random_crop_pairs_align():
  src = ArraySource(3, hw=(64, 70))
  cfg = dict(image_size=64, lowres_size=32, sr_crop_size=32, batch_size=3, flip=True, **ONE)
  b = make_map_dataset(src, **cfg)[0]
  assert b["image"].shape == (3, 32, 32, 3) and b["lowres"].shape == (3, 16, 16, 3)
  for hr, lr in zip(b["image"], b["lowres"]):
    hr8 = np.rint((hr + 1) * 127.5).astype(np.uint8)
    lr8 = np.rint((lr + 1) * 127.5).astype(int)
    diff = np.abs(lr8 - pp.make_sr_pair(hr8, 16).astype(int))
    assert diff[2:-2, 2:-2].max() <= 1  # same region; only the filter border differs
  with pytest.raises(ValueError, match="sr_crop_size"):
    DataConfig(image_size=64, lowres_size=32, sr_crop_size=33)


class _Cache:
  def lookup(self, captions):
    emb = np.stack([np.full((4, 2), len(c), np.float32) for c in captions])
    return emb, np.ones((len(captions), 4), np.int64)


def test_tokens_and_embeddings_in_batch():
  def tokenize(captions):
    ids = np.array([[len(c), 1, 0] for c in captions], np.int64)
    return {"input_ids": ids, "attention_mask": ids > 0}

  src = ArraySource(6, hw=(SIZE, SIZE))
  ds = make_dataset(
    src, image_size=SIZE, batch_size=3, tokenize_fn=tokenize, embedding_cache=_Cache(), **ONE
  )
  b = next(iter(ds))
  assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (3, 3)
  assert b["attention_mask"].dtype == bool
  assert b["text_emb"].shape == (3, 4, 2) and b["text_mask"].dtype == bool
  assert "caption" not in b
  np.testing.assert_array_equal(b["input_ids"][:, 0], b["text_emb"][:, 0, 0])


def test_config_validation():
  with pytest.raises(ValueError, match="crop"):
    DataConfig(image_size=8, crop="middle")
  with pytest.raises(ValueError, match="min_size_policy"):
    DataConfig(image_size=8, min_size_policy="pad")
  with pytest.raises(ValueError, match="lowres_size"):
    DataConfig(image_size=8, lowres_size=8)
  with pytest.raises(TypeError):
    make_dataset(ArraySource(2), image_size=8, nonsense=1, **ONE)
  with pytest.raises(ValueError, match="too few"):
    make_dataset(ArraySource(3), image_size=8, batch_size=4, num_epochs=1, **ONE)


def test_with_shapes_source():
  src = ShapesSource(seed=0, image_size=32)
  b = next(iter(make_dataset(src, image_size=32, lowres_size=16, batch_size=2, **ONE)))
  assert b["image"].shape == (2, 32, 32, 3) and b["lowres"].shape == (2, 16, 16, 3)
  assert sum(int(b[k].sum()) for k in COUNTER_KEYS) == 0


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(messy):
  src = ImageFolderSource(messy)
  ref = _take(iter(make_dataset(src, **AUG, **ONE)), 4)
  it = iter(make_dataset(src, **AUG, worker_count=2, **ONE))
  try:
    got = _take(it, 2)
    state = it.get_state()
    got += _take(it, 2)
  finally:
    it.close()
  _assert_same(got, ref)
  it = iter(make_dataset(src, **AUG, worker_count=2, **ONE))
  try:
    it.set_state(state)
    _assert_same(_take(it, 2), ref[2:])
  finally:
    it.close()


def test_log_cap_per_reason(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(pipeline, "_LOGGED", set())
  monkeypatch.setattr(pipeline, "_LOGGED_PER_REASON", {})
  monkeypatch.setattr(pipeline, "LOG_LIMIT_PER_REASON", 3)
  for i in range(6):
    Image.new("RGB", (SIZE, SIZE), i).save(tmp_path / f"{i}.png")  # no captions at all
  ds = make_dataset(ImageFolderSource(tmp_path), image_size=SIZE, batch_size=6, num_epochs=1, **ONE)
  with caplog.at_level(logging.WARNING, logger="imagen_jax.data.pipeline"):
    (batch,) = _collect(ds)
  assert batch["bad_missing_caption"].sum() == 6  # all counted
  msgs = [rec.getMessage() for rec in caplog.records]
  assert len(msgs) == 4 and "not logged" in msgs[-1]  # 3 examples + one notice
