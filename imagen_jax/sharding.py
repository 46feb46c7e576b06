"""Logical axis names and the one place where Flax/JAX sharding APIs are called.

Every weight in the project carries *logical* axis names (``embed``, ``mlp``, ``heads``,
``conv_in``, ``conv_out``...). A mesh and a list of rules map those names to mesh axes (``data``,
``fsdp``, ``tensor``). Modules never touch meshes: they call :func:`logical_init` for parameters and
:func:`constrain` for activations at block boundaries. Without an active rule set (the default, e.g.
on one CPU) both are free: no metadata is applied to values and ``constrain`` returns its input.

Logical axis vocabulary (shape letters in comments follow ``# [B, H, W, C]``):

  Weights
    ``embed``      model width of a transformer (T5 d_model).
    ``mlp``        feed-forward hidden width (T5 d_ff).
    ``heads``      attention heads (or the fused heads*head_dim projection axis).
    ``kv``         per-head feature size.
    ``vocab``      token-embedding rows.
    ``conv_in``    input channels of a conv / dense in the U-Nets.
    ``conv_out``   output channels of a conv / dense in the U-Nets.
    ``norm``       scale/bias vectors of normalisation layers (usually replicated).
    ``keep``       spatial kernel axes (never sharded).

  Activations
    ``act_batch``, ``act_length``, ``act_embed``, ``act_height``, ``act_width``, ``act_channels``.

Mesh axes (``config.mesh``): ``data`` (pure data parallelism: params replicated), ``fsdp`` (the
batch *and* the weights are split: ZeRO-3 style), ``tensor`` (weights split along heads / MLP /
conv output channels). :data:`DEFAULT_RULES` is the mapping used by every config; a
dimension whose size does not divide by its mesh axes stays replicated along them, so a tiny model
runs on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both (FSDP is data-parallel too)

# Logical name → mesh axes; first match wins (see :func:`logical_to_mesh_spec`).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # weights: FSDP over the input side, tensor parallelism over heads / MLP / output channels
  ("embed", "fsdp"),
  ("conv_in", "fsdp"),
  ("conv_out", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  ("kv", None),
  ("norm", None),
  ("keep", None),
  # activations: batch-sharded at block boundaries; features left to the compiler
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_embed", None),
  ("act_height", None),
  ("act_width", None),
  ("act_channels", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
  "imagen_jax_logical_rules", default=None
)


def logical_init(init: Callable[..., jax.Array], names: LogicalAxes) -> Callable[..., jax.Array]:
  """Wraps a parameter initializer so the created ``nnx.Param`` carries logical axis names.

  The names are stored as metadata only (``eager_sharding=False``): building a model never
  needs a mesh, and ``nnx.get_partition_spec`` later returns the logical spec that
  :func:`logical_to_sharding` turns into real shardings.

  Args:
    init: a ``jax.nn.initializers``-style ``init(key, shape, dtype)``.
    names: one logical name (or ``None``) per dimension of the parameter.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_to_mesh_spec(names: LogicalAxes, rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec`` over mesh axes (first matching rule wins).

  A mesh axis is used at most once per spec; later dimensions that map to an already used mesh
  axis stay replicated, as in Flax's ``logical_to_mesh_axes``.
  """
  table: dict[str, Any] = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    if not axes or any(a in used for a in axes):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def logical_to_sharding(names: LogicalAxes, mesh: Mesh, rules: Rules) -> NamedSharding:
  """``NamedSharding`` on ``mesh`` for an array with the given logical axis names."""
  return NamedSharding(mesh, logical_to_mesh_spec(names, rules))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates ``mesh`` + ``rules`` for :func:`constrain` calls traced inside the block."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op without :func:`use_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} logical names {names} for an array of rank {x.ndim}")
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, mesh, rules))


def make_mesh(
  axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """The one mesh helper: named axes ``data`` × ``fsdp`` × ``tensor`` over ``devices``.

  Axes use ``AxisType.Auto`` (GSPMD propagation plus :func:`constrain` hints), which
  ``with_sharding_constraint`` needs; ``jax.make_mesh`` defaults to Explicit axes since jax 0.10.

  Args:
    axes: axis name → size (``config.mesh``); one size may be -1, meaning "all remaining
      devices". Missing axes have size 1. Default: ``{"data": -1}``.
    devices: the devices to lay out (default: all devices of all processes).

  Raises:
    ValueError: unknown axis names, or sizes whose product is not the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"data": -1})
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)}")
  sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
  free = [n for n, v in sizes.items() if v == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"config.mesh={sizes}: sizes must be >= 1, with at most one -1 (the rest)")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(
        f"config.mesh={sizes}: {len(devices)} devices do not divide by the fixed axes ({fixed})"
      )
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(
      f"config.mesh={sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are "
      "available; set one axis to -1 (e.g. --config.mesh.data=-1) to use the rest"
    )
  shape = tuple(sizes[n] for n in MESH_AXES)
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    # Topology-aware device order (ICI rings on TPU, NVLink on GPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def parse_mesh(text: str, *, flag: str = "--mesh") -> dict[str, int]:
  """``"data=2,fsdp=4"`` → ``{"data": 2, "fsdp": 4}`` (the command-line form of ``config.mesh``).

  Raises:
    ValueError: a part is not ``name=size`` or names an unknown axis (the message names ``flag``).
  """
  out = {}
  for part in filter(None, (p.strip() for p in str(text).split(","))):
    name, _, size = part.partition("=")
    name = name.strip()
    if not size.strip().lstrip("-").isdigit():
      raise ValueError(f"{flag} expects name=size pairs like data=2,fsdp=4; got {part!r}")
    if name not in MESH_AXES:
      raise ValueError(f"{flag}: unknown axis {name!r}; the axes are {list(MESH_AXES)}")
    out[name] = int(size)
  return out


