"""train_and_evaluate end to end on tiny configs: outputs, strict restore, non-finite handling."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.checkpoint_integrity import CheckpointMismatchError
from imagen_jax.config import stage_config
from imagen_jax.stage import step as step_lib
from imagen_jax.train import NonFiniteError, train_and_evaluate
from imagen_jax.train import data as data_lib
from tests.clip_fixtures import make_tiny_clip_dir
from tests.torch_oracles import declare_torchvision_ops
from tests.train_utils import load_config, tiny_base_config


def _read_jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_two_stage_demo_writes_checkpoints_metrics_events_and_grids(tmp_path):
  config = load_config("shapes", "ci")  # base 32² + SR 32→64², 4 steps each
  # The evaluators config.evals names run on EMA weights: shapes, a (tiny) CLIP score, the grid.
  declare_torchvision_ops()
  config.evals.evaluators = ("shapes", "clip_score", "grid")
  config.evals.clip_score.clip = str(make_tiny_clip_dir(tmp_path / "clip"))
  for s in (config.stages.base, config.stages.sr):
    s.batch_size = 4
    s.log_every = 2
    s.sample.steps = 2
  config.evals.num_prompts = 8
  config.evals.cascade = True  # the final stage scored on the base's samples too
  out = train_and_evaluate(config, str(tmp_path))
  assert set(out) == {"base", "sr"}
  # The whole cascade: the SR stage upsampled the base's samples of the same 8 prompts.
  through = out["sr"]["cascade_evals"]
  assert through["eval/num_prompts"] == 8 and 0.0 <= through["eval/alignment"] <= 1.0
  assert Image.open(through["grid"]).size == Image.open(out["sr"]["evals"]["grid"]).size
  last = _read_jsonl(tmp_path / "sr" / "metrics.jsonl")[-1]
  assert last["step"] == 4 and last["cascade/alignment"] == through["eval/alignment"]
  assert "cascade_evals" not in out["base"]  # only after the final stage
  for name in ("base", "sr"):
    stage_dir = tmp_path / name
    assert out[name]["step"] == 4
    assert (stage_dir / "checkpoints" / "4" / "state").is_dir()
    records = _read_jsonl(stage_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for key in ("grad_norm", "lr", "images_per_s", "bad_corrupt", "loss_t0", "skipped_steps"):
      assert key in train[-1]
    assert np.isfinite(train[-1]["loss"])
    evals = [r for r in records if "eval/alignment" in r]
    assert evals and 0.0 <= evals[-1]["eval/alignment"] <= 1.0
    assert 0.0 <= evals[-1]["eval/clip_score"] <= 100.0
    events = list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and "samples_ema" in acc.Tags()["images"]
    assert "eval/clip_score" in acc.Tags()["scalars"]
    grid = Image.open(out[name]["evals"]["grid"])
    assert grid.mode == "RGB" and grid.size[0] > 3 * 128  # several captioned 128-pixel tiles
  assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
  assert json.loads((tmp_path / "config.json").read_text())["stage_order"] == ["base", "sr"]


@pytest.fixture(scope="module")
def paper_tiny_runs(tmp_path_factory):
  """Two training steps of each paper stage's ``:tiny`` config, each run in its own workdir."""
  runs = {}
  for name in ("base64", "sr256", "sr1024"):
    config = load_config(name, "tiny")
    stage = config.stages[config.stage_order[0]]
    stage.total_steps, stage.batch_size, stage.log_every = 2, 2, 1
    stage.eval_every, stage.final_eval = 0, False
    path = tmp_path_factory.mktemp(name)
    runs[name] = (path, train_and_evaluate(config, str(path)))
  return runs


def test_two_steps_of_each_paper_stage_config_tiny(paper_tiny_runs):
  for _, out in paper_tiny_runs.values():
    (summary,) = out.values()
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])


def test_paper_tiny_runs_sample_as_one_cascade(paper_tiny_runs):
  """base64:tiny → sr256:tiny → sr1024:tiny chain 32² → 128² → 512², as the paper's 64 → 1024."""
  from imagen_jax.sample.cascade import Cascade

  cascade = Cascade.from_workdir([str(path) for path, _ in paper_tiny_runs.values()], max_batch=1)
  steps = {name: {"steps": 2} for name in ("base", "sr256", "sr1024")}
  out = cascade(["a small red circle"], seed=0, settings=steps, progress=False)
  assert {k: v.shape for k, v in out.items()} == {
    "base": (1, 32, 32, 3),
    "sr256": (1, 128, 128, 3),
    "sr1024": (1, 512, 512, 3),
  }
  assert all(np.isfinite(v).all() for v in out.values())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A finished 2-step run of the demo's base stage (shared by the tests below)."""
  path = tmp_path_factory.mktemp("pretrained")
  train_and_evaluate(tiny_base_config(steps=2), str(path))
  return path


