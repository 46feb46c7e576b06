"""DeepFloyd IF U-Net configs: diffusers' ``UNet2DConditionModel`` fields and named presets.

:class:`IFUNetConfig` takes a diffusers ``unet/config.json`` as it is (field names unchanged),
refuses what :mod:`imagen_jax.models.if_unet` does not implement (naming the field and the values
it supports), and gives the config back to diffusers. The presets rebuild the released IF
U-Nets' architecture at their published sizes (see :class:`IFUNetConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax import kernels

# diffusers' get_activation names -> functions ("gelu" is torch's exact erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "relu": jax.nn.relu,
}
DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn",)
# Our fields (compute, kernel choices), not diffusers': never read from or written to config.json.
_OURS = ("dtype", "param_dtype", "remat", "attention_impl", "norm_impl")
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# diffusers keys whose only supported value is the one given (anything else changes the network).
_FIXED: dict[str, Any] = {
  "time_cond_proj_dim": None, "attention_type": "default", "class_embeddings_concat": False,
  "dual_cross_attention": False, "num_attention_heads": None, "num_class_embeds": None,
  "projection_class_embeddings_input_dim": None, "addition_time_embed_dim": None,
  "reverse_transformer_layers_per_block": None, "time_embedding_type": "positional",
}  # fmt: skip
_CHOICES: dict[str, tuple] = {
  "class_embed_type": (None, "timestep"),
  "addition_embed_type": (None, "text"),
  "encoder_hid_dim_type": (None, "text_proj"),
  "resnet_time_scale_shift": ("default", "scale_shift"),
  "cross_attention_norm": (None, "group_norm", "layer_norm"),
  "mid_block_type": MID_BLOCKS,
}


def _unsupported(name: str, value: Any, supported: Any) -> ValueError:
  return ValueError(
    f"IFUNetConfig: unsupported {name}={value!r} (this port supports {supported}); "
    "only DeepFloyd IF's subset of UNet2DConditionModel is implemented"
  )


@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
  """diffusers ``UNet2DConditionModel`` config (field names as in ``config.json``) for IF U-Nets.

  Besides diffusers' names: ``dtype`` (compute), ``param_dtype`` (storage), ``remat``
  (``jax.checkpoint`` per resnet/attention block), and the kernel choices ``attention_impl``
  (``"auto"``, ``"xla"``, ``"jax_xla"``, ``"cudnn"``) and ``norm_impl`` (``"auto"``, ``"ours"``,
  ``"flax"``), as ``UNetConfig``'s (:mod:`imagen_jax.kernels`); none of these is written to
  ``config.json``. Fields that cannot change the IF blocks' math (``dropout`` at inference,
  ``downsample_padding``, ``upcast_attention``, ``use_linear_projection``,
  ``transformer_layers_per_block``, ``sample_size``) are kept for the round trip only: diffusers'
  SimpleCrossAttn blocks never receive them.

  Presets (:meth:`from_preset`); parameter counts, ours == diffusers' (meta device, tested):

  ========== ============= ========= ==================================================
  name       parameters    published widths (block_out_channels; cross_attention_dim)
  ========== ============= ========= ==================================================
  IF-I-XL    4,096,711,686 4.3B      704 x (1, 2, 3, 4); 704
  IF-I-L       890,225,670 900M      320 x (1, 2, 3, 4); 320
  IF-I-M       354,401,286 400M      192 x (1, 2, 3, 4); 192
  IF-II-L    1,242,987,270 1.2B      192 x (1, 2, 4, 6, 6); 1152
  IF-II-M      443,085,958 450M      128 x (1, 2, 4, 5, 5); 640
  tiny           2,282,374 -         32, 64, 96 (tests, CPU)
  tiny_sr        2,288,454 -         32, 64, 96, stage II layout (tests, CPU)
  ========== ============= ========= ==================================================

  The five IF presets are *reconstructions*, not copies of the released ``unet/config.json``
  files (which could not be fetched where this was written). Established from diffusers'
  ``scripts/convert_if.py`` and the original ``deepfloyd_if/model/unet.py``: the block types
  (stage I attends at 1/2, 1/4, 1/8 resolution; stage II at its two lowest), head dim 64,
  ``encoder_hid_dim`` 4096 (T5-XXL) with a text projection, group norm on the text,
  ``scale_shift``, gelu, stage II's ``layers_per_block`` (2, 2, 3, 5, 5),
  ``only_cross_attention``, noise-level ``class_embed_type``, gelu ``time_embedding_act_fn``,
  ``resnet_skip_time_act``, 1/0.7071 scale factors and ``time_embedding_dim``. *Not*
  established (fitted to the published sizes, so do not trust them for real weights): the
  widths and channel multipliers, ``cross_attention_dim`` and ``addition_embed_type_num_heads``.
  Loading never uses a preset: :func:`~imagen_jax.models.if_loading.load_if_unet` reads the
  checkpoint's own ``config.json``.
  """

  sample_size: int | None = 64
  in_channels: int = 3
  out_channels: int = 6
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
    "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
  )  # fmt: skip
  mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
  up_block_types: tuple[str, ...] = (
    "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
    "ResnetUpsampleBlock2D",
  )  # fmt: skip
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
  layers_per_block: int | tuple[int, ...] = 3
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "gelu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 320
  transformer_layers_per_block: int = 1
  encoder_hid_dim: int | None = 4096
  encoder_hid_dim_type: str | None = "text_proj"
  attention_head_dim: int | tuple[int, ...] = 64
  use_linear_projection: bool = False
  class_embed_type: str | None = None
  addition_embed_type: str | None = "text"
  addition_embed_type_num_heads: int = 64
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "scale_shift"
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  mid_block_only_cross_attention: bool | None = None
  cross_attention_norm: str | None = "group_norm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  def __post_init__(self):
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, key, tuple(getattr(self, key)))
    for key in ("only_cross_attention", "layers_per_block", "attention_head_dim"):
      if isinstance(getattr(self, key), list | tuple):
        object.__setattr__(self, key, tuple(getattr(self, key)))
    if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
      object.__setattr__(self, "encoder_hid_dim_type", "text_proj")  # diffusers' default
    for key, choices in _CHOICES.items():
      if getattr(self, key) not in choices:
        raise _unsupported(key, getattr(self, key), list(choices))
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
      bad = [b for b in getattr(self, key) if b not in allowed]
      if bad:
        raise _unsupported(key, bad[0], list(allowed))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"IFUNetConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
        f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
      )
    for key in ("only_cross_attention", "layers_per_block", "attention_head_dim"):
      v = getattr(self, key)
      if isinstance(v, tuple) and len(v) != n:
        raise ValueError(f"IFUNetConfig: {key} has {len(v)} entries for {n} blocks")
    for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
      v = getattr(self, key)
      if v is not None and v not in ACTIVATIONS or (key == "act_fn" and v is None):
        raise _unsupported(key, v, sorted(ACTIVATIONS) + ([] if key == "act_fn" else [None]))
    if not isinstance(self.cross_attention_dim, int):
      raise _unsupported("cross_attention_dim", self.cross_attention_dim, "one int")
    if not isinstance(self.norm_num_groups, int):
      raise _unsupported("norm_num_groups", self.norm_num_groups, "an int")
    if self.encoder_hid_dim_type == "text_proj" and self.encoder_hid_dim is None:
      raise ValueError("IFUNetConfig: encoder_hid_dim_type='text_proj' needs encoder_hid_dim")
    for key in ("conv_in_kernel", "conv_out_kernel"):
      if getattr(self, key) % 2 != 1:
        raise _unsupported(key, getattr(self, key), "odd kernel sizes")
    ch, d = self.block_out_channels, self.head_dims
    # (channels, head dim) of every attention; diffusers would silently drop a remainder.
    attn = [(ch[i], d[i]) for i, b in enumerate(self.down_block_types) if "Attn" in b]
    attn += [(ch[::-1][i], d[i]) for i, b in enumerate(self.up_block_types) if "Attn" in b]
    for c, h in [*attn, (ch[-1], d[-1])]:
      if c % h:
        raise _unsupported("attention_head_dim", h, f"divisors of the attended width {c}")
    bad = [c for c in ch if c % self.norm_num_groups]
    if bad:
      raise _unsupported("norm_num_groups", self.norm_num_groups, f"divisors of {bad}")
    kernels.check_choice("attention", self.attention_impl, "IFUNetConfig: attention_impl")
    kernels.check_choice("norm", self.norm_impl, "IFUNetConfig: norm_impl")

  # --- derived values ------------------------------------------------------------------------
  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  def _per_block(self, v: Any) -> tuple:
    return v if isinstance(v, tuple) else (v,) * self.num_blocks

  @property
  def head_dims(self) -> tuple[int, ...]:
    return self._per_block(self.attention_head_dim)

  @property
  def layers(self) -> tuple[int, ...]:
    return self._per_block(self.layers_per_block)

  @property
  def cross_only(self) -> tuple[bool, ...]:
    return self._per_block(self.only_cross_attention)

  @property
  def mid_cross_only(self) -> bool:
    """diffusers: a bool ``only_cross_attention`` also sets the mid block unless given."""
    if self.mid_block_only_cross_attention is not None:
      return bool(self.mid_block_only_cross_attention)
    return isinstance(self.only_cross_attention, bool) and self.only_cross_attention

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def text_dim(self) -> int:
    """Width of ``encoder_hidden_states`` as passed to the model."""
    return self.encoder_hid_dim if self.encoder_hid_dim_type else self.cross_attention_dim

  # --- diffusers config.json -----------------------------------------------------------------
  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> IFUNetConfig:
    """Builds a config from a diffusers ``config.json`` dict; ``overrides`` (any field: dtype,
    remat, ...) win over the dict's values.

    Raises:
      ValueError: a key or value this port does not implement (the message names it).
    """
    names = {f.name for f in dataclasses.fields(cls)} - set(_OURS)
    kwargs = {}
    for key, value in config.items():
      if key in _BOOKKEEPING:
        continue
      if key in _FIXED:
        if value != _FIXED[key]:
          raise _unsupported(key, value, [_FIXED[key]])
        continue
      if key not in names:
        raise ValueError(f"IFUNetConfig: unknown UNet2DConditionModel config key {key!r}")
      kwargs[key] = value
    return cls(**{**kwargs, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """A ``config.json`` dict that ``UNet2DConditionModel(**cfg)`` / ``from_pretrained`` accept."""
    out = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(self):
      if f.name not in _OURS:
        v = getattr(self, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> IFUNetConfig:
    """A named IF U-Net (see the class docstring; ``tiny``/``tiny_sr`` are for tests/CPU)."""
    if name not in PRESETS:
      raise ValueError(f"unknown IF U-Net preset {name!r}; known: {sorted(PRESETS)}")
    return cls.from_diffusers(PRESETS[name], **overrides)


_I_TYPES = dict(
  down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
  up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
)
_II_TYPES = dict(
  down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
  up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
)
_IF_COMMON = dict(
  mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=64, encoder_hid_dim=4096,
  encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=64,
  cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
  norm_num_groups=32, norm_eps=1e-5,
)  # fmt: skip
# Stage II (convert_if.py's super-res branch): efficient activations, 1/sqrt(2) skips, noise level.
_II_COMMON = dict(
  in_channels=6, out_channels=6, sample_size=256, class_embed_type="timestep",
  only_cross_attention=True, time_embedding_act_fn="gelu", resnet_skip_time_act=True,
  resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,
  layers_per_block=[2, 2, 3, 5, 5],
)  # fmt: skip


def _stage_i(width: int) -> dict:
  mult = (1, 2, 3, 4)
  return dict(
    _IF_COMMON, **_I_TYPES, in_channels=3, out_channels=6, sample_size=64, layers_per_block=3,
    block_out_channels=[width * m for m in mult], cross_attention_dim=width,
  )  # fmt: skip


def _stage_ii(width: int, mult: tuple[int, ...]) -> dict:
  return dict(
    _IF_COMMON, **_II_TYPES, **_II_COMMON, block_out_channels=[width * m for m in mult],
    cross_attention_dim=width * mult[-1], time_embedding_dim=width * mult[-1],
  )  # fmt: skip


_TINY = dict(
  _IF_COMMON, in_channels=3, out_channels=6, sample_size=32,
  layers_per_block=1, block_out_channels=[32, 64, 96],
  down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 2,
  up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"],
  attention_head_dim=16, cross_attention_dim=64, encoder_hid_dim=48,
  addition_embed_type_num_heads=4, norm_num_groups=16, time_embedding_act_fn="gelu",
  resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
)  # fmt: skip
PRESETS: dict[str, dict] = {
  "IF-I-XL": _stage_i(704),
  "IF-I-L": _stage_i(320),
  "IF-I-M": _stage_i(192),
  "IF-II-L": _stage_ii(192, (1, 2, 4, 6, 6)),
  "IF-II-M": _stage_ii(128, (1, 2, 4, 5, 5)),
  "tiny": _TINY,
  "tiny_sr": dict(
    _TINY,
    **_II_COMMON | dict(layers_per_block=[1, 2, 1], sample_size=32),
    time_embedding_dim=96,
    down_block_types=["ResnetDownsampleBlock2D"] * 2 + ["SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D"] + ["ResnetUpsampleBlock2D"] * 2,
  ),  # fmt: skip
}
