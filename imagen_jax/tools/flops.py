"""Analytic FLOP counts of the Imagen U-Nets and the T5 encoder, as the code computes them.

  python -m imagen_jax.tools.flops --config configs/base64.py
  python -m imagen_jax.tools.flops --config configs/sr256.py:tiny --batch 8

From Python::

  from imagen_jax.tools.flops import unet_flops, t5_flops, train_step_flops
  unet_flops(UNetConfig.base64(), batch=1)                 # one forward pass, FLOPs
  train_step_flops(UNetConfig.base64(), batch=2048)        # ≈ 3 × forward (4 × with remat)
  t5_flops(T5Config.t5_v1_1_xxl(), batch=1, length=128)

The count walks the same structure as ``imagen_jax.models.unet`` (ADM and Efficient U-Net wiring,
per-level attention, skips) and counts every matrix product at 2 FLOPs per multiply-accumulate:

* convolutions: ``2 · B · H_out · W_out · k² · C_in · C_out`` (stride-2 DBlock convs at the output
  size; BigGAN up/down ResBlocks convolve at the resampled size, as ``ResBlock`` does);
* dense layers: ``2 · tokens · in · out`` (time / aug-level MLPs, scale-shift projections, Q/K/V/out
  projections, the shared text projection, attention pooling);
* attention: ``4 · B · T · S · hidden`` for QKᵀ and PV, where ``S = H·W + L`` in image
  self-attention that has the text concatenated to its keys/values (§2.5), ``S = L`` for plain
  text cross-attention, and ``S = 1 + L`` for the attention-pooling query;
* the bilinear resize of the low-res input of SR stages, which ``jax.image.resize`` lowers to two
  einsums with dense ``[h, H]`` weight matrices (a real matmul cost, though tiny);
* T5: Q/K/V/O and (gated) feed-forward matmuls and ``4 · B · L² · heads · d_kv`` for attention.

Where this differs from XLA's ``compiled.cost_analysis()["flops"]`` (``tests/test_flops.py``
cross-checks both on tiny configs; they agree within a few per cent):

* XLA also counts elementwise work — GroupNorm/LayerNorm statistics, SiLU, softmax, bias adds,
  residual sums, the scale-shift modulation, masking — at ~1 FLOP per element per op. On tiny
  models (32 channels) that is a few per cent of the total; on paper-sized models (≥128 channels, a
  9·C MAC conv per output element) it is well under 1%. Transcendentals (exp, rsqrt) are reported
  by XLA separately and are not FLOPs here either.
* XLA counts convolutions and dots as 2 FLOPs per MAC too, but for a convolution it counts only the
  kernel taps that fall inside the input, not those on the zero padding; a 3×3 conv on a 16² map
  is then 8% "cheaper" (on 64², 3%). Dense hardware computes the padded taps anyway, so the default
  here counts them (``count_padding=True``, the MFU convention); ``count_padding=False`` reproduces
  XLA's convention, which is what the tests compare. Bias terms are elementwise adds, left out.
* Gathers (the T5 token embedding, the relative-position bias lookup) cost 0 FLOPs in both.
* For a train step XLA counts the real backward, which skips input gradients the program never
  needs (e.g. w.r.t. the images), so it is slightly under the conventional ``3 × forward`` used
  for MFU here (the backward pass of a matmul costs two forward matmuls). With ``remat`` the
  forward is recomputed once more: ``4 × forward``.

MFU is ``train_step_flops / step_time / peak_flops``; the optimizer, EMA and loss are elementwise
and not counted, as is usual for MFU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from collections.abc import Sequence
from typing import Any

from imagen_jax.models.t5 import T5Config
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.stage.model import unet_config_for_stage
from imagen_jax.tools import cli

CATEGORIES = ("conv", "dense", "attention", "resize")


def _valid_taps(n_in: int, n_out: int, k: int, stride: int) -> int:
  """Kernel taps along one axis that land inside the input (not on the zero padding)."""
  pad = k // 2
  return sum(1 for o in range(n_out) for i in range(k) if 0 <= o * stride + i - pad < n_in)


class _Counter:
  """Accumulates FLOPs per category (``conv``, ``dense``, ``attention``, ``resize``)."""

  def __init__(self, count_padding: bool = True) -> None:
    self.by_cat: collections.Counter[str] = collections.Counter()
    self.count_padding = count_padding

  def conv(
    self, b: int, h_out: int, w_out: int, c_in: int, c_out: int, k: int = 3, stride: int = 1
  ) -> None:
    """A ``k × k`` conv with ``k // 2`` zero padding producing ``h_out × w_out``."""
    if self.count_padding:
      taps = h_out * k * w_out * k
    else:
      taps = _valid_taps(h_out * stride, h_out, k, stride) * _valid_taps(
        w_out * stride, w_out, k, stride
      )
    self.by_cat["conv"] += 2 * b * taps * c_in * c_out

  def dense(self, tokens: int, d_in: int, d_out: int) -> None:
    self.by_cat["dense"] += 2 * tokens * d_in * d_out

  def attn(self, b: int, t: int, s: int, hidden: int) -> None:
    self.by_cat["attention"] += 4 * b * t * s * hidden  # QKᵀ and PV, all heads

  def resize(self, b: int, c: int, h_in: int, w_in: int, h_out: int, w_out: int) -> None:
    # jax.image.resize: einsum with [h_in, h_out] then [w_in, w_out] weight matrices.
    self.by_cat["resize"] += 2 * b * c * (h_in * w_in * h_out + h_out * w_in * w_out)

  def result(self) -> dict[str, int]:
    out = {k: int(self.by_cat.get(k, 0)) for k in CATEGORIES}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------------
