"""U-Net tests on the tiny presets (CPU, a few seconds of compile each)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models.attention_control import (
  EditController,
  IdentityController,
  RecordingController,
)
from imagen_jax.models.unet import build_unet, coordinates, depth_to_space, space_to_depth
from imagen_jax.models.unet_config import PRESETS, UNetConfig

TINY = ("tiny_base", "tiny_sr", "tiny_sr1024")
B, L = 2, 16


def _random_weights(abstract: nnx.State, seed: int = 0) -> nnx.State:
  """Random weights drawn on the host from the abstract state.

  Zero-initialised output layers would hide all conditioning, so every weight is random:
  kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.05²), biases and vectors ~ N(0, 0.05²).
  numpy draws them instantly; compiling JAX's PRNG for ~150 shapes takes tens of seconds on CPU.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    shape = leaf.shape
    if name == "kernel":
      w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      w = 1.0 + 0.05 * rng.standard_normal(shape)
    else:
      w = 0.05 * rng.standard_normal(shape)
    return jnp.asarray(w, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def _model(preset: str, **overrides) -> tuple[UNetConfig, nnx.GraphDef, nnx.State]:
  """Config, graphdef and random weights (from shapes only: no init compile)."""
  cfg = UNetConfig.from_preset(preset, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_unet(cfg, rngs=nnx.Rngs(0))))
  return cfg, graphdef, _random_weights(abstract)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("make_controller",))
def _apply(graphdef, state, x, logsnr, text, mask, lowres, aug, make_controller=None):
  model = nnx.merge(graphdef, state)
  ctrl = None if make_controller is None else make_controller()
  return model(x, logsnr, text, mask, lowres=lowres, aug_logsnr=aug, controller=ctrl)


def _inputs(cfg: UNetConfig, seed: int = 1, length: int = L):
  ks = jax.random.split(jax.random.key(seed), 4)
  s = cfg.image_size
  x = jax.random.normal(ks[0], (B, s, s, cfg.in_channels))
  logsnr = jnp.array([-3.0, 4.0])
  text = jax.random.normal(ks[1], (B, length, cfg.text_dim))
  mask = jnp.arange(length)[None, :] < jnp.array([[5], [length]])  # [B, L]: 5 and all valid
  lowres = aug = None
  if cfg.lowres_cond:
    r = cfg.lowres_size
    lowres = jax.random.normal(ks[2], (B, r, r, cfg.in_channels))
    aug = jnp.array([20.0, 1.5])
  return x, logsnr, text, mask, lowres, aug


def _run(preset: str, *args, make_controller=None, **overrides):
  cfg, graphdef, state = _model(preset, **overrides)
  return _apply(graphdef, state, *args, make_controller=make_controller)


@pytest.mark.parametrize("preset", TINY)
def test_shapes_finite_and_bf16_close(preset):
  cfg = UNetConfig.from_preset(preset)
  args = _inputs(cfg)
  out = _run(preset, *args)
  assert out.shape == (B, cfg.image_size, cfg.image_size, cfg.out_channels)
  assert out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all()) and float(jnp.abs(out).max()) > 0
  # Same fp32 weights, bf16 compute.
  _, graphdef16, _ = _model(preset, dtype="bfloat16")
  out16 = _apply(graphdef16, _model(preset)[2], *args)
  assert out16.dtype == jnp.float32
  err = float(jnp.abs(out16 - out).max()) / float(jnp.abs(out).max())
  assert err < 5e-2, f"bf16 vs fp32 relative error {err}"


