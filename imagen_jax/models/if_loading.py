"""Loads (and saves) diffusers ``UNet2DConditionModel`` checkpoints of DeepFloyd IF (``IFUNet``).

A checkpoint is a diffusers directory: ``<path>/unet/config.json`` (or ``<path>/config.json``)
with ``diffusion_pytorch_model.safetensors``, its variants (``diffusion_pytorch_model.fp16
.safetensors``), sharded safetensors (``diffusion_pytorch_model.safetensors.index[.fp16].json``)
or ``diffusion_pytorch_model[.fp16].bin`` (needs torch). The model is built abstractly with
``nnx.eval_shape`` and every parameter is read from the file straight into its sharding (the
logical axis names of :mod:`imagen_jax.sharding`), so a 4.3B IF-I-XL never exists as a random
full-size copy. The check is strict: a missing, unexpected or wrongly shaped tensor fails with
its name. PyTorch layouts are converted (conv OIHW -> HWIO, linear [out, in] -> [in, out]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub as hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from imagen_jax.models.hf_loading import (
  CheckpointError,
  Plan,
  TensorSource,
  abstract_params,
  check_float_dtypes,
  check_plan,
  fill_params,
  hub_offline,
  read_json,
)
from imagen_jax.models.if_unet import IFUNet, IFUNetConfig
from imagen_jax.sharding import DEFAULT_RULES, Rules

__all__ = [
  "CheckpointError", "LoadedIFUNet", "hf_tensor_name", "load_if_unet", "read_if_unet_config",
  "save_if_unet",
]  # fmt: skip

WEIGHTS = "diffusion_pytorch_model"
_LINEAR = (1, 0)  # torch Linear [out, in] -> our kernel [in, out]
_CONV = (2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> our kernel [kh, kw, in, out]
_DIFFUSERS_VERSION = "0.42.1"  # written into config.json by save_if_unet (diffusers ignores it)


class LoadedIFUNet(NamedTuple):
  """What :func:`load_if_unet` returns; unpacks as ``config, graphdef, params``.

  ``params`` is a pure dict (``nnx.to_pure_dict``) of arrays, already placed on their shardings;
  use ``nnx.merge(graphdef, params)`` inside ``jax.jit``, or :meth:`module` outside.
  """

  config: IFUNetConfig
  graphdef: Any
  params: dict

  def module(self) -> IFUNet:
    """The merged :class:`IFUNet` (shares the arrays of ``params``)."""
    return nnx.merge(self.graphdef, self.params)


def _variant(name: str, variant: str | None) -> str:
  """diffusers' ``_add_variant``: the variant goes before the last suffix."""
  if not variant:
    return name
  head, _, tail = name.rpartition(".")
  return f"{head}.{variant}.{tail}"


def weight_file_names(variant: str | None = None) -> list[str]:
  """Weight files looked for, in order of preference (indexes first)."""
  return [
    _variant(f"{WEIGHTS}.safetensors.index.json", variant),
    _variant(f"{WEIGHTS}.safetensors", variant),
    _variant(f"{WEIGHTS}.bin.index.json", variant),
    _variant(f"{WEIGHTS}.bin", variant),
  ]


class DiffusersTensorSource(TensorSource):
  """:class:`TensorSource` over diffusers' weight file names (``diffusion_pytorch_model...``)."""

  def __init__(self, directory: Path, variant: str | None = None):
    self.directory = Path(directory)
    self.hf_class = "UNet2DConditionModel"
    self.files: dict[str, Path] = {}
    self._handles: dict[Path, Any] = {}
    self._bins: dict[Path, dict] = {}
    names = weight_file_names(variant)
    self.origin = next((self.directory / n for n in names if (self.directory / n).is_file()), None)
    if self.origin is None:
      raise CheckpointError(
        f"{self.directory}: no weights found (expected one of {', '.join(names)})"
        + ("" if variant else "; pass variant='fp16' for an fp16-only checkpoint")
      )
    if self.origin.name.endswith(".index.json"):
      self._from_index(self.origin, lambda _: True)
    elif self.origin.suffix == ".safetensors":
      self.files = dict.fromkeys(self._open(self.origin).keys(), self.origin)
    else:
      self.files = dict.fromkeys(self._load_bin(self.origin), self.origin)


