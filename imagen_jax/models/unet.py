"""Imagen U-Nets: the ADM base U-Net (App. F.1) and the Efficient U-Net (App. B.1, F.2, F.3).

One NNX module, :class:`UNet`, builds either variant from a :class:`UNetConfig`; use it as a pure
function with ``graphdef, state = nnx.split(model)`` and ``nnx.merge(graphdef, state)(...)`` inside
``jax.jit``. Both variants share the conditioning path:

* time: log-SNR λ (continuous time, §2.2) -> sinusoidal embedding of a scaled λ -> MLP;
* text: T5 embeddings -> LayerNorm -> shared projection -> (a) per-layer K/V concatenated to the
  self-attention keys/values, or plain cross-attention where there is no self-attention; (b) an
  attention-pooled vector added to the time embedding (§2.5);
* SR stages: the low-res image is resized to the output size (bilinear; upsampling, so antialiasing
  does not apply) and concatenated to ``x`` (SR3/CDM); the noise-augmentation level, as a log-SNR,
  gets the same sinusoidal embedding and its own MLP, added to the conditioning vector (§2.4).

Null condition for classifier-free guidance (§4.1 zeroes the text): ``text_emb = 0`` with an
all-false ``text_mask``. Self-attention keys are always present, the pooled query token is always a
valid key, and text-only cross-attention outputs zero when no token is valid, so it is well defined.

[open] choices of the Efficient U-Net (paper silent, see the presets): the stem is a 3×3 conv at
full resolution whose output is added (×``long_skip_scale``) to the last UBlock's output before the
output GroupNorm/SiLU/conv; the UBlock upsampling is nearest ×2 followed by its 3×3 conv.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import kernels
from imagen_jax.models.attention_control import AttentionController
from imagen_jax.models.layers import (
  ACT_BHWC,
  Attention,
  LogSNREmbedding,
  ResBlock,
  TextConditioner,
  conv,
  group_norm,
  pixel_coordinates,
  upsample,
)
from imagen_jax.models.stack import Stack
from imagen_jax.models.unet_config import UNetConfig, remat_policy
from imagen_jax.sharding import constrain


def _apply(module: nnx.Module, *args: jax.Array) -> jax.Array:
  return module(*args)


class _Blocks:
  """Shared per-block helpers: remat per ResBlock/attention call, as the config asks, and the
  scan over a stacked run of identical blocks (``UNetConfig.scan_blocks``)."""

  remat: str
  scan_impl: str  # kernels kind "block_runs"

  def _res(self, block: ResBlock, h: jax.Array, emb: jax.Array) -> jax.Array:
    if self.remat == "none":
      return block(h, emb)
    return nnx.remat(_apply, policy=remat_policy(self.remat))(block, h, emb)

  def _attn(self, attn: Attention | None, h: jax.Array, cond: dict, ctrl) -> jax.Array:
    if attn is None:
      return h
    args = (h, cond["ctx"], cond["mask"], cond["has_text"])
    if ctrl is not None or self.remat == "none":  # recorded values cannot leave a remat'd block
      return attn(*args, ctrl)
    return nnx.remat(_apply, policy=remat_policy(self.remat))(attn, *args)

  def _scan_run(self, stack: Stack, step, h, xs=None, collect: bool = False):
    """A stacked run as one scan (``UNetConfig.scan_blocks``); ``remat`` checkpoints each block."""
    remat, policy = self.remat != "none", remat_policy(self.remat)
    unroll = kernels.resolve("block_runs", self.scan_impl, field="scan_impl") == "unrolled"
    return stack.scan(step, h, xs, collect=collect, remat=remat, policy=policy, unroll=unroll)


def _blocks(scan: bool, blocks: list[ResBlock]) -> nnx.List | Stack:
  """An Efficient U-Net level's res blocks: stacked when ``scan`` (and N > 1)."""
  return Stack(blocks) if scan and len(blocks) > 1 else nnx.List(blocks)


