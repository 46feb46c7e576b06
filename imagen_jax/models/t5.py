"""T5 encoder stack in Flax NNX, numerically equivalent to transformers' ``T5EncoderModel``.

Imagen (Saharia et al. 2022, §2.1) conditions every U-Net of the cascade on the hidden states of a
*frozen* T5-XXL encoder; its key finding is that scaling the text encoder helps more than scaling
the U-Net. transformers 5 ships no Flax models, so this module re-implements the encoder:

* T5 LayerNorm: RMS norm with a scale and no bias/mean; the variance is accumulated in fp32.
* Self-attention without the 1/sqrt(d_kv) scaling (T5 folds it into the initialisation) plus a
  learned relative position bias (bidirectional buckets) that only the first layer owns and that
  all layers share.
* Feed-forward: ReLU ``wi -> wo`` (T5 v1.0) or gated ``act(wi_0) * wi_1 -> wo`` (T5 v1.1, flan-t5,
  mT5, the T5-XXL used by Imagen and DeepFloyd IF), where "gated-gelu" means the tanh-approximate
  ``gelu_new``, exactly as in transformers.
* A final layer norm. There is no dropout: the encoder is only ever used frozen, for inference.

Weights carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``norm``) so that the
XXL encoder (4.76B parameters) can be FSDP/tensor sharded by the rules in ``imagen_jax.sharding``.
Loading Hugging Face checkpoints lives in ``imagen_jax.models.t5_loading``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.sharding import constrain, logical_init

# feed_forward_proj activation name (after the "gated-" prefix) -> function, as in HF's ACT2FN.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh form, used by "gated-gelu"
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}
# HF T5 configs whose encoder is exactly this architecture (mT5 = T5 v1.1 with a bigger vocab).
_SUPPORTED_MODEL_TYPES = ("t5", "mt5")
_REQUIRED_HF_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


@dataclasses.dataclass(frozen=True, slots=True)
class T5Config:
  """Hyper-parameters of a T5 encoder (field names follow transformers' ``T5Config``).

  The defaults are T5 v1.1 XXL, the text encoder of Imagen and DeepFloyd IF.
  """

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  pad_token_id: int = 0
  eos_token_id: int = 1

  def __post_init__(self):
    _ = self.activation  # validates feed_forward_proj early, with the key named in the error
    for name in _REQUIRED_HF_KEYS:
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config.relative_attention_num_buckets must be >= 4")

  @property
  def is_gated(self) -> bool:
    """True for the gated feed-forward of T5 v1.1 (``wi_0``, ``wi_1``)."""
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """The HF activation name of the feed-forward (``gated-gelu`` means ``gelu_new``)."""
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(
        f"unsupported T5 config key feed_forward_proj={self.feed_forward_proj!r}: expected "
        "'ACT' or 'gated-ACT'"
      )
    act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
    if act not in _ACTIVATIONS:
      raise ValueError(
        f"unsupported T5 config key feed_forward_proj={self.feed_forward_proj!r}: activation "
        f"{act!r} is not one of {sorted(_ACTIVATIONS)}"
      )
    return act

  @property
  def num_params(self) -> int:
    """Parameter count of the encoder (embedding, layers, relative bias, final norm)."""
    ff_in = 2 if self.is_gated else 1
    inner = self.num_heads * self.d_kv
    per_layer = 4 * self.d_model * inner + (ff_in + 1) * self.d_model * self.d_ff + 2 * self.d_model
    return (
      self.vocab_size * self.d_model
      + self.num_layers * per_layer
      + self.relative_attention_num_buckets * self.num_heads
      + self.d_model
    )

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any], source: str = "config.json") -> T5Config:
    """Builds the config from a Hugging Face T5 ``config.json`` dict.

    Args:
      config: the parsed ``config.json``.
      source: the file it came from, named in error messages.

    Raises:
      ValueError: for a model type or config key this encoder does not implement.
    """
    model_type = config.get("model_type", "t5")
    if model_type not in _SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"{source}: unsupported config key model_type={model_type!r} (supported: "
        f"{', '.join(_SUPPORTED_MODEL_TYPES)}; umt5/longt5 use a different attention)"
      )
    if config.get("is_decoder", False):
      raise ValueError(
        f"{source}: unsupported config key is_decoder=true: a T5 decoder stack is causal, only "
        "the bidirectional encoder is implemented"
      )
    missing = [k for k in _REQUIRED_HF_KEYS if k not in config]
    if missing:
      raise ValueError(f"{source}: T5 config is missing required key(s) {missing}")
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    for key in ("pad_token_id", "eos_token_id"):
      # Some configs store null or a list (several EOS ids); keep the T5 defaults then.
      if not isinstance(kwargs.get(key, 0), int):
        kwargs.pop(key)
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  # Named variants (Hugging Face ids in the docstrings). flan-t5 shares the v1.1 shapes.
  @classmethod
  def t5_v1_1_xxl(cls) -> T5Config:
    """``google/t5-v1_1-xxl`` / ``google/flan-t5-xxl``: Imagen's encoder (4.76B params)."""
    return cls()

  @classmethod
  def t5_v1_1_xl(cls) -> T5Config:
    """``google/t5-v1_1-xl`` / ``google/flan-t5-xl``."""
    return cls(d_model=2048, d_ff=5120, num_heads=32)

  @classmethod
  def t5_v1_1_large(cls) -> T5Config:
    """``google/t5-v1_1-large`` / ``google/flan-t5-large``."""
    return cls(d_model=1024, d_ff=2816, num_heads=16)

  @classmethod
  def t5_v1_1_base(cls) -> T5Config:
    """``google/t5-v1_1-base`` / ``google/flan-t5-base`` (imagen-pytorch's default)."""
    return cls(d_model=768, d_ff=2048, num_heads=12, num_layers=12)

  @classmethod
  def t5_v1_1_small(cls) -> T5Config:
    """``google/t5-v1_1-small`` / ``google/flan-t5-small``."""
    return cls(d_model=512, d_ff=1024, num_heads=6, num_layers=8)

  @classmethod
  def t5_base(cls) -> T5Config:
    """``google-t5/t5-base``: the original T5 v1.0 with a ReLU feed-forward."""
    return cls(d_model=768, d_ff=3072, num_heads=12, num_layers=12, feed_forward_proj="relu")

  @classmethod
  def tiny(cls, feed_forward_proj: str = "gated-gelu") -> T5Config:
    """A test-sized encoder (compiles in about a second on CPU)."""
    return cls(
      vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj=feed_forward_proj,
    )  # fmt: skip


def relative_position_buckets(
  length: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """Bidirectional T5 relative-position buckets ``[L_q, L_k]`` (int32), computed on the host.

  Half of the buckets hold exact distances, the other half logarithmically wider bins up to
  ``max_distance``; the sign of ``key - query`` picks the half. The table depends only on the
  static length, so it is built with numpy in float32, the same arithmetic as transformers'
  ``_relative_position_bucket``: a fused or reassociated device computation could round
  ``log(n / max_exact)`` differently and flip a bucket at the exact bin edges (n = 16, 32, 64).
  """
  pos = np.arange(length, dtype=np.int64)
  rel = pos[None, :] - pos[:, None]  # memory_position - query_position
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (
      np.log(n.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(half - max_exact)
    )
  # where(is_small) discards the -inf of log(0) before the int cast can see it.
  large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(n < max_exact, n, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
  """T5's RMS layer norm: scale only, no mean subtraction, variance accumulated in fp32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(
      logical_init(nnx.initializers.ones, ("norm",))(rngs.params(), (dim,), param_dtype)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * y


def _dense(d_in: int, d_out: int, names: tuple[str, str], kw: dict) -> nnx.Linear:
  # Kernels are stored [in, out] (the transpose of torch's nn.Linear weight).
  return nnx.Linear(
    d_in, d_out, use_bias=False, kernel_init=logical_init(nnx.initializers.lecun_normal(), names),
    **kw,
  )  # fmt: skip


class T5Attention(nnx.Module):
  """Multi-head self-attention of a T5 encoder layer (no 1/sqrt(d) scaling, additive bias)."""

  def __init__(
    self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, precision: Any = None
  ):
    self.num_heads, self.d_kv = config.num_heads, config.d_kv
    self.precision = precision
    inner = config.num_heads * config.d_kv
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
    # The fused heads*d_kv axis is named `heads`: sharding it splits whole heads when the
    # number of shards divides num_heads.
    self.q = _dense(config.d_model, inner, ("embed", "heads"), kw)
    self.k = _dense(config.d_model, inner, ("embed", "heads"), kw)
    self.v = _dense(config.d_model, inner, ("embed", "heads"), kw)
    self.o = _dense(inner, config.d_model, ("heads", "embed"), kw)

  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; bias: [1, H, L, L] fp32; mask: [B, L] bool over keys."""
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, self.num_heads, self.d_kv)  # [B, L, H, K]
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    # Logits and softmax in fp32 even under bf16: unscaled T5 logits are large.
    logits = jnp.einsum(
      "bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
    )
    logits = logits + bias
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)  # [B, L, H, K]
    return self.o(out.reshape(b, length, self.num_heads * self.d_kv))


class T5FeedForward(nnx.Module):
  """``wo(act(wi(x)))`` (v1.0) or ``wo(act(wi_0(x)) * wi_1(x))`` (gated, v1.1)."""

  def __init__(
    self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, precision: Any = None
  ):
    self.act = _ACTIVATIONS[config.activation]
    self.is_gated = config.is_gated
    d, f = config.d_model, config.d_ff
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
    if self.is_gated:
      self.wi_0 = _dense(d, f, ("embed", "mlp"), kw)
      self.wi_1 = _dense(d, f, ("embed", "mlp"), kw)
    else:
      self.wi = _dense(d, f, ("embed", "mlp"), kw)
    self.wo = _dense(f, d, ("mlp", "embed"), kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.is_gated else self.act(self.wi(x))
    return self.wo(h)


class T5Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + ff(norm(x))``."""

  def __init__(
    self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, precision: Any = None
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    eps = config.layer_norm_epsilon
    self.attn_norm = T5LayerNorm(config.d_model, eps=eps, **kw)
    self.attn = T5Attention(config, precision=precision, **kw)
    self.mlp_norm = T5LayerNorm(config.d_model, eps=eps, **kw)
    self.mlp = T5FeedForward(config, precision=precision, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), bias, mask)
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("act_batch", "act_length", "act_embed"))


class T5EncoderModule(nnx.Module):
  """The T5 encoder stack: token embedding, ``num_layers`` blocks, final layer norm.

  ``__call__(input_ids [B, L], attention_mask [B, L]) -> [B, L, d_model]`` matches
  ``transformers.T5EncoderModel(...).last_hidden_state`` (padded positions included).

  Args:
    config: the architecture.
    rngs: only used for random init (loading builds the module under ``nnx.eval_shape``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: matmul precision. ``None`` means ``HIGHEST`` for fp32 compute, so "fp32" is
      true fp32 on TPU/GPU too (their default passes are bf16/TF32), and the backend default
      for bf16 compute.
  """

  def __init__(
    self,
    config: T5Config,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
  ):
    if not jnp.issubdtype(dtype, jnp.floating) or not jnp.issubdtype(param_dtype, jnp.floating):
      raise ValueError(f"T5 dtype/param_dtype must be floating, got {dtype} / {param_dtype}")
    if jnp.dtype(dtype) == jnp.float16:
      # T5 v1.1 activations overflow float16 (transformers clamps infs); bf16 has fp32's range.
      raise ValueError("float16 compute overflows in T5; use dtype=jnp.bfloat16 or jnp.float32")
    self.config = config
    self.dtype = dtype
    if precision is None and jnp.dtype(dtype) == jnp.float32:
      precision = jax.lax.Precision.HIGHEST
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embed = nnx.Embed(
      config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype,
      embedding_init=logical_init(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs,
    )  # fmt: skip
    # Owned by layer 0 in HF (block.0...relative_attention_bias), shared by every layer.
    self.rel_bias = nnx.Embed(
      config.relative_attention_num_buckets, config.num_heads, dtype=jnp.float32,
      param_dtype=param_dtype,
      embedding_init=logical_init(nnx.initializers.normal(1.0), (None, "heads")), rngs=rngs,
    )  # fmt: skip
    self.blocks = nnx.List(
      [T5Block(config, precision=precision, **kw) for _ in range(config.num_layers)]
    )
    self.final_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, **kw)

  def position_bias(self, length: int) -> jax.Array:
    """Relative position bias ``[1, H, L, L]`` in fp32, shared by all layers."""
    cfg = self.config
    buckets = relative_position_buckets(
      length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    values = self.rel_bias(jnp.asarray(buckets))  # [L, L, H]
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Encodes token ids ``[B, L]`` (mask 1 = real token) into hidden states ``[B, L, D]``."""
    x = self.embed(input_ids)  # [B, L, D]
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    bias = self.position_bias(input_ids.shape[1])
    mask = attention_mask.astype(bool)
    for block in self.blocks:
      x = block(x, bias, mask)
    return self.final_norm(x)