def hf_tensor_name(path: tuple) -> tuple[str, tuple[int, ...] | None]:
  """(diffusers tensor name, axis permutation file -> ours) for a parameter path of IFUNet."""
  parts = [str(p) for p in path]
  leaf, module = parts[-1], parts[:-1]
  if module and module[-1] == "to_out":  # diffusers: to_out = [Linear, Dropout]
    module = [*module, "0"]
  if leaf == "positional_embedding":
    return ".".join(parts), None
  if leaf == "kernel":
    return ".".join([*module, "weight"]), None  # permutation by rank: see _perm
  if leaf == "scale":
    return ".".join([*module, "weight"]), None
  if leaf == "bias":
    return ".".join([*module, "bias"]), None
  raise CheckpointError(f"IFUNet parameter {'.'.join(parts)} has no diffusers name")


def _perm(path: tuple, ndim: int) -> tuple[int, ...] | None:
  if str(path[-1]) != "kernel":
    return None
  return {2: _LINEAR, 4: _CONV}[ndim]


def read_if_unet_config(directory: str | os.PathLike, **overrides: Any) -> IFUNetConfig:
  """Reads and validates ``config.json`` of a diffusers U-Net directory.

  Raises:
    CheckpointError: a missing/invalid file or an unsupported value (the message names the key).
  """
  path = Path(directory) / "config.json"
  raw = read_json(path)
  if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise CheckpointError(
      f"{path}: _class_name={raw['_class_name']!r}; only UNet2DConditionModel is supported"
    )
  try:
    return IFUNetConfig.from_diffusers(raw, **overrides)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def resolve_if_unet_dir(
  path_or_hub_id: str | os.PathLike,
  *,
  subfolder: str | None = "unet",
  variant: str | None = None,
  revision: str | None = None,
) -> Path:
  """The local directory holding ``config.json`` + weights (``<path>/<subfolder>`` or ``path``).

  A Hub id (``DeepFloyd/IF-I-XL-v1.0``) that is not a local directory is fetched with
  huggingface_hub: the subfolder's ``config.json`` and the weight files of ``variant``
  (offline, ``HF_HUB_OFFLINE=1``: only the local Hub cache).
  """
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    for cand in ([path / subfolder] if subfolder else []) + [path]:
      if (cand / "config.json").is_file():
        return cand
    where = f"{path / subfolder}/config.json or " if subfolder else ""
    raise CheckpointError(f"{path}: no {where}{path}/config.json (not a diffusers U-Net)")
  if path.exists():
    raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + weights)")
  return _download(str(path_or_hub_id), subfolder, variant, revision)


def _download(repo_id: str, subfolder: str | None, variant: str | None, revision) -> Path:
  if repo_id.count("/") != 1:
    raise CheckpointError(
      f"{repo_id}: no such checkpoint directory (Hub ids look like DeepFloyd/IF-I-XL-v1.0)"
    )
  prefix = f"{subfolder.strip('/')}/" if subfolder else ""
  # Shards of the chosen variant only (the fp16 and fp32 weights of IF-I-XL are 8.6 + 17 GB).
  stem = _variant(f"{WEIGHTS}.x", variant)[: -len(".x")]
  patterns = [f"{prefix}config.json", f"{prefix}{stem}.*", f"{prefix}{stem}-*"]
  patterns += [f"{prefix}{n}" for n in weight_file_names(variant)]
  try:
    root = hub.snapshot_download(
      repo_id, revision=revision, allow_patterns=patterns, local_files_only=hub_offline()
    )
  except Exception as e:  # network / auth / cache errors: all mean "could not get the files"
    where = "HF_HUB_OFFLINE is set and it is not cached" if hub_offline() else "download failed"
    raise CheckpointError(
      f"cannot load IF U-Net {repo_id!r}: not a local directory and {where} "
      f"({type(e).__name__}: {e}). Download it where you are online and pass the directory."
    ) from e
  return Path(root) / subfolder if subfolder else Path(root)


