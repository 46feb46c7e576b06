"""Frozen U-Net hyper-parameters with the paper's presets (Imagen App. F.1, F.2, F.3).

A ``UNetConfig`` is built from ``config.model`` (an ml-collections ``ConfigDict`` holding a preset
name plus overrides) at the boundary, so the model never sees a ``ConfigDict``:

  cfg = UNetConfig.from_preset("sr256", dtype="bfloat16", remat="block")

Attention resolutions are given at the nominal ``image_size``, as in App. F.1, and mapped to U-Net
*levels*; the network therefore attends at the same levels for any input size divisible by
``total_downsampling`` (the 256->1024 model trains on 256² crops and samples at 1024², §2.5).

Choices the paper leaves open ([open] in ``shared/reference/imagen-paper.md``) are listed in each
preset's docstring and in ``imagen_jax/models/unet.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax import kernels

KINDS = ("base", "efficient")
_DTYPES = ("float32", "bfloat16", "float16")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@dataclasses.dataclass(frozen=True, slots=True)
class UNetConfig:
  """U-Net hyper-parameters; see the presets for paper values.

  Attributes:
    name: preset name, used in error messages.
    kind: ``"base"`` (ADM U-Net, App. F.1) or ``"efficient"`` (Efficient U-Net, App. B.1).
    image_size: nominal output resolution (inputs may be any size divisible by
      ``total_downsampling``).
    in_channels: channels of the noisy image ``x``.
    out_channels: channels of the prediction.
    lowres_cond: whether the model is a super-resolution stage conditioned on a low-res image and
      its noise-augmentation level (§2.4).
    lowres_size: nominal resolution of the low-res input (informational).
    model_channels: base width (ADM) or stem width (Efficient U-Net).
    channel_mult: per-level width multipliers of ``model_channels``.
    num_res_blocks: residual blocks per level (encoder side; ADM decoders use one more).
    attn_resolutions: resolutions (at ``image_size``) with image self-attention.
    cross_attn_resolutions: resolutions with text attention. Where both apply, the text sequence is
      concatenated to the self-attention keys/values (§2.5); text-only levels use plain
      cross-attention (App. F.3).
    num_heads: fixed number of heads (Efficient U-Net: 8); exclusive with ``head_dim``.
    head_dim: channels per head (ADM: 64); exclusive with ``num_heads``.
    attn_hidden_mult: attention width as a multiple of the block channels (App. B.1: 2).
    mid_attention: ADM middle block attention (base only).
    emb_dim: width of the conditioning vector (time + pooled text + aug level).
    text_dim: width of the text embeddings (T5-XXL: 4096).
    context_dim: width of the shared projection of the layer-normed text (per-layer K/V read it).
    pool_heads: heads of the attention pooling of the text.
    text_max_length: expected token count (informational; any length works with its mask).
    num_groups: GroupNorm groups.
    skip_scale: factor on the residual sum inside ResBlocks (1/√2 in Efficient U-Nets, App. B.1).
    long_skip_scale: factor on the encoder-to-decoder skips (Efficient U-Net only).
    decoder_skips: Efficient U-Net skip wiring: ``"block"`` adds each DBlock's output to the
      matching UBlock's input (Fig. A.29); ``"resblock"`` concatenates the output of every DBlock
      res block into the matching UBlock res block (imagen-pytorch ``memory_efficient``).
    dtype: compute dtype of activations (``"bfloat16"`` on accelerators).
    param_dtype: storage dtype of the weights (keep ``"float32"``).
    remat: ``"none"``, ``"block"`` (save nothing inside a block) or the name of a
      ``jax.checkpoint_policies`` entry, applied to every residual/attention block.
    attention_impl: attention kernel (:mod:`imagen_jax.kernels`): ``"auto"`` (by backend: cuDNN's
      fused kernel on GPUs where it applies, else XLA), ``"xla"`` (heads-major einsums, the CPU
      choice), ``"jax_xla"`` (``jax.nn.dot_product_attention``'s XLA version) or ``"cudnn"``
      (GPU, float16/bfloat16; raises where cuDNN cannot run). ``None`` is the older spelling of
      ``"xla"``.
    norm_impl: GroupNorm computation: ``"auto"`` (ours on CPU, flax's on GPU/TPU), ``"ours"``
      (per-channel statistics, ``layers.GroupNorm``) or ``"flax"`` (``nnx.GroupNorm``'s).
    patch_size: side of the non-overlapping patches the image (with the resized low-res input of
      SR stages) is folded into before the stem, and unfolded from after the output conv
      (space-to-depth, as in "simple diffusion", Hoogeboom et al. 2023): the network runs at
      ``image_size / patch_size``, every FLOP-heavy full-resolution layer goes away, and the
      prediction keeps full resolution. 1 = the paper's U-Nets. Level resolutions (and
      ``attn_resolutions``) count from the folded size.
    coord_channels: append the pixel coordinates (y, x in [-1, 1]) to the input as two extra
      channels (CoordConv, Liu et al. 2018). Convolutions are translation equivariant and learn
      absolute position only from the zero padding; with coordinates, captions that name a
      position ("at the top left") can read it from the input (on the shapes demo this did not
      measurably help by step 500). For stages that sample at their training size (not the
      crop-trained 1024² stage).
    attention_positions: F > 0 adds the absolute position of every query to the queries of
      each attention layer: F Fourier features of its coordinates (sin/cos at octave frequencies,
      ``layers.fourier_positions``) through a zero-initialised projection, so the layer starts
      unchanged. GroupNorm'd features carry position only weakly, and cross-attention then cannot
      tie a word ("left", "top") to a region. 0 (the paper) = off; a multiple of 4.
    output_prior: what the output is a correction to (``imagen_jax.models.unet.output_prior``):
      ``"none"`` (the paper: the output is the prediction), ``"gaussian"`` (the posterior mean of
      x0 under x0 ~ N(0, ``prior_var``) per pixel: EDM's σ_data preconditioning, Karras et al.
      2022, in VP form) or ``"lowres"`` (SR stages: the prior is centred on the upsampled low-res
      input, so an untrained SR stage already returns a denoised upsampling of it and training
      learns only the detail). Either way the output conv starts at zero, so the untrained model
      predicts the prior's posterior mean, and the output is in posterior-std units.
    prior_var: the prior's per-pixel variance: σ_data² of the images for ``"gaussian"``, the
      variance of the detail the low-res image lacks for ``"lowres"`` (images in [-1, 1]).
    prediction: what the output predicts, ``"eps"``, ``"v"`` or ``"x0"``: the stage's objective
      (set from it); ``output_prior`` needs it to express its estimate in those units.
    scan_blocks: store each run of identically built blocks (an Efficient U-Net level's res
      blocks; consecutive ADM units of one level with equal widths) stacked on a leading axis
      (``imagen_jax.models.stack``; MaxText's ``scan_layers``), so the optimizer, EMA and norms
      update one leaf per weight of a run instead of one per block, and apply each run as one
      ``jax.lax.scan`` (``scan_impl``). The paper's train steps compile 15-55% faster on CPU
      (bench/RESULTS.md "Compile time"). The same seed builds the same weights, stacked, and
      ``unet.with_scan_blocks`` converts a model between the layouts (checkpoints are saved in
      the layout of the config). Without ``remat``, a looped run keeps its per-block
      intermediates for the backward pass where XLA would otherwise fuse them away (+1.9-2.8
      GiB of temporaries for the SR presets at batch 2 on CPU; none with ``remat="block"``).
      With an attention controller, stacked ADM units run one by one, so every site is seen.
    scan_impl: how a stacked run is applied (:mod:`imagen_jax.kernels`, kind ``block_runs``):
      ``"auto"`` (by backend: unrolled on CPU, a loop on GPU/TPU), ``"loop"`` (``lax.scan``, one
      compiled block per run) or ``"unrolled"`` (the scan unrolled: N copies of the block, the
      speed of an unstacked model; the optimizer still sees one leaf per weight of a run).
  """

  name: str = "custom"
  kind: str = "base"
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3
  lowres_cond: bool = False
  lowres_size: int | None = None
  model_channels: int = 512
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: tuple[int, ...] = (3, 3, 3, 3)
  attn_resolutions: tuple[int, ...] = (32, 16, 8)
  cross_attn_resolutions: tuple[int, ...] = (32, 16, 8)
  num_heads: int | None = None
  head_dim: int | None = 64
  attn_hidden_mult: int = 1
  mid_attention: bool = True
  emb_dim: int = 2048
  text_dim: int = 4096
  context_dim: int = 1024
  pool_heads: int = 8
  text_max_length: int = 128
  num_groups: int = 32
  skip_scale: float = 1.0
  long_skip_scale: float = 1.0
  decoder_skips: str = "block"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str | None = "auto"
  norm_impl: str = "auto"
  patch_size: int = 1
  coord_channels: bool = False
  attention_positions: int = 0
  output_prior: str = "none"
  prior_var: float = 0.05
  prediction: str = "eps"
  scan_blocks: bool = False
  scan_impl: str = "auto"

  def __post_init__(self) -> None:
    self._validate()

  # ----------------------------------------------------------------------------------------------
  # Presets.

  @classmethod
  def base64(cls, **overrides: Any) -> UNetConfig:
    """Base 64² text-to-image U-Net, App. F.1 (paper: 2B params).

    Paper values: 512 channels, mult [1,2,3,4], 3 res blocks, attention + text cross-attention at
    32/16/8 with 64 channels per head, BigGAN res blocks with scale-shift norm, attention pooling.
    [open] choices: ADM embedding width 4×512 = 2048; T5-XXL (4096) is layer-normed and projected
    once to a shared 1024-wide context that every attention layer reads its text K/V from (per-layer
    4096-wide projections alone would add ~0.3B and overshoot 2B, shared-reference §9); ADM middle
    block with attention; text length 128.
    """
    return cls._make(
      dict(
        name="base64",
        kind="base",
        image_size=64,
        model_channels=512,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=(3, 3, 3, 3),
        attn_resolutions=(32, 16, 8),
        cross_attn_resolutions=(32, 16, 8),
        head_dim=64,
        emb_dim=2048,
        context_dim=1024,
      ),
      overrides,
    )

  @classmethod
  def sr256(cls, **overrides: Any) -> UNetConfig:
    """64²->256² Efficient U-Net, App. F.2 (paper: 600M params).

    Paper values: blocks of 128/256/512/1024 channels with 2/4/8/8 res blocks, stride 2 each,
    downsampling before the convs (DBlock) and upsampling after them (UBlock), self-attention with
    the text concatenated to its keys/values in the last block (8 heads, hidden 2×channels), skip
    connections scaled by 1/√2, scale-shift norm, attention pooling.
    [open] choices: stem width 128 at full resolution, added back before the output conv; every
    ResBlock reads a 512-wide (4×128, ADM convention) conditioning vector through scale-shift norm
    (IF-style CombineEmbs); ResBlock sums scaled by 1/√2 (IF ``resnet_out_scale_factor``); the
    output of every DBlock res block is concatenated (×1/√2) into the matching UBlock res block
    (imagen-pytorch ``memory_efficient``/``scale_skip_connection``); nearest-neighbour upsampling
    then the UBlock conv; text projected once to a 512-wide context.
    """
    return cls._make(
      dict(
        name="sr256",
        kind="efficient",
        image_size=256,
        lowres_cond=True,
        lowres_size=64,
        model_channels=128,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=(2, 4, 8, 8),
        attn_resolutions=(16,),
        cross_attn_resolutions=(16,),
        num_heads=8,
        head_dim=None,
        attn_hidden_mult=2,
        mid_attention=False,
        emb_dim=512,
        context_dim=512,
        skip_scale=_INV_SQRT2,
        long_skip_scale=_INV_SQRT2,
        decoder_skips="resblock",
      ),
      overrides,
    )

  @classmethod
  def sr1024(cls, **overrides: Any) -> UNetConfig:
    """256²->1024² Efficient U-Net, App. F.3 (paper: 400M params).

    Same blocks as ``sr256`` but no self-attention: explicit text cross-attention only in the last
    block (§2.5: self-attention removed so the model trains on 64->256 crops and samples at 1024²).
    The 1024 level list means the same *level* (16² on a 256² crop, 64² at 1024²).
    [open] choices: as ``sr256``, except the skip wiring: one skip per UBlock, the DBlock output
    added (×1/√2) at the UBlock input, the literal reading of Fig. A.29, which also stores fewer
    activations at 1024². F.2 and F.3 list the same blocks yet 600M vs 400M params; the skip wiring
    is where this implementation puts the difference (per-res-block skips add ~120M).
    """
    return cls._make(
      dict(
        name="sr1024",
        kind="efficient",
        image_size=1024,
        lowres_cond=True,
        lowres_size=256,
        model_channels=128,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=(2, 4, 8, 8),
        attn_resolutions=(),
        cross_attn_resolutions=(64,),
        num_heads=8,
        head_dim=None,
        attn_hidden_mult=2,
        mid_attention=False,
        emb_dim=512,
        context_dim=512,
        skip_scale=_INV_SQRT2,
        long_skip_scale=_INV_SQRT2,
        decoder_skips="block",
      ),
      overrides,
    )

  @classmethod
  def tiny_base(cls, **overrides: Any) -> UNetConfig:
    """CPU-sized base U-Net at 32² (same code paths as ``base64``)."""
    return cls._make(
      dict(
        name="tiny_base",
        kind="base",
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        attn_resolutions=(16,),
        cross_attn_resolutions=(16,),
        head_dim=16,
        emb_dim=64,
        text_dim=32,
        context_dim=32,
        pool_heads=2,
        text_max_length=16,
        num_groups=8,
      ),
      overrides,
    )

  @classmethod
  def tiny_sr(cls, **overrides: Any) -> UNetConfig:
    """CPU-sized 16²->64² Efficient U-Net with self + text attention (``sr256`` paths)."""
    return cls._make(
      dict(
        name="tiny_sr",
        kind="efficient",
        image_size=64,
        lowres_cond=True,
        lowres_size=16,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=(1, 1, 2),
        attn_resolutions=(8,),
        cross_attn_resolutions=(8,),
        num_heads=2,
        head_dim=None,
        attn_hidden_mult=2,
        mid_attention=False,
        emb_dim=64,
        text_dim=32,
        context_dim=32,
        pool_heads=2,
        text_max_length=16,
        num_groups=8,
        skip_scale=_INV_SQRT2,
        long_skip_scale=_INV_SQRT2,
        decoder_skips="resblock",
      ),
      overrides,
    )

  @classmethod
  def tiny_sr1024(cls, **overrides: Any) -> UNetConfig:
    """CPU-sized 16²->64² Efficient U-Net without self-attention (``sr1024`` paths)."""
    return cls.tiny_sr(
      **{
        "name": "tiny_sr1024",
        "attn_resolutions": (),
        "decoder_skips": "block",
        **overrides,
      }
    )

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> UNetConfig:
    """Builds preset ``name`` with field ``overrides`` (lists become tuples, for ConfigDicts)."""
    if name not in PRESETS:
      raise ValueError(f"Unknown U-Net preset {name!r}; known presets: {', '.join(PRESETS)}")
    return getattr(cls, name)(**overrides)

  @classmethod
  def _make(cls, fields: dict[str, Any], overrides: dict[str, Any]) -> UNetConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"Unknown UNetConfig field(s) {unknown} for preset {fields.get('name')!r}")
    merged = {**fields, **overrides}
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    return cls(**merged)

  # ----------------------------------------------------------------------------------------------
  # Derived quantities.

  @property
  def num_levels(self) -> int:
    return len(self.channel_mult)

  @property
  def channels(self) -> tuple[int, ...]:
    """Width of each level."""
    return tuple(self.model_channels * m for m in self.channel_mult)

  @property
  def level_downsampling(self) -> tuple[int, ...]:
    """Downsampling factor of each level. Efficient U-Net DBlocks downsample first (App. B.1)."""
    first = (1 if self.kind == "base" else 2) * self.patch_size
    return tuple(first * 2**i for i in range(self.num_levels))

  @property
  def total_downsampling(self) -> int:
    """Image height and width must be divisible by this."""
    return self.level_downsampling[-1]

  def _levels_of(self, resolutions: tuple[int, ...]) -> tuple[bool, ...]:
    factors = {self.image_size // r for r in resolutions}
    return tuple(f in factors for f in self.level_downsampling)

  @property
  def self_attn_levels(self) -> tuple[bool, ...]:
    return self._levels_of(self.attn_resolutions)

  @property
  def cross_attn_levels(self) -> tuple[bool, ...]:
    return self._levels_of(self.cross_attn_resolutions)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def remat_policy(self) -> Any:
    """See :func:`remat_policy`."""
    return remat_policy(self.remat)

  def heads_for(self, channels: int) -> tuple[int, int]:
    """(num_heads, head_dim) of an attention layer on ``channels`` block channels."""
    hidden = channels * self.attn_hidden_mult
    if self.num_heads is not None:
      return self.num_heads, hidden // self.num_heads
    return hidden // self.head_dim, self.head_dim

  # ----------------------------------------------------------------------------------------------

  def _validate(self) -> None:
    err = f"UNetConfig {self.name!r}"
    if self.kind not in KINDS:
      raise ValueError(f"{err}: kind must be one of {KINDS}, got {self.kind!r}")
    if len(self.channel_mult) != len(self.num_res_blocks):
      raise ValueError(f"{err}: channel_mult and num_res_blocks need one entry per level")
    if not isinstance(self.patch_size, int) or self.patch_size < 1:
      raise ValueError(f"{err}: patch_size must be an integer >= 1, got {self.patch_size!r}")
    if self.image_size % self.total_downsampling:
      raise ValueError(
        f"{err}: image_size {self.image_size} not divisible by {self.total_downsampling}"
      )
    for field in ("attn_resolutions", "cross_attn_resolutions"):
      level_res = [self.image_size // f for f in self.level_downsampling]
      bad = [r for r in getattr(self, field) if r not in level_res]
      if bad:
        raise ValueError(f"{err}: {field} {bad} are not level resolutions {level_res}")
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError(f"{err}: set exactly one of num_heads and head_dim")
    for c in self.channels:
      heads, dim = self.heads_for(c)
      if heads * dim != c * self.attn_hidden_mult or c % self.num_groups:
        raise ValueError(f"{err}: width {c} incompatible with heads/head_dim/num_groups")
    if self.dtype not in _DTYPES or self.param_dtype not in _DTYPES:
      raise ValueError(f"{err}: dtype/param_dtype must be in {_DTYPES}")
    if self.remat not in ("none", "block") and not hasattr(jax.checkpoint_policies, self.remat):
      raise ValueError(f"{err}: remat must be 'none', 'block' or a jax.checkpoint_policies name")
    if self.decoder_skips not in ("block", "resblock"):
      raise ValueError(f"{err}: decoder_skips must be 'block' or 'resblock'")
    if self.attention_impl is not None:
      kernels.check_choice("attention", self.attention_impl, f"{err}: attention_impl")
    kernels.check_choice("norm", self.norm_impl, f"{err}: norm_impl")
    kernels.check_choice("block_runs", self.scan_impl, f"{err}: scan_impl")
    if self.prediction not in ("eps", "v", "x0"):
      raise ValueError(f"{err}: prediction must be 'eps', 'v' or 'x0', got {self.prediction!r}")
    ap = self.attention_positions
    if isinstance(ap, bool) or not isinstance(ap, int) or ap < 0 or ap % 4:
      raise ValueError(
        f"{err}: attention_positions must be 0 (off) or a positive multiple of 4, got {ap!r}"
      )
    if not isinstance(self.scan_blocks, bool):
      raise ValueError(f"{err}: scan_blocks must be True or False, got {self.scan_blocks!r}")
    if self.output_prior not in OUTPUT_PRIORS:
      raise ValueError(
        f"{err}: output_prior must be one of {OUTPUT_PRIORS}, got {self.output_prior!r}"
      )
    if self.output_prior == "lowres" and not self.lowres_cond:
      raise ValueError(
        f"{err}: output_prior='lowres' needs a super-resolution model (lowres_cond=True); a base "
        "stage has no low-res image to centre the prior on (use 'gaussian')"
      )
    if not self.prior_var > 0:
      raise ValueError(f"{err}: prior_var must be > 0, got {self.prior_var!r}")


OUTPUT_PRIORS = ("none", "gaussian", "lowres")
PRESETS = ("base64", "sr256", "sr1024", "tiny_base", "tiny_sr", "tiny_sr1024")


def remat_policy(remat: str) -> Any:
  """The ``jax.checkpoint`` policy of a ``remat`` setting: ``None`` for ``"none"`` and
  ``"block"`` (save nothing inside a block), else the named ``jax.checkpoint_policies`` entry."""
  return None if remat in ("none", "block") else getattr(jax.checkpoint_policies, remat)