def test_strict_restore_rejects_a_checkpoint_of_another_model(pretrained):
  other = tiny_base_config(steps=6)
  other.stages.base.model.model_channels = 32  # a different model in the same workdir
  with pytest.raises(CheckpointMismatchError, match="shape mismatch") as err:
    train_and_evaluate(other, str(pretrained))
  assert "checkpoint (" in str(err.value) and "--config.init_from" in str(err.value)
  other.stages.base.model.model_channels = 16
  other.stages.base.model.attn_resolutions = (16,)  # drops the 8² attention layers
  other.stages.base.model.cross_attn_resolutions = (16,)
  with pytest.raises(CheckpointMismatchError, match="unexpected in checkpoint"):
    train_and_evaluate(other, str(pretrained))


def test_finished_run_resumes_at_its_last_step(pretrained):
  out = train_and_evaluate(tiny_base_config(steps=2), str(pretrained))  # nothing left to do
  assert out["base"]["step"] == 2
  assert [r["step"] for r in _read_jsonl(pretrained / "base" / "metrics.jsonl")] == [1, 2]


def test_init_from_starts_from_another_runs_weights(pretrained, tmp_path):
  config = tiny_base_config(steps=1)
  config.init_from = str(pretrained)
  config.stages.base.optimizer.lr = 1e-9  # one negligible Adam step (|update| <= ~1e-9)
  train_and_evaluate(config, str(tmp_path / "finetune"))
  from imagen_jax.tools.inspect_checkpoint import load_state

  pre = load_state(str(pretrained / "base" / "checkpoints" / "2"))
  fine = load_state(str(tmp_path / "finetune" / "base" / "checkpoints" / "1"))
  assert int(fine["step"]) == 1
  # Fine-tuning starts from the pretrained EMA weights (not from a fresh random init).
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7)
  jax.tree.map(close, fine["params"], pre["ema_params"])


def test_nonfinite_updates_are_skipped_then_training_stops(tmp_path, monkeypatch):
  real = data_lib.make_train_iterator

  def poisoned(config, stage, text):
    it = real(config, stage, text)

    class NaNImages:
      def __next__(self):
        batch = next(it)
        batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

      def __getattr__(self, name):
        return getattr(it, name)

    return NaNImages()

  monkeypatch.setattr(data_lib, "make_train_iterator", poisoned)
  config = tiny_base_config(steps=10, max_consecutive_nonfinite=3, ckpt_every=100)
  with pytest.raises(NonFiniteError, match="consecutive non-finite"):
    train_and_evaluate(config, str(tmp_path))
  assert not list((tmp_path / "base" / "checkpoints").glob("[0-9]*"))  # nothing bad was saved


@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_sr_loss_blurs_the_lowres_input_when_asked(blur):
  """``lowres_blur`` reaches the SR stage's U-Net: with the low-res input equal to the target and
  no noise augmentation, a model that returns its low-res input has zero x0 loss unless the input
  was blurred (white noise loses most of its variance under σ ~ U(0, 2))."""
  from imagen_jax.diffusion import get_schedule

  stage = stage_config(
    "sr", "tiny_sr", 8, lowres_size=4, objective="x0", max_aug_level=0.0, lowres_blur=blur
  )
  x0 = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  batch = {"image": x0, "lowres": x0, "text_emb": jnp.zeros((16, 4, 8))}
  batch["text_mask"] = jnp.ones((16, 4), bool)

  def apply_fn(params, x_t, logsnr, emb, mask, lowres=None, aug_logsnr=None):
    return lowres  # [B, H, W, C]: what the model was shown

  loss_fn = jax.jit(step_lib.make_loss_fn(apply_fn, stage, get_schedule("cosine")))
  loss, _ = loss_fn({}, batch, jax.random.key(1))
  if blur:
    assert float(loss) > 0.2
  else:
    assert float(loss) < 1e-4


def test_lowres_blur_out_of_range_names_the_field():
  from imagen_jax import config as config_lib

  config = load_config("shapes", "ci")
  config.stages.sr.lowres_blur = -1.0
  with pytest.raises(ValueError, match=r"config\.stages\.sr\.lowres_blur"):
    config_lib.validate(config)
  config = load_config("shapes", "ci")
  config.stages.base.lowres_blur = 1.0  # a base stage has no low-res input to blur
  with pytest.raises(ValueError, match=r"config\.stages\.base\.lowres_blur=1.0 .* set it to 0"):
    config_lib.validate(config)


