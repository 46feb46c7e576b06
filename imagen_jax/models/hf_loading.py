"""Model-agnostic pieces of loading Hugging Face checkpoints into NNX modules (T5, CLIP).

* :func:`resolve_checkpoint_dir`: a local directory, or a Hub id downloaded file by file (only
  the weight shards holding tensors the model needs; offline, only the local Hub cache).
* :class:`TensorSource`: lazy, memory-mapped reads of ``model.safetensors`` (single or sharded
  with ``model.safetensors.index.json``) or ``pytorch_model.bin`` (through torch, if installed).
* :func:`abstract_params` / :func:`fill_params`: build a module with ``nnx.eval_shape`` (no
  random full-size copy) and fill every parameter from the file, optionally straight into a
  sharding, so a multi-billion-parameter encoder never has to fit on one device.

Model-specific code (config parsing, the parameter-name mapping, the strict tensor checks) lives
in ``t5_loading`` and ``clip_loading``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
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
from tqdm.auto import tqdm

from imagen_jax.sharding import fitted_spec

ShardingSpec = (
  Sharding | tuple[Mesh, Any] | Callable[[tuple[str | None, ...], tuple[int, ...]], Sharding] | None
)
KeepFn = Callable[[str], bool]
# (Hugging Face tensor name, axis permutation from the file's layout to ours or None).
Plan = dict[tuple, tuple[str, tuple[int, ...] | None]]

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)*$")  # org/name[/subfolder...]


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file (and tensor)."""


def _keep_all(name: str) -> bool:
  return True


# ---------------------------------------------------------------------------------------------
# Locating the checkpoint: a local directory or a Hugging Face Hub id.


def hub_offline() -> bool:
  """Whether ``HF_HUB_OFFLINE`` is set (the environment or huggingface_hub's constant)."""
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  return env or bool(hf_constants.HF_HUB_OFFLINE)