def _group_units(scan: bool, units: list[_Unit], runs: tuple[tuple[int, int], ...]) -> nnx.List:
  """ADM units in order; with ``scan`` each run (``[start, stop)``, N > 1) becomes a Stack
  labelled with its members' attention sites."""
  if not scan:
    return nnx.List(units)
  items = []
  for start, stop in runs:
    run = units[start:stop]
    if len(run) == 1:
      items.append(run[0])
    else:
      items.append(Stack(run, labels=[u.attn.site if u.attn is not None else None for u in run]))
  return nnx.List(items)


def _units(item: nnx.Module) -> list[nnx.Module]:
  """The modules of a list item; a Stack's members each get their own attention site back."""
  return _members(item) if isinstance(item, Stack) else [item]


def _runs(keys: list) -> tuple[tuple[int, int], ...]:
  """``[start, stop)`` ranges of consecutive equal keys: the runs of identically built units."""
  runs, start = [], 0
  for i in range(1, len(keys) + 1):
    if i == len(keys) or keys[i] != keys[start]:
      runs.append((start, i))
      start = i
  return tuple(runs)


def _res_kw(cfg: UNetConfig, kw: dict) -> dict:
  """ResBlock keyword arguments shared by every block of ``cfg``."""
  return dict(num_groups=cfg.num_groups, skip_scale=cfg.skip_scale, norm_impl=cfg.norm_impl, **kw)


def _attention(cfg: UNetConfig, channels: int, level: int, site: str, kw: dict) -> Attention | None:
  self_attn, cross = cfg.self_attn_levels[level], cfg.cross_attn_levels[level]
  if not (self_attn or cross):
    return None
  heads, head_dim = cfg.heads_for(channels)
  return Attention(
    channels,
    num_heads=heads,
    head_dim=head_dim,
    context_dim=cfg.context_dim if cross else None,
    self_attention=self_attn,
    num_groups=cfg.num_groups,
    site=site,
    impl=cfg.attention_impl,
    norm_impl=cfg.norm_impl,
    position_features=cfg.attention_positions,
    **kw,
  )


class _Unit(nnx.Module, _Blocks):
  """ADM block: ResBlock, optional attention, optional BigGAN up-sampling ResBlock."""

  def __init__(self, res: ResBlock, attn: Attention | None, post: ResBlock | None, remat: str):
    self.res, self.attn, self.post, self.remat = res, attn, post, remat

  def __call__(self, h, emb, cond, ctrl):
    h = self._attn(self.attn, self._res(self.res, h, emb), cond, ctrl)
    return self._res(self.post, h, emb) if self.post is not None else h

  def plain(self, h, emb, cond):
    """The unit without remat or controller: the body of a scanned run."""
    h = self.res(h, emb)
    if self.attn is not None:
      h = self.attn(h, cond["ctx"], cond["mask"], cond["has_text"])
    return self.post(h, emb) if self.post is not None else h


class DBlock(nnx.Module, _Blocks):
  """Efficient U-Net DBlock (Fig. A.28): strided conv *first*, then ResBlocks, then attention."""

  def __init__(self, cfg: UNetConfig, level: int, in_ch: int, kw: dict):
    ch = cfg.channels[level]
    self.remat, self.scan_impl = cfg.remat, cfg.scan_impl
    self.keep_hiddens = cfg.decoder_skips == "resblock"  # only those skips read them
    self.down = conv(in_ch, ch, 3, stride=2, **kw)
    rb = _res_kw(cfg, kw)
    n = cfg.num_res_blocks[level]
    self.res = _blocks(cfg.scan_blocks, [ResBlock(ch, ch, cfg.emb_dim, **rb) for _ in range(n)])
    self.attn = _attention(cfg, ch, level, f"down.{level}.attn", kw)

  def __call__(self, h, emb, cond, ctrl) -> tuple[jax.Array, list[jax.Array] | jax.Array]:
    """Returns the block output and its res blocks' outputs (a list, or ``[N, B, H, W, C]``
    stacked when scanned; empty when the decoder does not read them)."""
    h = constrain(self.down(h), ACT_BHWC)  # [B, H/2, W/2, C]: downsample before the convs (B.1)
    if isinstance(self.res, Stack):
      step = lambda block, h, _: block(h, emb)
      h, hiddens = self._scan_run(self.res, step, h, collect=self.keep_hiddens)
    else:
      hiddens = []
      for block in self.res:
        h = self._res(block, h, emb)
        hiddens.append(h)
    h = self._attn(self.attn, h, cond, ctrl)
    return h, (hiddens if self.keep_hiddens else [])


