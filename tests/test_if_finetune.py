"""Fine-tuning DeepFloyd IF stages with the trainer: ``configs/if_stage1.py:tiny`` and
``configs/if_stage2.py:tiny`` from tiny diffusers checkpoints (U-Net, scheduler, T5 and tokenizer
in IF's layout)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

try:
  from tests.if_fixtures import make_if_dir
  from tests.train_utils import load_config
except ImportError:  # pragma: no cover
  from if_fixtures import make_if_dir
  from train_utils import load_config

from imagen_jax.checkpoint import restore_params_with_step
from imagen_jax.models.if_loading import load_if_unet
from imagen_jax.sample.cascade import Cascade
from imagen_jax.stage.model import create_stage_model
from imagen_jax.train import train_and_evaluate


def _config(if_dir, steps: int):
  config = load_config("if_stage1", "tiny")
  config.init_from = str(if_dir)
  config.text.encoder = str(if_dir)  # the checkpoint's own T5 (text_encoder/ + tokenizer/)
  config.text.max_length = 77  # IF's
  s = config.stages.if_stage1
  s.update(total_steps=steps, ckpt_every=2, log_every=2)
  s.optimizer.update(lr=1e-3)  # large enough for two steps to move every weight
  return config


def _params(workdir, if_dir):
  """The raw params and step of a run's latest checkpoint (architecture from the IF dir)."""
  ckdir = workdir / "if_stage1" / "checkpoints"
  config = _config(if_dir, 4)
  model = create_stage_model(config.stages.if_stage1, text_dim=32)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), model.abstract_params()
  )
  params, step = restore_params_with_step(str(ckdir), abstract, key="params")
  return params, step


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory):
  # Two levels (one attention level): the train step compiles in a fraction of the 3-level time.
  return make_if_dir(
    tmp_path_factory.mktemp("if_ft") / "IF-I-tiny",
    "tiny",
    sample_size=32,
    block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
  )


def test_fine_tune_from_diffusers_resumes_exactly_and_samples(if_dir, tmp_path):
  """2 steps from the checkpoint, then 2 more after a restart == 4 uninterrupted steps, bit for
  bit; the weights start from the checkpoint's (not a random init), the loss is finite, and the
  run samples through ``Cascade.from_workdir`` as an IF stage (learned variance, the empty
  prompt as the unconditional branch)."""
  whole, split = tmp_path / "whole", tmp_path / "split"
  train_and_evaluate(_config(if_dir, 2), str(split))
  after_two, step = _params(split, if_dir)
  assert step == 2
  # Started from the checkpoint: two Adam steps of lr 1e-3 move each weight by about 2e-3.
  start = _leaves(load_if_unet(if_dir).params)
  moved = [np.abs(x - y).max() for x, y in zip(_leaves(after_two), start, strict=True)]
  assert 0 < max(moved) < 0.05
  cascade = Cascade.from_workdir(str(split), settings={"if_stage1": {"steps": 2}})
  assert cascade.stages[0].learned_variance and cascade.null_prompt == ""
  images = cascade(["a red circle"], progress=False)["if_stage1"]
  assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

  train_and_evaluate(_config(if_dir, 4), str(split))  # resumes from step 2
  summary = train_and_evaluate(_config(if_dir, 4), str(whole))
  assert np.isfinite(summary["if_stage1"]["metrics"]["loss"])
  (a, step_a), (b, step_b) = _params(whole, if_dir), _params(split, if_dir)
  assert step_a == step_b == 4
  assert all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_fine_tune_stage_ii_from_diffusers_and_upscale(tmp_path):
  """``configs/if_stage2.py:tiny`` from a tiny IF-II checkpoint: the train step upscales the
  16² batch to 32² before augmenting it (IF's order; a 16² input would not fit the U-Net's
  6-channel input), 2 steps move the weights from the checkpoint's, the loss is finite, and the
  run upscales an image through ``Cascade.from_workdir``."""
  two = make_if_dir(
    tmp_path / "IF-II-tiny",
    "tiny_sr",
    seed=1,
    sample_size=32,
    block_out_channels=[32, 64],
    layers_per_block=[1, 1],
    time_embedding_dim=64,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
  )
  config = load_config("if_stage2", "tiny")
  config.init_from = str(two)
  config.text.encoder = str(two)  # the test's T5 sits beside the U-Net (IF-II has none)
  config.text.max_length = 77
  config.stages.if_stage2.update(total_steps=2, ckpt_every=2, log_every=1)
  config.stages.if_stage2.optimizer.update(lr=1e-3)
  summary = train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["if_stage2"]["metrics"]["loss"])
  cascade = Cascade.from_workdir(str(tmp_path / "run"), settings={"if_stage2": {"steps": 2}})
  stage = cascade.stages[0]
  assert stage.learned_variance and stage.lowres_size == 16
  start = _leaves(load_if_unet(two).params)
  moved = [np.abs(x - y).max() for x, y in zip(_leaves(stage.params), start, strict=True)]
  assert 0 < max(moved) < 0.05
  low = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  up = cascade(["a red circle"], init_image=low, progress=False)["if_stage2"]
  assert up.shape == (1, 32, 32, 3) and np.isfinite(up).all()
