"""Attention controllers: read or replace the text cross-attention probabilities of each layer.

This is the hook that prompt-to-prompt editing (Hertz et al. 2022, who ran on Imagen) and attention
maps are built on, threaded explicitly through the U-Net instead of monkey-patching modules:

  out, aux = unet(x, logsnr, text, mask, controller=RecordingController())
  aux["down.3.attn"]  # [B, heads, h, w, L] text probabilities of that layer

Design:

* A controller is a plain Python object used **at trace time**. Each attention layer that sees
  text asks ``controller.wants(site)``; if so it computes its probabilities explicitly and calls
  ``controller.edit(site, image_probs, text_probs, hw=(h, w))``. ``text_probs``
  ``[B, heads, h*w, L]`` are the float32 softmax weights of every query pixel on the L text
  tokens ("cross" attention). In layers where text is concatenated to the self-attention keys
  (§2.5) they are the text columns of the joint softmax (they sum to <= 1 per query) and
  ``image_probs`` ``[B, heads, h*w, h*w]`` are its image columns ("self" attention; ``None`` in
  text-only layers); each row of the two together sums to 1. ``edit`` returns both
  replacements, same shapes; the default ``edit`` hands ``text_probs`` to
  ``controller(site, text_probs, hw=hw)`` and leaves the image columns alone.
* Returning the very array it received (``return probs``) means "read only": the layer then keeps
  the fused attention output (``layers._xla_attention`` or cuDNN), so reading never changes the
  numerics. Any
  other array replaces the probabilities (explicit einsum path).
* Results leave the trace functionally: when a controller is passed, ``UNet.__call__`` returns
  ``(out, controller.outputs())``. Build controllers inside the jitted function (they may close over
  traced values, e.g. the sampler step for P2P's replace-until-τ), or pass them as static arguments.
* Zero cost when off: with ``controller=None`` no probabilities are computed; ``wants`` lets a
  controller opt in per layer (e.g. only the 16×16 layers).
* Controllers disable ``remat`` (values recorded inside a checkpointed block could not leave it);
  they are an inference tool.

Site names are ``"down.{i}.attn"``, ``"mid.attn"`` and ``"up.{i}.attn"``, where ``i`` is the
block index in execution order (ADM base U-Net) or the level (Efficient U-Net, 0 = highest
resolution); ``UNet.attention_sites()`` lists them. Bit-identity of read-only controllers holds for
the model as configured; with ``remat`` on, compare against the same model with ``remat="none"``,
since a controller turns remat off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp


class AttentionController:
  """Base controller: reads nothing and changes nothing (subclass and override)."""

  def wants(self, site: str) -> bool:
    """Whether the layer ``site`` should compute its probabilities and call this controller."""
    del site
    return True

  def __call__(self, site: str, probs: jax.Array, *, hw: tuple[int, int]) -> jax.Array:
    """Returns the text attention probabilities to use, ``[B, heads, h*w, L]``.

    Args:
      site: layer name, e.g. ``"down.3.attn"``.
      probs: float32 softmax weights of every query pixel on every text token.
      hw: the layer's spatial shape, so that ``h*w`` queries can be reshaped into maps.
    """
    del site, hw
    return probs

  def edit(
    self,
    site: str,
    image_probs: jax.Array | None,
    text_probs: jax.Array,
    *,
    hw: tuple[int, int],
  ) -> tuple[jax.Array | None, jax.Array]:
    """Returns ``(image_probs, text_probs)`` to use; returning the inputs themselves reads only.

    Args:
      site: layer name.
      image_probs: the image columns ``[B, heads, h*w, h*w]`` of a joint self-attention softmax,
        or ``None`` in a text-only cross-attention layer.
      text_probs: the text columns ``[B, heads, h*w, L]``.
      hw: the layer's spatial shape.
    """
    return image_probs, self(site, text_probs, hw=hw)

  def outputs(self) -> dict[str, jax.Array]:
    """Arrays to hand back from the traced forward (returned as the U-Net's ``aux``)."""
    return {}


class IdentityController(AttentionController):
  """Explicitly no-op controller: every layer computes its probabilities and hands them back
  untouched, which must leave the output bit-identical to ``controller=None``."""


class RecordingController(AttentionController):
  """Records text attention maps ``[B, heads, h, w, L]`` (or head-averaged ``[B, h, w, L]``).

  Args:
    sites: record only these layers (default: all text attention layers).
    average_heads: average over heads to save memory.
  """

  def __init__(self, sites: Iterable[str] | None = None, *, average_heads: bool = False):
    self.sites = None if sites is None else frozenset(sites)
    self.average_heads = average_heads
    self.maps: dict[str, jax.Array] = {}

  def wants(self, site: str) -> bool:
    return self.sites is None or site in self.sites

  def __call__(self, site: str, probs: jax.Array, *, hw: tuple[int, int]) -> jax.Array:
    b, n, _, length = probs.shape
    maps = probs.reshape(b, n, hw[0], hw[1], length)
    self.maps[site] = maps.mean(axis=1) if self.average_heads else maps
    return probs  # read only: the layer keeps its fused output

  def outputs(self) -> dict[str, jax.Array]:
    return dict(self.maps)


class EditController(AttentionController):
  """Replaces probabilities with ``fn(site, probs)`` (for tests and simple edits).

  For example P2P's reweighting of token ``j``: ``fn = lambda s, p: p.at[..., j].multiply(2.0)``.
  """

  def __init__(self, fn: Callable[[str, jax.Array], jax.Array], sites: Iterable[str] | None = None):
    self.fn = fn
    self.sites = None if sites is None else frozenset(sites)

  def wants(self, site: str) -> bool:
    return self.sites is None or site in self.sites

  def __call__(self, site: str, probs: jax.Array, *, hw: tuple[int, int]) -> jax.Array:
    del hw
    return jnp.asarray(self.fn(site, probs), probs.dtype)
