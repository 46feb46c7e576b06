"""Loads (and saves) Hugging Face ``CLIPModel`` checkpoints as :class:`CLIPModule`.

A checkpoint directory is what ``CLIPModel.save_pretrained`` writes, or a Hub snapshot:
``config.json`` plus ``model.safetensors`` (or sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin`` when torch is installed). The model is
built abstractly with ``nnx.eval_shape`` and every parameter is filled from the file, optionally
straight into a sharding, so a ViT-bigG (2.5B parameters) never exists as a random full copy.
The check is strict: a missing, unexpected or wrongly shaped tensor fails with its name
(``position_ids`` buffers that old checkpoints saved are ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from imagen_jax.models.clip import CLIPConfig, CLIPModule
from imagen_jax.models.hf_loading import (
  CheckpointError,
  Plan,
  ShardingSpec,
  TensorSource,
  abstract_params,
  check_float_dtypes,
  check_plan,
  fill_params,
  read_json,
  resolve_checkpoint_dir,
)

__all__ = [
  "CLIP_SIDE_FILES", "CheckpointError", "hf_tensor_name", "load_clip", "read_clip_config",
  "resolve_clip_dir", "save_clip",
]  # fmt: skip

# Tokenizer and image-processor files fetched next to the weights for a Hub id.
CLIP_SIDE_FILES = (
  "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
  "special_tokens_map.json", "preprocessor_config.json",
)  # fmt: skip
_LINEAR = (1, 0)  # torch Linear [out, in] -> our kernel [in, out]
_CONV = (2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> our kernel [kh, kw, in, out]
# Leaves of our modules -> the suffix of the HF tensor name and the permutation.
_LEAVES = {"kernel": ("weight", _LINEAR), "scale": ("weight", None), "bias": ("bias", None)}
_EMBEDDINGS = {"token_embedding", "position_embedding", "class_embedding", "patch_embedding"}


def resolve_clip_dir(
  path_or_hub_id: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None
) -> Path:
  """A local directory for a checkpoint directory or Hub id (``openai/clip-vit-large-patch14``).

  A Hub id downloads ``config.json``, the weights and the tokenizer/processor files (needs
  network, or the local HF cache with ``HF_HUB_OFFLINE=1``).
  """
  return resolve_checkpoint_dir(
    path_or_hub_id, subfolder=subfolder, revision=revision, tokenizer_files=CLIP_SIDE_FILES,
    kind="CLIP", example="openai/clip-vit-base-patch32",
  )  # fmt: skip


def read_clip_config(checkpoint_dir: str | os.PathLike) -> CLIPConfig:
  """Reads and validates ``config.json`` (``CLIPModel`` format) of a checkpoint directory.

  Raises:
    CheckpointError: a missing/invalid file or an unsupported value (the message names the key).
  """
  path = Path(checkpoint_dir) / "config.json"
  try:
    return CLIPConfig.from_hf_dict(read_json(path), source=str(path))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def hf_tensor_name(path: tuple) -> tuple[str, tuple[int, ...] | None]:
  """(HF tensor name, axis permutation HF -> ours) for a parameter path of :class:`CLIPModule`."""
  p = [str(x) for x in path]
  if p == ["logit_scale"]:
    return "logit_scale", None
  if p[0] in ("text_model", "vision_model") and len(p) >= 2:
    tower, name = p[0], p[1]
    if name in _EMBEDDINGS:
      hf = f"{tower}.embeddings.{name}"
      if name == "patch_embedding":
        return hf + ".weight", _CONV
      return (hf, None) if name == "class_embedding" else (hf + ".weight", None)
    if name == "layers":
      p = [tower, "encoder", *p[1:]]
  suffix, perm = _LEAVES[p[-1]]
  return ".".join([*p[:-1], suffix]), perm


def _is_buffer(name: str) -> bool:
  return name.endswith(".position_ids")  # non-persistent buffers some old checkpoints hold


def _plan(source: TensorSource, flat) -> Plan:
  """Validates names, shapes and dtypes against the abstract model before reading any data."""
  plan = {path: hf_tensor_name(path) for path, _ in flat}
  return check_plan(
    source, plan, flat, what="CLIP", hint="is this a full CLIPModel checkpoint?", ignore=_is_buffer
  )


def load_clip(
  path_or_hub_id: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = None,
  shardings: ShardingSpec = None,
  subfolder: str | None = None,
  revision: str | None = None,
  progress: bool = True,
) -> CLIPModule:
  """Builds a :class:`CLIPModule` from a Hugging Face ``CLIPModel`` checkpoint.

  Args:
    path_or_hub_id: a checkpoint directory or a Hub id (see :func:`resolve_clip_dir`).
    dtype: compute dtype (``jnp.float32`` exact; ``jnp.bfloat16`` keeps norms/softmax in fp32).
    param_dtype: storage dtype of the parameters; defaults to ``dtype``.
    shardings: where to put each parameter: ``None`` (default device), one ``Sharding``, a
      ``(mesh, rules)`` tuple mapping the logical axis names through ``imagen_jax.sharding``,
      or a callable ``(logical_names, shape) -> Sharding``.
    subfolder: checkpoint subfolder.
    revision: Hub revision.
    progress: show a tqdm bar over the tensors.

  Raises:
    CheckpointError: missing/corrupt files, unsupported config values, missing, unexpected or
      wrongly shaped tensors (each named).
  """
  directory = resolve_clip_dir(path_or_hub_id, subfolder=subfolder, revision=revision)
  config = read_clip_config(directory)
  param_dtype = dtype if param_dtype is None else param_dtype
  check_float_dtypes(dtype=dtype, param_dtype=param_dtype)
  source = TensorSource(directory, hf_class="CLIPModel")
  # Abstract model: shapes, dtypes and logical names only, no weights allocated.
  graphdef, flat, names = abstract_params(
    lambda rngs: CLIPModule(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  )
  plan = _plan(source, flat)
  return fill_params(
    graphdef, flat, names, plan, source, param_dtype=param_dtype, shardings=shardings,
    progress=progress, desc="loading CLIP",
  )  # fmt: skip


def save_clip(model: CLIPModule, path: str | os.PathLike) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` in Hugging Face ``CLIPModel`` format.

  The inverse of :func:`load_clip`; ``transformers.CLIPModel.from_pretrained(path)`` loads it.
  Tensors are written as float32.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, perm = hf_tensor_name(key)
    arr = np.asarray(var.get_value(), np.float32)
    arr = arr if perm is None else arr.transpose(np.argsort(perm))
    tensors[name] = arr.copy(order="C")  # not ascontiguousarray: it makes logit_scale 1-d
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with open(path / "config.json", "w") as f:
    json.dump(model.config.to_hf_dict(), f, indent=2)
  return path
