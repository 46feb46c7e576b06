"""Factories for tiny CLIP checkpoints, tokenizers and image processors (no network).

  make_tiny_clip_tokenizer_dir(path)   -> dir with vocab.json + merges.txt (CLIPTokenizer)
  make_tiny_clip_dir(path, ...)        -> dir with config.json, safetensors, tokenizer and
                                          preprocessor_config.json (needs torch)
  hf_clip_outputs(dir, ids, mask, px)  -> the PyTorch oracle's features and logits

The tokenizer is a hand-written byte-level BPE over lowercase letters: every letter alone and
at the end of a word (``a</w>``), a few merges, then ``<|startoftext|>`` and ``<|endoftext|>``
as the last ids (so EOS is the largest id, as in real CLIP, and the legacy argmax pooling is
meaningful). Anything else maps to ``<|endoftext|>`` (CLIP's unk token).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

MERGES = ("t h", "th e</w>", "o n</w>", "c o", "r s", "d o", "p h", "ph o", "o g</w>")
IMAGE_SIZE = 30
SHORTEST_EDGE = 34  # > IMAGE_SIZE so that the processor both resizes and crops


def tiny_clip_vocab() -> dict[str, int]:
  """Token -> id of the tiny BPE (letters, letters + ``</w>``, merges, then BOS and EOS)."""
  letters = list(string.ascii_lowercase)
  tokens = letters + [c + "</w>" for c in letters] + [m.replace(" ", "") for m in MERGES]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}


TINY_VOCAB = len(tiny_clip_vocab())
BOS_ID, EOS_ID = TINY_VOCAB - 2, TINY_VOCAB - 1


def make_tiny_clip_tokenizer_dir(path: str | Path, max_length: int = 16) -> Path:
  """Writes ``vocab.json``/``merges.txt`` and saves them as a ``CLIPTokenizer`` directory."""
  from transformers import CLIPTokenizer

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "vocab.json").write_text(json.dumps(tiny_clip_vocab()))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  # transformers 5 ignores CLIPTokenizer(vocab_file=...); from_pretrained(dir) reads the files.
  tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length)
  tok.save_pretrained(str(path))
  return path


def tiny_hf_clip_config(
  hidden_act: str = "quick_gelu", eos_token_id: int = 2, patch_size: int = 10, **overrides
):
  """A tiny ``transformers.CLIPConfig`` (towers of different widths, to catch mix-ups)."""
  from transformers import CLIPConfig

  text = dict(
    vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
    eos_token_id=eos_token_id, bos_token_id=BOS_ID, pad_token_id=EOS_ID,
  )  # fmt: skip
  vision = dict(
    hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
    image_size=IMAGE_SIZE, patch_size=patch_size, hidden_act=hidden_act,
  )  # fmt: skip
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, **overrides)


def make_tiny_clip_dir(
  path: str | Path,
  hidden_act: str = "quick_gelu",
  eos_token_id: int = 2,
  *,
  patch_size: int = 10,
  sharded: bool = False,
  with_tokenizer: bool = True,
  with_processor: bool = True,
  seed: int = 0,
) -> Path:
  """Saves a random tiny ``CLIPModel`` with ``save_pretrained`` (torch required).

  Args:
    path: output directory.
    hidden_act: both towers' activation.
    eos_token_id: 2 (legacy argmax pooling) or the real EOS id (first-EOS pooling).
    patch_size: vision patch size (10 or 15 for the 30-pixel images).
    sharded: write ``model.safetensors.index.json`` + several shards.
    with_tokenizer: also write the tiny tokenizer.
    with_processor: also write a ``CLIPImageProcessor`` ``preprocessor_config.json``.
    seed: torch seed of the random weights.
  """
  import torch
  from transformers import CLIPImageProcessor, CLIPModel

  path = Path(path)
  torch.manual_seed(seed)
  model = CLIPModel(tiny_hf_clip_config(hidden_act, eos_token_id, patch_size)).eval()
  with torch.no_grad():
    # HF's init makes LN affines trivial and logit_scale fixed; randomise them so a mix-up shows.
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or name == "logit_scale":
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(str(path), max_shard_size="40KB" if sharded else "10GB")
  if with_tokenizer:
    make_tiny_clip_tokenizer_dir(path)
  if with_processor:
    CLIPImageProcessor(
      size={"shortest_edge": SHORTEST_EDGE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(str(path))
  return path


def hf_clip_outputs(checkpoint_dir: str | Path, input_ids, attention_mask, pixels_nhwc) -> dict:
  """The oracle: transformers' PyTorch ``CLIPModel`` in fp32 on the same inputs (numpy out)."""
  import torch
  from transformers import CLIPModel

  model = CLIPModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(attention_mask).astype(np.int64))
  px = torch.as_tensor(np.asarray(pixels_nhwc, np.float32).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
    text = model.get_text_features(input_ids=ids, attention_mask=mask)
    image = model.get_image_features(pixel_values=px)
  as_np = lambda t: (t.pooler_output if hasattr(t, "pooler_output") else t).numpy()
  return {
    "text_features": as_np(text),
    "image_features": as_np(image),
    "logits_per_image": out.logits_per_image.numpy(),
    "logits_per_text": out.logits_per_text.numpy(),
  }


def padded_ids(lengths, length: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random ids ``[B, length]`` with ``lengths[i]`` real tokens and an EOS closing each row but
  the last, padded with EOS; the mask marks the real tokens.

  Tokens are drawn from the whole vocabulary below EOS, so the legacy argmax pooling and the
  first-EOS pooling pick different positions in the row without an EOS.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, EOS_ID, size=(len(lengths), length)).astype(np.int32)
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  ids = np.where(mask, ids, EOS_ID).astype(np.int32)
  for i, n in enumerate(lengths[:-1]):
    ids[i, n - 1] = EOS_ID
  return ids, mask