# U-Net.


def _resblock(n: _Counter, cfg: UNetConfig, b: int, res: int, c_in: int, c_out: int) -> None:
  """ResBlock at output resolution ``res`` (after any BigGAN resampling)."""
  n.conv(b, res, res, c_in, c_out)  # conv1
  n.dense(b, cfg.emb_dim, 2 * c_out)  # scale-shift projection of the conditioning vector
  n.conv(b, res, res, c_out, c_out)  # conv2
  if c_in != c_out:
    n.conv(b, res, res, c_in, c_out, k=1)  # 1×1 skip projection


def _attention(
  n: _Counter,
  cfg: UNetConfig,
  b: int,
  res: int,
  ch: int,
  length: int,
  *,
  self_attn: bool,
  ctx: bool,
) -> None:
  """Attention layer on a ``res × res`` map of ``ch`` channels (see ``layers.Attention``)."""
  heads, head_dim = cfg.heads_for(ch)
  hidden = heads * head_dim
  tokens = b * res * res
  n.dense(tokens, ch, hidden)  # q
  if cfg.attention_positions:  # query positions: once per call, broadcast over the batch
    n.dense(res * res, cfg.attention_positions, hidden)
  keys = 0
  if self_attn:
    n.dense(tokens, ch, 2 * hidden)  # image k, v
    keys += res * res
  if ctx:
    n.dense(b * length, cfg.context_dim, 2 * hidden)  # text k, v (per layer)
    keys += length
  n.attn(b, res * res, keys, hidden)
  n.dense(tokens, hidden, ch)  # output projection


def _level_attention(
  n: _Counter, cfg: UNetConfig, b: int, res: int, ch: int, length: int, level: int
) -> None:
  self_attn, ctx = cfg.self_attn_levels[level], cfg.cross_attn_levels[level]
  if self_attn or ctx:
    _attention(n, cfg, b, res, ch, length, self_attn=self_attn, ctx=ctx)