class UBlock(nnx.Module, _Blocks):
  """Efficient U-Net UBlock (Fig. A.29): skip, ResBlocks, attention, then upsampling *last*."""

  def __init__(self, cfg: UNetConfig, level: int, out_ch: int, kw: dict):
    ch = cfg.channels[level]
    self.remat, self.skip_mode, self.skip_scale = cfg.remat, cfg.decoder_skips, cfg.long_skip_scale
    self.scan_impl = cfg.scan_impl
    in_ch = 2 * ch if cfg.decoder_skips == "resblock" else ch
    rb = _res_kw(cfg, kw)
    n = cfg.num_res_blocks[level]
    self.res = _blocks(cfg.scan_blocks, [ResBlock(in_ch, ch, cfg.emb_dim, **rb) for _ in range(n)])
    self.attn = _attention(cfg, ch, level, f"up.{level}.attn", kw)
    self.up = conv(ch, out_ch, 3, **kw)

  def __call__(self, h, skip, hiddens, emb, cond, ctrl) -> jax.Array:
    scale = jnp.asarray(self.skip_scale, h.dtype)
    if self.skip_mode == "block":
      h = (h + skip.astype(h.dtype)) * scale  # skip connections scaled by 1/√2 (B.1)
    resblock_skips = self.skip_mode == "resblock"

    def join(h, hid):  # [B, H, W, 2C]: with the matching DBlock res block's output
      return jnp.concatenate([h, hid.astype(h.dtype) * scale], axis=-1) if resblock_skips else h

    skips = hiddens[::-1] if resblock_skips else None  # deepest res block's output first
    if isinstance(self.res, Stack):
      step = lambda block, h, hid: block(join(h, hid), emb)
      h, _ = self._scan_run(self.res, step, h, skips)
    else:
      for i, block in enumerate(self.res):
        h = self._res(block, join(h, skips[i] if resblock_skips else None), emb)
    h = self._attn(self.attn, h, cond, ctrl)
    return constrain(self.up(upsample(h)), ACT_BHWC)  # [B, 2H, 2W, C']: upsample after (B.1)


