"""Runs of identical modules stored stacked and applied as one ``jax.lax.scan``.

MaxText's ``scan_layers``, for the U-Net (``UNetConfig.scan_blocks``): ``N`` modules built one
after another, so they draw exactly the weights an unrolled run would, are kept as one template
module whose every weight has a leading axis of size N. XLA then compiles one body per run instead
of N, and the optimizer, the EMA and the norms see one leaf per weight of the run instead of N:
their per-leaf updates are most of a train step's compile time on CPU (``bench/RESULTS.md``,
"Compile time"). The stack axis gets the logical name ``None`` (never sharded), so FSDP and tensor
sharding of each weight are unchanged.

  stack = Stack([ResBlock(c, c, e, ...) for _ in range(8)])
  h, _ = stack.scan(lambda block, h, _: block(h, emb), h)       # one compiled block
  block3 = stack.member(3)                                   # unrolled access, e.g. controllers
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Where flax versions keep a Variable's logical axis names (nnx.with_partitioning).
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def _stack_axis(var: nnx.Variable, add: bool) -> None:
  """Adds (``add``) or removes the leading unsharded stack axis in a weight's logical names."""
  meta = var.get_metadata()
  for key in _NAME_KEYS:
    names = meta.get(key)
    if isinstance(names, tuple):
      if add or (names and names[0] is None):
        var.set_metadata(**{key: (None, *names) if add else names[1:]})
      return


class Stack(nnx.Module):
  """``N`` identically built modules with their weights stacked on a leading axis.

  Args:
    modules: the run, in execution order (N >= 2), built exactly as an unrolled model builds them
      (same arguments; static attributes may differ only in what ``labels`` records).
    labels: optional per-member labels (e.g. attention site names) for unrolled access.
  """

  def __init__(self, modules: Sequence[nnx.Module], labels: Sequence[Any] = ()):
    if len(modules) < 2:
      raise ValueError(f"Stack needs at least 2 modules, got {len(modules)}")
    states = [nnx.state(m) for m in modules]
    shapes = [jax.tree.map(jnp.shape, s) for s in states]
    if any(s != shapes[0] for s in shapes[1:]):
      raise ValueError("Stack: the modules' weights differ in structure or shape")
    template = modules[0]
    nnx.update(template, jax.tree.map(lambda *w: jnp.stack(w), *states))  # [N, ...] each
    for _, node in nnx.iter_graph(template):
      if isinstance(node, nnx.Variable):
        _stack_axis(node, add=True)
    self.module = template
    self.size = len(modules)
    self.labels = tuple(labels)

  def scan(
    self,
    step: Callable[[nnx.Module, jax.Array, Any], jax.Array],
    h: jax.Array,
    xs: Any = None,
    *,
    collect: bool = False,
    remat: bool = False,
    policy: Any = None,
    unroll: bool = False,
  ) -> tuple[jax.Array, jax.Array | None]:
    """``h = step(member_i, h, x_i)`` for i = 0..N-1, as one ``lax.scan``.

    Args:
      step: ``(module, h, x) -> h``, the member's own computation (no remat inside).
      h: the carry, e.g. ``[B, H, W, C]``.
      xs: optional per-member inputs with a leading axis ``[N, ...]``.
      collect: also return every member's output, stacked ``[N, ...]``.
      remat: checkpoint each member (``jax.checkpoint`` of the body) with ``policy``.
      unroll: emit N copies of the body instead of a loop (``kernels`` kind ``block_runs``).

    Returns:
      ``(h, outputs)``; ``outputs`` is None unless ``collect``.
    """
    graphdef, state = nnx.split(self.module)

    def body(carry, inputs):
      weights, x = inputs
      out = step(nnx.merge(graphdef, weights), carry, x)
      return out, (out if collect else None)

    if remat:
      body = jax.checkpoint(body, policy=policy)
    return jax.lax.scan(body, h, (state, xs), unroll=bool(unroll))

  def member(self, i: int) -> nnx.Module:
    """Member ``i`` as its own module: slice ``i`` of every weight, logical names as built."""
    graphdef, state = nnx.split(self.module)
    member = nnx.merge(graphdef, jax.tree.map(lambda w: w[i], state))
    for _, node in nnx.iter_graph(member):
      if isinstance(node, nnx.Variable):
        _stack_axis(node, add=False)
    return member
