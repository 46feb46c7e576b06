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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

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
