"""The mesh helper and logical-axis → sharding rules (single process; multi-device runs are in
``test_scale_out.py``)."""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from imagen_jax import config as config_lib
from imagen_jax import sharding
from imagen_jax.stage import model as model_lib
from tests.train_utils import tiny_base_config

MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)  # shapes only: no devices needed
RULES = sharding.DEFAULT_RULES


def test_make_mesh_fills_the_rest_and_uses_auto_axes():
  mesh = sharding.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  # Auto axes: with_sharding_constraint (our `constrain`) fails on jax 0.10's Explicit default.
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
  "axes, message",
  [
    ({"data": 2 * jax.device_count()}, "config.mesh="),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"model": 2}, "unknown axes ['model']"),
    ({"data": 0}, "sizes must be >= 1"),
  ],
)
def test_make_mesh_rejects_bad_shapes_naming_the_field(axes, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    sharding.make_mesh(axes)


def test_bad_mesh_in_a_config_fails_validation():
  config = tiny_base_config()
  config.mesh.model = 2
  with pytest.raises(ValueError, match=r"config.mesh has unknown axes \['model'\]"):
    config_lib.validate(config)


def test_parse_mesh_flag():
  assert sharding.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
  with pytest.raises(ValueError, match="unknown axis 'model'"):
    sharding.parse_mesh("model=2")
  with pytest.raises(ValueError, match="name=size"):
    sharding.parse_mesh("data=two")


def test_fitted_spec_shards_divisible_dims_and_replicates_the_rest():
  spec = sharding.fitted_spec(("keep", "keep", "conv_in", "conv_out"), (3, 3, 64, 32), MESH, RULES)
  assert spec == PartitionSpec(None, None, "fsdp", "tensor")
  # 3 RGB input channels do not divide by fsdp=4: replicated, never an XLA shape error.
  spec = sharding.fitted_spec(("keep", "keep", "conv_in", "conv_out"), (3, 3, 3, 32), MESH, RULES)
  assert spec == PartitionSpec(None, None, None, "tensor")
  # The batch splits over data × fsdp when it can, else over what divides it.
  assert sharding.fitted_spec(("act_batch",), (16,), MESH, RULES) == PartitionSpec(("data", "fsdp"))
  assert sharding.fitted_spec(("act_batch",), (6,), MESH, RULES) == PartitionSpec("data")


def test_config_rules_round_trip_through_the_config():
  config = tiny_base_config()
  assert config_lib.logical_rules(config) == sharding.DEFAULT_RULES
  config.logical_rules = (("embed", "fsdp", "extra"),)
  with pytest.raises(ValueError, match="logical_rules entries"):
    config_lib.logical_rules(config)


def _stage_model():
  config = tiny_base_config()
  return model_lib.StageModel.create(config.stages.base, text_dim=64)


def test_unet_params_carry_logical_names_that_map_to_fsdp_and_tensor():
  from flax import nnx

  model = _stage_model()
  names = nnx.to_pure_dict(nnx.get_partition_spec(model.abstract_state))
  is_spec = lambda v: isinstance(v, PartitionSpec)
  assert jax.tree.structure(names, is_leaf=is_spec) == jax.tree.structure(model.abstract_params())
  specs = jax.tree.map(
    lambda s, x: sharding.fitted_spec(tuple(s), x.shape, MESH, RULES),
    names,
    model.abstract_params(),
    is_leaf=is_spec,
  )
  used = {a for spec in jax.tree.leaves(specs, is_leaf=is_spec) for a in spec if a is not None}
  assert {"fsdp", "tensor"} <= used  # FSDP and tensor parallelism both apply to the U-Net


@pytest.mark.parametrize("name", ["adam", "adafactor"])
def test_optimizer_moments_follow_their_parameter(name):
  model = _stage_model()
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES)
  params = model.abstract_params()
  p_shard = sharding.param_shardings(model.abstract_state, mesh, RULES)
  tx = optax.adam(1e-3) if name == "adam" else optax.adafactor(1e-3)
  opt = sharding.optimizer_shardings(tx, params, p_shard, mesh)
  abstract_opt = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(opt) == jax.tree.structure(abstract_opt)
  for s, x in zip(jax.tree.leaves(opt), jax.tree.leaves(abstract_opt)):
    assert len(s.spec) <= x.ndim  # every sharding is valid for its leaf's rank
