"""Factories for tiny T5 checkpoints and tokenizers, shared by the text/T5 tests (and others).

Nothing here touches the network: the tokenizer is a sentencepiece model trained in-process and
the checkpoints are random ``transformers`` T5 models saved with ``save_pretrained``.

  make_tiny_tokenizer_dir(path)             -> dir loadable by AutoTokenizer / imagen_jax.text
  make_tiny_t5_dir(path, variant="v1_1")    -> dir with config.json, safetensors and a tokenizer
                                               (needs torch)
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TINY_VOCAB = 128  # >= the tokenizer's size, as in real T5 (32128 rows for 32100 tokens)

DEFAULT_CORPUS = (
  "a photo of a corgi on the beach",
  "an oil painting of a cat wearing a hat",
  "the quick brown fox jumps over the lazy dog",
  "a red sports car parked near a tall tree",
  "two dogs playing in the snow at night",
  "a bowl of fruit on a wooden table",
  "a watercolor landscape with mountains and a river",
  "an astronaut riding a horse on the moon",
)


def make_tiny_tokenizer_dir(
  path: str | Path, corpus: Sequence[str] | None = None, vocab_size: int = 64
) -> Path:
  """Trains a tiny unigram sentencepiece model and saves it as a T5 tokenizer directory.

  Ids follow T5: pad 0, ``</s>`` 1, unk 2, no BOS, no extra ids. Characters outside the corpus
  (non-ASCII, emoji) map to unk. Returns ``path``.
  """
  import sentencepiece as spm
  from transformers import T5Tokenizer

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  corpus = list(corpus or DEFAULT_CORPUS)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus * 10), model_writer=model, vocab_size=vocab_size,
    hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
    minloglevel=2,
  )  # fmt: skip
  # transformers 5 ignores T5Tokenizer(vocab_file=...); from_pretrained(dir) reads spiece.model.
  with tempfile.TemporaryDirectory() as raw:
    (Path(raw) / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(raw, extra_ids=0).save_pretrained(str(path))
  return path


def tiny_hf_config(variant: str = "v1_1", **overrides):
  """A random-init-sized ``transformers.T5Config``: ``v1_0`` (ReLU), ``v1_1`` (gated-GELU) or
  any ``feed_forward_proj`` string."""
  from transformers import T5Config

  ff = {"v1_0": "relu", "v1_1": "gated-gelu"}.get(variant, variant)
  kwargs = dict(
    vocab_size=TINY_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
    num_heads=4, feed_forward_proj=ff, dropout_rate=0.0, decoder_start_token_id=0,
  )  # fmt: skip
  kwargs.update(overrides)
  return T5Config(**kwargs)


def make_tiny_t5_dir(
  path: str | Path,
  variant: str = "v1_1",
  sharded: bool = False,
  with_decoder: bool = False,
  *,
  dtype: str = "float32",
  with_tokenizer: bool = True,
  seed: int = 0,
  **config_overrides,
) -> Path:
  """Saves a random tiny T5 checkpoint with ``save_pretrained`` (torch required).

  Args:
    path: output directory.
    variant: ``v1_0`` (ReLU), ``v1_1`` (gated-GELU) or a ``feed_forward_proj`` string.
    sharded: write ``model.safetensors.index.json`` + several shards.
    with_decoder: save a full ``T5ForConditionalGeneration`` instead of ``T5EncoderModel``.
    dtype: ``float32``, ``bfloat16`` or ``float16`` weights on disk.
    with_tokenizer: also write a tiny tokenizer (see :func:`make_tiny_tokenizer_dir`).
    seed: torch seed of the random weights.
    **config_overrides: ``transformers.T5Config`` fields.
  """
  import torch
  from transformers import T5EncoderModel, T5ForConditionalGeneration

  path = Path(path)
  torch.manual_seed(seed)
  config = tiny_hf_config(variant, **config_overrides)
  model = (T5ForConditionalGeneration if with_decoder else T5EncoderModel)(config).eval()
  with torch.no_grad():
    # HF's init gives a tiny relative bias; make it large so a wrong bucket shows in the output.
    for name, p in model.named_parameters():
      if "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  model = model.to(getattr(torch, dtype))
  model.save_pretrained(str(path), max_shard_size="20KB" if sharded else "10GB")
  if with_tokenizer:
    make_tiny_tokenizer_dir(path)
  return path


def hf_last_hidden_state(checkpoint_dir: str | Path, input_ids, attention_mask) -> np.ndarray:
  """The oracle: ``transformers.T5EncoderModel(...).last_hidden_state`` in fp32 (torch)."""
  import torch
  from transformers import T5EncoderModel

  model = T5EncoderModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
      attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
    )
  return out.last_hidden_state.numpy()


def padded_batch(lengths: Sequence[int], length: int, vocab: int = TINY_VOCAB, seed: int = 0):
  """Random ids ``[B, length]`` with ``lengths[i]`` real tokens each (pad id 0) and the mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(len(lengths), length)).astype(np.int32)
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask
