"""CLIP (text and vision towers) in Flax NNX, numerically equivalent to transformers' ``CLIPModel``.

Imagen reports CLIP score next to FID (Saharia et al. 2022, §4.1: the guidance-weight sweeps
trade one against the other), and CLIP guidance needs a differentiable image tower inside
jitted code. transformers 5 ships no Flax models, so this module re-implements ``CLIPModel``:

* Text tower: token + learned position embedding, pre-LN transformer layers with a causal *and*
  padding mask, a final layer norm, and the hidden state at the EOS token as the pooled output
  (``eos_token_id == 2``, the legacy configs of the OpenAI/LAION checkpoints, means "argmax of the
  ids", since EOS is the largest id; otherwise the first position equal to ``eos_token_id``,
  exactly as transformers 5 does).
* Vision tower: a bias-free conv patch embedding, a class token, learned position embedding,
  ``pre_layrnorm`` (sic, the HF name), the same layers without a mask, and ``post_layernorm`` on
  the class token.
* ``text_projection`` / ``visual_projection`` (no bias) and ``logit_scale``.

Layer norms and the attention softmax run in fp32 whatever the compute dtype. Weights carry the
logical axis names of ``imagen_jax.sharding`` (``vocab``, ``embed``, ``heads``, ``mlp``, ``norm``,
``keep``), so a ViT-bigG can be FSDP-sharded. Images are channels-last ``[B, H, W, 3]``, already
normalised as the CLIP processor does. Loading Hugging Face checkpoints lives in
``imagen_jax.models.clip_loading``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.sharding import constrain, logical_init

# HF ACT2FN names used by CLIP checkpoints -> functions.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form (OpenCLIP/LAION)
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
_SUPPORTED_MODEL_TYPES = ("clip",)
_LEGACY_EOS_ID = 2  # configs from before transformers PR #24773: pool at argmax(input_ids)


def _validate_tower(cfg: Any, name: str) -> None:
  if cfg.hidden_act not in _ACTIVATIONS:
    raise ValueError(
      f"unsupported config key {name}.hidden_act={cfg.hidden_act!r} (supported: "
      f"{', '.join(sorted(_ACTIVATIONS))})"
    )
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
      raise ValueError(f"{name}.{key} must be a positive int, got {getattr(cfg, key)!r}")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(
      f"{name}.hidden_size={cfg.hidden_size} is not a multiple of "
      f"num_attention_heads={cfg.num_attention_heads}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPTextConfig:
  """The text tower (field names and defaults follow transformers' ``CLIPTextConfig``)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    _validate_tower(self, "text_config")
    if not isinstance(self.eos_token_id, int):
      raise ValueError(
        f"unsupported config key text_config.eos_token_id={self.eos_token_id!r}: the pooled "
        "output needs one integer EOS id"
      )


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPVisionConfig:
  """The vision tower (field names and defaults follow transformers' ``CLIPVisionConfig``)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _validate_tower(self, "vision_config")
    for key in ("image_size", "patch_size", "num_channels"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        raise ValueError(
          f"unsupported config key vision_config.{key}={getattr(self, key)!r}: expected a "
          "positive int (square images and patches)"
        )
    if self.patch_size > self.image_size:
      raise ValueError(f"vision_config.patch_size={self.patch_size} exceeds image_size")

  @property
  def num_positions(self) -> int:
    """Class token + patches (a remainder of ``image_size % patch_size`` is dropped, as HF)."""
    return (self.image_size // self.patch_size) ** 2 + 1


def _tower_kwargs(cls, d: Mapping[str, Any]) -> dict:
  out = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
  for key in ("image_size", "patch_size"):
    # HF allows [s, s]; only square images and patches are implemented.
    v = out.get(key)
    if isinstance(v, list | tuple) and len(v) == 2 and v[0] == v[1]:
      out[key] = int(v[0])
  return out


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPConfig:
  """Both towers plus the shared projection (transformers' ``CLIPConfig``).

  The defaults are OpenAI's ViT-B/32 shapes; the named variants give the published checkpoints.
  """

  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
      raise ValueError(f"projection_dim must be a positive int, got {self.projection_dim!r}")

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
    """Builds the config from a Hugging Face ``CLIPModel`` ``config.json`` dict.

    Missing keys take transformers' defaults; legacy ``text_config_dict``/``vision_config_dict``
    entries override ``text_config``/``vision_config`` as in transformers.

    Raises:
      ValueError: for a model type or config value this module does not implement (the message
        names ``source`` and the key).
    """
    model_type = config.get("model_type", "clip")
    if model_type not in _SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"{source}: unsupported config key model_type={model_type!r} (supported: "
        f"{', '.join(_SUPPORTED_MODEL_TYPES)}, i.e. a full CLIPModel checkpoint)"
      )
    towers = {}
    for key in ("text_config", "vision_config"):
      merged = {**(config.get(key) or {}), **(config.get(f"{key}_dict") or {})}
      towers[key] = merged
    try:
      kwargs = {k: config[k] for k in ("projection_dim", "logit_scale_init_value") if k in config}
      return cls(
        text_config=CLIPTextConfig(**_tower_kwargs(CLIPTextConfig, towers["text_config"])),
        vision_config=CLIPVisionConfig(**_tower_kwargs(CLIPVisionConfig, towers["vision_config"])),
        **kwargs,
      )
    except (ValueError, TypeError) as e:
      raise ValueError(f"{source}: {e}") from None

  @property
  def num_params(self) -> int:
    """Parameter count of the whole model (both towers, projections, ``logit_scale``)."""
    t, v = self.text_config, self.vision_config
    layer = lambda d, f: 4 * (d * d + d) + 4 * d + 2 * d * f + f + d  # attn, 2 LNs, MLP
    text = (t.vocab_size + t.max_position_embeddings + 2) * t.hidden_size
    text += t.num_hidden_layers * layer(t.hidden_size, t.intermediate_size)
    d = v.hidden_size
    vision = (1 + v.patch_size**2 * v.num_channels + v.num_positions + 4) * d
    vision += v.num_hidden_layers * layer(d, v.intermediate_size)
    return text + vision + (t.hidden_size + d) * self.projection_dim + 1

  def to_hf_dict(self) -> dict:
    """The ``config.json`` of an equivalent transformers ``CLIPModel``."""
    text = dataclasses.asdict(self.text_config)
    vision = dataclasses.asdict(self.vision_config)
    text.update(model_type="clip_text_model", projection_dim=self.projection_dim)
    vision.update(model_type="clip_vision_model", projection_dim=self.projection_dim)
    return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": self.projection_dim,
      "logit_scale_init_value": self.logit_scale_init_value,
      "text_config": text,
      "vision_config": vision,
    }

  # Named variants: the published Hugging Face CLIPModel configs (ids in the docstrings).
  @classmethod
  def vit_b_32(cls) -> CLIPConfig:
    """``openai/clip-vit-base-patch32``."""
    return cls(text_config=CLIPTextConfig(eos_token_id=2, bos_token_id=0))

  @classmethod
  def vit_b_16(cls) -> CLIPConfig:
    """``openai/clip-vit-base-patch16``."""
    return dataclasses.replace(cls.vit_b_32(), vision_config=CLIPVisionConfig(patch_size=16))

  @classmethod
  def vit_l_14(cls, image_size: int = 224) -> CLIPConfig:
    """``openai/clip-vit-large-patch14`` (the text encoder of Stable Diffusion 1.x)."""
    return cls(
      text_config=CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, eos_token_id=2,
        bos_token_id=0,
      ),
      vision_config=CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=image_size,
      ),
      projection_dim=768,
    )  # fmt: skip

  @classmethod
  def vit_l_14_336(cls) -> CLIPConfig:
    """``openai/clip-vit-large-patch14-336``."""
    return cls.vit_l_14(image_size=336)

  @classmethod
  def vit_h_14(cls) -> CLIPConfig:
    """``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (OpenCLIP; exact GELU)."""
    return cls(
      text_config=CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        hidden_act="gelu", eos_token_id=2, bos_token_id=0,
      ),
      vision_config=CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        patch_size=14, hidden_act="gelu",
      ),
      projection_dim=1024,
    )  # fmt: skip

  @classmethod
  def vit_bigg_14(cls) -> CLIPConfig:
    """``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` (2.5B params; SDXL's second text encoder)."""
    return cls(
      text_config=CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", eos_token_id=2, bos_token_id=0,
      ),
      vision_config=CLIPVisionConfig(
        hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
        patch_size=14, hidden_act="gelu",
      ),
      projection_dim=1280,
    )  # fmt: skip

  @classmethod
  def tiny(cls, hidden_act: str = "quick_gelu", eos_token_id: int = 2) -> CLIPConfig:
    """A test-sized model (compiles in about a second on CPU)."""
    return cls(
      text_config=CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
        eos_token_id=eos_token_id, bos_token_id=62,
      ),
      vision_config=CLIPVisionConfig(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        image_size=30, patch_size=10, hidden_act=hidden_act,
      ),
      projection_dim=24,
    )  # fmt: skip


@flax.struct.dataclass
class CLIPOutput:
  """Contrastive logits and the L2-normalised embeddings behind them (all fp32)."""

  logits_per_image: jax.Array  # [B_img, B_txt]
  logits_per_text: jax.Array  # [B_txt, B_img]
  image_embeds: jax.Array  # [B_img, P]
  text_embeds: jax.Array  # [B_txt, P]


def l2_normalize(x: jax.Array) -> jax.Array:
  """``x / ||x||`` over the last axis in fp32 (as ``CLIPModel`` normalises before the logits)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Layers shared by both towers.


class LayerNorm(nnx.Module):
  """``torch.nn.LayerNorm`` with its statistics and affine computed in fp32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.eps = eps
    self.dtype = dtype
    key = rngs.params()
    self.scale = nnx.Param(logical_init(nnx.initializers.ones, ("norm",))(key, (dim,), param_dtype))
    self.bias = nnx.Param(logical_init(nnx.initializers.zeros, ("norm",))(key, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def _dense(d_in: int, d_out: int, names: tuple, kw: dict, use_bias: bool = True) -> nnx.Linear:
  # Kernels are stored [in, out] (the transpose of torch's nn.Linear weight).
  return nnx.Linear(
    d_in, d_out, use_bias=use_bias,
    kernel_init=logical_init(nnx.initializers.lecun_normal(), names),
    bias_init=logical_init(nnx.initializers.zeros, names[1:]), **kw,
  )  # fmt: skip


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with biases and 1/sqrt(head_dim) scaling."""

  def __init__(self, cfg: Any, *, kw: dict):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.head_dim = d // self.num_heads
    self.precision = kw["precision"]
    # The fused heads*head_dim axis is named `heads`: sharding it splits whole heads.
    self.q_proj = _dense(d, d, ("embed", "heads"), kw)
    self.k_proj = _dense(d, d, ("embed", "heads"), kw)
    self.v_proj = _dense(d, d, ("embed", "heads"), kw)
    self.out_proj = _dense(d, d, ("heads", "embed"), kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: [B, L, D]; mask: [B, 1, L, L] bool (True = may attend) or None."""
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, self.num_heads, self.head_dim)  # [B, L, H, K]
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum(
      "bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
    )  # [B, H, L, L], fp32 even under bf16
    logits = logits * (self.head_dim**-0.5)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)  # [B, L, H, K]
    return self.out_proj(out.reshape(b, length, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
  """``fc2(act(fc1(x)))``."""

  def __init__(self, cfg: Any, *, kw: dict):
    self.act = _ACTIVATIONS[cfg.hidden_act]
    self.fc1 = _dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), kw)
    self.fc2 = _dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: Any, *, kw: dict):
    norm_kw = {k: kw[k] for k in ("rngs", "dtype", "param_dtype")}
    self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **norm_kw)
    self.self_attn = CLIPAttention(cfg, kw=kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **norm_kw)
    self.mlp = CLIPMLP(cfg, kw=kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    x = x + self.mlp(self.layer_norm2(x))
    return constrain(x, ("act_batch", "act_length", "act_embed"))


def _param(init, names: tuple, shape: tuple, kw: dict) -> nnx.Param:
  return nnx.Param(logical_init(init, names)(kw["rngs"].params(), shape, kw["param_dtype"]))


# ---------------------------------------------------------------------------------------------
# The towers.


def pool_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Hidden state ``[B, D]`` at each sequence's EOS token, as transformers 5 picks it.

  ``eos_token_id == 2`` (legacy configs): the position of the largest id (EOS is the largest id
  in CLIP's vocabulary); otherwise the first position equal to ``eos_token_id`` (0 if none).
  """
  if eos_token_id == _LEGACY_EOS_ID:
    index = jnp.argmax(input_ids, axis=-1)  # first maximum, as torch.argmax
  else:
    index = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nnx.Module):
  """``(input_ids [B, L], attention_mask [B, L]) -> (last_hidden [B, L, D], pooled [B, D])``."""

  def __init__(self, cfg: CLIPTextConfig, *, kw: dict):
    self.config = cfg
    d = cfg.hidden_size
    self.token_embedding = nnx.Embed(
      cfg.vocab_size, d, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=kw["rngs"],
      embedding_init=logical_init(nnx.initializers.normal(0.02), ("vocab", "embed")),
    )  # fmt: skip
    self.position_embedding = _param(
      nnx.initializers.normal(0.01), (None, "embed"), (cfg.max_position_embeddings, d), kw
    )
    self.layers = nnx.List([CLIPEncoderLayer(cfg, kw=kw) for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = LayerNorm(
      d, eps=cfg.layer_norm_eps, **{k: kw[k] for k in ("rngs", "dtype", "param_dtype")}
    )

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    b, length = input_ids.shape
    if length > self.config.max_position_embeddings:
      raise ValueError(
        f"sequence length {length} exceeds max_position_embeddings="
        f"{self.config.max_position_embeddings}"
      )
    x = self.token_embedding(input_ids)  # [B, L, D]
    x = x + self.position_embedding[:length].astype(x.dtype)[None]
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L] causal
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]  # padded keys
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_layer_norm(x)
    return x, pool_eos(x, input_ids, self.config.eos_token_id)


class CLIPVisionTransformer(nnx.Module):
  """``pixels [B, H, W, C] -> (last_hidden [B, 1 + N, D], pooled [B, D])``."""

  def __init__(self, cfg: CLIPVisionConfig, *, kw: dict):
    self.config = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    norm_kw = {k: kw[k] for k in ("rngs", "dtype", "param_dtype")}
    self.class_embedding = _param(nnx.initializers.normal(d**-0.5), ("embed",), (d,), kw)
    self.patch_embedding = nnx.Conv(
      cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
      kernel_init=logical_init(nnx.initializers.lecun_normal(), ("keep", "keep", None, "embed")),
      **kw,
    )  # fmt: skip
    self.position_embedding = _param(
      nnx.initializers.normal(0.02), (None, "embed"), (cfg.num_positions, d), kw
    )
    self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, **norm_kw)
    self.layers = nnx.List([CLIPEncoderLayer(cfg, kw=kw) for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, **norm_kw)

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
        f"pixels must be [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
        f"(channels-last, normalised), got {tuple(pixels.shape)}"
      )
    patches = self.patch_embedding(pixels)  # [B, H/P, W/P, D]
    b, gh, gw, d = patches.shape
    patches = patches.reshape(b, gh * gw, d)  # row-major, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)  # [B, 1 + N, D]
    x = x + self.position_embedding[...].astype(x.dtype)[None]
    x = constrain(self.pre_layrnorm(x), ("act_batch", "act_length", "act_embed"))
    for layer in self.layers:
      x = layer(x, None)
    return x, self.post_layernorm(x[:, 0])


class CLIPModule(nnx.Module):
  """Both towers, their projections and ``logit_scale`` (transformers' ``CLIPModel``).

  Args:
    config: the architecture.
    rngs: only used for random init (loading builds the module under ``nnx.eval_shape``).
    dtype: compute dtype (layer norms, softmax and the final logits stay fp32).
    param_dtype: parameter dtype.
    precision: matmul precision. ``None`` means ``HIGHEST`` for fp32 compute (true fp32 on
      TPU/GPU too) and the backend default otherwise.
  """

  def __init__(
    self,
    config: CLIPConfig,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
  ):
    if not jnp.issubdtype(dtype, jnp.floating) or not jnp.issubdtype(param_dtype, jnp.floating):
      raise ValueError(f"CLIP dtype/param_dtype must be floating, got {dtype} / {param_dtype}")
    if precision is None and jnp.dtype(dtype) == jnp.float32:
      precision = jax.lax.Precision.HIGHEST
    self.config = config
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
    self.text_model = CLIPTextTransformer(config.text_config, kw=kw)
    self.vision_model = CLIPVisionTransformer(config.vision_config, kw=kw)
    p = config.projection_dim
    self.text_projection = _dense(config.text_config.hidden_size, p, ("embed", None), kw, False)
    self.visual_projection = _dense(
      config.vision_config.hidden_size, p, ("embed", None), kw, use_bias=False
    )
    init = nnx.initializers.constant(config.logit_scale_init_value)
    self.logit_scale = _param(init, (), (), kw)

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Projected, *unnormalised* text features ``[B, P]`` (``CLIPModel.get_text_features``)."""
    _, pooled = self.text_model(input_ids, attention_mask)
    return self.text_projection(pooled)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """Projected, *unnormalised* image features ``[B, P]`` (``get_image_features``).

    Args:
      pixels: ``[B, S, S, 3]`` channels-last, normalised like ``CLIPImageProcessor`` output.
    """
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled)

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None, pixels: jax.Array
  ) -> CLIPOutput:
    """Contrastive logits between images and texts, as ``CLIPModel.forward``."""
    image = l2_normalize(self.image_features(pixels))  # [B_img, P]
    text = l2_normalize(self.text_features(input_ids, attention_mask))  # [B_txt, P]
    scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
    logits_per_text = jnp.matmul(text, image.T, precision=jax.lax.Precision.HIGHEST) * scale
    return CLIPOutput(
      logits_per_image=logits_per_text.T,
      logits_per_text=logits_per_text,
      image_embeds=image,
      text_embeds=text,
    )
