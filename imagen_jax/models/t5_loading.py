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
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub as hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from huggingface_hub import constants as hf_constants
from jax.sharding import Mesh, NamedSharding, Sharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.sharding import fitted_spec

ShardingSpec = (
  Sharding | tuple[Mesh, Any] | Callable[[tuple[str | None, ...], tuple[int, ...]], Sharding] | None
)

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_EMBED_KEYS = ("encoder.embed_tokens.weight", "shared.weight")  # tied: either one is the input
_TOKENIZER_FILES = (
  "tokenizer_config.json", "tokenizer.json", "spiece.model", "special_tokens_map.json",
)  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)*$")  # org/name[/subfolder...]


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file (and tensor)."""


# ---------------------------------------------------------------------------------------------
# Locating the checkpoint: a local directory or a Hugging Face Hub id.


def _hub_offline() -> bool:
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  return env or bool(hf_constants.HF_HUB_OFFLINE)


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
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    local = path / subfolder if subfolder else path
    if not local.is_dir():
      raise CheckpointError(f"{local}: no such checkpoint directory")
    return local
  if path.exists():
    raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + weights)")
  name = str(path_or_hub_id)
  if not _HUB_ID.match(name) or "/" not in name:
    raise CheckpointError(
      f"{name}: no such checkpoint directory (Hub ids look like org/name, e.g. google/t5-v1_1-xxl)"
    )
  parts = name.split("/")
  repo_id, extra = "/".join(parts[:2]), "/".join(parts[2:])
  subfolder = "/".join(x for x in (extra, subfolder) if x) or None
  return _download_from_hub(repo_id, subfolder=subfolder, revision=revision, tok=tokenizer_only)


def _download_from_hub(
  repo_id: str, *, subfolder: str | None, revision: str | None, tok: bool
) -> Path:
  offline = _hub_offline()

  def fetch(name: str) -> Path:
    return Path(
      hub.hf_hub_download(
        repo_id, name, subfolder=subfolder, revision=revision, local_files_only=offline
      )
    )

  def fetch_optional(name: str, listing: set[str] | None) -> Path | None:
    if listing is not None and name not in listing:
      return None
    try:
      return fetch(name)
    except hub.errors.EntryNotFoundError:  # also LocalEntryNotFoundError (offline, not cached)
      return None

  try:
    listing = None
    if not offline:
      prefix = f"{subfolder.strip('/')}/" if subfolder else ""
      listing = {
        f[len(prefix) :]
        for f in hub.list_repo_files(repo_id, revision=revision)
        if f.startswith(prefix)
      }
    tokenizer = [p for p in (fetch_optional(n, listing) for n in _TOKENIZER_FILES) if p]
    if tok:
      if not tokenizer:
        raise CheckpointError(f"{repo_id}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
      return tokenizer[0].parent
    config = fetch("config.json")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      index = fetch_optional(index_name, listing)
      if index is not None:
        for shard in sorted(set(_encoder_weight_map(index).values())):
          fetch(shard)
        return config.parent
    for single in ("model.safetensors", "pytorch_model.bin"):
      if fetch_optional(single, listing) is not None:
        return config.parent
    raise CheckpointError(f"{repo_id}: the Hub repo has no model.safetensors or pytorch_model.bin")
  except CheckpointError:
    raise
  except Exception as e:  # httpx/OS/hub errors: all mean "could not get the files"
    where = (
      "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
      if offline
      else "the Hugging Face Hub could not be reached (offline?) or refused the request"
    )
    raise CheckpointError(
      f"cannot load T5 checkpoint {repo_id!r}: it is not a local directory and {where} "
      f"({type(e).__name__}: {e}). Download it where you are online "
      f"(`huggingface-cli download {repo_id}`) and pass the local directory instead."
    ) from e


def _encoder_weight_map(index_file: Path) -> dict[str, str]:
  """{tensor name: shard file} for the tensors the encoder needs, from an index JSON."""
  weight_map = _read_json(index_file).get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index_file}: no 'weight_map' in the index")
  return {k: v for k, v in weight_map.items() if k.startswith("encoder.") or k in _EMBED_KEYS}


def _read_json(path: Path) -> dict:
  if not path.is_file():
    raise CheckpointError(f"{path}: file not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_t5_config(checkpoint_dir: Path) -> T5Config:
  """Reads and validates ``config.json`` of a checkpoint directory."""
  path = Path(checkpoint_dir) / "config.json"
  try:
    return T5Config.from_hf_dict(_read_json(path), source=str(path))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Reading tensors lazily from safetensors (memory-mapped) or torch .bin files.


class TensorSource:
  """Read-only view of the tensors of a checkpoint directory: names, shapes, dtypes, data."""

  def __init__(self, directory: Path):
    self.directory = Path(directory)
    self.files: dict[str, Path] = {}  # tensor name -> file
    self._handles: dict[Path, Any] = {}
    self._bins: dict[Path, dict] = {}  # memory-mapped torch state dicts
    d = self.directory
    names = [
      "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
      "pytorch_model.bin",
    ]  # fmt: skip
    # The file the tensor list comes from, named in "missing tensor" errors.
    self.origin = next((d / n for n in names if (d / n).is_file()), d)
    if self.origin.name.endswith(".index.json"):
      self._from_index(self.origin)
    elif self.origin.name == "model.safetensors":
      self.files = dict.fromkeys(self._open(self.origin).keys(), self.origin)
    elif self.origin.name == "pytorch_model.bin":
      self.files = dict.fromkeys(self._load_bin(self.origin), self.origin)
    else:
      raise CheckpointError(
        f"{d}: no weights found (expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin)"
      )

  def _from_index(self, index: Path) -> None:
    # Only encoder tensors matter; their shards must exist (a Hub download may skip the rest).
    self.files = {k: self.directory / v for k, v in _encoder_weight_map(index).items()}
    for shard in sorted(set(self.files.values())):
      if not shard.is_file():
        raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")

  def _open(self, path: Path):
    if path not in self._handles:
      try:
        self._handles[path] = safe_open(str(path), framework="numpy")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return self._handles[path]

  def _load_bin(self, path: Path) -> dict:
    if path in self._bins:
      return self._bins[path]
    try:
      import torch
    except ImportError:
      raise CheckpointError(
        f"{path}: reading PyTorch .bin checkpoints needs torch, which is not installed. Convert "
        "the checkpoint to safetensors once (e.g. `T5EncoderModel.from_pretrained(dir)"
        ".save_pretrained(out)` where torch is available) and load that directory."
      ) from None
    try:
      try:  # mmap keeps multi-GB shards out of RAM; legacy (non-zip) files do not support it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: a corrupt or non-weights file
      raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict):
      raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    self._bins[path] = state
    return state

  def _is_bin(self, key: str) -> bool:
    return self.files[key].suffix == ".bin"

  def shape(self, key: str) -> tuple[int, ...]:
    path = self.files[key]
    if self._is_bin(key):
      return tuple(self._load_bin(path)[key].shape)
    return tuple(self._open(path).get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """safetensors dtype code (``F32``, ``BF16``, ...)."""
    path = self.files[key]
    if self._is_bin(key):
      name = str(self._load_bin(path)[key].dtype).removeprefix("torch.")
      codes = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
      return codes.get(name, name)
    return self._open(path).get_slice(key).get_dtype()

  def get(self, key: str) -> np.ndarray:
    path = self.files[key]
    if not self._is_bin(key):
      try:
        return self._open(path).get_tensor(key)
      except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from None
    import torch

    t = self._load_bin(path)[key].contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


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


def _sharding_fn(shardings: ShardingSpec):
  if shardings is None:
    return None
  if isinstance(shardings, Sharding):
    return lambda names, shape: shardings
  if isinstance(shardings, tuple) and len(shardings) == 2 and isinstance(shardings[0], Mesh):
    mesh, rules = shardings
    # Dimensions that do not divide by their mesh axes stay replicated (e.g. a 32128 vocab).
    return lambda names, shape: NamedSharding(mesh, fitted_spec(names, shape, mesh, rules))
  if callable(shardings):
    return shardings
  raise TypeError(
    "shardings must be None, a jax Sharding, a (mesh, logical rules) tuple or a callable "
    f"(logical_names, shape) -> Sharding; got {type(shardings).__name__}"
  )


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
  for name, d in (("dtype", dtype), ("param_dtype", param_dtype)):
    if not jnp.issubdtype(d, jnp.floating):
      raise CheckpointError(f"{name} must be a floating dtype, got {np.dtype(d)}")
  if jnp.dtype(dtype) == jnp.float16:
    raise CheckpointError("float16 compute overflows in T5; use dtype=jnp.bfloat16 or float32")
  source = TensorSource(directory)
  embed_key = next((k for k in _EMBED_KEYS if k in source.files), _EMBED_KEYS[0])

  # Abstract model: shapes, dtypes and logical names only, no weights allocated.
  abstract = nnx.eval_shape(
    lambda: T5EncoderModule(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  )
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  names = {p: tuple(v.get_value()) for p, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
  plan = _check_tensors(source, flat, embed_key)

  place = _sharding_fn(shardings)
  np_dtype = np.dtype(param_dtype)
  for path, var in tqdm(flat, desc="loading T5", disable=not progress, leave=False):
    key, transpose = plan[path]
    arr = source.get(key)
    arr = (arr.T if transpose else arr).astype(np_dtype, copy=False)
    if place is None:
      var.set_value(jnp.asarray(arr))
    else:
      sharding = place(names[path], arr.shape)
      var.set_value(jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_tensors(source: TensorSource, flat, embed_key: str) -> dict:
  """Validates names, shapes and dtypes against the abstract model before reading any data."""
  where = lambda key: source.files.get(key, source.origin)
  plan = {}
  for path, var in flat:
    key, transpose = hf_tensor_name(path, embed_key)
    if key not in source.files:
      also = f" (nor {_EMBED_KEYS[1]})" if key == _EMBED_KEYS[0] else ""
      raise CheckpointError(f"{source.origin}: encoder tensor {key}{also} is missing")
    expected = tuple(var.get_value().shape)
    expected = expected[::-1] if transpose else expected
    actual = source.shape(key)
    if actual != expected:
      raise CheckpointError(
        f"{where(key)}: tensor {key} has shape {list(actual)} but config.json implies "
        f"{list(expected)}"
      )
    if source.dtype(key) not in _FLOAT_DTYPES:
      raise CheckpointError(
        f"{where(key)}: tensor {key} has dtype {source.dtype(key)}; only float16/bfloat16/"
        "float32/float64 weights are supported (quantized checkpoints are not)"
      )
    plan[path] = (key, transpose)
  used = {key for key, _ in plan.values()}
  unexpected = sorted(k for k in source.files if k.startswith("encoder.") and k not in used)
  unexpected = [k for k in unexpected if k != "encoder.embed_tokens.weight"]
  if unexpected:
    raise CheckpointError(
      f"{where(unexpected[0])}: unexpected encoder tensor(s) {unexpected[:5]}"
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