def _plan(source: TensorSource, flat) -> Plan:
  """Validates names, shapes and dtypes against the abstract model before reading any data."""
  plan = {}
  for path, var in flat:
    name, _ = hf_tensor_name(path)
    plan[path] = (name, _perm(path, var.get_value().ndim))
  return check_plan(source, plan, flat, what="U-Net", hint="does the checkpoint match config.json?")


def load_if_unet(
  path: str | os.PathLike,
  *,
  subfolder: str | None = "unet",
  variant: str | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = None,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
  remat: bool = False,
  revision: str | None = None,
  progress: bool = False,
) -> LoadedIFUNet:
  """Builds an :class:`IFUNet` from a diffusers checkpoint, weights filled into their shardings.

  Args:
    path: a diffusers pipeline or U-Net directory, or a Hub id (needs network or the HF cache).
    subfolder: the U-Net's subfolder in a pipeline directory; ``path`` itself is used when it
      holds ``config.json`` directly.
    variant: weight-file variant (``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``).
    dtype: compute dtype (``jnp.float32`` exact; ``jnp.bfloat16`` keeps norms/softmax in fp32).
    param_dtype: storage dtype of the parameters; defaults to ``dtype``.
    mesh: place each parameter on this mesh by its logical axis names (``None``: default device).
    rules: logical-name rules for ``mesh`` (default :data:`imagen_jax.sharding.DEFAULT_RULES`).
    remat: ``jax.checkpoint`` each resnet/attention block (training).
    revision: Hub revision.
    progress: show a tqdm bar over the tensors.

  Returns:
    ``LoadedIFUNet(config, graphdef, params)``.

  Raises:
    CheckpointError: missing/corrupt files, unsupported config values, missing, unexpected or
      wrongly shaped tensors (each named).
  """
  directory = resolve_if_unet_dir(path, subfolder=subfolder, variant=variant, revision=revision)
  param_dtype = dtype if param_dtype is None else param_dtype
  check_float_dtypes(dtype=dtype, param_dtype=param_dtype)
  config = read_if_unet_config(directory, dtype=dtype, param_dtype=param_dtype, remat=remat)
  source = DiffusersTensorSource(directory, variant)
  graphdef, flat, names = abstract_params(lambda rngs: IFUNet(config, rngs=rngs))
  plan = _plan(source, flat)
  shardings = None if mesh is None else (mesh, tuple(rules or DEFAULT_RULES))
  model = fill_params(
    graphdef, flat, names, plan, source, param_dtype=param_dtype, shardings=shardings,
    progress=progress, desc="loading IF U-Net",
  )  # fmt: skip
  graphdef, state = nnx.split(model)
  return LoadedIFUNet(config, graphdef, nnx.to_pure_dict(state))


def save_if_unet(
  directory: str | os.PathLike, config: IFUNetConfig, params: Any, *, dtype: Any = np.float32
) -> Path:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` in diffusers format.

  The inverse of :func:`load_if_unet`: ``UNet2DConditionModel.from_pretrained(directory)`` loads
  it. ``params`` is a pure dict (``LoadedIFUNet.params``), an ``nnx.State`` or an :class:`IFUNet`.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  tensors = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    name, _ = hf_tensor_name(keys)
    arr = np.asarray(jax.device_get(value), dtype)
    perm = _perm(keys, arr.ndim)
    tensors[name] = (arr if perm is None else arr.transpose(np.argsort(perm))).copy(order="C")
  save_file(tensors, str(directory / f"{WEIGHTS}.safetensors"), metadata={"format": "pt"})
  cfg = {**config.to_diffusers(), "_diffusers_version": _DIFFUSERS_VERSION}
  (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
  return directory
