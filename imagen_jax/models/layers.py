"""Building blocks shared by the Imagen U-Nets (App. F.1 ADM U-Net, App. B.1 Efficient U-Net).

Every weight is created through :func:`imagen_jax.sharding.logical_init` with conv-aware logical
names (``keep`` for spatial kernel axes, ``conv_in``/``conv_out`` for channels, ``heads`` for the
fused heads*head_dim axis, ``embed`` for the T5 width, ``norm`` for scale/bias vectors). Modules
follow the house NNX style: ``__init__(..., *, rngs, dtype, param_dtype)``, compute in ``dtype``,
store weights in ``param_dtype``, normalisations and softmax in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import kernels
from imagen_jax.models.attention_control import AttentionController
from imagen_jax.sharding import constrain, logical_init

# Log-SNR range the embedding is defined on. The cosine schedule's log-SNR is clipped to about
# ±20 by the diffusion core; values outside are clipped here too, so the embedding stays bounded.
LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
ACT_BHWC = ("act_batch", "act_height", "act_width", "act_channels")
ACT_BLD = ("act_batch", "act_length", "act_embed")

_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_default_kernel = nnx.initializers.lecun_normal()


def dense(
  in_features: int,
  out_features: int,
  names: tuple[str, str] = ("conv_in", "conv_out"),
  *,
  zero: bool = False,
  rngs: nnx.Rngs,
  dtype: jnp.dtype,
  param_dtype: jnp.dtype,
) -> nnx.Linear:
  """``nnx.Linear`` with logical names ``names`` on the kernel and ``names[1]`` on the bias."""
  return nnx.Linear(
    in_features,
    out_features,
    kernel_init=logical_init(_zeros if zero else _default_kernel, names),
    bias_init=logical_init(_zeros, (names[1],)),
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def conv(
  in_channels: int,
  out_channels: int,
  kernel: int = 3,
  stride: int = 1,
  *,
  zero: bool = False,
  rngs: nnx.Rngs,
  dtype: jnp.dtype,
  param_dtype: jnp.dtype,
) -> nnx.Conv:
  """NHWC conv with symmetric padding (a stride-2 3×3 conv halves even sizes exactly)."""
  pad = kernel // 2
  return nnx.Conv(
    in_channels,
    out_channels,
    (kernel, kernel),
    strides=stride,
    padding=((pad, pad), (pad, pad)),
    kernel_init=logical_init(
      _zeros if zero else _default_kernel, ("keep", "keep", "conv_in", "conv_out")
    ),
    bias_init=logical_init(_zeros, ("conv_out",)),
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class GroupNorm(nnx.GroupNorm):
  """``nnx.GroupNorm`` (same parameters and names) computed in float32, per channel first.

  ``impl`` picks the computation (:mod:`imagen_jax.kernels`, kind ``"norm"``): ``"ours"`` (below),
  ``"flax"`` (``nnx.GroupNorm``'s own) or ``"auto"`` (ours on CPU, flax's on GPU/TPU).

  The mean and mean square are reduced over the spatial axes per channel (contiguous in NHWC),
  then pooled into groups; the group statistics are expanded back to channels by one product with
  a one-hot ``[G, C]`` matrix. The product keeps the statistics out of the normalisation's
  elementwise loop, which then only broadcasts ``[B, C]`` vectors over the image:
  on CPU the norm + SiLU runs ~3× faster (forward) than ``nnx.GroupNorm``'s reduction over the
  strided ``[B, HW, G, C/G]`` view. Variance is E[x²] − E[x]², as ``nnx.GroupNorm``'s default
  ``use_fast_variance``.
  """

  def __init__(self, *args: Any, impl: str = kernels.AUTO, **kwargs: Any):
    kernels.check_choice("norm", impl, "GroupNorm impl")
    super().__init__(*args, **kwargs)
    self.impl = impl

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    # Masked statistics (unused by the U-Nets) always take Flax's own computation.
    if mask is not None or kernels.resolve("norm", self.impl) == "flax":
      return super().__call__(x, mask=mask)
    x = x.astype(jnp.float32)  # [B, ..., C]
    b, c, g = x.shape[0], x.shape[-1], self.num_groups
    flat = x.reshape(b, -1, c)  # [B, N, C]
    count = flat.shape[1] * (c // g)
    sums = jnp.stack([flat.sum(axis=1), jnp.square(flat).sum(axis=1)], axis=1)  # [B, 2, C]
    mean, mean_sq = jnp.moveaxis(sums.reshape(b, 2, g, c // g).sum(-1) / count, 1, 0)  # [B, G]
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)  # [B, G]
    # Group → channel expansion as one product with a one-hot [G, C] matrix, at full precision
    # (TPUs' bf16 passes or GPUs' TF32 would round the statistics otherwise).
    onehot = jnp.repeat(jnp.eye(g, dtype=jnp.float32), c // g, axis=1)  # [G, C]
    stats = jnp.matmul(
      jnp.stack([inv, mean], axis=1), onehot, precision=jax.lax.Precision.HIGHEST
    )  # [B, 2, C]
    per_channel = (b,) + (1,) * (x.ndim - 2) + (c,)
    gain = stats[:, 0] * self.scale[...].astype(jnp.float32)  # [B, C]
    center = stats[:, 1]  # [B, C]
    bias = self.bias[...].astype(jnp.float32)
    return (x - center.reshape(per_channel)) * gain.reshape(per_channel) + bias


def group_norm(
  channels: int,
  groups: int,
  *,
  rngs: nnx.Rngs,
  param_dtype: jnp.dtype,
  impl: str = kernels.AUTO,
) -> GroupNorm:
  """GroupNorm in float32 (bf16 statistics are too coarse); ``impl`` as :class:`GroupNorm`."""
  return GroupNorm(
    channels,
    num_groups=groups,
    epsilon=1e-5,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_init=logical_init(_ones, ("norm",)),
    bias_init=logical_init(_zeros, ("norm",)),
    rngs=rngs,
    impl=impl,
  )


def layer_norm(features: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> nnx.LayerNorm:
  """LayerNorm computed in float32."""
  return nnx.LayerNorm(
    features,
    epsilon=1e-5,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_init=logical_init(_ones, ("norm",)),
    bias_init=logical_init(_zeros, ("norm",)),
    rngs=rngs,
  )


def downsample(x: jax.Array) -> jax.Array:
  """2×2 average pooling, NHWC."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x: jax.Array) -> jax.Array:
  """2× nearest-neighbour upsampling, NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ------------------------------------------------------------------------------------------------
# Conditioning embeddings.


def logsnr_to_timestep(logsnr: jax.Array) -> jax.Array:
  """Maps log-SNR λ to a DDPM-like time in [0, 1000] for the sinusoidal embedding.

  λ is clipped to [LOGSNR_MIN, LOGSNR_MAX] = [-20, 20] and mapped linearly, clean (λ=20) to 0 and
  pure noise (λ=-20) to 1000, so the sinusoid frequencies of ADM's timestep embedding (tuned for
  integer steps up to 1000) resolve the whole range. Continuous time enters only through λ (§2.2).
  """
  lam = jnp.clip(logsnr.astype(jnp.float32), LOGSNR_MIN, LOGSNR_MAX)
  return (LOGSNR_MAX - lam) / (LOGSNR_MAX - LOGSNR_MIN) * 1000.0


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """ADM's ``timestep_embedding``: [cos(t·f), sin(t·f)], geometric f. [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class LogSNREmbedding(nnx.Module):
  """Sinusoidal embedding of the (scaled) log-SNR followed by a 2-layer SiLU MLP (ADM time MLP)."""

  def __init__(
    self, freq_dim: int, emb_dim: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype
  ):
    self.freq_dim = freq_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = dense(freq_dim, emb_dim, **kw)
    self.fc2 = dense(emb_dim, emb_dim, **kw)

  def __call__(self, logsnr: jax.Array) -> jax.Array:
    emb = sinusoidal_embedding(logsnr_to_timestep(logsnr), self.freq_dim)  # [B, F]
    return self.fc2(jax.nn.silu(self.fc1(emb)))  # [B, E]


