"""The analytic FLOP counter agrees with XLA's own count (``cost_analysis``) on tiny models.

Models are lowered from shapes only (``nnx.eval_shape`` + ``jax.ShapeDtypeStruct`` inputs), so no
weights are materialised. XLA additionally counts elementwise ops (norms, SiLU, softmax, residual
adds), so its total is a few per cent above the analytic matmul/conv/attention count on these
32-channel models; the tolerance is 10%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.models.unet import build_unet
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.tools import flops

TOL = 0.10


def _xla_flops(fn, *args) -> float:
  """XLA's FLOP count of ``jit(fn)(*args)`` (args are ShapeDtypeStructs), after optimisation."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _unet_xla_flops(cfg: UNetConfig, batch: int, length: int) -> float:
  abstract = nnx.eval_shape(lambda: build_unet(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  size = cfg.image_size
  f32 = jnp.float32
  args = [
    state,
    jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), f32),
    jax.ShapeDtypeStruct((batch,), f32),
    jax.ShapeDtypeStruct((batch, length, cfg.text_dim), f32),
    jax.ShapeDtypeStruct((batch, length), jnp.bool_),
  ]
  if cfg.lowres_cond:
    low = cfg.lowres_size
    args += [
      jax.ShapeDtypeStruct((batch, low, low, cfg.in_channels), f32),
      jax.ShapeDtypeStruct((batch,), f32),
    ]

  def fwd(state, x, logsnr, emb, mask, lowres=None, aug=None):
    model = nnx.merge(graphdef, state)
    kw = {"lowres": lowres, "aug_logsnr": aug} if cfg.lowres_cond else {}
    return model(x, logsnr, emb, mask, **kw)

  return _xla_flops(fwd, *args)


@pytest.mark.parametrize(
  "preset, patch_size",
  [("tiny_base", 1), ("tiny_sr", 1), ("tiny_sr1024", 1), ("tiny_base", 2), ("tiny_sr", 2)],
)
def test_unet_forward_matches_xla(preset, patch_size):
  cfg = UNetConfig.from_preset(preset, patch_size=patch_size)
  batch, length = 2, 8
  # XLA skips conv taps on the zero padding; compare like with like.
  analytic = flops.unet_flops(cfg, batch, text_length=length, count_padding=False)
  assert analytic < flops.unet_flops(cfg, batch, text_length=length)
  xla = _unet_xla_flops(cfg, batch, length)
  # XLA counts the same matmuls plus elementwise work: never below, and within TOL above.
  assert analytic <= xla * 1.001, (analytic, xla)
  assert abs(xla / analytic - 1) < TOL, f"{preset}: analytic {analytic:,} vs XLA {xla:,.0f}"


def test_t5_matches_xla():
  cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4)
  batch, length = 2, 16
  abstract = nnx.eval_shape(
    lambda: T5EncoderModule(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  )
  graphdef, state = nnx.split(abstract)

  def fwd(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  xla = _xla_flops(fwd, state, ids, ids)
  analytic = flops.t5_flops(cfg, batch, length)
  assert analytic <= xla * 1.001, (analytic, xla)
  assert abs(xla / analytic - 1) < TOL, f"T5: analytic {analytic:,} vs XLA {xla:,.0f}"


def test_breakdown_and_train_step():
  cfg = UNetConfig.from_preset("tiny_base")
  parts = flops.unet_flops_breakdown(cfg, 4)
  assert parts["total"] == sum(parts[k] for k in flops.CATEGORIES)
  assert parts["resize"] == 0 and parts["conv"] > parts["attention"] > 0
  # Linear in batch except nothing: every term scales with B.
  assert flops.unet_flops(cfg, 4) == 4 * flops.unet_flops(cfg, 1)
  assert flops.train_step_flops(cfg, 4) == 3 * flops.unet_flops(cfg, 4)
  remat = UNetConfig.from_preset("tiny_base", remat="block")
  assert flops.train_step_flops(remat, 4) == 4 * flops.unet_flops(remat, 4)
  assert flops.sample_flops(cfg, 2, 10) == 10 * flops.unet_flops(cfg, 4)


def test_paper_presets_are_sane():
  """The base64 forward is ~100s of GFLOPs per image, dominated by convs (2B params at 64²)."""
  g = flops.unet_flops(UNetConfig.base64()) / 1e9
  assert 100 < g < 2000, g
  xxl = flops.t5_flops(T5Config.t5_v1_1_xxl(), 1, 128) / 1e9
  # ≈ 2 · params · tokens for the 4.6B non-embedding params, plus attention.
  assert 0.9 < xxl / (2 * 4.6 * 128) < 1.2, xxl
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("cpu") is None


def test_cli(capsys):
  assert flops.main(["--config", "configs/base64.py:tiny"]) == 0
  out = capsys.readouterr().out
  assert "tiny_base" in out and "GFLOPs per prompt" in out
