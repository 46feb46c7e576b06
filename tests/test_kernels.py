"""Backend-aware kernel choices (``imagen_jax.kernels``): every implementation of attention,
GroupNorm and the dynamic-thresholding percentile agrees with the others on CPU, ``"auto"``
resolves to the documented choice per backend (GPU/TPU resolution tested here on CPU), and bad
values fail naming their field.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import kernels
from imagen_jax.diffusion import guidance
from imagen_jax.models import layers
from imagen_jax.models.if_unet import IFUNetConfig
from imagen_jax.models.unet_config import UNetConfig

try:
  from tests.test_unet import _inputs, _run
except ImportError:
  from test_unet import _inputs, _run

# ------------------------------------------------------------------------------------------------
# The resolver.


@pytest.mark.parametrize(
  "backend, want",
  [
    ("cpu", {"attention": "xla", "norm": "ours", "percentile": "bisect", "block_runs": "unrolled"}),
    ("gpu", {"attention": "cudnn", "norm": "flax", "percentile": "sort", "block_runs": "loop"}),
    ("cuda", {"attention": "cudnn", "norm": "flax", "percentile": "sort"}),
    ("tpu", {"attention": "xla", "norm": "flax", "percentile": "sort", "block_runs": "loop"}),
    ("metal", {"attention": "xla", "norm": "ours", "percentile": "bisect"}),  # unknown: CPU's
  ],
)
def test_auto_resolves_per_backend(backend, want):
  assert {kind: kernels.resolve(kind, "auto", backend=backend) for kind in want} == want


def test_resolve_defaults_to_the_current_backend_and_keeps_explicit_choices():
  for kind, choices in kernels.CHOICES.items():
    assert kernels.resolve(kind) == kernels.resolve(kind, backend=jax.default_backend())
    for choice in choices:
      assert kernels.resolve(kind, choice, backend="tpu") == choice


def test_resolve_errors_name_the_field():
  with pytest.raises(ValueError, match=r"attention_impl must be one of \('auto', 'xla'"):
    kernels.resolve("attention", "flash", field="attention_impl")
  with pytest.raises(ValueError, match="unknown kernel kind 'conv'"):
    kernels.resolve("conv")


def test_cudnn_applicability():
  """cuDNN's constraints, checked as for a GPU (backend and compute capability given)."""
  ok = dict(seq_q=1024, seq_kv=1152, masked=True, backend="gpu", capability=(9, 0))
  assert kernels.cudnn_attention_unsupported(jnp.bfloat16, 64, **ok) is None
  assert kernels.cudnn_attention_unsupported(jnp.float16, 256, **ok) is None  # Hopper: <= 256
  assert "float16/bfloat16" in kernels.cudnn_attention_unsupported(jnp.float32, 64, **ok)
  assert "up to 128" in kernels.cudnn_attention_unsupported(
    jnp.bfloat16, 256, **{**ok, "capability": (8, 0)}
  )
  assert "multiples of 8" in kernels.cudnn_attention_unsupported(jnp.bfloat16, 60, **ok)
  assert "even" in kernels.cudnn_attention_unsupported(jnp.bfloat16, 64, **{**ok, "seq_kv": 1155})
  unmasked_odd = {**ok, "seq_kv": 7, "masked": False}
  assert kernels.cudnn_attention_unsupported(jnp.bfloat16, 64, **unmasked_odd) is None
  on_tpu = {**ok, "backend": "tpu"}
  assert "CUDA GPU" in kernels.cudnn_attention_unsupported(jnp.bfloat16, 64, **on_tpu)


# ------------------------------------------------------------------------------------------------
# Attention.


def _qkv(dtype, b=2, t=12, s=20, n=2, d=16):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, t, n, d)).astype(dtype)
  k, v = (jax.random.normal(key, (b, s, n, d)).astype(dtype) for key in (kk, kv))
  mask = (jnp.arange(s) < jnp.array([s, 13])[:, None])[:, None, None, :]  # [B, 1, 1, S]
  return q, k, v, mask


def _reference(q, k, v, mask=None, bias=None):
  """Float64 numpy softmax attention."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_choices_agree(dtype, tol, masked):
  q, k, v, mask = _qkv(dtype)
  mask = mask if masked else None
  want = _reference(q, k, v, mask)
  outs = {
    impl: layers.attention(q, k, v, mask, impl=impl) for impl in ("auto", "xla", "jax_xla", None)
  }
  outs["ours"] = layers._xla_attention(q, k, v, mask)
  outs["jax"] = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  for name, out in outs.items():
    assert out.shape == q.shape and out.dtype == dtype, name
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol, err_msg=name)
  # "auto" is "xla" on CPU: the same program, bit for bit.
  np.testing.assert_array_equal(outs["auto"], outs["ours"])


def test_attention_with_an_additive_bias():
  """IF's form: an additive bias on the text keys; every choice takes it."""
  q, k, v, _ = _qkv(jnp.float32)
  bias = jnp.where(jnp.arange(20) < 15, 0.0, -10000.0)[None, None, None, :]  # [1, 1, 1, S]
  want = _reference(q, k, v, bias=bias)
  for impl in ("xla", "jax_xla"):
    out = layers.attention(q, k, v, bias=bias, impl=impl)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_cudnn_off_gpu_fails_clearly_and_auto_falls_back():
  q, k, v, mask = _qkv(jnp.bfloat16)
  if jax.default_backend() == "gpu":
    pytest.skip("this checks the message off a GPU")  # the suite runs on CPU
  with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run.*needs a CUDA GPU"):
    layers.attention(q, k, v, mask, impl="cudnn")
  np.testing.assert_array_equal(
    layers.attention(q, k, v, mask, impl="auto"), layers._xla_attention(q, k, v, mask)
  )