def _adm(n: _Counter, cfg: UNetConfig, b: int, size: int, length: int) -> None:
  """ADM U-Net body (``UNet._build_adm`` / ``_forward_adm``)."""
  mc = cfg.model_channels
  ch, chans = mc, [mc]
  res = size
  for level, width in enumerate(cfg.channels):
    for _ in range(cfg.num_res_blocks[level]):
      _resblock(n, cfg, b, res, ch, width)
      _level_attention(n, cfg, b, res, width, length, level)
      ch = width
      chans.append(ch)
    if level != cfg.num_levels - 1:
      res //= 2
      _resblock(n, cfg, b, res, ch, ch)  # BigGAN down block convolves after pooling
      chans.append(ch)
  _resblock(n, cfg, b, res, ch, ch)
  if cfg.mid_attention:
    _attention(n, cfg, b, res, ch, length, self_attn=True, ctx=cfg.cross_attn_levels[-1])
  _resblock(n, cfg, b, res, ch, ch)
  for level in reversed(range(cfg.num_levels)):
    width = cfg.channels[level]
    for j in range(cfg.num_res_blocks[level] + 1):
      _resblock(n, cfg, b, res, ch + chans.pop(), width)
      _level_attention(n, cfg, b, res, width, length, level)
      ch = width
      if level and j == cfg.num_res_blocks[level]:
        res *= 2
        _resblock(n, cfg, b, res, width, width)  # BigGAN up block convolves after upsampling


def _efficient(n: _Counter, cfg: UNetConfig, b: int, size: int, length: int) -> None:
  """Efficient U-Net body (``DBlock`` / ``UBlock``)."""
  widths = (cfg.model_channels, *cfg.channels)
  for level in range(cfg.num_levels):
    ch, res = cfg.channels[level], size // cfg.level_downsampling[level]
    n.conv(b, res, res, widths[level], ch, stride=2)  # stride-2 conv first
    for _ in range(cfg.num_res_blocks[level]):
      _resblock(n, cfg, b, res, ch, ch)
    _level_attention(n, cfg, b, res, ch, length, level)
  for level in reversed(range(cfg.num_levels)):
    ch, res = cfg.channels[level], size // cfg.level_downsampling[level]
    c_in = 2 * ch if cfg.decoder_skips == "resblock" else ch
    for _ in range(cfg.num_res_blocks[level]):
      _resblock(n, cfg, b, res, c_in, ch)
    _level_attention(n, cfg, b, res, ch, length, level)
    n.conv(b, 2 * res, 2 * res, ch, widths[level])  # upsample, then conv


