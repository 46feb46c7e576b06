"""Tests for the pixel-analysis alignment evaluator of the ``shapes`` dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from imagen_jax.data import shapes as ds
from imagen_jax.evaluators import shapes as ev

ATTRS = ("color_acc", "shape_acc", "position_acc", "size_acc", "relation_acc")


def _dataset(size: int, n: int = 200, seed: int = 1) -> tuple[list[str], np.ndarray]:
  src = ds.ShapesSource(seed=seed, image_size=size)
  items = [src[i] for i in range(n)]
  return [it["caption"] for it in items], np.stack([it["image"] for it in items])


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_renders_score_near_perfect(size):
  prompts, images = _dataset(size)
  m = ev.score(prompts, images)
  assert m["num_single"] > 100 and m["num_two"] > 30 and m["unparsed"] == 0
  assert m["single_object_acc"] >= 0.97 and m["two_object_acc"] >= 0.95
  assert all(m[k] >= 0.98 for k in ATTRS), m
  assert m["alignment"] >= 0.98 and m["count_acc"] >= 0.98
  # Float images in [-1, 1] (the samplers' output) score the same as uint8.
  assert ev.score(prompts, _to_float(images)) == m


def test_every_single_object_caption_is_recognised():
  rng = np.random.default_rng(0)
  prompts = ds.all_single_object_captions()
  images = np.stack([ds.render(ds.scene_from_spec(ds.parse_caption(p), rng), 32) for p in prompts])
  m = ev.score(prompts, images)
  assert m["single_object_acc"] >= 0.98, m


@pytest.mark.parametrize("size", [32, 64])
def test_robust_to_noise_blur_and_color_shift(size):
  prompts, images = _dataset(size, seed=2)
  rng = np.random.default_rng(0)
  x = _to_float(images)
  x = ndimage.gaussian_filter(x, (0, 0.7 * size / 32, 0.7 * size / 32, 0))
  x = 0.9 * x + rng.uniform(-0.08, 0.08, (len(x), 1, 1, 3))  # contrast loss + colour cast
  x = x + 0.1 * rng.standard_normal(x.shape)
  m = ev.score(prompts, x.astype(np.float32))
  assert m["single_object_acc"] >= 0.9 and m["two_object_acc"] >= 0.85, m
  assert all(m[k] >= 0.9 for k in ATTRS), m


def test_speckles_are_ignored():
  prompts, images = _dataset(32, n=100, seed=3)
  rng = np.random.default_rng(0)
  speckled = images.copy()
  for img in speckled:
    for _ in range(4):  # isolated 1-2 px dots of random colour
      y, x = rng.integers(0, 31, size=2)
      img[y : y + rng.integers(1, 3), x] = rng.integers(0, 256, 3)
  m = ev.score(prompts, speckled)
  assert m["single_object_acc"] >= 0.95 and m["count_acc"] >= 0.95, m


def test_shuffled_captions_score_near_chance():
  prompts, images = _dataset(32, n=300, seed=4)
  shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
  m = ev.score(shuffled, images)
  assert m["color_acc"] <= 0.3 and m["shape_acc"] <= 0.5 and m["position_acc"] <= 0.3
  assert m["single_object_acc"] <= 0.03 and m["alignment"] <= 0.4
  assert abs(m["alignment"] - m["chance_alignment"]) < 0.1


def test_single_and_two_object_alignment_split_alignment():
  prompts, images = _dataset(32, n=300, seed=4)
  shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
  for caps in (prompts, shuffled):
    m = ev.score(caps, images)
    ns, nt = m["num_single"], m["num_two"]
    # alignment is the prompt-weighted mean of the two per-template alignments.
    split = (ns * m["single_object_alignment"] + nt * m["two_object_alignment"]) / (ns + nt)
    assert split == pytest.approx(m["alignment"])
    assert m["single_object_alignment"] >= m["single_object_acc"]
  assert ev.score(prompts, images)["single_object_alignment"] >= 0.98
  m = ev.score(shuffled, images)
  assert abs(m["single_object_alignment"] - m["chance_single_object_alignment"]) < 0.1
  # Only single-object prompts: the two-object metrics are undefined.
  single = [i for i, p in enumerate(prompts) if len(ds.parse_caption(p).objects) == 1]
  m = ev.score([prompts[i] for i in single], images[single])
  assert np.isnan(m["two_object_alignment"]) and np.isnan(m["chance_two_object_alignment"])
  assert m["single_object_alignment"] == pytest.approx(m["alignment"])


def test_noise_and_blank_images():
  prompts = ds.default_prompts(100)
  rng = np.random.default_rng(0)
  noise = np.clip(rng.standard_normal((100, 32, 32, 3)), -1, 1).astype(np.float32)
  m = ev.score(prompts, noise)
  assert m["single_object_acc"] <= 0.03 and m["two_object_acc"] <= 0.03
  assert m["alignment"] <= 0.4 and m["color_acc"] <= 0.3
  blank = np.full((100, 32, 32, 3), 128, np.uint8)
  assert ev.analyze_image(blank[0]) == []
  mb = ev.score(prompts, blank)
  assert mb["alignment"] == 0.0 and mb["count_acc"] == 0.0


def test_analyze_image_measurements():
  obj = ds.ShapeObject("purple", "triangle", "large", "bottom left", (0.01, -0.02))
  scene = ds.Scene((obj,))
  for size in (32, 64, 256):
    (det,) = ev.analyze_image(ds.render(scene, size))
    assert (det.color, det.shape, det.size, det.position) == (
      "purple",
      "triangle",
      "large",
      "bottom left",
    )
    np.testing.assert_allclose(det.center, obj.center, atol=1.5 / min(size, 128))
    assert abs(det.radius - obj.radius) < 0.01 and det.fit_error < 0.1


def test_relation_of():
  assert ev.relation_of((0.2, 0.5), (0.8, 0.5)) == "to the left of"
  assert ev.relation_of((0.8, 0.4), (0.2, 0.5)) == "to the right of"
  assert ev.relation_of((0.5, 0.1), (0.45, 0.9)) == "above"
  assert ev.relation_of((0.5, 0.9), (0.45, 0.1)) == "below"


def test_invalid_inputs():
  prompts, images = _dataset(32, n=3)
  with pytest.raises(ValueError, match="3 prompts but 2 images"):
    ev.score(prompts, images[:2])
  with pytest.raises(ValueError, match="shape"):
    ev.score(prompts, images[..., 0])
  with pytest.raises(ValueError, match="square RGB"):
    ev.score(prompts, np.concatenate([images, images[..., :1]], axis=-1))
  with pytest.raises(ValueError, match="square RGB"):
    ev.analyze_image(images[0, :, :20])
  with pytest.raises(ValueError, match="sequence"):
    ev.score(prompts[0], images[:1])
  with pytest.raises(ValueError, match="not a caption"):
    ev.ShapesAlignmentEvaluator(prompts=["a photo of a cat"])
  # Non-grammar prompts are counted, not fatal, and excluded from the metrics.
  m = ev.score(["a photo of a cat", *prompts[1:]], images)
  assert m["unparsed"] == 1 and m["num_prompts"] == 3 and m["alignment"] == 1.0
  m = ev.score(["nonsense"], images[:1])
  assert m["unparsed"] == 1 and np.isnan(m["alignment"])


def test_evaluator_prompts_are_fixed_and_mixed():
  a = ev.ShapesAlignmentEvaluator(num_prompts=40, two_object_fraction=0.25, seed=0)
  assert a.prompts == ev.ShapesAlignmentEvaluator(num_prompts=40, seed=0).prompts
  assert a.prompts != ev.ShapesAlignmentEvaluator(num_prompts=40, seed=1).prompts
  specs = [ds.parse_caption(p) for p in a.prompts]
  assert len(specs) == 40 and sum(len(s.objects) == 2 for s in specs) == 10
  assert len(set(a.prompts)) >= 38
  rng = np.random.default_rng(0)
  images = np.stack([ds.render(ds.scene_from_spec(s, rng), 32) for s in specs])
  m = a.run(_to_float(images))
  assert m["alignment"] == 1.0 and m == a(images)
  assert len(ds.default_prompts(500, 0.0)) == 500  # more single prompts than the 432 distinct ones


def test_cli_self_test(capsys):
  assert ev.main(["--self_test", "30"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == "alignment: 1.000"
  assert any(line.startswith("color_acc") for line in out)


@pytest.mark.parametrize("layout", ["images", "prompts", "txt"])
def test_cli_images_dir(tmp_path, capsys, layout):
  prompts, images = _dataset(32, n=6, seed=5)
  files = [f"{i:03d}.png" for i in range(len(prompts))]
  for f, img, p in zip(files, images, prompts):
    Image.fromarray(img).save(tmp_path / f)
    if layout == "txt":
      (tmp_path / f).with_suffix(".txt").write_text(p + "\n")
  if layout == "images":
    entries = [{"file": f, "prompt": p} for f, p in zip(files, prompts)]
    (tmp_path / "metadata.json").write_text(json.dumps({"prompts": prompts, "images": entries}))
  elif layout == "prompts":
    (tmp_path / "metadata.json").write_text(json.dumps({"prompts": prompts}))
  assert ev.main(["--images_dir", str(tmp_path), "--json"]) == 0
  out = capsys.readouterr().out
  assert out.strip().splitlines()[-1] == "alignment: 1.000" and '"color_acc": 1.0' in out


def test_cli_images_dir_errors(tmp_path):
  with pytest.raises(SystemExit):
    ev.main(["--images_dir", str(tmp_path)])  # empty directory
  with pytest.raises(SystemExit):
    ev.main([])