class UNet(nnx.Module, _Blocks):
  """Imagen U-Net (``kind="base"``: ADM, App. F.1; ``kind="efficient"``: App. B.1)."""

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    self.remat, self.scan_impl = cfg.remat, cfg.scan_impl
    kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    mc = cfg.model_channels
    self.time_embed = LogSNREmbedding(mc, cfg.emb_dim, **kw)
    self.aug_embed = LogSNREmbedding(mc, cfg.emb_dim, **kw) if cfg.lowres_cond else None
    self.text = TextConditioner(cfg.text_dim, cfg.context_dim, cfg.emb_dim, cfg.pool_heads, **kw)
    p2 = cfg.patch_size**2  # channels per folded pixel
    in_ch = (cfg.in_channels * (2 if cfg.lowres_cond else 1) + 2 * cfg.coord_channels) * p2
    self.stem = conv(in_ch, mc, 3, **kw)
    if cfg.kind == "base":
      self._build_adm(cfg, kw)
    else:
      self._build_efficient(cfg, kw)
    self.out_norm = group_norm(
      mc, cfg.num_groups, rngs=rngs, param_dtype=cfg.weight_dtype, impl=cfg.norm_impl
    )
    self.out_conv = conv(mc, cfg.out_channels * p2, 3, zero=True, **kw)

  # ----------------------------------------------------------------------------------------------
  # Construction.

  def _build_adm(self, cfg: UNetConfig, kw: dict) -> None:
    rb = _res_kw(cfg, kw)
    ch, chans, down = cfg.model_channels, [cfg.model_channels], []
    # Each unit's structure key: consecutive units with equal keys form a run (scan_blocks).
    down_keys, up_keys = [], []
    for level, width in enumerate(cfg.channels):
      for _ in range(cfg.num_res_blocks[level]):
        attn = _attention(cfg, width, level, f"down.{len(down)}.attn", kw)
        down.append(_Unit(ResBlock(ch, width, cfg.emb_dim, **rb), attn, None, cfg.remat))
        down_keys.append((level, ch, width))
        ch = width
        chans.append(ch)
      if level != cfg.num_levels - 1:  # BigGAN downsampling ResBlock
        res = ResBlock(ch, ch, cfg.emb_dim, resample="down", **rb)
        down.append(_Unit(res, None, None, cfg.remat))
        down_keys.append((level, "down"))
        chans.append(ch)
    self.down_runs = _runs(down_keys)
    self.down = _group_units(cfg.scan_blocks, down, self.down_runs)
    self.mid_res1 = ResBlock(ch, ch, cfg.emb_dim, **rb)
    # ADM/GLIDE middle block: self-attention, with the text when the deepest level has it.
    heads, head_dim = cfg.heads_for(ch)
    mid_ctx = cfg.context_dim if cfg.cross_attn_levels[-1] else None
    self.mid_attn = (
      Attention(
        ch,
        num_heads=heads,
        head_dim=head_dim,
        context_dim=mid_ctx,
        num_groups=cfg.num_groups,
        site="mid.attn",
        impl=cfg.attention_impl,
        norm_impl=cfg.norm_impl,
        **kw,
      )
      if cfg.mid_attention
      else None
    )
    self.mid_res2 = ResBlock(ch, ch, cfg.emb_dim, **rb)
    up = []
    for level in reversed(range(cfg.num_levels)):
      width = cfg.channels[level]
      for j in range(cfg.num_res_blocks[level] + 1):
        in_ch = ch + chans.pop()
        res = ResBlock(in_ch, width, cfg.emb_dim, **rb)
        attn = _attention(cfg, width, level, f"up.{len(up)}.attn", kw)
        last = level and j == cfg.num_res_blocks[level]
        post = ResBlock(width, width, cfg.emb_dim, resample="up", **rb) if last else None
        up.append(_Unit(res, attn, post, cfg.remat))
        up_keys.append((level, in_ch, width, bool(last)))
        ch = width
    self.up_runs = _runs(up_keys)
    self.up = _group_units(cfg.scan_blocks, up, self.up_runs)

  def _build_efficient(self, cfg: UNetConfig, kw: dict) -> None:
    widths = (cfg.model_channels, *cfg.channels)
    self.dblocks = nnx.List([DBlock(cfg, i, widths[i], kw) for i in range(cfg.num_levels)])
    # Deepest first, in execution order.
    self.ublocks = nnx.List(
      [UBlock(cfg, i, widths[i], kw) for i in reversed(range(cfg.num_levels))]
    )

  # ----------------------------------------------------------------------------------------------
  # Forward.

  def __call__(
    self,
    x: jax.Array,
    logsnr: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    *,
    lowres: jax.Array | None = None,
    aug_logsnr: jax.Array | None = None,
    controller: AttentionController | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Predicts ε (or whatever target the diffusion core trains) for the noisy image ``x``.

    Args:
      x: noisy image ``[B, H, W, in_channels]``; H, W divisible by ``total_downsampling``.
      logsnr: log-SNR λ of ``x`` ``[B]`` (continuous time).
      text_emb: T5 embeddings ``[B, L, text_dim]``; zeros with an all-false mask = null condition.
      text_mask: ``[B, L]`` bool, True for real tokens. Padding has no effect on the output.
      lowres: SR stages only: the (noise-augmented) low-res image ``[B, h, w, in_channels]``,
        resized here to H×W.
      aug_logsnr: SR stages only: its noise-augmentation level as a log-SNR ``[B]`` (use
        ``LOGSNR_MAX`` = 20 for no augmentation).
      controller: optional :class:`AttentionController`; see ``attention_control``.

    Returns:
      ``[B, H, W, out_channels]`` float32, or ``(out, controller.outputs())`` with a controller.
    """
    cfg = self.config
    self._check_inputs(x, logsnr, text_emb, text_mask, lowres, aug_logsnr)
    dtype = cfg.compute_dtype
    z = x  # [B, H, W, C]: the noisy image, for the output prior
    ctx, pooled = self.text(text_emb, text_mask)  # [B, L, Dc], [B, E]
    cond = dict(ctx=ctx, mask=text_mask, has_text=text_mask.any(axis=-1))
    emb = self.time_embed(logsnr) + pooled  # pooled text added to the time embedding (§2.5)
    if cfg.lowres_cond:
      b, hgt, wid, c = x.shape
      if lowres.shape[1:3] != (hgt, wid):
        lowres = jax.image.resize(lowres.astype(jnp.float32), (b, hgt, wid, c), "bilinear")
      x = jnp.concatenate([x.astype(dtype), lowres.astype(dtype)], axis=-1)  # [B, H, W, 2C]
      emb = emb + self.aug_embed(aug_logsnr)
    x = x.astype(dtype)
    if cfg.coord_channels:
      x = jnp.concatenate([x, coordinates(x.shape, dtype)], axis=-1)  # [B, H, W, C + 2]
    x = space_to_depth(x, cfg.patch_size)  # [B, H/p, W/p, p²·C]
    h = constrain(self.stem(x), ACT_BHWC)  # [B, H/p, W/p, mc]
    if cfg.kind == "base":
      h = self._forward_adm(h, emb, cond, controller)
    else:
      h = self._forward_efficient(h, emb, cond, controller)
    h = jax.nn.silu(self.out_norm(h)).astype(dtype)
    out = self.out_conv(h).astype(jnp.float32)  # [B, H/p, W/p, p²·out_channels]
    out = depth_to_space(out, cfg.patch_size)  # [B, H, W, out_channels]
    if cfg.output_prior != "none":
      mean, aug = (lowres, aug_logsnr) if cfg.output_prior == "lowres" else (None, None)
      out = output_prior(out, z, logsnr, cfg.prediction, cfg.prior_var, mean=mean, aug_logsnr=aug)
    return out if controller is None else (out, controller.outputs())

  def _forward_adm(self, h, emb, cond, ctrl) -> jax.Array:
    hs = [h]
    for item in self.down:
      if isinstance(item, Stack) and ctrl is None:
        step = lambda unit, h, _: unit.plain(h, emb, cond)
        h, outs = self._scan_run(item, step, h, collect=True)  # outs: [N, B, H, W, C]
        hs.extend(outs[i] for i in range(item.size))
        continue
      for unit in _units(item):
        h = unit(h, emb, cond, ctrl)
        hs.append(h)
    h = self._res(self.mid_res1, h, emb)
    h = self._attn(self.mid_attn, h, cond, ctrl)
    h = self._res(self.mid_res2, h, emb)
    for item in self.up:
      n = item.size if isinstance(item, Stack) else 1
      skips = [hs.pop() for _ in range(n)]  # ADM concatenates the encoder's outputs, last first
      if isinstance(item, Stack) and ctrl is None:
        step = lambda unit, h, skip: unit.plain(jnp.concatenate([h, skip], -1), emb, cond)
        h, _ = self._scan_run(item, step, h, jnp.stack(skips))  # [N, B, H, W, C'] skips
        continue
      # A controller reads each attention site: a stack's units then run one by one.
      for unit, skip in zip(_units(item), skips):
        h = unit(jnp.concatenate([h, skip], axis=-1), emb, cond, ctrl)
    return h

  def _forward_efficient(self, h, emb, cond, ctrl) -> jax.Array:
    stem, skips = h, []
    for block in self.dblocks:
      h, hiddens = block(h, emb, cond, ctrl)
      skips.append((h, hiddens))
    for block in self.ublocks:
      skip, hiddens = skips.pop()
      h = block(h, skip, hiddens, emb, cond, ctrl)
    return (h + stem) * jnp.asarray(self.config.long_skip_scale, h.dtype)

  # ----------------------------------------------------------------------------------------------
  # Introspection and input checks.

  def attention_sites(self) -> list[str]:
    """Names of the attention layers that see text (the controller ``site`` names)."""
    stacks = [(path, m) for path, m in nnx.iter_graph(self) if isinstance(m, Stack)]
    sites = []
    for path, m in nnx.iter_graph(self):
      stacked = [s for p, s in stacks if path[: len(p)] == p]
      if not isinstance(m, Attention) or m.context_kv is None:
        continue
      # A stack's template holds the one attention layer of all its members.
      sites.extend(stacked[0].labels if stacked else [m.site])
    return sites

  def _check_inputs(self, x, logsnr, text_emb, text_mask, lowres, aug_logsnr) -> None:
    """Static shape checks with clear errors, raised at trace time before anything is lowered."""
    cfg = self.config
    name, c, d = cfg.name, cfg.in_channels, cfg.total_downsampling
    if x.ndim != 4 or x.shape[-1] != c:
      raise ValueError(f"U-Net preset {name!r}: x must be [B, H, W, {c}] (NHWC), got {x.shape}")
    b, hgt, wid, _ = x.shape
    if hgt % d or wid % d:
      raise ValueError(
        f"U-Net preset {name!r}: image size {hgt}x{wid} must be divisible by the total "
        f"downsampling {d} (e.g. [B, {cfg.image_size}, {cfg.image_size}, {c}])"
      )
    if logsnr.shape != (b,):
      raise ValueError(f"U-Net preset {name!r}: logsnr must be [{b}], got {logsnr.shape}")
    if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[-1] != cfg.text_dim:
      raise ValueError(
        f"U-Net preset {name!r}: text_emb must be [{b}, L, {cfg.text_dim}], got {text_emb.shape}"
      )
    if text_mask.shape != text_emb.shape[:2] or text_mask.dtype != jnp.bool_:
      raise ValueError(
        f"U-Net preset {name!r}: text_mask must be bool [{b}, {text_emb.shape[1]}], got "
        f"{text_mask.dtype}{list(text_mask.shape)}"
      )
    if not cfg.lowres_cond:
      if lowres is not None or aug_logsnr is not None:
        raise ValueError(f"U-Net preset {name!r} is not a super-resolution model: no lowres")
      return
    lr = cfg.lowres_size or "h"
    if lowres is None or lowres.ndim != 4 or lowres.shape[0] != b or lowres.shape[-1] != c:
      got = None if lowres is None else lowres.shape
      raise ValueError(
        f"U-Net preset {name!r} is a super-resolution model: lowres must be [{b}, {lr}, {lr}, {c}],"
        f" got {got}"
      )
    if aug_logsnr is None or aug_logsnr.shape != (b,):
      got = None if aug_logsnr is None else aug_logsnr.shape
      raise ValueError(
        f"U-Net preset {name!r}: aug_logsnr (noise-augmentation level as log-SNR) must be [{b}], "
        f"got {got}"
      )


def output_prior(
  out: jax.Array,
  z: jax.Array,
  logsnr: jax.Array,
  prediction: str,
  prior_var: float,
  *,
  mean: jax.Array | None = None,
  aug_logsnr: jax.Array | None = None,
) -> jax.Array:
  """The network output ``out`` as a correction to the Gaussian posterior mean of x0.

  Per pixel the prior is x0 ~ N(m, s²): m = 0 and s² = ``prior_var`` (σ_data²), or, for SR
  stages, m = α_a·up and s² = ``prior_var`` + σ_a², centred on the upsampled low-res image ``up``
  noised to the augmentation level a (z_a = α_a x + σ_a ε, whose linear estimate is α_a z_a).
  Given z = α x0 + σ ε (α² + σ² = 1):

    x̂0 = m + k (z − α m),         k = α s² / D,   D = α² s² + σ²   (the posterior mean)
    x̂0 += c F,                    c = s σ / √D                     (F in posterior-std units)

  so F = 0 is already the Wiener estimate (m at high noise, z/α at low noise); with m = 0 this is
  EDM's σ_data preconditioning in VP form. Expressed as the stage's prediction, in forms that
  stay finite as σ → 0:

    ε̂ = (z − α x̂0)/σ = σ (z − α m)/D − (α s/√D) F
    v̂ = (α z − x̂0)/σ = σ (α (1 − s²) z − m)/D − (s/√D) F

  Args:
    out: the network's output F ``[B, H, W, C]``.
    z: the noisy image ``[B, H, W, C]``.
    logsnr: λ of ``z`` ``[B]``.
    prediction: ``"eps"``, ``"v"`` or ``"x0"``.
    prior_var: the prior's variance (before augmentation), s0².
    mean: the noise-augmented low-res image resized to ``[B, H, W, C]``, or ``None`` (m = 0).
    aug_logsnr: λ of its augmentation ``[B]`` (with ``mean``).

  Returns:
    The prediction ``[B, H, W, C]`` float32.
  """
  f32 = jnp.float32
  # α, σ inline: models sit beside diffusion (one layer), so diffusion.alpha_sigma is not imported.

  def per_image(v):  # [B] -> [B, 1, 1, 1]
    return v.astype(f32)[:, None, None, None]

  alpha2 = jax.nn.sigmoid(per_image(logsnr))  # α² = sigmoid(λ), σ² = sigmoid(−λ)
  alpha, sigma = jnp.sqrt(alpha2), jnp.sqrt(jax.nn.sigmoid(-per_image(logsnr)))
  z, out = z.astype(f32), out.astype(f32)
  if mean is None:
    m, s2 = jnp.zeros((), f32), jnp.asarray(prior_var, f32)
  else:
    aug_alpha2 = jax.nn.sigmoid(per_image(aug_logsnr))
    m = jnp.sqrt(aug_alpha2) * mean.astype(f32)  # [B, H, W, C]
    s2 = prior_var + (1.0 - aug_alpha2)  # [B, 1, 1, 1]
  d = alpha2 * s2 + sigma**2
  if prediction == "eps":
    return sigma * (z - alpha * m) / d - alpha * jnp.sqrt(s2 / d) * out
  if prediction == "v":
    return sigma * (alpha * (1.0 - s2) * z - m) / d - jnp.sqrt(s2 / d) * out
  return m + alpha * s2 / d * (z - alpha * m) + jnp.sqrt(s2) * sigma / jnp.sqrt(d) * out


def coordinates(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  """Pixel-centre coordinates ``[B, H, W, 2]`` (y, x), each in [-1, 1], for ``[B, H, W, C]``."""
  b, h, w, _ = shape
  return jnp.broadcast_to(pixel_coordinates(h, w), (b, h, w, 2)).astype(dtype)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """Folds non-overlapping p×p patches into channels: ``[B, H, W, C] → [B, H/p, W/p, p·p·C]``."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of :func:`space_to_depth`: ``[B, h, w, p·p·C] → [B, h·p, w·p, C]``."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p))
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c // (p * p))