# ------------------------------------------------------------------------------------------------
# GroupNorm.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_ours_equals_flax(dtype):
  rng = np.random.default_rng(0)
  norms = {
    impl: layers.group_norm(32, 8, rngs=nnx.Rngs(0), param_dtype=jnp.float32, impl=impl)
    for impl in ("ours", "flax", "auto")
  }
  scale, bias = rng.uniform(0.5, 1.5, 32), rng.standard_normal(32)
  for m in norms.values():
    m.scale[...], m.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 32)) * 3 + 2, dtype)
  out = {impl: m(x) for impl, m in norms.items()}
  assert all(o.dtype == jnp.float32 for o in out.values())
  np.testing.assert_allclose(out["ours"], out["flax"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["auto"], out[kernels.resolve("norm")])
  # A mask takes flax's masked statistics whatever the choice.
  mask = jnp.ones(x.shape, bool).at[:, 0].set(False)
  np.testing.assert_allclose(
    norms["ours"](x, mask=mask), norms["flax"](x, mask=mask), rtol=1e-6, atol=1e-6
  )


def test_group_norm_rejects_an_unknown_impl():
  with pytest.raises(ValueError, match=r"GroupNorm impl must be one of \('auto', 'ours', 'flax'\)"):
    layers.group_norm(32, 8, rngs=nnx.Rngs(0), param_dtype=jnp.float32, impl="apex")


# ------------------------------------------------------------------------------------------------
# Percentile (dynamic thresholding).


def test_percentile_bisect_equals_sort_and_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3 * 16 * 16)).astype(np.float32) * 2
  x[1, :100] = 3.0  # ties at the top
  x[2] = 0.0
  x[3, 7] = np.nan
  want = np.percentile(np.abs(x), 99.5, axis=1)
  got = {impl: np.asarray(guidance.abs_percentile(jnp.asarray(x), 99.5, impl=impl))
         for impl in ("bisect", "sort", "auto")}  # fmt: skip
  for impl, out in got.items():
    np.testing.assert_allclose(out, want, rtol=1e-6, err_msg=impl)
  assert np.isnan(got["sort"][3]) and np.isnan(got["bisect"][3])
  x0 = jnp.asarray(np.nan_to_num(x)).reshape(4, 16, 16, 3)
  np.testing.assert_allclose(
    guidance.dynamic_threshold(x0, 99.5, impl="sort"),
    guidance.dynamic_threshold(x0, 99.5, impl="bisect"),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    guidance.threshold(x0, "dynamic", 99.5, percentile_impl="sort"),
    guidance.threshold(x0, "dynamic", 99.5),
    rtol=1e-6,
  )


def test_percentile_impl_errors_name_the_keyword():
  x = jnp.ones((1, 8))
  with pytest.raises(ValueError, match=r"percentile impl must be one of \('auto', 'bisect'"):
    guidance.abs_percentile(x, 99.5, impl="radix")
  with pytest.raises(ValueError, match="percentile_impl must be one of"):
    guidance.threshold(x, "static", percentile_impl="radix")


# ------------------------------------------------------------------------------------------------
# Config fields and a whole U-Net.


def test_config_fields_are_validated_by_name():
  with pytest.raises(ValueError, match=r"'tiny_base': attention_impl must be one of \('auto'"):
    UNetConfig.tiny_base(attention_impl="flash")
  with pytest.raises(ValueError, match=r"'tiny_base': norm_impl must be one of \('auto', 'ours'"):
    UNetConfig.tiny_base(norm_impl="apex")
  with pytest.raises(ValueError, match="IFUNetConfig: attention_impl must be one of"):
    IFUNetConfig.from_preset("tiny", attention_impl="flash")
  with pytest.raises(ValueError, match="IFUNetConfig: norm_impl must be one of"):
    IFUNetConfig.from_preset("tiny", norm_impl="apex")
  assert UNetConfig.tiny_base().attention_impl == "auto" == UNetConfig.tiny_base().norm_impl
  assert UNetConfig.tiny_base(attention_impl=None).attention_impl is None  # older "xla"
  cfg = IFUNetConfig.from_preset("tiny", norm_impl="flax", attention_impl="xla")
  assert "norm_impl" not in cfg.to_diffusers() and "attention_impl" not in cfg.to_diffusers()


def test_unet_forward_same_for_every_kernel_choice():
  """A tiny U-Net (random weights) with flax's GroupNorm or jax's attention equals our kernels."""
  cfg = UNetConfig.tiny_base()
  x, logsnr, text, mask, _, _ = _inputs(cfg)
  x = x[:, :16, :16]  # attention still runs (at 8²), at a quarter of the cost

  def forward(**impls):
    return _run("tiny_base", x, logsnr, text, mask, None, None, **impls)

  ref = forward(norm_impl="ours", attention_impl="xla")
  assert float(jnp.abs(ref).mean()) > 0.1  # random weights: the output depends on every layer
  other = forward(norm_impl="flax", attention_impl="jax_xla")
  np.testing.assert_allclose(other, ref, rtol=1e-4, atol=1e-4)
