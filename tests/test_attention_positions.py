"""``UNetConfig.attention_positions``: query positions in every attention layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models.layers import fourier_positions
from imagen_jax.models.unet import build_unet
from imagen_jax.models.unet_config import UNetConfig

# The default demo's base U-Net: self-attention at 8², text attention at 16² and 8².
DEMO = dict(
  model_channels=16,
  channel_mult=(1, 2, 4),
  num_res_blocks=(1, 1, 1),
  attn_resolutions=(8,),
  cross_attn_resolutions=(16, 8),
)


def test_fourier_positions():
  pos = np.asarray(fourier_positions(4, 8, 8, jnp.float32))  # [32, 8]
  assert pos.shape == (32, 8)
  y, x = -1 + 1 / 4, -1 + 1 / 8  # pixel (0, 0)'s centre
  ang = np.array([y * np.pi, y * 2 * np.pi, x * np.pi, x * 2 * np.pi])
  np.testing.assert_allclose(pos[0], np.concatenate([np.sin(ang), np.cos(ang)]), atol=1e-6)
  # Every pixel gets its own vector, so a query can tell where it is.
  assert len({tuple(np.round(r, 5)) for r in pos}) == 32


def _forward(cfg, params):
  graphdef, state = nnx.split(build_unet(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  k = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(k[0], (2, 32, 32, 3))
  text, mask = jax.random.normal(k[1], (2, 8, cfg.text_dim)), jnp.ones((2, 8), bool)
  fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(x, jnp.array([-1.0, 2.0]), text, mask))
  return fwd(state)


def test_starts_as_the_model_without_them_and_then_uses_them():
  plain = UNetConfig.tiny_base(**DEMO)
  with_pos = UNetConfig.tiny_base(attention_positions=16, **DEMO)
  base_params = nnx.to_pure_dict(nnx.state(build_unet(plain, rngs=nnx.Rngs(0))))
  # Perturb every weight: the attention and output projections start at zero, which would hide
  # any effect of the queries.
  leaves, treedef = jax.tree.flatten(base_params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  leaves = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
  base_params = jax.tree.unflatten(treedef, leaves)
  params = nnx.to_pure_dict(nnx.state(build_unet(with_pos, rngs=nnx.Rngs(3))))
  # The shared weights from the plain model; the position projections as initialised (zero).
  pos_kernels = []

  def merge(dst, src):
    for key, value in dst.items():
      if key == "q_pos":
        pos_kernels.append(value["kernel"])
      elif isinstance(value, dict):
        merge(value, src[key])
      else:
        dst[key] = src[key]

  merge(params, base_params)
  assert pos_kernels and all(not np.any(k) for k in pos_kernels)
  out = _forward(with_pos, params)
  np.testing.assert_allclose(out, _forward(plain, base_params), atol=1e-6)

  def perturb(tree):
    for key, value in tree.items():
      if key == "q_pos":
        value["kernel"] = 0.5 * jax.random.normal(jax.random.key(2), value["kernel"].shape)
      elif isinstance(value, dict):
        perturb(value)

  perturb(params)
  assert float(jnp.abs(_forward(with_pos, params) - out).max()) > 1e-4


@pytest.mark.parametrize("bad", [3, -4, True, 2.0])
def test_bad_value_names_the_field(bad):
  with pytest.raises(
    ValueError, match="attention_positions must be 0 .off. or a positive multiple"
  ):
    UNetConfig.tiny_base(attention_positions=bad)