def with_scan_blocks(model: UNet, scan: bool) -> UNet:
  """``model`` with its runs of identical blocks stacked (``scan=True``) or unrolled, in place.

  The weights are the same, only their layout changes (``UNetConfig.scan_blocks``): restore a
  checkpoint into the layout it was saved in, convert, and save or train in the other. Weight
  ``i`` of a stack is block ``i`` of the run. Returns ``model``, whose ``config`` follows.
  """
  if model.config.scan_blocks == scan:
    return model

  def flat(items) -> list:
    return [unit for item in items for unit in _units(item)]

  if model.config.kind == "base":
    model.down = _group_units(scan, flat(model.down), model.down_runs)
    model.up = _group_units(scan, flat(model.up), model.up_runs)
  else:
    for block in (*model.dblocks, *model.ublocks):
      res = block.res
      block.res = _blocks(scan, list(res) if isinstance(res, nnx.List) else _members(res))
  model.config = dataclasses.replace(model.config, scan_blocks=scan)
  return model


def _members(stack: Stack) -> list[nnx.Module]:
  """A stack's members as independent modules (unrolled layout), attention sites restored."""
  members = [stack.member(i) for i in range(stack.size)]
  for member, site in zip(members, stack.labels or [None] * stack.size):
    if site is not None:
      member.attn.site = site
  return members


def build_unet(config: UNetConfig, *, rngs: nnx.Rngs) -> UNet:
  """Builds the U-Net for ``config`` (either kind)."""
  return UNet(config, rngs=rngs)