@pytest.mark.parametrize("preset", TINY)
def test_padding_has_no_effect(preset):
  """The same prompt padded to 16 or 64 tokens (garbage in the padding) gives the same output;
  row 1 is the null condition (all-false mask)."""
  cfg = UNetConfig.from_preset(preset)
  x, logsnr, text, mask, lowres, aug = _inputs(cfg)
  mask = mask.at[1].set(False)
  garbage = 3.0 * jax.random.normal(jax.random.key(7), (B, 48, cfg.text_dim))
  text64 = jnp.concatenate([text, garbage], axis=1)
  mask64 = jnp.concatenate([mask, jnp.zeros((B, 48), bool)], axis=1)
  out16 = _run(preset, x, logsnr, text, mask, lowres, aug)
  out64 = _run(preset, x, logsnr, text64, mask64, lowres, aug)
  np.testing.assert_allclose(out16, out64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_base", "tiny_sr1024"])
def test_null_condition(preset):
  """Zeroed text + all-false mask (the documented CFG null condition) runs and differs."""
  cfg = UNetConfig.from_preset(preset)
  x, logsnr, text, mask, lowres, aug = _inputs(cfg)
  out = _run(preset, x, logsnr, text, mask, lowres, aug)
  null = _run(preset, x, logsnr, jnp.zeros_like(text), jnp.zeros_like(mask), lowres, aug)
  assert bool(jnp.isfinite(null).all())
  assert float(jnp.abs(null - out).max()) > 1e-3


def test_lowres_and_aug_level_change_output():
  cfg = UNetConfig.tiny_sr()
  x, logsnr, text, mask, lowres, aug = _inputs(cfg)
  out = _run("tiny_sr", x, logsnr, text, mask, lowres, aug)
  other_lowres = _run("tiny_sr", x, logsnr, text, mask, -lowres, aug)
  other_aug = _run("tiny_sr", x, logsnr, text, mask, lowres, aug - 10.0)
  assert float(jnp.abs(other_lowres - out).max()) > 1e-3
  assert float(jnp.abs(other_aug - out).max()) > 1e-3


def _scale_by_one():
  return EditController(lambda site, p: p * 1.0)


def _zero_text():
  return EditController(lambda site, p: jnp.zeros_like(p))


@pytest.mark.parametrize("preset", ["tiny_base", "tiny_sr1024"])
def test_attention_controller(preset):
  cfg, graphdef, _ = _model(preset)
  args = _inputs(cfg)
  out = _run(preset, *args)
  # Read-only controllers leave the output bit-identical.
  ident, aux = _run(preset, *args, make_controller=IdentityController)
  assert aux == {} and np.array_equal(ident, out)
  rec, maps = _run(preset, *args, make_controller=RecordingController)
  assert np.array_equal(rec, out)
  sites = nnx.merge(graphdef, _model(preset)[2]).attention_sites()
  assert sorted(maps) == sorted(sites) and sites
  for site, m in maps.items():
    level = int(site.split(".")[1]) if cfg.kind == "efficient" else None
    h = m.shape[2]
    assert m.shape == (B, m.shape[1], h, h, L), site
    if level is not None:
      assert h == cfg.image_size // cfg.level_downsampling[level]
    assert bool((m >= 0).all()) and bool((m.sum(-1) <= 1 + 1e-5).all())
    assert bool((m[0, ..., 5:] == 0).all())  # padding tokens get no attention
  # Replacing probabilities goes through the explicit path: identical maps -> same output.
  same, _ = _run(preset, *args, make_controller=_scale_by_one)
  np.testing.assert_allclose(same, out, atol=1e-5, rtol=1e-5)
  edited, _ = _run(preset, *args, make_controller=_zero_text)
  assert float(jnp.abs(edited - out).max()) > 1e-3


# A two-level tiny_sr1024: the grad graph is what makes this test slow to compile.
_SMALL = dict(channel_mult=(1, 2), num_res_blocks=(1, 1), cross_attn_resolutions=(16,))


def test_remat_same_output_and_grads(remat: str = "block"):
  cfg = UNetConfig.tiny_sr1024(**_SMALL)
  args = _inputs(cfg)

  def loss(state, graphdef):
    out = nnx.merge(graphdef, state)(*args[:4], lowres=args[4], aug_logsnr=args[5])
    return jnp.mean(out**2)

  _, graphdef, state = _model("tiny_sr1024", **_SMALL)
  _, graphdef_remat, _ = _model("tiny_sr1024", remat=remat, **_SMALL)
  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = grad_fn(state, graphdef)
  remat_loss, remat_grads = grad_fn(state, graphdef_remat)
  np.testing.assert_allclose(remat_loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), remat_grads, ref_grads
  )


# --------------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors naming the preset and the expected shape, before any compilation.


@pytest.fixture(scope="module")
def eager_models():
  return {p: nnx.merge(*_model(p)[1:]) for p in ("tiny_base", "tiny_sr")}


