"""Text conditioning for training: a frozen T5 (real checkpoint or the shapes demo) or the cache.

``config.text.encoder`` selects it:

* a Hugging Face T5 checkpoint directory or hub id (e.g. ``google/t5-v1_1-xxl``, as in Imagen);
* ``"shapes_demo"``: a small T5 architecture with frozen random weights (deterministic from the
  seed) and a word-level sentencepiece tokenizer trained on the shapes caption grammar. It is
  written to ``workdir/text_encoder/`` in Hugging Face format, so ``sample.py`` and
  ``T5Encoder.from_pretrained`` load it like any T5. A random frozen encoder still maps every
  caption to a distinct, deterministic embedding sequence — all a U-Net needs to learn the
  grammar's 23 words; it has no pretrained language knowledge, which the demo does not need.

With ``config.text.embedding_cache`` the pipeline reads precomputed embeddings instead and no T5
is held in memory during training.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx
from jax.experimental import multihost_utils
from transformers import T5Tokenizer

from imagen_jax.data import shapes
from imagen_jax.data.text_cache import EmbeddingCache
from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.models.t5_loading import save_t5_encoder
from imagen_jax.text import T5Encoder

DEMO_ENCODER = "shapes_demo"


class TextEmbedder:
  """Turns batches and prompts into ``(text_emb [B, L, D], text_mask [B, L])``.

  ``zero_padding`` zeroes the hidden states of padded positions (what this project's U-Nets are
  trained with); DeepFloyd IF was trained on the raw states of every position (``False``).
  """

  def __init__(self, encoder: Any = None, cache: Any = None, *, zero_padding: bool = True):
    if encoder is None and cache is None:
      raise ValueError("TextEmbedder needs a T5Encoder or an EmbeddingCache")
    self.encoder, self.cache = encoder, cache
    self.zero_padding = bool(zero_padding)
    if cache is not None and not self.zero_padding:
      raise ValueError(
        "config.text.embedding_cache stores zero-padded embeddings; config.text.zero_padding="
        "False (DeepFloyd IF) needs config.text.encoder instead"
      )
    self._null = None
    if encoder is not None and cache is not None and encoder.d_model != cache.d_model:
      raise ValueError(
        f"config.text.embedding_cache has d_model {cache.d_model} but config.text.encoder has "
        f"{encoder.d_model}: the cache was written by a different encoder"
      )
    self.d_model = int(encoder.d_model if encoder is not None else cache.d_model)

  def pipeline_kwargs(self) -> dict:
    """What the data pipeline adds to each batch: cached embeddings, else token ids."""
    if self.cache is not None:
      return {"embedding_cache": self.cache}
    tok = self.encoder.tokenizer

    def tokenize_fn(captions):
      ids, mask = tok(list(captions))
      return {"input_ids": ids, "attention_mask": mask}

    return {"tokenize_fn": tokenize_fn}

  def prepare_batch(self, batch: dict) -> dict:
    """Replaces token ids by ``text_emb``/``text_mask`` (encoded on device) where needed."""
    # astype, not np.asarray: batch values may be global (multi-host, sharded) jax.Arrays.
    if "text_emb" in batch:
      batch["text_mask"] = batch["text_mask"].astype(bool)
      return batch
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask").astype(bool)
    batch["text_emb"] = self.encoder.encode(ids, mask, zero_padding=self.zero_padding)
    batch["text_mask"] = mask
    if not self.zero_padding:  # text dropout's null condition: the empty prompt (IF)
      batch["null_emb"], batch["null_mask"] = self.null_condition(ids.shape[0])
    return batch

  def null_condition(self, n: int) -> tuple[Any, Any]:
    """The unconditional branch's ``(emb [n, L, D], mask [n, L])``: zeros and an all-false mask
    (this project's U-Nets), or the empty prompt's states without zeroed padding (DeepFloyd IF,
    ``zero_padding=False``)."""
    if self.zero_padding:
      length = self.encoder.max_length if self.encoder is not None else self.cache.max_length
      return np.zeros((n, length, self.d_model), np.float32), np.zeros((n, length), bool)
    if self._null is None:
      emb, mask = self.encode_prompts([""])
      self._null = (np.asarray(emb), np.asarray(mask))
    emb, mask = self._null
    return np.repeat(emb, n, axis=0), np.repeat(mask, n, axis=0)

  def encode_prompts(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
    """Embeddings for arbitrary prompts (evals, sampling)."""
    if self.encoder is not None:
      ids, mask = self.encoder.tokenize(list(prompts))
      ids, mask = np.asarray(ids), np.asarray(mask, bool)  # host values: same on every process
      return self.encoder.encode(ids, mask, zero_padding=self.zero_padding), mask
    emb, mask = self.cache.lookup(list(prompts))
    return np.asarray(emb), np.asarray(mask, bool)


def build_text_embedder(
  config: ml_collections.ConfigDict, workdir: str, *, shardings: Any = None
) -> TextEmbedder:
  """The conditioner for ``config.text`` (building the demo encoder in the workdir if asked).

  ``shardings`` places the T5 weights (e.g. ``(mesh, rules)``: FSDP-sharded T5-XXL), see
  :meth:`imagen_jax.text.T5Encoder.from_pretrained`.
  """
  t = config.text
  dtype = jnp.bfloat16 if t.dtype == "bfloat16" else jnp.float32
  encoder = cache = None
  if t.encoder == DEMO_ENCODER:
    path = os.path.join(workdir, "text_encoder")
    if not os.path.isfile(os.path.join(path, "config.json")):
      if jax.process_index() == 0:
        write_demo_encoder(path, seed=config.seed, max_length=t.max_length)
      _sync("demo_text_encoder")
    encoder = T5Encoder.from_pretrained(
      path, dtype=dtype, max_length=t.max_length, progress=False, shardings=shardings
    )
  elif os.path.isdir(os.path.join(t.encoder, "text_encoder")):  # a DeepFloyd IF pipeline dir
    encoder = T5Encoder.from_pretrained(
      t.encoder,
      dtype=dtype,
      max_length=t.max_length,
      shardings=shardings,
      subfolder="text_encoder",
      tokenizer_path=os.path.join(t.encoder, "tokenizer"),
    )
  elif t.encoder:
    encoder = T5Encoder.from_pretrained(
      t.encoder, dtype=dtype, max_length=t.max_length, shardings=shardings
    )
  if t.embedding_cache:
    cache = EmbeddingCache(t.embedding_cache)
  return TextEmbedder(encoder, cache, zero_padding=bool(t.get("zero_padding", True)))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_demo_encoder(path: str, *, seed: int = 0, max_length: int = 16) -> str:
  """Writes the shapes demo text encoder (tokenizer + random tiny T5) in Hugging Face format."""
  os.makedirs(path, exist_ok=True)
  words = shapes.vocabulary()
  corpus = [" ".join(words)] + shapes.all_single_object_captions()
  buf = io.BytesIO()
  # A word-level model: every grammar word is one token, so captions tokenize unambiguously.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_writer=buf,
    vocab_size=len(words) + 3,
    hard_vocab_limit=False,
    model_type="word",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    minloglevel=2,
  )
  raw = os.path.join(path, "_spm")
  os.makedirs(raw, exist_ok=True)
  with open(os.path.join(raw, "spiece.model"), "wb") as f:
    f.write(buf.getvalue())
  tok = T5Tokenizer.from_pretrained(raw, extra_ids=0)
  tok.model_max_length = max_length
  tok.save_pretrained(path)
  shutil.rmtree(raw)
  cfg = T5Config(
    vocab_size=len(tok),
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
  )
  model = T5EncoderModule(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
  save_t5_encoder(model, path)
  return path
