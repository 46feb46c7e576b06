"""Tests for the procedural ``shapes`` image–caption dataset."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from imagen_jax.data import shapes as ds


def _box_down(img: np.ndarray, factor: int) -> np.ndarray:
  n = img.shape[0] // factor
  return img.astype(np.float64).reshape(n, factor, n, factor, 3).mean(axis=(1, 3))


def test_items_are_pure_functions_of_seed_and_index():
  a, b = ds.ShapesSource(seed=3), ds.ShapesSource(seed=3)
  for i in (0, 1, 17, 2**31 - 2):
    x, y = a[i], b[i]
    assert x["caption"] == y["caption"] and x["id"] == i
    np.testing.assert_array_equal(x["image"], y["image"])
  # Access order does not matter (no hidden iterator state).
  np.testing.assert_array_equal(a[5]["image"], ds.ShapesSource(seed=3)[5]["image"])


def test_different_indices_and_seeds_differ():
  src = ds.ShapesSource(seed=0)
  captions = [src[i]["caption"] for i in range(50)]
  assert len(set(captions)) >= 45
  images = [src[i]["image"] for i in range(20)]
  assert all(not np.array_equal(images[i], images[i + 1]) for i in range(19))
  other = ds.ShapesSource(seed=1)
  assert sum(other[i]["caption"] != captions[i] for i in range(50)) >= 45


def test_item_format_and_grain_protocol():
  src = ds.ShapesSource(seed=0, image_size=32, length=10)
  assert isinstance(src, grain.sources.RandomAccessDataSource) and len(src) == 10
  item = src[3]
  assert set(item) == {"image", "caption", "id"}
  assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
  with pytest.raises(IndexError):
    src[10]
  assert src[-1]["caption"] == src[9]["caption"]
  assert "seed=0" in repr(src)
  batch = grain.MapDataset.source(ds.ShapesSource(image_size=(16, 32))).batch(4)[0]
  assert batch["image_16"].shape == (4, 16, 16, 3) and batch["image_32"].shape == (4, 32, 32, 3)
  assert len(batch["caption"]) == 4


def test_multi_resolution_items_render_the_same_scene():
  src = ds.ShapesSource(seed=0, image_size=(32, 64, 128))
  diffs = []
  for i in range(40):
    item = src[i]
    lo = item["image_32"].astype(np.float64)
    for hi, f in ((item["image_64"], 2), (item["image_128"], 4)):
      d = np.abs(_box_down(hi, f) - lo)
      diffs.append(d.mean())
      # Only a few pixels at sharp corners (triangle apexes) may differ noticeably.
      assert (d > 16).mean() < 0.01
  assert max(diffs) < 1.0


@pytest.mark.parametrize("size", [16, 33, 200])
def test_render_any_resolution(size):
  img = ds.render(ds.ShapesSource(seed=0).scene(2), size)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  assert (img != np.array(ds.BACKGROUND, np.uint8)).any(axis=-1).mean() > 0.005


def test_caption_parse_round_trip():
  rng = np.random.default_rng(0)
  seen_two = 0
  for _ in range(500):
    scene = ds.sample_scene(rng, two_object_prob=0.5)
    text = ds.caption(scene)
    spec = ds.parse_caption(text)
    assert spec == scene.spec()
    assert ds.caption(spec) == text
    seen_two += len(scene.objects) == 2
  assert 200 < seen_two < 300


def test_parse_normalises_and_rejects():
  spec = ds.parse_caption("  A Small  RED circle at the top left. ")
  assert spec == ds.CaptionSpec((ds.ObjectSpec("red", "circle", "small", "top left"),))
  two = ds.parse_caption("an orange square to the right of a white triangle")
  assert two.relation == "to the right of" and two.objects[0] == ds.ObjectSpec("orange", "square")
  assert ds.caption(ds.parse_caption("a orange square above a red circle")).startswith("an orange")
  bad = [
    "a red circle",
    "a small pink circle at the top left",
    "a small red circle at the top left and more",
    "a red circle next to a blue square",
    "",
  ]
  for text in bad:
    with pytest.raises(ValueError, match="not a caption") as err:
      ds.parse_caption(text)
    assert repr(text) in str(err.value)
  with pytest.raises(ValueError):
    ds.parse_caption(3)


def test_vocabulary_is_exactly_the_grammar_words():
  rng = np.random.default_rng(1)
  captions = ds.all_single_object_captions()
  captions += [ds.caption(ds.sample_spec(rng, two_object_prob=1.0)) for _ in range(2000)]
  used = {w for c in captions for w in c.split()}
  assert used == set(ds.vocabulary())
  assert ds.vocabulary() == sorted(ds.vocabulary())


def test_all_single_object_captions():
  caps = ds.all_single_object_captions()
  assert len(caps) == len(set(caps)) == 8 * 3 * 2 * 9 == 432
  specs = [ds.parse_caption(c) for c in caps]
  assert all(len(s.objects) == 1 for s in specs)
  assert {s.objects[0].position for s in specs} == set(ds.POSITIONS)
  assert (
    "a small red circle at the top left" in caps and "a large blue square in the center" in caps
  )
  assert "a large white triangle on the right" in caps


@pytest.mark.parametrize("shape", ds.SHAPES)
def test_small_objects_visible_at_32(shape):
  for color in ("black", "white", "purple"):
    scene = ds.Scene((ds.ShapeObject(color, shape, "small", "center"),))
    img = ds.render(scene, 32).astype(np.int32)
    diff = np.abs(img - np.array(ds.BACKGROUND)).sum(-1)
    strong = diff > 0.5 * np.abs(np.array(ds.COLORS[color]) - ds.BACKGROUND).sum()
    ys, xs = np.nonzero(strong)
    assert strong.sum() >= 15
    assert np.ptp(xs) + 1 >= 5 and np.ptp(ys) + 1 >= 5


def test_two_object_placement_matches_relation():
  rng = np.random.default_rng(2)
  for _ in range(300):
    scene = ds.sample_scene(rng, two_object_prob=1.0, position_jitter=0.05)
    a, b = scene.objects
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    want = {
      "to the left of": dx < -0.5,
      "to the right of": dx > 0.5,
      "above": dy < -0.5,
      "below": dy > 0.5,
    }
    assert want[scene.relation], scene
    assert (a.color, a.shape) != (b.color, b.shape)
    assert min(abs(dx), abs(dy)) <= 0.1 + 1e-9  # same row (or column), up to jitter


def test_objects_stay_inside_image_and_cell():
  rng = np.random.default_rng(3)
  for _ in range(300):
    for o in ds.sample_scene(rng, two_object_prob=0.5, position_jitter=0.1).objects:
      half = ds.shape_half_extent(o.shape, o.radius)
      row, col = ds.cell_index(o.position)
      cx, cy = o.center
      assert half < cx < 1 - half and half < cy < 1 - half
      assert col / 3 < cx < (col + 1) / 3 and row / 3 < cy < (row + 1) / 3


def test_invalid_inputs():
  with pytest.raises(ValueError, match="color"):
    ds.ShapeObject("pink", "circle", "small", "center")
  with pytest.raises(ValueError, match="position"):
    ds.ShapeObject("red", "circle", "small", "middle")
  obj = ds.ShapeObject("red", "circle", "small", "center")
  with pytest.raises(ValueError):
    ds.Scene((obj, obj))  # two objects need a relation
  with pytest.raises(ValueError):
    ds.render(ds.Scene((obj,)), 4)
  with pytest.raises(ValueError):
    ds.scene_from_spec(ds.CaptionSpec((ds.ObjectSpec("red", "circle"),)), np.random.default_rng(0))
  with pytest.raises(ValueError):
    ds.ShapesSource(seed=-1)
