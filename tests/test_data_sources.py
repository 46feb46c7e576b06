"""Random-access sources: image folder, JSONL/CSV manifests, tfds (no TensorFlow), embeddings."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import make_dataset
from imagen_jax.data import preprocess as pp
from imagen_jax.data.sources import (
  ImageFolderSource,
  ManifestSource,
  TfdsSource,
  lookup_text_embeddings,
)


def _image(path, value: int, size=(12, 10), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, (value,) * len(mode)).save(path)


# ----------------------------------------------------------------------------------------------
# ImageFolderSource.
# ----------------------------------------------------------------------------------------------


def test_image_folder_pairs_captions(tmp_path):
  _image(tmp_path / "b.png", 1)
  (tmp_path / "b.txt").write_text("bee\n")
  _image(tmp_path / "a.JPG", 2)  # extension match is case-insensitive
  (tmp_path / "a.txt").write_bytes(b"caf\xe9")  # non-UTF-8 is passed on raw
  _image(tmp_path / "sub" / "c.png", 3)  # no caption
  (tmp_path / "notes.md").write_text("ignored")
  src = ImageFolderSource(tmp_path)
  assert len(src) == 3
  assert [src[i]["key"] for i in range(3)] == ["a.JPG", "b.png", "sub/c.png"]
  assert src[0]["caption"] == b"caf\xe9" and src[1]["caption"] == b"bee\n"
  assert src[2]["caption"] is None
  assert src[2]["image"] == os.path.join(str(tmp_path), "sub/c.png")
  assert len(ImageFolderSource(tmp_path, exts=(".png",))) == 2
  with pytest.raises(ValueError, match="No images"):
    ImageFolderSource(tmp_path / "sub", exts=(".webp",))


# ----------------------------------------------------------------------------------------------
# ManifestSource.
# ----------------------------------------------------------------------------------------------


def test_jsonl_manifest_resolves_paths_and_keys(tmp_path):
  _image(tmp_path / "imgs" / "1.png", 10)
  _image(tmp_path / "abs.png", 20)
  lines = [
    {"image": "imgs/1.png", "caption": "one"},
    {"image": str(tmp_path / "abs.png"), "caption": None},
    {"image": "imgs/missing.png"},
  ]
  man = tmp_path / "meta" / "train.jsonl"
  man.parent.mkdir()
  man.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
  src = ManifestSource(man, root=tmp_path)
  assert len(src) == 3
  assert src[0] == {"image": str(tmp_path / "imgs/1.png"), "caption": "one", "key": "imgs/1.png"}
  assert src[1]["image"] == str(tmp_path / "abs.png") and src[1]["caption"] is None
  assert src[2]["caption"] is None
  # Default root is the manifest's own directory.
  assert ManifestSource(man)[0]["image"] == str(man.parent / "imgs/1.png")
  # Custom keys.
  man2 = tmp_path / "m2.jsonl"
  man2.write_text(json.dumps({"file": "imgs/1.png", "text": "uno"}) + "\n")
  src2 = ManifestSource(man2, image_key="file", caption_key="text")
  assert src2[0]["caption"] == "uno" and src2[0]["image"] == str(tmp_path / "imgs/1.png")


def test_manifest_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "a.png"}\n{not json\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    ManifestSource(bad)
  bad.write_text('{"caption": "no image"}\n')
  with pytest.raises(ValueError, match="no 'image' field"):
    ManifestSource(bad)
  with pytest.raises(ValueError, match="format"):
    ManifestSource(tmp_path / "x.parquet")


def test_csv_and_tsv_manifests(tmp_path):
  _image(tmp_path / "1.png", 10)
  (tmp_path / "m.csv").write_bytes(b'path,text\n1.png,"a, quoted caption"\n2.png,\n3.png,caf\xe9\n')
  src = ManifestSource(tmp_path / "m.csv", image_key="path", caption_key="text")
  assert len(src) == 3
  assert src[0]["caption"] == "a, quoted caption" and src[0]["key"] == "1.png"
  assert src[1]["caption"] is None  # empty cell = missing caption
  # A non-UTF-8 cell does not break the manifest; the pipeline counts and repairs it.
  assert pp.normalize_caption(src[2]["caption"]) == ("caf\ufffd", ("caption_encoding",))
  (tmp_path / "m.tsv").write_text("image\tcaption\n1.png\ttab caption\n")
  assert ManifestSource(tmp_path / "m.tsv")[0]["caption"] == "tab caption"


# ----------------------------------------------------------------------------------------------
# TfdsSource: a tiny offline builder (array_record), read without TensorFlow.
# ----------------------------------------------------------------------------------------------

N_TFDS = 6


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # the [tfds] extra; [test] installs it

  root = tmp_path_factory.mktemp("tfds")
  src = root / "src"
  for i in range(N_TFDS):
    _image(src / f"{i}.png", 40 * i, size=(20 + i, 16))

  class ImagenJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
    # A one-part module name keeps tfds from resolving the builder's code path as a package
    # resource (tests/ is a package), which needs the `importlib_resources` package.
    __module__ = "tiny_captions_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      feats = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text(),
        "id": np.int32,
      }
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(N_TFDS):
        yield i, {"image": str(src / f"{i}.png"), "caption": f"caption {i}", "id": i}

  builder = ImagenJaxTinyCaptions(data_dir=str(root / "data"), file_format="array_record")
  builder.download_and_prepare()
  return root / "data", builder.data_dir


def test_tfds_source_by_name_and_builder_dir(tfds_dir):
  data_dir, builder_dir = tfds_dir
  by_name = TfdsSource("imagen_jax_tiny_captions", "train", data_dir, key_key="id")
  by_dir = TfdsSource(builder_dir, "train")
  assert len(by_name) == len(by_dir) == N_TFDS
  seen = set()
  for i in range(N_TFDS):
    rec = by_name[i]
    assert isinstance(rec["image"], bytes)  # read encoded; our decoder applies the pixel limit
    ident = int(rec["key"])
    seen.add(ident)
    assert pp.normalize_caption(rec["caption"]) == (f"caption {ident}", ())
    img = pp.to_rgb(pp.decode_image(rec["image"]))
    assert img.shape == (16, 20 + ident, 3) and (img == 40 * ident).all()
    assert by_dir[i]["key"] == f"imagen_jax_tiny_captions/train/{i}"
  assert seen == set(range(N_TFDS))
  assert "tensorflow" not in sys.modules


def test_tfds_source_in_pipeline(tfds_dir):
  data_dir, _ = tfds_dir
  src = TfdsSource("imagen_jax_tiny_captions", "train[:4]", data_dir)
  it = iter(
    make_dataset(src, image_size=16, batch_size=2, seed=0, process_count=1, process_index=0)
  )
  batch = next(it)
  assert batch["image"].shape == (2, 16, 16, 3)
  assert sum(batch[k].sum() for k in batch if k.startswith("bad_")) == 0


# ----------------------------------------------------------------------------------------------
# Cached text embeddings (duck-typed EmbeddingCache).
# ----------------------------------------------------------------------------------------------


class FakeCache:
  def __init__(self, length=5, dim=3):
    self.length, self.dim = length, dim

  def lookup(self, captions):
    emb = np.zeros((len(captions), self.length, self.dim), np.float16)
    mask = np.zeros((len(captions), self.length), np.int8)
    for i, c in enumerate(captions):
      n = min(len(c.split()), self.length)
      emb[i, :n] = len(c)
      mask[i, :n] = 1
    return emb, mask


def test_lookup_text_embeddings():
  out = lookup_text_embeddings(FakeCache(), ["a b", ""])
  assert out["text_emb"].shape == (2, 5, 3) and out["text_emb"].dtype == np.float16
  assert out["text_mask"].dtype == bool
  np.testing.assert_array_equal(out["text_mask"].sum(1), [2, 0])

  class Broken:
    def lookup(self, captions):
      return np.zeros((1, 5, 3)), np.zeros((1, 5))

  with pytest.raises(ValueError, match="expected"):
    lookup_text_embeddings(Broken(), ["a", "b"])
