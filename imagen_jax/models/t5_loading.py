"""Loads Hugging Face T5 checkpoints into :class:`imagen_jax.models.t5.T5EncoderModule`.

Supported layouts of a checkpoint directory (what ``save_pretrained`` writes, or a Hub snapshot):

* ``config.json`` + ``model.safetensors``;
* ``config.json`` + ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``;
* ``pytorch_model.bin`` (optionally sharded with ``pytorch_model.bin.index.json``), read only
  through ``torch.load(weights_only=True)`` when torch is installed.

Both ``T5EncoderModel`` and full encoder-decoder checkpoints (``T5ForConditionalGeneration``,
``T5Model``) work: decoder and ``lm_head`` tensors are ignored. Loading never materialises random
weights: the model is built abstractly with ``nnx.eval_shape`` and every parameter is filled from
the file, optionally straight into a sharding (so the 4.76B-parameter XXL encoder can be placed
FSDP-sharded without a full copy on one device).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from imagen_jax.models.hf_loading import (
  CheckpointError,
  ShardingSpec,
  TensorSource,
  abstract_params,
  check_float_dtypes,
  check_tensor,
  fill_params,
  read_json,
)
from imagen_jax.models.hf_loading import resolve_checkpoint_dir as _resolve
from imagen_jax.models.t5 import T5Config, T5EncoderModule

# Re-exported: callers and tests import these names from here.
__all__ = [
  "CheckpointError", "ShardingSpec", "TensorSource", "hf_tensor_name", "load_t5_encoder",
  "read_t5_config", "resolve_checkpoint_dir", "save_t5_encoder",
]  # fmt: skip

_EMBED_KEYS = ("encoder.embed_tokens.weight", "shared.weight")  # tied: either one is the input
_TOKENIZER_FILES = (
  "tokenizer_config.json", "tokenizer.json", "spiece.model", "special_tokens_map.json",
)  # fmt: skip


def _is_encoder_tensor(name: str) -> bool:
  # Only encoder tensors matter: decoder-only shards of a full checkpoint are never fetched.
  return name.startswith("encoder.") or name in _EMBED_KEYS


# ---------------------------------------------------------------------------------------------
# Locating the checkpoint: a local directory or a Hugging Face Hub id.


def resolve_checkpoint_dir(
  path_or_hub_id: str | os.PathLike,
  *,
  subfolder: str | None = None,
  revision: str | None = None,
  tokenizer_only: bool = False,
) -> Path:
  """Returns a local directory holding the checkpoint, downloading it from the Hub if needed.

  A Hub id (``google/t5-v1_1-xxl``) downloads only ``config.json``, the tokenizer files and the
  weight files holding encoder tensors (for a sharded encoder-decoder checkpoint the
  decoder-only shards are skipped); with ``tokenizer_only`` just the tokenizer files. Path
  components after ``org/name`` select a subfolder (``DeepFloyd/IF-I-XL-v1.0/text_encoder``).
  Offline (``HF_HUB_OFFLINE=1``) only the local Hub cache is used.

  Raises:
    CheckpointError: the path does not exist and the Hub id cannot be fetched.
  """
  return _resolve(
    path_or_hub_id, subfolder=subfolder, revision=revision, tokenizer_only=tokenizer_only,
    tokenizer_files=_TOKENIZER_FILES, keep=_is_encoder_tensor, kind="T5",
    example="google/t5-v1_1-xxl",
  )  # fmt: skip


def read_t5_config(checkpoint_dir: Path) -> T5Config:
  """Reads and validates ``config.json`` of a checkpoint directory."""
  path = Path(checkpoint_dir) / "config.json"
  try:
    return T5Config.from_hf_dict(read_json(path), source=str(path))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Mapping our parameter paths to Hugging Face tensor names.


def hf_tensor_name(path: tuple, embed_key: str) -> tuple[str, bool]:
  """(HF tensor name, transpose?) for a parameter path of :class:`T5EncoderModule`."""
  p = tuple(str(x) for x in path)
  if p == ("embed", "embedding"):
    return embed_key, False
  if p == ("rel_bias", "embedding"):
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False
  if p == ("final_norm", "scale"):
    return "encoder.final_layer_norm.weight", False
  if len(p) >= 4 and p[0] == "blocks":
    i, sub = p[1], p[2]
    if sub == "attn_norm":
      return f"encoder.block.{i}.layer.0.layer_norm.weight", False
    if sub == "mlp_norm":
      return f"encoder.block.{i}.layer.1.layer_norm.weight", False
    if sub == "attn" and p[4:] == ("kernel",):  # torch Linear weight is [out, in]
      return f"encoder.block.{i}.layer.0.SelfAttention.{p[3]}.weight", True
    if sub == "mlp" and p[4:] == ("kernel",):
      return f"encoder.block.{i}.layer.1.DenseReluDense.{p[3]}.weight", True
  raise AssertionError(f"no Hugging Face name for parameter {'/'.join(p)}")


def load_t5_encoder(
  checkpoint_dir: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = None,
  shardings: ShardingSpec = None,
  progress: bool = True,
) -> T5EncoderModule:
  """Builds a :class:`T5EncoderModule` from a local Hugging Face checkpoint directory.

  Args:
    checkpoint_dir: directory with ``config.json`` and weights (see the module docstring).
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
    param_dtype: storage dtype of the parameters; defaults to ``dtype``.
    shardings: where to put each parameter: ``None`` (default device), one ``Sharding`` for
      all, a ``(mesh, rules)`` tuple mapping the logical axis names through
      ``imagen_jax.sharding``, or a callable ``(logical_names, shape) -> Sharding``.
    progress: show a tqdm bar over the tensors.

  Raises:
    CheckpointError: missing/corrupt files, unsupported config keys, missing or unexpected
      encoder tensors, non-float tensors or shapes that disagree with ``config.json``.
  """
  directory = Path(checkpoint_dir)
  config = read_t5_config(directory)
  param_dtype = dtype if param_dtype is None else param_dtype
  check_float_dtypes(dtype=dtype, param_dtype=param_dtype)
  if jnp.dtype(dtype) == jnp.float16:
    raise CheckpointError("float16 compute overflows in T5; use dtype=jnp.bfloat16 or float32")
  source = TensorSource(directory, keep=_is_encoder_tensor, hf_class="T5EncoderModel")
  embed_key = next((k for k in _EMBED_KEYS if k in source.files), _EMBED_KEYS[0])

  # Abstract model: shapes, dtypes and logical names only, no weights allocated.
  graphdef, flat, names = abstract_params(
    lambda rngs: T5EncoderModule(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  )
  plan = _check_tensors(source, flat, embed_key)
  return fill_params(
    graphdef, flat, names, plan, source, param_dtype=param_dtype, shardings=shardings,
    progress=progress, desc="loading T5",
  )  # fmt: skip


def _check_tensors(source: TensorSource, flat, embed_key: str) -> dict:
  """Validates names, shapes and dtypes against the abstract model before reading any data."""
  plan = {}
  for path, var in flat:
    key, transpose = hf_tensor_name(path, embed_key)
    if key not in source.files:
      also = f" (nor {_EMBED_KEYS[1]})" if key == _EMBED_KEYS[0] else ""
      raise CheckpointError(f"{source.origin}: encoder tensor {key}{also} is missing")
    expected = tuple(var.get_value().shape)
    check_tensor(source, key, expected[::-1] if transpose else expected)
    plan[path] = (key, (1, 0) if transpose else None)
  used = {key for key, _ in plan.values()}
  unexpected = sorted(k for k in source.files if k.startswith("encoder.") and k not in used)
  unexpected = [k for k in unexpected if k != "encoder.embed_tokens.weight"]
  if unexpected:
    raise CheckpointError(
      f"{source.where(unexpected[0])}: unexpected encoder tensor(s) {unexpected[:5]}"
      f"{' ...' if len(unexpected) > 5 else ''}: the checkpoint is not a T5/mT5 encoder with "
      "this config.json (e.g. umt5 has a position bias in every layer)"
    )
  return plan


def save_t5_encoder(model: T5EncoderModule, path: str | os.PathLike) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` with Hugging Face ``T5EncoderModel`` names.

  The inverse of :func:`load_t5_encoder` (and loadable by ``transformers.T5EncoderModel``).
  """
  cfg = model.config
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)

  tensors = {}
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transpose = hf_tensor_name(key, "shared.weight")
    arr = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value, np.float32)
    tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
  save_file(tensors, str(path / "model.safetensors"))
  hf = dataclasses.asdict(cfg)
  hf.update(model_type="t5", architectures=["T5EncoderModel"], is_encoder_decoder=False)
  hf["dense_act_fn"] = "gelu_new" if cfg.feed_forward_proj == "gated-gelu" else "relu"
  hf["is_gated_act"] = cfg.feed_forward_proj.startswith("gated")
  with open(path / "config.json", "w") as f:
    json.dump(hf, f, indent=2)
  return path