def test_bad_inputs(eager_models):
  base, sr = eager_models["tiny_base"], eager_models["tiny_sr"]
  x, logsnr, text, mask, _, _ = _inputs(base.config)
  with pytest.raises(ValueError, match=r"'tiny_base'.*divisible by the total downsampling 2"):
    base(x[:, :31, :31], logsnr, text, mask)
  with pytest.raises(ValueError, match=r"'tiny_base'.*\[B, H, W, 3\]"):
    base(jnp.concatenate([x, x[..., :1]], -1), logsnr, text, mask)
  with pytest.raises(ValueError, match=r"'tiny_base'.*text_emb must be \[2, L, 32\]"):
    base(x, logsnr, jnp.zeros((B, L, 4096)), mask)
  with pytest.raises(ValueError, match=r"'tiny_base'.*not a super-resolution"):
    base(x, logsnr, text, mask, lowres=x)
  x, logsnr, text, mask, lowres, aug = _inputs(sr.config)
  with pytest.raises(ValueError, match=r"'tiny_sr'.*lowres must be \[2, 16, 16, 3\]"):
    sr(x, logsnr, text, mask)
  with pytest.raises(ValueError, match=r"'tiny_sr'.*aug_logsnr"):
    sr(x, logsnr, text, mask, lowres=lowres)
  with pytest.raises(ValueError, match=r"'tiny_sr'.*divisible by the total downsampling 8"):
    sr(x[:, :60, :60], logsnr, text, mask, lowres=lowres, aug_logsnr=aug)


def test_sr_accepts_other_sizes():
  """SR models run at any size divisible by the total downsampling (sr1024 trains on crops)."""
  x, logsnr, text, mask, lowres, aug = _inputs(UNetConfig.tiny_sr1024())
  out = _run("tiny_sr1024", x[:, :32, :48], logsnr, text, mask, lowres[:, :8, :12], aug)
  assert out.shape == (B, 32, 48, 3) and bool(jnp.isfinite(out).all())


def test_presets_and_config_errors():
  for name in PRESETS:
    cfg = UNetConfig.from_preset(name)
    assert cfg.name == name and cfg.image_size % cfg.total_downsampling == 0
  assert UNetConfig.sr1024().self_attn_levels == (False,) * 4
  assert UNetConfig.sr256().self_attn_levels == (False, False, False, True)
  assert UNetConfig.base64().cross_attn_levels == (False, True, True, True)
  with pytest.raises(ValueError, match="known presets: base64, sr256, sr1024"):
    UNetConfig.from_preset("sr512")
  with pytest.raises(ValueError, match="Unknown UNetConfig field"):
    UNetConfig.from_preset("tiny_base", channels=3)
  with pytest.raises(ValueError, match="remat"):
    UNetConfig.from_preset("tiny_base", remat="everything")
  assert UNetConfig.from_preset("tiny_base", channel_mult=[1, 2]).channel_mult == (1, 2)
  policy = UNetConfig.tiny_base(remat="dots_with_no_batch_dims_saveable").remat_policy
  assert policy is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert UNetConfig.tiny_base(remat="block").remat_policy is None


def test_patch_size_folds_patches_and_keeps_full_resolution():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12, 3)), jnp.float32)
  y = space_to_depth(x, 2)  # [2, 4, 6, 12]: each 2×2 patch, row-major, in the channels
  assert y.shape == (2, 4, 6, 12)
  np.testing.assert_array_equal(y[1, 2, 3], x[1, 4:6, 6:8].reshape(-1))
  np.testing.assert_array_equal(depth_to_space(y, 2), x)
  # The network runs at image_size / patch_size: level resolutions and attention count from it.
  cfg = UNetConfig.tiny_sr(patch_size=2)
  assert cfg.level_downsampling == (4, 8, 16) and cfg.cross_attn_levels == (False, True, False)
  _, graphdef, params = _model("tiny_sr", patch_size=2)
  assert params["stem"]["kernel"].shape[-2:] == (2 * 3 * 4, cfg.model_channels)
  x, logsnr, text, mask, lowres, aug = _inputs(cfg)
  assert _apply(graphdef, params, x, logsnr, text, mask, lowres, aug).shape == x.shape
  # Coordinate channels: pixel centres in [-1, 1], folded with the image, read by the stem.
  grid = np.asarray(coordinates((1, 4, 8, 3), jnp.float32))[0]  # [4, 8, 2]
  np.testing.assert_allclose(grid[:, 0, 0], [-0.75, -0.25, 0.25, 0.75])  # y down the rows
  np.testing.assert_allclose(grid[0, :, 1], np.linspace(-0.875, 0.875, 8))  # x along a row
  cfg, graphdef, params = _model("tiny_base", coord_channels=True, patch_size=2)
  assert params["stem"]["kernel"].shape[-2] == (3 + 2) * 4
  x, logsnr, text, mask, _, _ = _inputs(cfg)
  out = _apply(graphdef, params, x, logsnr, text, mask, None, None)
  # The same weights with the stem's coordinate inputs zeroed: the coordinates change the output.
  folded = np.arange((3 + 2) * 4) % (3 + 2) >= 3  # which folded stem inputs are coordinates
  blind = jax.tree.map(lambda a: a, params)
  blind["stem"]["kernel"] = params["stem"]["kernel"] * jnp.asarray(~folded)[:, None]
  other = _apply(graphdef, blind, x, logsnr, text, mask, None, None)
  assert float(jnp.abs(other - out).max()) > 1e-3
  with pytest.raises(ValueError, match="patch_size must be an integer >= 1"):
    UNetConfig.tiny_base(patch_size=0)
  with pytest.raises(ValueError, match="not divisible"):
    UNetConfig.tiny_base(patch_size=3)