def fitted_spec(
  names: LogicalAxes, shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
  """:func:`logical_to_mesh_spec`, keeping only mesh axes that divide the dimension evenly."""
  spec = logical_to_mesh_spec(names, rules)
  out = []
  for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept: list[str] = []
    for a in axes:
      if dim % (mesh.shape[a] * math.prod(mesh.shape[k] for k in kept)) == 0:
        kept.append(a)
      elif mesh.shape[a] > 1:
        _log_replicated(names, tuple(shape), i, a, mesh.shape[a])
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


_REPLICATED_LOGGED: set[tuple] = set()


def _log_replicated(names: LogicalAxes, shape: tuple, dim: int, axis: str, size: int) -> None:
  """Says once per (logical names, shape, axis) why a dimension is not split as the rules ask."""
  key = (tuple(names), shape, dim, axis, size)
  if key in _REPLICATED_LOGGED:
    return
  _REPLICATED_LOGGED.add(key)
  log.info(
    "sharding: dimension %d (%s, size %d) of a %s array %s does not divide by mesh axis %r "
    "(size %d); it stays replicated along %r, so each device holds more of it than planned",
    dim,
    names[dim] if dim < len(names) else None,
    shape[dim],
    "x".join(map(str, shape)) or "scalar",
    tuple(names),
    axis,
    size,
    axis,
  )


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
  """Shardings (a pure dict, like ``nnx.to_pure_dict``) for an NNX model's parameters.

  Uses the logical axis names each parameter was created with (:func:`logical_init`).
  """
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, fitted_spec(tuple(spec), x.shape, mesh, rules)),
    specs,
    shapes,
    is_leaf=lambda v: isinstance(v, PartitionSpec),
  )


def optimizer_shardings(
  tx: optax.GradientTransformation, abstract_params: Any, params_sharding: Any, mesh: Mesh
) -> Any:
  """Shardings for ``tx.init(params)``: moments follow their parameter, the rest is replicated.

  Leaves whose shape differs from their parameter's (e.g. Adafactor's factored row/column
  statistics) are small and replicated.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
    tx,
    lambda leaf, p, s: s if tuple(leaf.shape) == tuple(p.shape) else replicated,
    abstract_opt,
    abstract_params,
    params_sharding,
    transform_non_params=lambda _: replicated,
  )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """The global batch split over ``data`` × ``fsdp`` along its leading axis."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of a batch (numpy) → global arrays split over ``data`` × ``fsdp``.

  Every process passes its own rows (``global batch / process_count``); the result is one
  global ``jax.Array`` per key, as if the whole batch had been loaded on one host.
  """
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in batch.items()
  }


def bytes_per_device(shardings: Any, shapes: Any) -> tuple[int, int]:
  """``(bytes one device holds, bytes of the whole tree)`` for arrays placed by ``shardings``."""
  total = per_device = 0
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
    itemsize = np.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape)) * itemsize
    per_device += int(np.prod(s.shard_shape(x.shape))) * itemsize
  return per_device, total
