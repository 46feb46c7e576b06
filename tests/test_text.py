"""Tokenizer wrapper and the ``T5Encoder`` text API (``tokenize``/``encode_text``)."""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import text
from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.models.t5_loading import CheckpointError
from imagen_jax.text import T5Encoder, Tokenizer, TruncationWarning

try:
  from tests.t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, make_tiny_tokenizer_dir
except ImportError:
  from t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, make_tiny_tokenizer_dir

L = 16
LONG = " ".join(["a photo of a corgi on the beach"] * 6)  # ~50 tokens


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  pytest.importorskip("torch")
  return make_tiny_t5_dir(tmp_path_factory.mktemp("t5"), "v1_1")


@pytest.fixture(scope="module")
def encoder(t5_dir):
  return T5Encoder.from_pretrained(t5_dir, max_length=L, progress=False)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_pads_and_masks(tok_dir):
  tok = Tokenizer.from_pretrained(tok_dir, max_length=L)
  ids, mask = tok(["a photo of a corgi", "a cat"])
  assert ids.shape == mask.shape == (2, L) and ids.dtype == np.int32 and mask.dtype == bool
  hf = tok.hf_tokenizer(["a photo of a corgi", "a cat"], padding="max_length", max_length=L)
  np.testing.assert_array_equal(ids, hf["input_ids"])
  np.testing.assert_array_equal(mask, np.asarray(hf["attention_mask"], bool))
  for i in range(2):  # real tokens end with </s>, then pad
    n = mask[i].sum()
    assert ids[i, n - 1] == tok.eos_id and (ids[i, n:] == tok.pad_id).all()
  assert Tokenizer.from_pretrained(tok_dir)(["x"])[0].shape == (1, 128)  # default max_length


def test_truncation_warns_with_count_and_matches_hf(tok_dir):
  tok = Tokenizer.from_pretrained(tok_dir, max_length=L)
  with pytest.warns(TruncationWarning, match=r"2 of 3 prompts exceeded max_length=16"):
    ids, mask = tok([LONG, "a cat", LONG + " dog"])
  assert mask[0].all() and ids[0, -1] == tok.eos_id  # cut like truncation=True: </s> kept
  hf = tok.hf_tokenizer(
    [LONG, "a cat", LONG + " dog"], truncation=True, padding="max_length", max_length=L
  )
  np.testing.assert_array_equal(ids, hf["input_ids"])
  assert tok.num_truncated == 2
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning when nothing is cut
    tok(["a cat"])


def test_empty_prompt_is_a_lone_eos(tok_dir):
  tok = Tokenizer.from_pretrained(tok_dir, max_length=L)
  ids, mask = tok(["", "a cat"])
  assert mask[0].sum() == 1 and ids[0, 0] == tok.eos_id and (ids[0, 1:] == tok.pad_id).all()
  assert tok([])[0].shape == (0, L)
  assert tok("a cat")[0].shape == (1, L)  # a bare string is one prompt, not characters


def test_non_ascii_emoji_and_bad_bytes(tok_dir):
  tok = Tokenizer.from_pretrained(tok_dir, max_length=L)
  surrogates = b"a dog \xff".decode("utf-8", "surrogateescape")
  prompts = [
    "un café à Zürich",
    "日本語のテキスト",
    "a corgi 🐶🏖️",
    b"a cat \xff\xfe",
    "\u200b",
    surrogates,
  ]
  ids, mask = tok(prompts)
  assert ids.shape == (6, L) and mask[:, 0].all()
  assert (ids < len(tok)).all() and (ids >= 0).all()
  with pytest.raises(TypeError, match="str or bytes"):
    tok([None])


# ---------------------------------------------------------------------------------------------
# T5Encoder text API.


