"""How a cascade call is cut into compiled batches and placed on the mesh (shared by sampling
and inversion, so that both see the same batches, keys and noise)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from imagen_jax import sharding

MeshSpec = Mesh | Mapping[str, int] | None  # a mesh, or its axis sizes (``{"data": -1}``)


def chunk_rng(key: jax.Array, stage_index: int, lo: int) -> np.ndarray:
  """The sampling key data of the chunk starting at image ``lo`` of the ``stage_index``-th stage
  run (noise augmentation and per-step noise; inversion reuses it for the same augmentation)."""
  return np.asarray(
    jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 1_000_003 + stage_index), lo))
  )


def as_mesh(mesh: MeshSpec) -> Mesh:
  """A mesh from a ``Mesh`` or axis sizes (``{"data": 2, "fsdp": 4}``); default data over all."""
  return mesh if isinstance(mesh, Mesh) else sharding.make_mesh(dict(mesh or {"data": -1}))


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-process, sharded) array's full value as numpy, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def batch_size(m: int, max_batch: int, shards: int = 1) -> int:
  """The compiled batch for ``m`` images: the next power of two (at most ``max_batch``), rounded
  up to a multiple of ``shards`` (the data-parallel devices) so it always splits evenly."""
  b = 1
  while b < m:
    b *= 2
  b = min(b, max_batch)
  return -(-b // shards) * shards