def test_every_weight_has_logical_names():
  _, _, state = _model("tiny_sr")
  variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  for v in variables:
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == v.ndim, (names, v.shape)


@pytest.mark.parametrize(
  "preset,size,lowres_size", [("base64", 64, None), ("sr256", 256, 64), ("sr1024", 256, 64)]
)
def test_full_presets_trace_from_shapes(preset, size, lowres_size):
  """The paper presets run end to end (bf16, remat, recording controller) at shape level;
  sr1024 on its 256² training crop, where its cross-attention level is 16²."""
  cfg = UNetConfig.from_preset(preset, dtype="bfloat16", remat="block")

  def forward():
    model = build_unet(cfg, rngs=nnx.Rngs(0))
    kw = {}
    if lowres_size:
      kw = dict(lowres=jnp.zeros((1, lowres_size, lowres_size, 3)), aug_logsnr=jnp.zeros((1,)))
    x, text = jnp.zeros((1, size, size, 3)), jnp.zeros((1, 128, 4096))
    ctrl = RecordingController(average_heads=True)
    return model(x, jnp.zeros((1,)), text, jnp.ones((1, 128), bool), controller=ctrl, **kw)

  out, maps = jax.eval_shape(forward)
  assert out.shape == (1, size, size, 3) and out.dtype == jnp.float32
  deepest = size // cfg.total_downsampling
  assert maps and all(m.shape[-1] == 128 for m in maps.values())
  assert min(m.shape[1] for m in maps.values()) == deepest


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 6, 5, 32), (3, 7, 32)])
def test_group_norm_matches_flax(shape, dtype):
  """The U-Nets' GroupNorm equals ``nnx.GroupNorm`` (output and gradients), same parameters."""
  from imagen_jax.models.layers import group_norm

  rng = np.random.default_rng(0)
  ours = group_norm(32, 8, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
  ref = nnx.GroupNorm(32, num_groups=8, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert isinstance(ours, nnx.GroupNorm)
  scale, bias = rng.uniform(0.5, 1.5, 32), rng.standard_normal(32)
  for m in (ours, ref):
    m.scale[...] = jnp.asarray(scale, jnp.float32)
    m.bias[...] = jnp.asarray(bias, jnp.float32)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, dtype)  # non-zero mean per group

  def loss(m, x):
    return jnp.sum(jnp.sin(m(x)))

  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
  (g_ours, gx_ours), (g_ref, gx_ref) = (
    nnx.grad(loss, argnums=(0, 1))(m, x.astype(jnp.float32)) for m in (ours, ref)
  )
  np.testing.assert_allclose(gx_ours, gx_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_with_a_mask_uses_masked_statistics():
  """A mask restricts the statistics to its positions, exactly as ``nnx.GroupNorm`` does."""
  from imagen_jax.models.layers import group_norm

  ours = group_norm(32, 8, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
  ref = nnx.GroupNorm(32, num_groups=8, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 32)) * 2 + 1, jnp.float32)
  mask = jnp.ones(x.shape, bool).at[:, 0].set(False)
  np.testing.assert_allclose(ours(x, mask=mask), ref(x, mask=mask), rtol=1e-6, atol=1e-6)
  assert not np.allclose(ours(x, mask=mask), ours(x), atol=1e-3)  # the mask changes the stats
