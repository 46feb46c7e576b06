"""Text conditioning: a frozen T5 encoder plus its tokenizer, loaded from Hugging Face checkpoints.

Typical use (a sampler or notebook)::

  from imagen_jax.text import T5Encoder
  t5 = T5Encoder.from_pretrained("/ckpt/t5-v1_1-xxl", dtype=jnp.bfloat16)  # or a Hub id online
  emb, mask = t5.encode_text(["a corgi on the beach", ""])  # [B, 128, 4096], [B, 128]

``""`` is a valid prompt: it tokenizes to a lone ``</s>`` and is the unconditional input of
classifier-free guidance. ``encode_text`` zeroes the embeddings of padded positions, so cached
(trimmed) and freshly computed embeddings agree up to the cache's storage rounding. Training can
avoid holding the T5 in memory by pre-encoding captions with
``python -m imagen_jax.tools.encode_texts``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.models.t5_loading import (
  CheckpointError,
  ShardingSpec,
  load_t5_encoder,
  resolve_checkpoint_dir,
)

DEFAULT_T5 = "google/t5-v1_1-xxl"  # Imagen's text encoder (Saharia et al. 2022, §2.1)
DEFAULT_MAX_LENGTH = 128
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")

__all__ = [
  "DEFAULT_MAX_LENGTH", "DEFAULT_T5", "CheckpointError", "T5Encoder", "Tokenizer",
  "TruncationWarning", "encode_text", "get_encoder",
]  # fmt: skip


class TruncationWarning(UserWarning):
  """Some prompts were longer than ``max_length`` tokens and were cut (keeping ``</s>``)."""


def _as_text(prompt: Any) -> str:
  if isinstance(prompt, str):
    try:
      prompt.encode("utf-8")
      return prompt
    except UnicodeEncodeError:  # lone surrogates (errors="surrogateescape" reads): replace them
      return prompt.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
  if isinstance(prompt, bytes | np.bytes_):  # e.g. tfds captions; never crash on bad bytes
    return bytes(prompt).decode("utf-8", errors="replace")
  raise TypeError(f"prompts must be str or bytes, got {type(prompt).__name__}: {prompt!r}")


class Tokenizer:
  """Fixed-length T5 tokenization: ids padded to ``max_length`` plus an attention mask.

  Wraps a transformers tokenizer. Prompts longer than ``max_length`` tokens are truncated the way
  ``tokenizer(..., truncation=True)`` does (the final ``</s>`` is kept) and a
  :class:`TruncationWarning` reports how many were cut.
  """

  def __init__(self, hf_tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH):
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    self.hf_tokenizer = hf_tokenizer
    self.max_length = int(max_length)
    self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0)
    self.eos_id = hf_tokenizer.eos_token_id
    self.num_truncated = 0  # running count over all calls (the cache tool reports it)

  @classmethod
  def from_pretrained(
    cls,
    path_or_hub_id: str | os.PathLike,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    subfolder: str | None = None,
    revision: str | None = None,
  ) -> Tokenizer:
    """Loads ``AutoTokenizer.from_pretrained`` from a local directory or a Hub id.

    The directory needs ``tokenizer.json`` or ``spiece.model`` (+ ``tokenizer_config.json``).
    Note: in transformers 5, ``T5Tokenizer(vocab_file=...)`` silently ignores the file; always go
    through ``from_pretrained(directory)``.
    """
    local = resolve_checkpoint_dir(
      path_or_hub_id, subfolder=subfolder, revision=revision, tokenizer_only=True
    )
    if not any((local / f).is_file() for f in _TOKENIZER_FILES):
      raise CheckpointError(f"{local}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return cls(AutoTokenizer.from_pretrained(str(local)), max_length=max_length)

  def __len__(self) -> int:
    return len(self.hf_tokenizer)

  def __call__(self, prompts: str | Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes prompts into ``(ids int32 [B, L], mask bool [B, L])``, ``L = max_length``."""
    if isinstance(prompts, str | bytes):
      prompts = [prompts]
    texts = [_as_text(p) for p in prompts]
    length = self.max_length
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    if not texts:
      return ids, mask
    # Tokenize untruncated once so truncation can be counted (verbose=False: no HF length spam).
    seqs = self.hf_tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    truncated = 0
    for i, seq in enumerate(seqs):
      if len(seq) > length:
        truncated += 1
        ends_eos = self.eos_id is not None and seq[-1] == self.eos_id
        seq = seq[: length - 1] + [seq[-1]] if ends_eos else seq[:length]
      ids[i, : len(seq)] = seq
      mask[i, : len(seq)] = True
    self.num_truncated += truncated
    if truncated:
      warnings.warn(
        f"{truncated} of {len(texts)} prompts exceeded max_length={length} tokens and were "
        "truncated",
        TruncationWarning,
        stacklevel=2,
      )
    return ids, mask