def test_encode_text_shapes_mask_and_zero_padding(encoder, t5_dir):
  prompts = ["a corgi", "", "日本語 🐶"]
  emb, mask = encoder.encode_text(prompts)
  assert emb.shape == (3, L, encoder.d_model) and emb.dtype == jnp.float32
  assert mask.shape == (3, L) and mask.dtype == jnp.bool_
  emb, mask = np.asarray(emb), np.asarray(mask)
  assert (emb[~mask] == 0).all() and np.abs(emb[mask]).min() > 0
  ids, ids_mask = encoder.tokenize(prompts)
  np.testing.assert_array_equal(mask, ids_mask)
  ref = hf_last_hidden_state(t5_dir, ids, ids_mask)
  assert np.abs(emb[mask] - ref[mask]).max() <= 1e-4
  assert encoder.max_length == L and encoder.d_model == 32


def test_encode_validates_shapes(encoder):
  with pytest.raises(ValueError, match=r"must both be \[B, L\]"):
    encoder.encode(np.zeros((2, 4), np.int32), np.ones((2, 5), bool))


def test_module_level_encode_text(t5_dir):
  text.get_encoder.cache_clear()
  emb, mask = text.encode_text(["a cat", ""], str(t5_dir), max_length=8)
  assert emb.shape == (2, 8, 32) and mask.shape == (2, 8)
  text.encode_text(["a dog"], str(t5_dir), max_length=8)
  assert text.get_encoder.cache_info().hits == 1  # the encoder is loaded once
  text.get_encoder.cache_clear()


def test_tokenizer_elsewhere_or_missing(t5_dir, tok_dir, tmp_path):
  weights = tmp_path / "weights"
  weights.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(t5_dir / name, weights / name)
  enc = T5Encoder.from_pretrained(weights, max_length=L, progress=False)
  assert enc.tokenizer is None
  enc.encode(np.ones((1, 4), np.int32), np.ones((1, 4), bool))  # ids still work
  with pytest.raises(CheckpointError, match="no tokenizer files.*tokenizer_path"):
    enc.encode_text(["a cat"])
  enc = T5Encoder.from_pretrained(weights, max_length=L, tokenizer_path=tok_dir, progress=False)
  assert enc.encode_text(["a cat"])[0].shape == (1, L, 32)


def test_tokenizer_larger_than_vocab_is_rejected(tok_dir):
  config = dataclasses.replace(T5Config.tiny(), vocab_size=8)
  model = nnx.eval_shape(lambda: T5EncoderModule(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="do not belong together"):
    T5Encoder(model, Tokenizer.from_pretrained(tok_dir))


def test_from_pretrained_timing(t5_dir):
  """Loading must stay cheap (abstract build + fill); report the time for the tiny model."""
  start = time.perf_counter()
  T5Encoder.from_pretrained(t5_dir, progress=False)
  elapsed = time.perf_counter() - start
  print(f"tiny T5Encoder.from_pretrained: {elapsed * 1000:.0f} ms")
  assert elapsed < 10


def test_hub_subfolder_tokenizer_only(tok_dir, tmp_path, monkeypatch):
  """``org/name/subfolder`` ids (e.g. DeepFloyd IF's ``tokenizer/``), Hub faked locally."""
  import huggingface_hub

  snapshot = tmp_path / "snap"
  calls = []

  def hf_hub_download(repo_id, filename, *, subfolder=None, revision=None, local_files_only=False):
    calls.append((repo_id, subfolder, filename))
    (snapshot / subfolder).mkdir(parents=True, exist_ok=True)
    shutil.copy(tok_dir / filename, snapshot / subfolder / filename)
    return str(snapshot / subfolder / filename)

  listing = [f"tokenizer/{p.name}" for p in tok_dir.iterdir()] + ["text_encoder/config.json"]
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listing)
  tok = Tokenizer.from_pretrained("DeepFloyd/IF-I-XL-v1.0/tokenizer", max_length=L)
  assert tok(["a cat"])[1].sum() > 0
  assert {(r, s) for r, s, _ in calls} == {("DeepFloyd/IF-I-XL-v1.0", "tokenizer")}
  assert "config.json" not in {f for _, _, f in calls}
