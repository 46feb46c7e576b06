"""What every stage model shares: a static graph plus abstract state, params as a pure dict."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx


class PureModel:
  """Mixin for a frozen dataclass with ``graphdef`` and ``abstract_state`` (an ``nnx.State`` of
  shapes): params are a plain nested dict that optax, Orbax and the train step treat as any
  pytree, and the module is rebuilt from them where it runs."""

  graphdef: Any
  abstract_state: Any

  def abstract_params(self) -> dict:
    """The params as a pure dict of ``jax.ShapeDtypeStruct``."""
    return nnx.to_pure_dict(self.abstract_state)

  def merge(self, params: dict) -> nnx.Module:
    """The module with ``params`` (a pure dict) filled in."""
    state = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params()))