def _as_input(x: Any, dtype: Any) -> Any:
  if isinstance(x, jax.Array):
    return x if x.dtype == dtype else x.astype(dtype)
  return np.asarray(x, dtype)


def _apply(graphdef, state, input_ids, attention_mask):
  return nnx.merge(graphdef, state)(input_ids, attention_mask)


def _apply_zero_padding(graphdef, state, input_ids, attention_mask):
  hidden = _apply(graphdef, state, input_ids, attention_mask)
  return jnp.where(attention_mask[..., None].astype(bool), hidden, 0).astype(hidden.dtype)


class T5Encoder:
  """A frozen T5 encoder (parameters as an ``nnx.State``) and its tokenizer.

  ``encode`` is a jitted pure function of the parameters, so the encoder can be held sharded and
  called from host code; ``apply`` exposes the same function for use inside other jitted code.
  """

  def __init__(
    self, model: T5EncoderModule, tokenizer: Tokenizer | None = None, *, source: str | None = None
  ):
    self.config: T5Config = model.config
    self.source = source  # where the weights came from (for messages and cache manifests)
    self.dtype = model.dtype
    self.tokenizer = tokenizer
    if tokenizer is not None and len(tokenizer) > self.config.vocab_size:
      raise ValueError(
        f"tokenizer has {len(tokenizer)} tokens but the T5 embedding only "
        f"{self.config.vocab_size} rows: they do not belong together"
      )
    self.graphdef, self.state = nnx.split(model)
    self._encode = jax.jit(functools.partial(_apply, self.graphdef))
    self._encode_zeroed = jax.jit(functools.partial(_apply_zero_padding, self.graphdef))

  @classmethod
  def from_pretrained(
    cls,
    path_or_hub_id: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    shardings: ShardingSpec = None,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    progress: bool = True,
  ) -> T5Encoder:
    """Loads a Hugging Face T5 checkpoint (encoder-only or full encoder-decoder).

    Args:
      path_or_hub_id: a directory with ``config.json`` + ``model.safetensors`` (or sharded
        safetensors, or ``pytorch_model.bin`` when torch is installed), or a Hub id such as
        ``google/t5-v1_1-xxl`` / ``google/flan-t5-xxl`` (needs network or the local HF cache).
      dtype: compute dtype, ``jnp.float32`` (exact) or ``jnp.bfloat16`` (half the memory and
        faster on accelerators; layer-norm statistics and softmax stay in fp32).
      param_dtype: parameter storage dtype; defaults to ``dtype``.
      max_length: tokenizer length ``L`` (Imagen uses 128).
      shardings: parameter placement, see :func:`imagen_jax.models.t5_loading.load_t5_encoder`
        (e.g. ``(mesh, rules)`` to FSDP-shard XXL over ``embed``/``heads``/``mlp``).
      tokenizer_path: tokenizer directory or Hub id if it is not next to the weights.
      subfolder: checkpoint subfolder (e.g. ``"text_encoder"`` in a DeepFloyd IF repo).
      revision: Hub revision.
      progress: show a progress bar while loading.

    Raises:
      CheckpointError: missing/corrupt/incompatible files (the message names file and tensor).
    """
    local = resolve_checkpoint_dir(path_or_hub_id, subfolder=subfolder, revision=revision)
    model = load_t5_encoder(
      local, dtype=dtype, param_dtype=param_dtype, shardings=shardings, progress=progress
    )
    if tokenizer_path is not None:
      tokenizer = Tokenizer.from_pretrained(tokenizer_path, max_length=max_length)
    elif any((local / f).is_file() for f in _TOKENIZER_FILES):
      tokenizer = Tokenizer.from_pretrained(local, max_length=max_length)
    else:
      tokenizer = None  # encode() still works; tokenize()/encode_text() explain what is missing
    return cls(model, tokenizer, source=str(path_or_hub_id))

  @property
  def d_model(self) -> int:
    """Width ``D`` of the hidden states (4096 for T5-XXL)."""
    return self.config.d_model

  @property
  def max_length(self) -> int:
    """Token length ``L`` that :meth:`tokenize` pads/truncates to."""
    return self._require_tokenizer().max_length

  @property
  def model(self) -> T5EncoderModule:
    """The encoder as an NNX module (shares the parameter arrays)."""
    return nnx.merge(self.graphdef, self.state)

  @staticmethod
  def apply(graphdef, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Pure ``(graphdef, state, ids, mask) -> hidden [B, L, D]`` for use inside ``jax.jit``."""
    return _apply(graphdef, state, input_ids, attention_mask)

  def encode(self, input_ids: Any, attention_mask: Any, *, zero_padding: bool = False) -> jax.Array:
    """Hidden states ``[B, L, D]`` equal to ``T5EncoderModel(...).last_hidden_state``.

    Args:
      input_ids: int ``[B, L]`` token ids (host or device arrays, sharded ones included).
      attention_mask: ``[B, L]``, 1/True for real tokens (padding is never attended to).
      zero_padding: zero the hidden states of padded positions (what the U-Nets are trained
        on, and what the embedding cache restores).
    """
    # Host inputs stay numpy (in a multi-process run every process passes the same values);
    # device arrays, sharded global ones included, are passed through.
    input_ids, attention_mask = _as_input(input_ids, np.int32), _as_input(attention_mask, bool)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
      raise ValueError(
        f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, L]"
      )
    fn = self._encode_zeroed if zero_padding else self._encode
    return fn(self.state, input_ids, attention_mask)

  def _require_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise CheckpointError(
        f"{self.source or 'this T5 checkpoint'}: no tokenizer files next to the "
        "weights; pass tokenizer_path= to T5Encoder.from_pretrained"
      )
    return self.tokenizer

  def tokenize(self, prompts: str | Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [B, L], mask bool [B, L])`` as numpy arrays; see :class:`Tokenizer`."""
    return self._require_tokenizer()(prompts)

  def encode_text(self, prompts: str | Sequence[str | bytes]) -> tuple[jax.Array, jax.Array]:
    """Tokenizes and encodes prompts.

    Returns:
      ``(embeddings [B, L, D] in the compute dtype, mask bool [B, L])``; embeddings at padded
      positions are zero.
    """
    ids, mask = self.tokenize(prompts)
    return self.encode(ids, mask, zero_padding=True), jnp.asarray(mask)

  def __repr__(self) -> str:
    c = self.config
    return (
      f"T5Encoder(d_model={c.d_model}, layers={c.num_layers}, heads={c.num_heads}, "
      f"ff={c.feed_forward_proj}, dtype={jnp.dtype(self.dtype).name}, "
      f"source={self.source!r})"
    )


@functools.lru_cache(maxsize=2)
def get_encoder(
  path_or_hub_id: str = DEFAULT_T5, dtype: Any = jnp.float32, max_length: int = DEFAULT_MAX_LENGTH
) -> T5Encoder:
  """A process-wide cached :meth:`T5Encoder.from_pretrained` (loading XXL takes a while)."""
  return T5Encoder.from_pretrained(path_or_hub_id, dtype=dtype, max_length=max_length)


def encode_text(
  prompts: str | Sequence[str | bytes],
  path_or_hub_id: str = DEFAULT_T5,
  *,
  dtype: Any = jnp.float32,
  max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[jax.Array, jax.Array]:
  """``(embeddings [B, L, D], mask [B, L])`` from a process-wide cached :class:`T5Encoder`.

  Args:
    prompts: the texts (``""`` is the unconditional prompt).
    path_or_hub_id: T5 checkpoint directory or Hub id (default Imagen's ``google/t5-v1_1-xxl``).
    dtype: compute dtype.
    max_length: token length ``L``.
  """
  return get_encoder(str(path_or_hub_id), dtype, max_length).encode_text(prompts)