class AttentionPool(nnx.Module):
  """Attention pooling of a token sequence into one vector (§2.5, ``feature_pooling_type``).

  A query token (masked mean of the tokens + a learned vector, as CLIP/IF pool) attends over itself
  and the valid tokens. The query token is always a valid key, so an all-false mask (the null
  condition) still has a well-defined softmax, and padding tokens never receive weight.
  """

  def __init__(
    self,
    dim: int,
    out_dim: int,
    num_heads: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
  ):
    self.num_heads = num_heads
    self.dtype = dtype
    init = logical_init(nnx.initializers.normal(dim**-0.5), ("norm",))
    self.query = nnx.Param(init(rngs.params(), (dim,), param_dtype))
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = dense(dim, dim, ("conv_in", "heads"), **kw)
    self.kv = dense(dim, 2 * dim, ("conv_in", "heads"), **kw)
    self.out = dense(dim, out_dim, ("heads", "conv_out"), **kw)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    b, length, d = tokens.shape
    n = self.num_heads
    m = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    mean = (tokens.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # [B, D]
    cls = (mean + self.query[...].astype(jnp.float32)).astype(self.dtype)  # [B, D]
    seq = jnp.concatenate([cls[:, None], tokens.astype(self.dtype)], axis=1)  # [B, 1+L, D]
    valid = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)  # [B, 1+L]
    q = self.q(cls).reshape(b, 1, n, d // n)
    k, v = jnp.split(self.kv(seq).reshape(b, 1 + length, 2 * n, d // n), 2, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :])  # [B, 1, N, D/N]
    return self.out(out.reshape(b, d))  # [B, E]


# ------------------------------------------------------------------------------------------------
# Residual block.


class ResBlock(nnx.Module):
  """BigGAN/ADM residual block with scale-shift norm (App. F.1 ``use_scale_shift_norm``).

  GN -> SiLU -> [resample] -> conv3×3 -> GN·(1+scale)+shift -> SiLU -> conv3×3 (zero init), plus a
  skip path (resampled, 1×1 conv when widths differ). ``resample`` ("up"/"down") makes it the BigGAN
  up/down block (``res_block_type "biggan"``). The sum is multiplied by ``skip_scale`` (1/√2 in the
  Efficient U-Net, App. B.1, as IF's ``resnet_out_scale_factor``). ``norm_impl``: the GroupNorms'
  computation (:class:`GroupNorm`).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    emb_dim: int,
    *,
    num_groups: int,
    resample: str | None = None,
    skip_scale: float = 1.0,
    norm_impl: str = kernels.AUTO,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resample = resample
    self.skip_scale = skip_scale
    self.dtype = dtype
    norm = dict(rngs=rngs, param_dtype=param_dtype, impl=norm_impl)
    self.norm1 = group_norm(in_channels, num_groups, **norm)
    self.conv1 = conv(in_channels, out_channels, **kw)
    self.emb_proj = dense(emb_dim, 2 * out_channels, **kw)
    self.norm2 = group_norm(out_channels, num_groups, **norm)
    self.conv2 = conv(out_channels, out_channels, zero=True, **kw)
    self.skip = conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

  def _resample(self, x: jax.Array) -> jax.Array:
    if self.resample == "down":
      return downsample(x)
    if self.resample == "up":
      return upsample(x)
    return x

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.norm1(x)).astype(self.dtype)  # [B, H, W, Cin]
    x = self._resample(x)
    h = self.conv1(self._resample(h))  # [B, H', W', Cout]
    scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=-1)  # [B, Cout] each
    h = self.norm2(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = self.conv2(jax.nn.silu(h).astype(self.dtype))
    skip = self.skip(x) if self.skip is not None else x
    out = (skip.astype(self.dtype) + h) * jnp.asarray(self.skip_scale, self.dtype)
    return constrain(out, ACT_BHWC)


# ------------------------------------------------------------------------------------------------
# Attention.


def _attention_probs(
  q: jax.Array, k: jax.Array, mask: jax.Array | None, bias: jax.Array | None = None
) -> jax.Array:
  """Softmax probabilities in float32, heads-major. [B, T, N, D] x [B, S, N, D] -> [B, N, T, S].

  ``mask`` (bool) and ``bias`` (additive, on the scaled logits) broadcast to [B, N, T, S].
  """
  qh, kh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # [B, N, T|S, D]
  logits = jnp.einsum("bntd,bnsd->bnts", qh, kh, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(q.shape[-1] ** -0.5)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def _attend(probs: jax.Array, v: jax.Array) -> jax.Array:
  """Weighted values. probs [B, N, T, S] x v [B, S, N, D] -> [B, T, N, D]."""
  vh = jnp.swapaxes(v, 1, 2)  # [B, N, S, D]
  return jnp.swapaxes(jnp.einsum("bnts,bnsd->bntd", probs.astype(v.dtype), vh), 1, 2)


def _xla_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention as two heads-major einsums. [B, T, N, D] x [B, S, N, D] -> [B, T, N, D].

  The same math as ``jax.nn.dot_product_attention(implementation="xla")`` (fp32 logits and
  softmax, probabilities cast to the value dtype), but with the heads moved next to the batch
  before the products. jax's version goes through a grouped-query 5-D einsum whose gradient is
  about 2x slower on CPU (bench/RESULTS.md: 36 vs 17 ms for one 16² layer's backward at batch 8),
  which made attention ~40% of a small U-Net's train step. The controlled (explicit) path uses
  the same two functions, so unchanged probabilities give bit-identical outputs.
  """
  return _attend(_attention_probs(q, k, mask, bias), v)


def _cudnn_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None
) -> jax.Array:
  """``jax.nn.dot_product_attention(implementation="cudnn")``. Mask and bias are broadcast to
  [B, 1, T, S] and the bias cast to the inputs' dtype, as jax's cuDNN path requires."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, 1, t, s))
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, 1, t, s)).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  bias: jax.Array | None = None,
  impl: str | None = kernels.AUTO,
) -> jax.Array:
  """Softmax attention with the implementation ``impl`` picks. [B, T, N, D] x [B, S, N, D].

  Args:
    q: queries ``[B, T, N, D]``.
    k: keys ``[B, S, N, D]``.
    v: values ``[B, S, N, D]``.
    mask: bool, True = attend, broadcastable to ``[B, N, T, S]`` (4-D).
    bias: additive logit bias broadcastable to ``[B, N, T, S]`` (4-D).
    impl: ``"auto"``, ``"xla"``, ``"jax_xla"`` or ``"cudnn"`` (:mod:`imagen_jax.kernels`; None is
      the older spelling of ``"xla"``). ``"auto"`` takes cuDNN on a GPU when
      :func:`~imagen_jax.kernels.cudnn_attention_unsupported` allows (or jax refuses while
      tracing), else ``"xla"``; ``"cudnn"`` raises ``ValueError`` where cuDNN cannot run.

  Returns:
    ``[B, T, N, D]`` in the value dtype.
  """
  impl = "xla" if impl is None else impl
  choice = kernels.resolve("attention", impl, field="attention_impl")
  if choice == "cudnn":
    masked = mask is not None or bias is not None
    why = kernels.cudnn_attention_unsupported(q.dtype, q.shape[-1], q.shape[1], k.shape[1], masked)
    if why is None:
      try:
        return _cudnn_attention(q, k, v, mask, bias)
      except (NotImplementedError, ValueError, RuntimeError):
        # jax checks more than we do (cuDNN version, GPU generation) while tracing: "auto"
        # falls back to XLA then, an explicit "cudnn" reports jax's reason.
        if impl == "cudnn":
          raise
    elif impl == "cudnn":
      raise ValueError(
        f"attention_impl='cudnn' cannot run this layer: {why}. Use 'auto' (cuDNN where it "
        "applies, XLA elsewhere) or 'xla'"
      )
    choice = "xla"
  if choice == "jax_xla":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")
  return _xla_attention(q, k, v, mask, bias)


class Attention(nnx.Module):
  """Image self-attention with the text sequence concatenated to its keys/values (§2.5), or plain
  text cross-attention (``self_attention=False``, the 256->1024 model, App. F.3).

  The attention probabilities over text tokens can be read or replaced by an
  :class:`~imagen_jax.models.attention_control.AttentionController` (prompt-to-prompt). Without a
  controller the layer runs one fused attention, chosen by ``impl`` (:func:`attention`): by
  backend for ``"auto"`` (cuDNN's fused kernel on GPUs where it applies, else heads-major einsums,
  :func:`_xla_attention`), or forced. ``norm_impl``: the GroupNorm's computation.
  """

  def __init__(
    self,
    channels: int,
    *,
    num_heads: int,
    head_dim: int,
    context_dim: int | None,
    self_attention: bool = True,
    num_groups: int,
    site: str,
    impl: str | None = kernels.AUTO,
    norm_impl: str = kernels.AUTO,
    position_features: int = 0,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
  ):
    if not self_attention and context_dim is None:
      raise ValueError(f"{site}: an attention layer needs self-attention or a text context")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    hidden = num_heads * head_dim
    if impl is not None:
      kernels.check_choice("attention", impl, f"{site}: attention_impl")
    self.num_heads, self.head_dim, self.site, self.impl = num_heads, head_dim, site, impl
    self.self_attention = self_attention
    self.dtype = dtype
    self.norm = group_norm(channels, num_groups, rngs=rngs, param_dtype=param_dtype, impl=norm_impl)
    self.q = dense(channels, hidden, ("conv_in", "heads"), **kw)
    # Absolute position of each query (Fourier features of its coordinates, zero-init projection).
    self.position_features = position_features
    self.q_pos = dense(position_features, hidden, zero=True, **kw) if position_features else None
    self.kv = dense(channels, 2 * hidden, ("conv_in", "heads"), **kw) if self_attention else None
    if context_dim is not None:
      # LayerNorm on the text before its K/V projection "helps considerably" (§2.5).
      self.context_norm = layer_norm(context_dim, rngs=rngs, param_dtype=param_dtype)
      self.context_kv = dense(context_dim, 2 * hidden, ("conv_in", "heads"), **kw)
    else:
      self.context_norm = self.context_kv = None
    # Zero init (ADM ``zero_module``): each attention layer starts as the identity.
    self.proj = dense(hidden, channels, ("heads", "conv_out"), zero=True, **kw)

  def _heads(self, t: jax.Array) -> jax.Array:
    b, s, _ = t.shape
    return t.reshape(b, s, -1, self.head_dim)

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None,
    context_mask: jax.Array | None,
    has_text: jax.Array | None,
    controller: AttentionController | None = None,
  ) -> jax.Array:
    """x: [B, H, W, C]; context: [B, L, Dc]; context_mask: [B, L] bool; has_text: [B] bool."""
    b, hgt, wid, c = x.shape
    h = self.norm(x).astype(self.dtype).reshape(b, hgt * wid, c)  # [B, HW, C]
    q = self.q(h)  # [B, HW, hidden]
    if self.q_pos is not None:
      q = q + self.q_pos(fourier_positions(hgt, wid, self.position_features, self.dtype))[None]
    q = self._heads(q)  # [B, HW, N, Dh]
    keys, values, masks = [], [], []
    if self.self_attention:
      k, v = jnp.split(self._heads(self.kv(h)), 2, axis=2)
      keys.append(k)
      values.append(v)
      masks.append(jnp.ones((b, hgt * wid), bool))
    n_img = hgt * wid if self.self_attention else 0
    use_text = self.context_kv is not None and context is not None
    if use_text:
      ctx = self.context_norm(context).astype(self.dtype)  # [B, L, Dc]
      kt, vt = jnp.split(self._heads(self.context_kv(ctx)), 2, axis=2)  # [B, L, N, Dh] each
      keys.append(kt)
      values.append(vt)
      masks.append(context_mask)
    k, v = jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)  # [B, S, N, Dh]
    mask = jnp.concatenate(masks, axis=1)[:, None, None, :] if use_text else None  # [B,1,1,S]
    out = attention(q, k, v, mask, impl=self.impl)
    if use_text and controller is not None and controller.wants(self.site):
      out = self._controlled(q, k, v, mask, out, n_img, (hgt, wid), controller)
    if not self.self_attention:
      # Text-only attention with an all-false mask (the null condition) attends to nothing.
      out = jnp.where(has_text[:, None, None, None], out, jnp.zeros_like(out))
    out = self.proj(out.reshape(b, hgt, wid, -1))  # [B, H, W, C]
    return constrain(x + out.astype(x.dtype), ACT_BHWC)

  def _controlled(self, q, k, v, mask, fused, n_img, hw, controller):
    """Explicit-probability attention handing the probabilities to ``controller.edit``.

    A controller that only reads (returns the very arrays it was given) keeps the fused output, so
    reading maps never perturbs the numerics (bit-identical to no controller).
    """
    probs = _attention_probs(q, k, mask)  # [B, N, T, S] float32
    image_probs = probs[..., :n_img] if n_img else None  # [B, N, HW, HW] or None
    text_probs = probs[..., n_img:]  # [B, N, HW, L]
    new_image, new_text = controller.edit(self.site, image_probs, text_probs, hw=hw)
    if new_image is image_probs and new_text is text_probs:
      return fused
    parts = ([new_image.astype(jnp.float32)] if n_img else []) + [new_text.astype(jnp.float32)]
    return _attend(jnp.concatenate(parts, axis=-1) if n_img else parts[0], v)


def pixel_coordinates(hgt: int, wid: int) -> jax.Array:
  """Pixel-centre coordinates ``[H, W, 2]`` (y, x), each in [-1, 1], float32."""
  ys = (jnp.arange(hgt, dtype=jnp.float32) + 0.5) / hgt * 2.0 - 1.0
  xs = (jnp.arange(wid, dtype=jnp.float32) + 0.5) / wid * 2.0 - 1.0
  return jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)


def fourier_positions(hgt: int, wid: int, features: int, dtype: jnp.dtype) -> jax.Array:
  """``[H·W, features]`` sin/cos of the pixel-centre coordinates (:func:`pixel_coordinates`) at
  octave frequencies π·2^k, k = 0 .. features/4 − 1."""
  yx = pixel_coordinates(hgt, wid).reshape(hgt * wid, 2)  # [HW, 2]
  freqs = jnp.pi * 2.0 ** jnp.arange(features // 4, dtype=jnp.float32)  # [F/4]
  ang = (yx[:, :, None] * freqs).reshape(hgt * wid, -1)  # [HW, F/2]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1).astype(dtype)  # [HW, F]


class TextConditioner(nnx.Module):
  """LayerNorm + shared projection of the text embeddings, and their attention-pooled vector.

  Padding positions are zeroed first, so whatever the padding holds never reaches the network;
  the mask then removes them from every attention (§2.5 text conditioning).
  """

  def __init__(
    self,
    text_dim: int,
    context_dim: int,
    emb_dim: int,
    pool_heads: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = layer_norm(text_dim, rngs=rngs, param_dtype=param_dtype)
    self.proj = dense(text_dim, context_dim, ("embed", "conv_out"), **kw)
    self.pool = AttentionPool(context_dim, emb_dim, pool_heads, **kw)

  def __call__(self, text_emb: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, L, T], [B, L] -> context [B, L, Dc], pooled [B, E]."""
    text = jnp.where(text_mask[..., None], text_emb, 0.0)
    ctx = constrain(self.proj(self.norm(text)), ACT_BLD)  # [B, L, Dc]
    return ctx, self.pool(ctx, text_mask)