def test_shifted_schedule_base_size_reaches_the_stage_schedule():
  """``schedule_base_size`` sets the shift the stage trains and samples with: λ_cosine +
  2 log(16/32) (4× noisier) for a 32² stage; runs saved before the field existed keep base size
  64; a bad value names the field."""
  import ml_collections

  from imagen_jax import config as config_lib
  from imagen_jax.diffusion import get_schedule
  from imagen_jax.stage.model import stage_schedule

  stage = stage_config("base", "tiny_base", 32, schedule="shifted_cosine", schedule_base_size=16)
  t = jnp.linspace(0.05, 0.95, 7)
  cosine = np.asarray(get_schedule("cosine")(t))
  np.testing.assert_allclose(stage_schedule(stage)(t), cosine + 2 * np.log(0.5), atol=1e-5)
  old = ml_collections.ConfigDict({k: v for k, v in stage.items() if k != "schedule_base_size"})
  np.testing.assert_allclose(stage_schedule(old)(t), cosine + 2 * np.log(2.0), atol=1e-5)
  config = load_config("shapes", "ci")
  config.stages.base.schedule_base_size = 0
  with pytest.raises(ValueError, match=r"config\.stages\.base\.schedule_base_size"):
    config_lib.validate(config)
  config = load_config("shapes", "ci")  # the plain cosine: a base size alone would do nothing
  config.stages.base.schedule_base_size = 16
  with pytest.raises(ValueError, match=r"config\.stages\.base\.schedule='shifted_cosine'"):
    config_lib.validate(config)


def test_train_step_skips_nonfinite_update_and_counts_it():
  """The step itself: a NaN batch leaves params, EMA and optimizer state untouched."""
  import optax

  stage = stage_config("toy", "tiny_base", 8, text_drop_prob=0.0)
  from imagen_jax.diffusion import get_schedule

  def apply_fn(params, x, logsnr, emb, mask, **kw):
    return x * params["w"]  # [B, H, W, C]

  tx = optax.sgd(0.1)
  schedule = get_schedule("cosine")
  step = jax.jit(step_lib.make_train_step(apply_fn, tx, lambda s: 0.1, stage, schedule))
  state = step_lib.init_state({"w": jnp.ones(())}, tx, jax.random.key(0))
  batch = {
    "image": jnp.zeros((2, 8, 8, 3)),
    "text_emb": jnp.zeros((2, 4, 8)),
    "text_mask": jnp.ones((2, 4), bool),
  }
  good, m = step(state, batch)
  assert float(good["params"]["w"]) != 1.0 and int(m["skipped_steps"]) == 0
  bad, m = step(good, {**batch, "image": jnp.full((2, 8, 8, 3), jnp.nan)})
  assert float(bad["params"]["w"]) == float(good["params"]["w"])
  assert float(bad["ema_params"]["w"]) == float(good["ema_params"]["w"])
  assert int(m["skipped_steps"]) == 1 and int(m["nonfinite_run"]) == 1
  again, m = step(bad, batch)
  assert int(m["nonfinite_run"]) == 0 and float(again["params"]["w"]) != float(bad["params"]["w"])


def test_bad_config_fails_fast_naming_the_field(tmp_path):
  config = tiny_base_config()
  config.stages.base.objective = "score"
  with pytest.raises(ValueError, match=r"config.stages.base.objective"):
    train_and_evaluate(config, str(tmp_path))
  config = tiny_base_config()
  config.stages.base.batch_size = 5
  config.stages.base.grad_accum = 2
  with pytest.raises(ValueError, match="grad_accum"):
    train_and_evaluate(config, str(tmp_path))
  config = tiny_base_config()
  config.stages.base.model.preset = "tiny_sr"
  with pytest.raises(ValueError, match="lowres_cond"):
    train_and_evaluate(config, str(tmp_path))


def test_per_t_losses_are_pooled_over_the_logging_window():
  """A quarter of t that one step missed still gets the window's loss; one no step hit is NaN."""
  from imagen_jax.train.trainer import pooled_metrics

  host = [
    {"loss": 1.0, "loss_t_sum": np.array([2.0, 0, 0, 3]), "loss_t_count": np.array([2.0, 0, 0, 1])},
    {"loss": 3.0, "loss_t_sum": np.array([0.0, 6, 0, 1]), "loss_t_count": np.array([0.0, 2, 0, 1])},
  ]
  out = pooled_metrics(host)
  assert out["loss"] == 2.0
  assert out["loss_t0"] == 1.0 and out["loss_t1"] == 3.0 and out["loss_t3"] == 2.0
  assert np.isnan(out["loss_t2"])
  assert not any(k.startswith("loss_t_") for k in out)
