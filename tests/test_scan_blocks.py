"""``UNetConfig.scan_blocks``: runs of identical blocks stored stacked and applied as a scan.

The oracle is the unrolled U-Net itself: the same seed builds the same weights, stacked; with the
same weights the scanned model gives the same output and gradients; ``with_scan_blocks`` moves a
model between the layouts exactly; controllers still see every attention site; and the scanned
model compiles loops over fewer parameter leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.checkpoint_integrity import CheckpointMismatchError, check_matches
from imagen_jax.models.attention_control import RecordingController
from imagen_jax.models.stack import Stack
from imagen_jax.models.unet import _runs, build_unet, with_scan_blocks
from imagen_jax.models.unet_config import UNetConfig
from tests.test_unet import _inputs, _random_weights

# Two or three blocks per level, so most levels have a run; small widths keep compiles short.
# ``scan_impl``: a loop (accelerators) or unrolled (CPU's "auto"); both must match.
CASES = {
  "adm": (
    "tiny_base",
    dict(
      num_res_blocks=(3, 2),
      attn_resolutions=(32, 16),
      cross_attn_resolutions=(32, 16),
      scan_impl="loop",
    ),
  ),
  "efficient_resblock_skips": ("tiny_sr", dict(num_res_blocks=(2, 1, 3), scan_impl="unrolled")),
  "efficient_block_skips_remat": (
    "tiny_sr",
    dict(num_res_blocks=(2, 1, 3), decoder_skips="block", remat="block", scan_impl="loop"),
  ),
}


def _is_spec(x) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def _models(case: str):
  """(config, unrolled model with random weights, the same model converted to stacked)."""
  preset, overrides = CASES[case]
  cfg = UNetConfig.from_preset(preset, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_unet(cfg, rngs=nnx.Rngs(0))))
  unrolled = nnx.merge(graphdef, _random_weights(abstract))
  return cfg, unrolled, with_scan_blocks(nnx.clone(unrolled), True)


def _loss_and_grads(model, args):
  x, logsnr, text, mask, lowres, aug = args
  graphdef, state = nnx.split(model)

  def loss(state):
    out = nnx.merge(graphdef, state)(x, logsnr, text, mask, lowres=lowres, aug_logsnr=aug)
    return jnp.mean(out**2) + jnp.mean(out[..., 0])

  fn = jax.jit(jax.value_and_grad(loss))
  return fn(state), fn.lower(state).as_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_unet_equals_unrolled(case):
  cfg, unrolled, scanned = _models(case)
  assert scanned.config.scan_blocks and not unrolled.config.scan_blocks
  args = _inputs(cfg)
  (ref_loss, ref_grads), ref_hlo = _loss_and_grads(unrolled, args)
  (loss, grads), hlo = _loss_and_grads(scanned, args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # Gradients of stacked weights are the unrolled blocks' gradients, stacked.
  back = with_scan_blocks(nnx.merge(nnx.graphdef(scanned), grads), False)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
    nnx.state(back),
    ref_grads,
  )
  # A loop per run, forward and backward (none unrolled). Either way, fewer leaves to update.
  assert "stablehlo.while" not in ref_hlo
  loops = hlo.count("stablehlo.while")
  assert loops >= 4 if cfg.scan_impl == "loop" else loops == 0
  assert len(jax.tree.leaves(grads)) < 0.75 * len(jax.tree.leaves(ref_grads))


@pytest.mark.parametrize("case", ["adm", "efficient_resblock_skips"])
def test_same_seed_builds_the_same_weights_stacked_and_layouts_round_trip(case):
  preset, overrides = CASES[case]
  unrolled = build_unet(UNetConfig.from_preset(preset, **overrides), rngs=nnx.Rngs(3))
  built = build_unet(
    UNetConfig.from_preset(preset, scan_blocks=True, **overrides), rngs=nnx.Rngs(3)
  )
  converted = with_scan_blocks(nnx.clone(unrolled), True)
  assert any(isinstance(m, Stack) for _, m in nnx.iter_graph(built))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(built), nnx.state(converted))
  # Logical names: the stack axis is unsharded, the rest as built.
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(built)))
  shapes = nnx.to_pure_dict(nnx.state(built))
  ranks = jax.tree.map(lambda spec, w: (len(spec), w.ndim), specs, shapes, is_leaf=_is_spec)
  assert all(a == b for a, b in jax.tree.leaves(ranks, is_leaf=lambda t: isinstance(t, tuple)))
  back = with_scan_blocks(converted, False)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(unrolled))
  assert nnx.get_partition_spec(nnx.state(back)) == nnx.get_partition_spec(nnx.state(unrolled))
  assert nnx.graphdef(back) == nnx.graphdef(unrolled)


def test_controller_sees_every_site_of_a_scanned_adm_unet():
  """ADM runs hold attention layers: with a controller they run unrolled, each with its site."""
  cfg, unrolled, scanned = _models("adm")
  x, logsnr, text, mask, _, _ = _inputs(cfg)

  def run(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state):
      m = nnx.merge(graphdef, state)
      return m(x, logsnr, text, mask), m(x, logsnr, text, mask, controller=RecordingController())

    return fn(state)

  plain, (recorded, maps) = run(scanned)
  ref_plain, (_, ref_maps) = run(unrolled)
  assert sorted(scanned.attention_sites()) == sorted(unrolled.attention_sites()) == sorted(maps)
  assert sorted(maps) == sorted(ref_maps)
  for site in maps:
    np.testing.assert_allclose(maps[site], ref_maps[site], rtol=1e-5, atol=1e-6, err_msg=site)
  np.testing.assert_allclose(recorded, plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain, ref_plain, rtol=1e-5, atol=1e-6)


def test_runs_of_the_paper_adm_base():
  assert _runs(["a", "a", "b", "a", "a", "a"]) == ((0, 2), (2, 3), (3, 6))
  assert _runs(["x"]) == ((0, 1),)
  # The paper base's level structure (base64: 3 blocks per level, widths ×1, 2, 3, 4) at 32².
  cfg = UNetConfig.from_preset("tiny_base", channel_mult=(1, 2, 3, 4), num_res_blocks=(3,) * 4)
  model = nnx.eval_shape(lambda: build_unet(cfg, rngs=nnx.Rngs(0)))
  # Down: level 0's three units, then per level a width-changing unit and two equal ones, with
  # a downsampling unit between levels.
  assert [b - a for a, b in model.down_runs] == [3, 1, 1, 2, 1, 1, 2, 1, 1, 2]
  # Up: the inputs widen by the skip; the last unit of levels 3..1 also upsamples.
  assert [b - a for a, b in model.up_runs] == [3, 1, 1, 2, 1, 1, 2, 1, 1, 3]


def test_scan_blocks_must_be_a_bool():
  with pytest.raises(ValueError, match="scan_blocks must be True or False"):
    UNetConfig.from_preset("tiny_sr", scan_blocks="yes")
  with pytest.raises(ValueError, match="at least 2"):
    Stack([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
  with pytest.raises(ValueError, match="differ in structure or shape"):
    Stack([nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 3, rngs=nnx.Rngs(0))])


def test_restoring_across_layouts_names_scan_blocks():
  """A checkpoint of one layout restored into the other fails with the field and the fix."""
  _, unrolled, scanned = _models("efficient_resblock_skips")
  with pytest.raises(CheckpointMismatchError, match="model.scan_blocks") as err:
    saved, target = (nnx.to_pure_dict(nnx.state(m)) for m in (unrolled, scanned))
    check_matches(saved, target, what="ckpt")
  assert "with_scan_blocks" in str(err.value)
