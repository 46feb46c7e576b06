"""DeepFloyd IF's U-Net in Flax NNX, numerically equivalent to diffusers' ``UNet2DConditionModel``.

Only the subset IF uses is ported: ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttnDownBlock2D``
down blocks, ``UNetMidBlock2DSimpleCrossAttn``, ``SimpleCrossAttnUpBlock2D`` /
``ResnetUpsampleBlock2D`` up blocks, ``ResnetBlock2D`` (``scale_shift`` or ``default`` time
conditioning, resampling inside the resnet), the added-K/V ``Attention`` (``AttnAddedKVProcessor``:
the projected text keys/values are concatenated *before* the image tokens' own keys/values, or
replace them with ``only_cross_attention``), ``encoder_hid_dim_type="text_proj"``,
``addition_embed_type="text"`` (``TextTimeEmbedding``: LayerNorm -> ``AttentionPooling`` ->
Linear -> LayerNorm) and ``class_embed_type="timestep"`` (stage II's noise-augmentation level).

Layout is NHWC. Attribute names mirror diffusers' state-dict names (``down_blocks.0.resnets.1``,
``time_emb_proj``, ``add_k_proj`` ...), so ``imagen_jax.models.if_loading`` maps a checkpoint by
renaming leaves only. Weights carry the logical axis names of :mod:`imagen_jax.sharding`.

Masks follow diffusers exactly: ``encoder_attention_mask`` becomes an additive ``-10000`` bias on
the text keys only (the image tokens' own keys are never masked), and the attention pooling of the
addition embedding ignores it (diffusers and the original IF pool over every token, padding
included). Group/layer norm statistics and softmax run in float32 whatever ``config.dtype``.
Attention and GroupNorm kernels are chosen per backend like the Imagen U-Nets'
(``config.attention_impl`` / ``norm_impl``, :mod:`imagen_jax.kernels`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.models.hf_loading import abstract_params
from imagen_jax.models.if_unet_config import ACTIVATIONS, PRESETS, IFUNetConfig
from imagen_jax.models.layers import (
  ACT_BHWC,
  GroupNorm,
  _attend,
  _attention_probs,
  attention,
  conv,
  dense,
  downsample,
  layer_norm,
  upsample,
)
from imagen_jax.sharding import constrain, logical_init

__all__ = ["ACTIVATIONS", "PRESETS", "IFUNet", "IFUNetConfig", "count_params"]

MASK_BIAS = -10000.0  # diffusers' additive bias for masked text keys (not -inf)
_CROSS_NORM_GROUPS = 32  # diffusers' Attention(cross_attention_norm_num_groups=32)
_ATTN_NORM_EPS = 1e-5  # Attention(eps=1e-5): its group norm ignores config.norm_eps


# ------------------------------------------------------------------------------------------------
# Building blocks.


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
  """diffusers' ``get_timestep_embedding`` in float32 (fractional t allowed). [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _group_norm(
  channels: int, groups: int, eps: float, rngs: nnx.Rngs, param_dtype, impl: str
) -> GroupNorm:
  """The project's float32 GroupNorm with diffusers' epsilon (``layers.group_norm`` fixes 1e-5)."""
  return GroupNorm(
    channels, num_groups=groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
    scale_init=logical_init(nnx.initializers.ones_init(), ("norm",)),
    bias_init=logical_init(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs, impl=impl,
  )  # fmt: skip


class TimestepEmbedding(nnx.Module):
  """``linear_1 -> act -> linear_2 [-> post_act]`` (diffusers' ``TimestepEmbedding``)."""

  def __init__(self, cfg: IFUNetConfig, in_dim: int, out_dim: int, post_act: str | None, kw: dict):
    self.linear_1 = dense(in_dim, out_dim, **kw)
    self.linear_2 = dense(out_dim, out_dim, **kw)
    self.act = ACTIVATIONS[cfg.act_fn]
    self.post_act = ACTIVATIONS[post_act] if post_act else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_2(self.act(self.linear_1(x)))  # [B, E]
    return self.post_act(x) if self.post_act else x


class AttentionPooling(nnx.Module):
  """IF's attention pooling: a class token (token mean + learned vector) attends to itself and all
  tokens, padding included (diffusers passes no mask here). [B, L, D] -> [B, D]."""

  def __init__(self, num_heads: int, dim: int, kw: dict):
    self.num_heads = num_heads
    init = logical_init(nnx.initializers.normal(dim**-0.5), (None, "norm"))
    self.positional_embedding = nnx.Param(init(kw["rngs"].params(), (1, dim), kw["param_dtype"]))
    self.k_proj = dense(dim, dim, ("conv_in", "heads"), **kw)
    self.q_proj = dense(dim, dim, ("conv_in", "heads"), **kw)
    self.v_proj = dense(dim, dim, ("conv_in", "heads"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, d = x.shape
    n = self.num_heads
    cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
    seq = jnp.concatenate([cls, x], axis=1)  # [B, 1+L, D]
    q = self.q_proj(cls).reshape(b, 1, n, d // n)
    k = self.k_proj(seq).reshape(b, length + 1, n, d // n)
    v = self.v_proj(seq).reshape(b, length + 1, n, d // n)
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (d // n) ** -0.5, axis=-1)  # [B, N, 1, 1+L]
    out = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    return out.reshape(b, d)


class TextTimeEmbedding(nnx.Module):
  """``addition_embed_type="text"``: LayerNorm -> AttentionPooling -> Linear -> LayerNorm."""

  def __init__(self, text_dim: int, emb_dim: int, num_heads: int, kw: dict):
    pd = kw["param_dtype"]
    self.norm1 = layer_norm(text_dim, rngs=kw["rngs"], param_dtype=pd)
    self.pool = AttentionPooling(num_heads, text_dim, kw)
    self.proj = dense(text_dim, emb_dim, ("embed", "conv_out"), **kw)
    self.norm2 = layer_norm(emb_dim, rngs=kw["rngs"], param_dtype=pd)
    self.dtype = kw["dtype"]

  def __call__(self, text: jax.Array) -> jax.Array:
    h = self.pool(self.norm1(text).astype(self.dtype))  # [B, T]
    return self.norm2(self.proj(h)).astype(self.dtype)  # [B, E]


class ResnetBlock2D(nnx.Module):
  """diffusers' ``ResnetBlock2D``: GN -> act -> [resample] -> conv -> time conditioning -> GN ->
  act -> conv, plus a (resampled, 1x1-projected) skip, the sum divided by ``output_scale_factor``.
  """

  def __init__(
    self, cfg: IFUNetConfig, cin: int, cout: int, kw: dict, *, scale: float, resample: str = ""
  ):
    g, eps, pd, rngs = cfg.norm_num_groups, cfg.norm_eps, kw["param_dtype"], kw["rngs"]
    self.act = ACTIVATIONS[cfg.act_fn]
    self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    self.skip_time_act, self.scale, self.resample = cfg.resnet_skip_time_act, scale, resample
    self.dtype = kw["dtype"]
    self.norm1 = _group_norm(cin, g, eps, rngs, pd, cfg.norm_impl)
    self.conv1 = conv(cin, cout, **kw)
    self.time_emb_proj = dense(cfg.time_embed_dim, cout * (2 if self.scale_shift else 1), **kw)
    self.norm2 = _group_norm(cout, g, eps, rngs, pd, cfg.norm_impl)
    self.conv2 = conv(cout, cout, **kw)
    self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

  def _resample(self, x: jax.Array) -> jax.Array:
    return {"up": upsample, "down": downsample}.get(self.resample, lambda y: y)(x)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = self._resample(self.act(self.norm1(x)).astype(self.dtype))  # [B, H', W', Cin]
    x = self._resample(x)
    h = self.conv1(h)  # [B, H', W', Cout]
    t = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(t.astype(jnp.float32), 2, axis=-1)
      h = self.norm2(h) * (1.0 + scale) + shift
    else:
      h = self.norm2(h + t)
    h = self.conv2(self.act(h).astype(self.dtype))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    out = (skip.astype(self.dtype) + h) / jnp.asarray(self.scale, self.dtype)
    return constrain(out, ACT_BHWC)


class AddedKVAttention(nnx.Module):
  """diffusers' ``Attention`` + ``AttnAddedKVProcessor``: image tokens attend to the projected
  text keys/values followed by their own (text only with ``cross_only``); residual added."""

  def __init__(self, cfg: IFUNetConfig, channels: int, head_dim: int, cross_only: bool, kw: dict):
    pd, rngs, ctx = kw["param_dtype"], kw["rngs"], cfg.cross_attention_dim
    self.heads, self.head_dim, self.cross_only, self.dtype = (
      channels // head_dim,
      head_dim,
      cross_only,
      kw["dtype"],
    )
    ni, self.impl = cfg.norm_impl, cfg.attention_impl
    self.group_norm = _group_norm(channels, cfg.norm_num_groups, _ATTN_NORM_EPS, rngs, pd, ni)
    if cfg.cross_attention_norm == "group_norm":
      self.norm_cross = _group_norm(ctx, _CROSS_NORM_GROUPS, 1e-5, rngs, pd, ni)
    elif cfg.cross_attention_norm == "layer_norm":
      self.norm_cross = layer_norm(ctx, rngs=rngs, param_dtype=pd)
    else:
      self.norm_cross = None
    self.to_q = dense(channels, channels, ("conv_in", "heads"), **kw)
    self.to_k = None if cross_only else dense(channels, channels, ("conv_in", "heads"), **kw)
    self.to_v = None if cross_only else dense(channels, channels, ("conv_in", "heads"), **kw)
    self.add_k_proj = dense(ctx, channels, ("conv_in", "heads"), **kw)
    self.add_v_proj = dense(ctx, channels, ("conv_in", "heads"), **kw)
    self.to_out = dense(channels, channels, ("heads", "conv_out"), **kw)

  site: str = ""  # the controller's name for this layer (set by IFUNet)

  def __call__(
    self, x: jax.Array, ctx: jax.Array, bias: jax.Array | None, controller: Any = None
  ) -> jax.Array:
    """x: [B, H, W, C]; ctx: [B, L, Dc]; bias: [B, L] additive text-key bias or None.

    ``controller`` (prompt-to-prompt, attention maps; see
    :mod:`imagen_jax.models.attention_control`) reads or replaces the probabilities: the text
    columns ``[B, N, HW, L]`` ("cross") and the image columns ``[B, N, HW, HW]`` ("self"; None
    with ``cross_only``); each row of the two together sums to 1.
    """
    b, hgt, wid, c = x.shape
    n, d = self.heads, self.head_dim
    if self.norm_cross is not None:
      ctx = self.norm_cross(ctx).astype(self.dtype)  # [B, L, Dc]
    h = self.group_norm(x.reshape(b, hgt * wid, c)).astype(self.dtype)  # [B, HW, C]
    q = self.to_q(h).reshape(b, hgt * wid, n, d)
    k = self.add_k_proj(ctx).reshape(b, -1, n, d)  # [B, L, N, D]
    v = self.add_v_proj(ctx).reshape(b, -1, n, d)
    if not self.cross_only:  # text first, then the image tokens (diffusers' order)
      k = jnp.concatenate([k, self.to_k(h).reshape(b, hgt * wid, n, d)], axis=1)
      v = jnp.concatenate([v, self.to_v(h).reshape(b, hgt * wid, n, d)], axis=1)
    if bias is not None:  # text keys only; the image keys are never masked
      bias = jnp.pad(bias, ((0, 0), (0, k.shape[1] - bias.shape[-1])))[:, None, None, :]
    out = attention(q, k, v, bias=bias, impl=self.impl)  # [B, HW, N, D]
    if controller is not None and controller.wants(self.site):
      out = self._controlled(q, k, v, bias, out, ctx.shape[1], (hgt, wid), controller)
    out = out.reshape(b, hgt, wid, c)
    return constrain(x.astype(self.dtype) + self.to_out(out), ACT_BHWC)

  def _controlled(self, q, k, v, bias, fused, n_text, hw, controller) -> jax.Array:
    """Explicit probabilities ``[B, N, HW, S]`` handed to ``controller.edit``; a controller that
    only reads keeps the fused output (bit-identical to no controller)."""
    probs = _attention_probs(q, k, None, bias)  # float32
    text_probs = probs[..., :n_text]  # [B, N, HW, L]
    image_probs = None if self.cross_only else probs[..., n_text:]  # [B, N, HW, HW]
    new_image, new_text = controller.edit(self.site, image_probs, text_probs, hw=hw)
    if new_image is image_probs and new_text is text_probs:
      return fused
    parts = [new_text] + ([] if self.cross_only else [new_image])
    return _attend(jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1), v)


def _run(module: nnx.Module, *args: Any) -> jax.Array:
  return module(*args)


class _Block(nnx.Module):
  """Resnets with optional attention after each, and an optional resampling resnet."""

  def __init__(self, cfg: IFUNetConfig, ins: list[int], cout: int, attn: bool, cross: bool,
               head_dim: int, resample: str, kw: dict, scale: float | None = None):  # fmt: skip
    scale = cfg.resnet_out_scale_factor if scale is None else scale
    self.remat = cfg.remat
    self.resnets = nnx.List([ResnetBlock2D(cfg, c, cout, kw, scale=scale) for c in ins])
    self.attentions = nnx.List(
      [AddedKVAttention(cfg, cout, head_dim, cross, kw) for _ in ins] if attn else []
    )
    sampler = [ResnetBlock2D(cfg, cout, cout, kw, scale=scale, resample=resample)]
    name = "downsamplers" if resample == "down" else "upsamplers"
    setattr(self, name, nnx.List(sampler) if resample else None)

  def _apply(self, module: nnx.Module, *args: Any) -> jax.Array:
    return nnx.remat(_run)(module, *args) if self.remat else module(*args)

  def layer(self, i: int, h, temb, ctx, bias, controller=None) -> jax.Array:
    h = self._apply(self.resnets[i], h, temb)
    if not len(self.attentions):
      return h
    if controller is not None:  # a controller is a trace-time Python object: no remat
      return self.attentions[i](h, ctx, bias, controller)
    return self._apply(self.attentions[i], h, ctx, bias)


class DownBlock(_Block):
  def __call__(self, h, temb, ctx, bias, skips: list, controller=None) -> jax.Array:
    for i in range(len(self.resnets)):
      h = self.layer(i, h, temb, ctx, bias, controller)
      skips.append(h)
    if getattr(self, "downsamplers", None) is not None:
      h = self._apply(self.downsamplers[0], h, temb)
      skips.append(h)
    return h


class UpBlock(_Block):
  def __call__(self, h, temb, ctx, bias, skips: list, controller=None) -> jax.Array:
    for i in range(len(self.resnets)):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)  # [B, H, W, C + Cskip]
      h = self.layer(i, h, temb, ctx, bias, controller)
    if getattr(self, "upsamplers", None) is not None:
      h = self._apply(self.upsamplers[0], h, temb)
    return h


class MidBlock(_Block):
  """Two resnets with one attention between them (built as two resnets + two attentions
  would be, minus the last attention)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.attentions = nnx.List(list(self.attentions)[:1])

  def __call__(self, h, temb, ctx, bias, controller=None) -> jax.Array:
    h = self._apply(self.resnets[0], h, temb)
    for i in range(len(self.attentions)):
      if controller is not None:
        h = self.attentions[i](h, ctx, bias, controller)
      else:
        h = self._apply(self.attentions[i], h, ctx, bias)
      h = self._apply(self.resnets[i + 1], h, temb)
    return h


class IFUNet(nnx.Module):
  """DeepFloyd IF's U-Net (stage I or II), the math of diffusers' ``UNet2DConditionModel``.

  Args:
    config: the architecture (:class:`IFUNetConfig`), with compute/storage dtypes.
    rngs: parameter initialisation (random weights; load real ones with ``if_loading``).
  """

  def __init__(self, config: IFUNetConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    ch, emb = cfg.block_out_channels, cfg.time_embed_dim
    self.conv_in = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(cfg, ch[0], emb, cfg.timestep_post_act, kw)
    self.class_embedding = (
      TimestepEmbedding(cfg, ch[0], emb, None, kw) if cfg.class_embed_type else None
    )
    self.encoder_hid_proj = (
      dense(cfg.encoder_hid_dim, cfg.cross_attention_dim, ("embed", "conv_out"), **kw)
      if cfg.encoder_hid_dim_type == "text_proj"
      else None
    )
    self.add_embedding = (
      TextTimeEmbedding(cfg.text_dim, emb, cfg.addition_embed_type_num_heads, kw)
      if cfg.addition_embed_type == "text"
      else None
    )
    n, layers, heads = cfg.num_blocks, cfg.layers, cfg.head_dims
    down, cin = [], ch[0]
    for i, kind in enumerate(cfg.down_block_types):
      ins = [cin] + [ch[i]] * (layers[i] - 1)
      attn = kind == "SimpleCrossAttnDownBlock2D"
      resample = "down" if i < n - 1 else ""
      down.append(DownBlock(cfg, ins, ch[i], attn, cfg.cross_only[i], heads[i], resample, kw))
      cin = ch[i]
    self.down_blocks = nnx.List(down)
    # Mid: resnet, attention, resnet; its resnets use mid_block_scale_factor.
    self.mid_block = MidBlock(
      cfg, [ch[-1]] * 2, ch[-1], True, cfg.mid_cross_only, heads[-1], "", kw,
      scale=cfg.mid_block_scale_factor,
    )  # fmt: skip
    rev, rev_layers, rev_cross = ch[::-1], layers[::-1], cfg.cross_only[::-1]
    up, prev = [], rev[0]
    for i, kind in enumerate(cfg.up_block_types):
      skip_in = rev[min(i + 1, n - 1)]
      m = rev_layers[i] + 1
      ins = [(prev if j == 0 else rev[i]) + (skip_in if j == m - 1 else rev[i]) for j in range(m)]
      attn = kind == "SimpleCrossAttnUpBlock2D"
      # diffusers indexes attention_head_dim of up block i without reversing it (kept as is).
      resample = "up" if i < n - 1 else ""
      up.append(UpBlock(cfg, ins, rev[i], attn, rev_cross[i], heads[i], resample, kw))
      prev = rev[i]
    self.up_blocks = nnx.List(up)
    # Controller site names: "down.{block}.{layer}.attn", "mid.{layer}.attn", "up.{block}...".
    for kind, blocks in (("down", self.down_blocks), ("up", self.up_blocks)):
      for b, block in enumerate(blocks):
        for j, attn in enumerate(block.attentions):
          attn.site = f"{kind}.{b}.{j}.attn"
    for j, attn in enumerate(self.mid_block.attentions):
      attn.site = f"mid.{j}.attn"
    self.conv_norm_out = _group_norm(
      ch[0], cfg.norm_num_groups, cfg.norm_eps, rngs, cfg.param_dtype, cfg.norm_impl
    )
    self.conv_out = conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

  def __call__(
    self,
    x: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    encoder_attention_mask: jax.Array | None = None,
    class_labels: jax.Array | None = None,
    controller: Any = None,
  ) -> jax.Array | tuple[jax.Array, Any]:
    """Predicts the model output (IF: ε and the variance interpolation, ``out_channels`` = 6).

    Args:
      x: ``[B, H, W, in_channels]`` noisy image (stage II: already concatenated with the
        upscaled low-res image); H and W divisible by ``2 ** (num_blocks - 1)``.
      timesteps: ``[B]`` (or scalar) diffusion time, continuous values allowed.
      encoder_hidden_states: ``[B, L, encoder_hid_dim]`` text embeddings (T5-XXL).
      encoder_attention_mask: ``[B, L]`` bool, True = attend; None = every token.
      class_labels: ``[B]`` stage II noise-augmentation level (required iff
        ``class_embed_type`` is set).
      controller: an attention controller (prompt-to-prompt, attention maps; see
        :mod:`imagen_jax.models.attention_control`) at every attention layer
        (:meth:`attention_sites`).

    Returns:
      ``[B, H, W, out_channels]`` in ``config.dtype``, or ``(out, controller.outputs())``.
    """
    cfg = self.config
    if (class_labels is None) != (self.class_embedding is None):
      raise ValueError(
        f"IFUNet: class_labels {'is required' if class_labels is None else 'was given'} but "
        f"config.class_embed_type={cfg.class_embed_type!r}"
      )
    b = x.shape[0]
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    ch0 = cfg.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    proj = lambda v: timestep_embedding(v, ch0, cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = self.time_embedding(proj(t).astype(cfg.dtype))  # [B, E]
    if self.class_embedding is not None:
      labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.float32).reshape(-1), (b,))
      emb = emb + self.class_embedding(proj(labels).astype(cfg.dtype))
    text = jnp.asarray(encoder_hidden_states)
    if self.add_embedding is not None:  # pooled from the raw (unprojected) text, as diffusers
      emb = emb + self.add_embedding(text)
    if cfg.time_embedding_act_fn:
      emb = ACTIVATIONS[cfg.time_embedding_act_fn](emb)
    ctx = self.encoder_hid_proj(text) if self.encoder_hid_proj is not None else text
    ctx = ctx.astype(cfg.dtype)  # [B, L, Dc]
    bias = None
    if encoder_attention_mask is not None:
      bias = jnp.where(jnp.asarray(encoder_attention_mask, bool), 0.0, MASK_BIAS)  # [B, L]
    h = self.conv_in(x.astype(cfg.dtype))  # [B, H, W, C0]
    skips = [h]
    for block in self.down_blocks:
      h = block(h, emb, ctx, bias, skips, controller)
    h = self.mid_block(h, emb, ctx, bias, controller)
    for block in self.up_blocks:
      h = block(h, emb, ctx, bias, skips, controller)
    h = ACTIVATIONS[cfg.act_fn](self.conv_norm_out(h)).astype(cfg.dtype)
    out = self.conv_out(h)  # [B, H, W, out_channels]
    return out if controller is None else (out, controller.outputs())

  def attention_sites(self) -> list[str]:
    """Names of the attention layers (all of them see the text): the controller ``site`` names."""
    return [m.site for _, m in nnx.iter_graph(self) if isinstance(m, AddedKVAttention)]


def count_params(config: IFUNetConfig) -> int:
  """Parameter count of :class:`IFUNet` for ``config``, computed abstractly (no allocation)."""
  # A shape-only build: ~2 s for IF-I-XL.
  _, flat, _ = abstract_params(lambda rngs: IFUNet(config, rngs=rngs))
  return int(sum(np.prod(v.get_value().shape) for _, v in flat))