def resolve_checkpoint_dir(
  path_or_hub_id: str | os.PathLike,
  *,
  subfolder: str | None = None,
  revision: str | None = None,
  tokenizer_only: bool = False,
  tokenizer_files: Sequence[str] = (),
  keep: KeepFn = _keep_all,
  kind: str = "model",
  example: str = "org/name",
) -> Path:
  """Returns a local directory holding the checkpoint, downloading it from the Hub if needed.

  A Hub id downloads ``config.json``, those of ``tokenizer_files`` that the repo has, and the
  weight files holding tensors for which ``keep(name)`` is true (with an index, other shards are
  skipped); with ``tokenizer_only`` just the tokenizer files. Path components after ``org/name``
  select a subfolder. Offline (``HF_HUB_OFFLINE=1``) only the local Hub cache is used.

  Args:
    path_or_hub_id: a local directory or a Hub id.
    subfolder: checkpoint subfolder inside the directory or repo.
    revision: Hub revision.
    tokenizer_only: fetch only the tokenizer files.
    tokenizer_files: optional side files to fetch (tokenizer, preprocessor config).
    keep: which tensors of a sharded checkpoint the model needs.
    kind: the model family, named in error messages ("T5", "CLIP").
    example: an example Hub id for the error message about malformed ids.

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
      f"{name}: no such checkpoint directory (Hub ids look like org/name, e.g. {example})"
    )
  parts = name.split("/")
  repo_id, extra = "/".join(parts[:2]), "/".join(parts[2:])
  subfolder = "/".join(x for x in (extra, subfolder) if x) or None
  try:
    return _download_from_hub(
      repo_id, subfolder, revision, tokenizer_only, tuple(tokenizer_files), keep
    )
  except CheckpointError:
    raise
  except Exception as e:  # httpx/OS/hub errors: all mean "could not get the files"
    where = (
      "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
      if hub_offline()
      else "the Hugging Face Hub could not be reached (offline?) or refused the request"
    )
    raise CheckpointError(
      f"cannot load {kind} checkpoint {repo_id!r}: it is not a local directory and {where} "
      f"({type(e).__name__}: {e}). Download it where you are online "
      f"(`huggingface-cli download {repo_id}`) and pass the local directory instead."
    ) from e


def _download_from_hub(
  repo_id: str,
  subfolder: str | None,
  revision: str | None,
  tok: bool,
  tokenizer_files: tuple[str, ...],
  keep: KeepFn,
) -> Path:
  offline = hub_offline()

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

  listing = None
  if not offline:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    listing = {
      f[len(prefix) :]
      for f in hub.list_repo_files(repo_id, revision=revision)
      if f.startswith(prefix)
    }
  tokenizer = [p for p in (fetch_optional(n, listing) for n in tokenizer_files) if p]
  if tok:
    if not tokenizer:
      raise CheckpointError(f"{repo_id}: no tokenizer files ({', '.join(tokenizer_files)})")
    return tokenizer[0].parent
  config = fetch("config.json")
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = fetch_optional(index_name, listing)
    if index is not None:
      for shard in sorted(set(weight_map(index, keep).values())):
        fetch(shard)
      return config.parent
  for single in ("model.safetensors", "pytorch_model.bin"):
    if fetch_optional(single, listing) is not None:
      return config.parent
  raise CheckpointError(f"{repo_id}: the Hub repo has no model.safetensors or pytorch_model.bin")


def weight_map(index_file: Path, keep: KeepFn = _keep_all) -> dict[str, str]:
  """{tensor name: shard file} of an index JSON, for the tensors ``keep`` selects."""
  table = read_json(index_file).get("weight_map")
  if not isinstance(table, dict):
    raise CheckpointError(f"{index_file}: no 'weight_map' in the index")
  return {k: v for k, v in table.items() if keep(k)}


def read_json(path: Path) -> dict:
  """Parses a JSON file; a missing or malformed file is a :class:`CheckpointError`."""
  if not path.is_file():
    raise CheckpointError(f"{path}: file not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Reading tensors lazily from safetensors (memory-mapped) or torch .bin files.


class TensorSource:
  """Read-only view of the tensors of a checkpoint directory: names, shapes, dtypes, data.

  Args:
    directory: the checkpoint directory.
    keep: with an index file, which tensors to list (their shards must exist; a Hub download
      may have skipped the others).
    hf_class: the transformers class named in the "convert to safetensors" hint.
  """

  def __init__(self, directory: Path, keep: KeepFn = _keep_all, hf_class: str = "AutoModel"):
    self.directory = Path(directory)
    self.hf_class = hf_class
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
      self._from_index(self.origin, keep)
    elif self.origin.name == "model.safetensors":
      self.files = dict.fromkeys(self._open(self.origin).keys(), self.origin)
    elif self.origin.name == "pytorch_model.bin":
      self.files = dict.fromkeys(self._load_bin(self.origin), self.origin)
    else:
      raise CheckpointError(
        f"{d}: no weights found (expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin)"
      )

  def _from_index(self, index: Path, keep: KeepFn) -> None:
    self.files = {k: self.directory / v for k, v in weight_map(index, keep).items()}
    for shard in sorted(set(self.files.values())):
      if not shard.is_file():
        raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")

  def where(self, key: str) -> Path:
    """The file holding ``key`` (or the tensor list's origin for a missing one)."""
    return self.files.get(key, self.origin)

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
        f"the checkpoint to safetensors once (e.g. `{self.hf_class}.from_pretrained(dir)"
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


def check_tensor(source: TensorSource, key: str, expected: tuple[int, ...]) -> None:
  """Raises if tensor ``key`` (known to exist) has another shape or is not floating point."""
  actual = source.shape(key)
  if actual != tuple(expected):
    raise CheckpointError(
      f"{source.where(key)}: tensor {key} has shape {list(actual)} but config.json implies "
      f"{list(expected)}"
    )
  if source.dtype(key) not in FLOAT_DTYPES:
    raise CheckpointError(
      f"{source.where(key)}: tensor {key} has dtype {source.dtype(key)}; only float16/bfloat16/"
      "float32/float64 weights are supported (quantized checkpoints are not)"
    )


def check_plan(
  source: TensorSource,
  plan: Plan,
  flat: Any,
  *,
  what: str,
  hint: str,
  ignore: KeepFn = lambda name: False,
) -> Plan:
  """Checks a planned load before any data is read: every planned tensor exists (else the
  missing ones are named, with ``hint``), nothing in the file is left over (except
  ``ignore``d buffers) and every shape and dtype is right. ``what`` names the model
  ("CLIP", "U-Net")."""
  missing = sorted(key for key, _ in plan.values() if key not in source.files)
  if missing:
    raise CheckpointError(
      f"{source.origin}: {len(missing)} {what} tensor(s) missing: {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''} ({hint})"
    )
  used = {key for key, _ in plan.values()}
  unexpected = sorted(k for k in source.files if k not in used and not ignore(k))
  if unexpected:
    raise CheckpointError(
      f"{source.where(unexpected[0])}: unexpected tensor(s) {unexpected[:8]}"
      f"{' ...' if len(unexpected) > 8 else ''}: the checkpoint does not match config.json"
    )
  for path, var in flat:
    key, perm = plan[path]
    shape = tuple(var.get_value().shape)
    check_tensor(source, key, shape if perm is None else tuple(shape[i] for i in np.argsort(perm)))
  return plan


# ---------------------------------------------------------------------------------------------
# Building the module abstractly and filling it.


def sharding_fn(shardings: ShardingSpec):
  """``None`` or a ``(logical_names, shape) -> Sharding`` function for a :data:`ShardingSpec`."""
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


class _ShapeOnlyRngs:
  """Stands in for ``nnx.Rngs`` while a module is built only for its shapes.

  A real ``Rngs`` updates its traced counter on every ``rngs.params()`` call, and each update
  makes flax look up ``.sharding`` on a tracer, which walks the whole jaxpr built so far: with
  ~2000 parameters (ViT-bigG) ``nnx.eval_shape`` took 53 s instead of 3 s. The values are never
  used, so one fixed key serves every parameter.
  """

  def params(self) -> jax.Array:
    return jax.random.key(0)


def abstract_params(build: Callable[[Any], nnx.Module]):
  """``(graphdef, flat state, {path: logical names})`` of ``build(rngs)`` without allocating it.

  Args:
    build: ``rngs -> module``; it receives a shape-only stand-in for ``nnx.Rngs``.
  """
  abstract = nnx.eval_shape(lambda: build(_ShapeOnlyRngs()))
  graphdef, state = nnx.split(abstract)
  names = {p: tuple(v.get_value()) for p, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
  return graphdef, nnx.to_flat_state(state), names


def fill_params(
  graphdef,
  flat,
  names: dict,
  plan: Plan,
  source: TensorSource,
  *,
  param_dtype: Any,
  shardings: ShardingSpec = None,
  progress: bool = True,
  desc: str = "loading",
) -> nnx.Module:
  """Reads every planned tensor into the abstract ``flat`` state and merges the module.

  Args:
    graphdef: from :func:`abstract_params`.
    flat: the abstract flat state (filled in place).
    names: logical axis names per path, for ``shardings``.
    plan: path -> (tensor name, axis permutation or ``None``), already validated.
    source: where the tensors are read from.
    param_dtype: storage dtype of the parameters.
    shardings: see :data:`ShardingSpec`; ``None`` puts them on the default device.
    progress: show a tqdm bar over the tensors.
    desc: the bar's label.
  """
  place = sharding_fn(shardings)
  np_dtype = np.dtype(param_dtype)
  for path, var in tqdm(flat, desc=desc, disable=not progress, leave=False):
    key, perm = plan[path]
    arr = source.get(key)
    arr = (arr if perm is None else arr.transpose(perm)).astype(np_dtype, copy=False)
    if place is None:
      var.set_value(jnp.asarray(arr))
    else:
      sharding = place(names[path], arr.shape)
      var.set_value(jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_float_dtypes(**dtypes: Any) -> None:
  """Raises unless every named dtype (``dtype=..., param_dtype=...``) is floating point."""
  for name, d in dtypes.items():
    if not jnp.issubdtype(d, jnp.floating):
      raise CheckpointError(f"{name} must be a floating dtype, got {np.dtype(d)}")