def unet_flops_breakdown(
  config: UNetConfig,
  batch: int = 1,
  *,
  image_size: int | None = None,
  text_length: int | None = None,
  lowres_size: int | None = None,
  count_padding: bool = True,
) -> dict[str, int]:
  """FLOPs of one U-Net forward pass, by category (``conv``, ``dense``, ``attention``, ``resize``).

  Args:
    config: the U-Net.
    batch: images in the forward pass (a CFG sampling step runs ``2 × batch``).
    image_size: input side (default ``config.image_size``; the 1024 stage trains on 256² crops).
    text_length: tokens of the text embeddings (default ``config.text_max_length``).
    lowres_size: side of the low-res input of SR stages (default
      ``image_size * lowres_size / image_size`` of the config). Only the resize depends on it.
    count_padding: count conv taps on the zero padding (what dense hardware computes, the MFU
      convention). ``False`` counts only taps inside the image, as XLA's cost analysis does.

  Returns:
    ``{category: flops, ..., "total": flops}``.
  """
  cfg, b = config, int(batch)
  size = int(image_size or cfg.image_size)
  length = int(text_length or cfg.text_max_length)
  if size % cfg.total_downsampling:
    raise ValueError(f"image_size {size} is not divisible by {cfg.total_downsampling}")
  n = _Counter(count_padding)
  mc, e, dc = cfg.model_channels, cfg.emb_dim, cfg.context_dim
  # Text: LayerNorm + shared projection, then attention pooling (``TextEmbedder``).
  n.dense(b * length, cfg.text_dim, dc)
  n.dense(b, dc, dc)  # pooling query
  n.dense(b * (1 + length), dc, 2 * dc)  # pooling k, v over [query token, text]
  n.attn(b, 1, 1 + length, dc)
  n.dense(b, dc, e)
  # Time (and aug-level) embedding MLPs.
  for _ in range(2 if cfg.lowres_cond else 1):
    n.dense(b, mc, e)
    n.dense(b, e, e)
  in_ch = cfg.in_channels
  if cfg.lowres_cond:
    low = int(lowres_size or size * (cfg.lowres_size or size) // cfg.image_size)
    if low != size:
      n.resize(b, in_ch, low, low, size, size)
    in_ch *= 2
  p = cfg.patch_size
  size //= p  # the network runs on p×p patches folded into channels
  n.conv(b, size, size, (in_ch + 2 * cfg.coord_channels) * p * p, mc)  # stem
  if cfg.kind == "base":
    _adm(n, cfg, b, size, length)
  else:
    _efficient(n, cfg, b, size * p, length)  # level sizes from level_downsampling (includes p)
  n.conv(b, size, size, mc, cfg.out_channels * p * p)  # output conv
  return n.result()


def unet_flops(
  config: UNetConfig,
  batch: int = 1,
  *,
  image_size: int | None = None,
  text_length: int | None = None,
  lowres_size: int | None = None,
  count_padding: bool = True,
) -> int:
  """FLOPs of one U-Net forward pass (matmuls, convs and attention; see the module docstring)."""
  return unet_flops_breakdown(
    config,
    batch,
    image_size=image_size,
    text_length=text_length,
    lowres_size=lowres_size,
    count_padding=count_padding,
  )["total"]


def train_step_flops(
  config: UNetConfig,
  batch: int,
  *,
  image_size: int | None = None,
  text_length: int | None = None,
  remat: bool | None = None,
) -> int:
  """Model FLOPs of one training step: forward + backward ≈ 3 × forward (4 × with remat).

  ``remat`` defaults to ``config.remat != "none"``: rematerialised blocks run their forward again
  during the backward pass. For MFU use ``remat=False`` (model FLOPs, not hardware FLOPs).
  """
  fwd = unet_flops(config, batch, image_size=image_size, text_length=text_length)
  if remat is None:
    remat = config.remat != "none"
  return (4 if remat else 3) * fwd


def sample_flops(
  config: UNetConfig,
  batch: int,
  steps: int,
  *,
  guidance: bool = True,
  image_size: int | None = None,
  text_length: int | None = None,
) -> int:
  """FLOPs of sampling ``batch`` images in ``steps`` model evaluations (CFG doubles the batch)."""
  b = batch * (2 if guidance else 1)
  return steps * unet_flops(config, b, image_size=image_size, text_length=text_length)


# --------------------------------------------------------------------------------------------------
# T5.


def t5_flops(config: T5Config, batch: int, length: int) -> int:
  """FLOPs of one T5 encoder forward pass over ``batch`` sequences of ``length`` tokens."""
  tokens = batch * length
  d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  per_layer = 2 * tokens * d * inner * 4  # q, k, v, o
  per_layer += 4 * batch * length * length * inner  # logits and weighted sum
  per_layer += 2 * tokens * d * ff * ((2 if config.is_gated else 1) + 1)  # wi(_0, _1), wo
  return config.num_layers * per_layer


# --------------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU.

# Dense (no 2:4 sparsity) peak FLOP/s per device by ``jax.Device.device_kind`` substring, per dtype.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
  # The first key contained in the device kind wins: PCIe before the SXM default.
  "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
  "H100": {"bfloat16": 989.0, "float32": 494.0},  # SXM; float32 = TF32 tensor cores
  "H200": {"bfloat16": 989.0, "float32": 494.0},
  "A100": {"bfloat16": 312.0, "float32": 156.0},
  "TPU v4": {"bfloat16": 275.0},
  "TPU v5 lite": {"bfloat16": 197.0},
  "TPU v5p": {"bfloat16": 459.0},
  "TPU v6": {"bfloat16": 918.0},
}


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Dense peak TFLOP/s of one device of ``device_kind`` for ``dtype``, or None when unknown."""
  for key, table in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return table.get(dtype)
  return None


# --------------------------------------------------------------------------------------------------
# CLI.

_T5_BY_NAME = {
  "xxl": T5Config.t5_v1_1_xxl,
  "xl": T5Config.t5_v1_1_xl,
  "large": T5Config.t5_v1_1_large,
  "base": T5Config.t5_v1_1_base,
  "small": T5Config.t5_v1_1_small,
}


def text_encoder_config(encoder: str) -> T5Config | None:
  """The T5 architecture a ``config.text.encoder`` value names, when it can be told offline."""
  if encoder == "shapes_demo":
    # The demo encoder (``train.text_cond.write_demo_encoder``); its vocabulary costs no FLOPs.
    return T5Config(vocab_size=26, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
  path = os.path.join(encoder, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return T5Config.from_hf_dict(json.load(f), source=path)
  name = encoder.rstrip("/").rsplit("/", 1)[-1].lower()
  for size in ("xxl", "xl", "large", "base", "small"):  # "xxl" before "xl"
    if name.endswith(f"-{size}") or name.endswith(f"_{size}"):
      return _T5_BY_NAME[size]()
  return None


def stage_report(stage: Any, t5: T5Config | None, text_length: int, batch: int = 1) -> dict:
  """GFLOPs per image of one config stage: forward, train step and sampling (CFG, its steps)."""
  cfg = unet_config_for_stage(stage, t5.d_model if t5 else 4096)
  train_size = int(stage.crop_size or stage.image_size)
  kw = dict(text_length=text_length)
  fwd = unet_flops(cfg, batch, image_size=train_size, **kw)
  guidance = float(stage.sample.guidance) != 1.0
  steps = int(stage.sample.steps)
  sample = sample_flops(cfg, batch, steps, guidance=guidance, image_size=stage.image_size, **kw)
  return {
    "preset": cfg.name,
    "train_size": train_size,
    "sample_size": int(stage.image_size),
    "fwd_gflops": fwd / batch / 1e9,
    "train_gflops": train_step_flops(cfg, batch, image_size=train_size, remat=False, **kw)
    / batch
    / 1e9,
    "sample_gflops": sample / batch / 1e9,
    "sample_steps": steps,
    "cfg": guidance,
    "t5_gflops": t5_flops(t5, batch, text_length) / batch / 1e9 if t5 else None,
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg] or a built-in name")
  parser.add_argument("--text_length", type=int, default=0, help="default: config.text.max_length")
  parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
  args = parser.parse_args(argv)
  config = cli.load_config_flag(args.config)
  t5 = text_encoder_config(config.text.encoder)
  length = args.text_length or int(config.text.max_length)
  print(
    f"{'stage':10s} {'preset':10s} {'train res':>9s} {'fwd GF/img':>11s} {'train GF/img':>13s} "
    f"{'sample GF/img':>14s}   (GFLOPs per image; train = 3 x fwd, sample = steps x CFG x fwd)"
  )
  for name in config.stage_order:
    r = stage_report(config.stages[name], t5, length)
    how = f"{r['sample_steps']} steps{', CFG' if r['cfg'] else ''}, {r['sample_size']}²"
    print(
      f"{name:10s} {r['preset']:10s} {r['train_size']:>8d}² {r['fwd_gflops']:11.2f} "
      f"{r['train_gflops']:13.2f} {r['sample_gflops']:14.1f}   ({how})"
    )
  if t5 is not None:
    print(
      f"T5 encoder ({config.text.encoder}, d_model {t5.d_model}, {t5.num_layers} layers), "
      f"{length} tokens: {t5_flops(t5, 1, length) / 1e9:.2f} GFLOPs per prompt"
    )
  else:
    print(f"T5 encoder {config.text.encoder!r}: architecture unknown offline, not counted")
  return 0


if __name__ == "__main__":
  cli.run_tool(main)
