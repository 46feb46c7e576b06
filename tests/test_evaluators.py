"""The evaluator interface: CLIP score against torchmetrics, the registry chosen by config, the
``python -m imagen_jax.evaluators`` command and the DrawBench-style runner.

FID / KID and the Inception network are tested in ``test_fid.py``; CLIP itself in ``test_clip.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax.clip import CLIP
from imagen_jax.evaluators import cli, clip_score, drawbench, registry
from imagen_jax.sample.cascade import Cascade
from tests.clip_fixtures import make_tiny_clip_dir
from tests.torch_oracles import declare_torchvision_ops, torchmetrics_multimodal
from tests.train_utils import two_stage_run

PROMPTS = ["a red circle", "the blue dog", "a cat on the sofa", "o", "green", "a long story of it"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  declare_torchvision_ops()  # transformers' CLIPImageProcessor imports torchvision
  return make_tiny_clip_dir(tmp_path_factory.mktemp("clip"), hidden_act="gelu")


@pytest.fixture(scope="module")
def clip(clip_dir):
  return CLIP.load(clip_dir)


@pytest.fixture(scope="module")
def images():
  """uint8 images of a size the processor resizes and crops (not square)."""
  return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 40, 52, 3), dtype=np.uint8)


def test_clip_score_equals_torchmetrics(clip, clip_dir, images):
  torch = pytest.importorskip("torch")
  torchmetrics_multimodal()
  from torchmetrics.functional.multimodal.clip_score import _clip_score_update
  from transformers import CLIPModel, CLIPProcessor
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  class Features(torch.nn.Module):
    """transformers 5's ``get_*_features`` return output objects; torchmetrics 1.9 wants the
    projected tensor (their ``pooler_output``)."""

    def __init__(self, model):
      super().__init__()
      self.model, self.config = model, model.config

    def get_image_features(self, *args):
      return self.model.get_image_features(*args).pooler_output

    def get_text_features(self, *args):
      return self.model.get_text_features(*args).pooler_output

  model = Features(CLIPModel.from_pretrained(str(clip_dir)).eval())
  # transformers 5's default CLIPImageProcessor resizes with torchvision; the PIL one is the
  # reference CLIP was trained with, and the one our preprocessing equals.
  pil = CLIPProcessor(
    image_processor=CLIPImageProcessorPil.from_pretrained(str(clip_dir)),
    tokenizer=CLIPProcessor.from_pretrained(str(clip_dir)).tokenizer,
  )
  tensors = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images]

  def oracle(sel, processor=pil):  # torchmetrics.functional.clip_score's body, our wrapped model
    with torch.no_grad():
      pairs, _ = _clip_score_update(
        [tensors[i] for i in sel], [PROMPTS[i] for i in sel], model, processor
      )
    return pairs.numpy(), float(torch.max(pairs.mean(0), torch.zeros_like(pairs.mean(0))))

  everything = range(len(PROMPTS))
  got_pairs = clip_score.pair_scores(clip, images, PROMPTS, batch_size=4)  # two batches
  np.testing.assert_allclose(got_pairs, oracle(everything)[0], atol=1e-3)  # 1e-5 in cos
  # With torchmetrics' default (torchvision) processor: the resize differs slightly.
  default = CLIPProcessor.from_pretrained(str(clip_dir))
  np.testing.assert_allclose(got_pairs, oracle(everything, default)[0], atol=0.05)
  # The floor applies to the mean: test it on pairs whose mean is negative and positive.
  neg, pos = np.flatnonzero(got_pairs < 0), np.flatnonzero(got_pairs > 0)
  assert len(neg) and len(pos), got_pairs
  for sel in (neg, pos):
    got = clip_score.clip_score(clip, images[sel], [PROMPTS[i] for i in sel])
    np.testing.assert_allclose(got, oracle(sel)[1], atol=1e-3)


def test_float_images_are_scored_like_their_uint8_pixels(clip, images):
  as_float = images.astype(np.float32) / 127.5 - 1.0  # what the samplers return
  np.testing.assert_allclose(
    clip_score.pair_scores(clip, as_float, PROMPTS),
    clip_score.pair_scores(clip, images, PROMPTS),
    atol=1e-4,
  )
  with pytest.raises(ValueError, match="6 images but 2 prompts"):
    clip_score.pair_scores(clip, images, PROMPTS[:2])


def _evals(**updates):
  evals = config_lib.run_config().evals
  evals.update(updates)
  return evals


def test_registry_checks_name_the_field_and_the_fix():
  with pytest.raises(
    ValueError, match=r"config.evals.evaluators: unknown evaluator\(s\) \['clip'\]"
  ):
    registry.check_evals(_evals(evaluators=("clip",)))
  with pytest.raises(ValueError, match=r"config.evals.clip_score.clip is empty"):
    registry.check_evals(_evals(evaluators=("clip_score",)))
  with pytest.raises(ValueError, match=r"config.evals.fid.inception is empty"):
    registry.check_evals(_evals(evaluators=("fid",)))
  with pytest.raises(ValueError, match=r"'shapes'.*config.data.source = 'folder'"):
    registry.check_evals(_evals(evaluators=("shapes",)), data_source="folder")
  with pytest.raises(ValueError, match="repeat"):
    registry.parse_names("grid,grid")
  assert registry.parse_names(" shapes, grid ") == ["shapes", "grid"]
  assert registry.parse_names(("clip_score,grid",)) == ["clip_score", "grid"]  # flag override


def test_registry_runs_evaluators_and_splits_scalars_from_pictures(clip_dir):
  evals = _evals(evaluators=("clip_score", "grid", "shapes"))
  evals.clip_score.clip = str(clip_dir)
  evals.num_prompts = 6
  built = registry.build_evaluators(evals, data_source="shapes")
  assert [e.name for e in built] == ["clip_score", "grid", "shapes"]
  prompts = registry.eval_prompts(built, default=["ignored"] * 6)
  assert prompts == built[2].prompts  # shapes fixes its own prompts
  square = np.random.default_rng(1).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
  scalars, pictures = registry.run_evaluators(built, square, prompts)
  assert {"eval/clip_score", "eval/alignment"} <= set(scalars)
  assert np.isfinite(list(scalars.values())).all()
  assert list(pictures) == ["samples"] and pictures["samples"].dtype == np.uint8
  assert pictures["samples"].shape[1] > 3 * 128  # 3 columns of 128-pixel tiles with captions


def _write_folder(path, images, prompts):
  path.mkdir()
  for i, (im, p) in enumerate(zip(images, prompts)):
    Image.fromarray(im).save(path / f"{i:03d}.png")
    (path / f"{i:03d}.txt").write_text(p)
  return path


def test_cli_scores_a_folder_and_reports_mistakes_as_flags(
  tmp_path, clip, clip_dir, images, capsys
):
  folder = _write_folder(tmp_path / "samples", images, PROMPTS)
  out = tmp_path / "scores.json"
  argv = ["--images_dir", str(folder), "--evals", "clip_score,grid", "--clip", str(clip_dir)]
  assert cli.main([*argv, "--out", str(out)]) == 0
  got = json.loads(out.read_text())["eval/clip_score"]
  assert got == pytest.approx(clip_score.clip_score(clip, images, PROMPTS), abs=1e-4)
  assert (folder / "eval" / "samples.png").exists()
  assert "eval/clip_score" in capsys.readouterr().out
  for bad, message in [
    (["--images_dir", str(folder), "--evals", "clip_score"], "--clip is empty"),
    (["--images_dir", str(folder), "--evals", "fid"], "--inception is empty"),
    (["--images_dir", str(tmp_path / "nope")], "not a directory"),
    (
      ["--images_dir", str(folder), "--evals", "psnr"],
      r"--evals: unknown evaluator\(s\) \['psnr'\]",
    ),
  ]:
    with pytest.raises(SystemExit) as e:
      cli.main(bad)
    assert e.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err), message


def test_drawbench_csv_layout(tmp_path):
  path = tmp_path / "bench.csv"
  path.write_text(
    'Prompts,Category,Source\n"a red, round thing",Colors,x\nb,Counting,\nc,Colors,\n'
  )
  got = drawbench.read_prompts_csv(path)
  assert [(p.prompt, p.category) for p in got] == [
    ("a red, round thing", "Colors"),
    ("b", "Counting"),
    ("c", "Colors"),
  ]
  assert [p.prompt for p in drawbench.read_prompts_csv(path, limit_per_category=1)] == [
    "a red, round thing",
    "b",
  ]
  (tmp_path / "bad.csv").write_text("text,kind\na,b\n")
  with pytest.raises(ValueError, match="'Prompts'.*'Category'"):
    drawbench.read_prompts_csv(tmp_path / "bad.csv")


def test_drawbench_two_runs_side_by_side(tmp_path, clip):
  cascade = Cascade.from_workdir(str(two_stage_run()), max_batch=4)
  prompts = [
    drawbench.BenchPrompt("a small red circle at the top left", "Colors"),
    drawbench.BenchPrompt("two blue squares", "Counting"),
    drawbench.BenchPrompt("a large green triangle", "Colors"),
  ]
  steps = {"base": {"steps": 4}, "sr": {"steps": 2}}  # run A: test_clip_guidance's programs
  runs = [
    drawbench.BenchRun("w5", cascade, steps),
    drawbench.BenchRun("w1", cascade, {s: {**v, "guidance": 1.0} for s, v in steps.items()}),
  ]
  table = drawbench.run_bench(runs, prompts, clip, tmp_path / "report")
  assert list(table) == ["w5", "w1"] and list(table["w5"]) == ["Colors", "Counting", "overall"]
  out = tmp_path / "report"
  assert json.loads((out / "scores.json").read_text()) == table
  for label in ("w5", "w1"):
    grid = np.asarray(Image.open(out / label / "colors.png"))
    assert grid.shape[1] > 2 * 128  # two Colors prompts side by side, captioned
  sbs = np.asarray(Image.open(out / "side_by_side" / "counting.png"))
  assert sbs.shape[0] > 2 * 128 > sbs.shape[1]  # one prompt: run A above run B
  html = (out / "report.html").read_text()
  assert "Colors" in html and "side_by_side/counting.png" in html and "w5" in html
  assert all(0.0 <= v <= 100.0 for t in table.values() for v in t.values())
  # The same seed, different guidance: the two runs' images differ.
  a, b = (np.asarray(Image.open(out / lab / "counting.png")) for lab in ("w5", "w1"))
  assert a.shape == b.shape and np.abs(a.astype(int) - b).max() > 10
