"""Per-example preprocessing: decoding every PIL mode, bad-data reasons, geometry, SR pairs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import preprocess as pp


def _png_bytes(img: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG", **kw)
  return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", **kw)
  return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
  """A tiny PNG whose header claims ``width x height``: cheap on disk, a bomb if decoded."""
  data = bytearray(_png_bytes(Image.new("L", (8, 8), 128)))
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _rgb(data, **kw) -> np.ndarray:
  return pp.to_rgb(pp.decode_image(data, **kw))


# ----------------------------------------------------------------------------------------------
# Decoding and colour modes.
# ----------------------------------------------------------------------------------------------


def test_decode_rgb_png_roundtrip_and_inputs(tmp_path):
  arr = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  data = _png_bytes(Image.fromarray(arr))
  (tmp_path / "a.png").write_bytes(data)
  for src in (data, str(tmp_path / "a.png"), tmp_path / "a.png", arr, Image.fromarray(arr)):
    out = _rgb(src)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_and_one_bit():
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  out = _rgb(_png_bytes(Image.fromarray(gray)))
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
  out = _rgb(_png_bytes(Image.new("1", (8, 8), 1)))
  assert out.shape == (8, 8, 3) and (out == 255).all()
  np.testing.assert_array_equal(_rgb(gray[..., None]), np.repeat(gray[..., None], 3, -1))


def test_rgba_and_la_composite_over_white():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)  # opaque red
  rgba[0, 1] = (255, 0, 0, 0)  # transparent -> white
  rgba[1, 0] = (0, 0, 0, 128)  # half black over white -> ~127
  out = _rgb(_png_bytes(Image.fromarray(rgba)))
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
  assert np.abs(out[1, 0].astype(int) - 127).max() <= 1
  la = _rgb(_png_bytes(Image.new("LA", (4, 4), (0, 0))))
  assert (la == 255).all()


def test_palette_with_and_without_transparency():
  p = Image.new("P", (4, 4), 0)
  p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  p.putpixel((1, 1), 1)
  out = _rgb(_png_bytes(p))
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[1, 1], (0, 255, 0))
  out = _rgb(_png_bytes(p, transparency=0))  # index 0 transparent -> white
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[1, 1], (0, 255, 0))


def test_cmyk_jpeg():
  data = _jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  out = _rgb(data)
  assert out.shape == (16, 16, 3)
  assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 8  # pure red, up to JPEG error


def test_sixteen_bit_png_scaled_to_eight():
  arr16 = np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16)
  data = _png_bytes(Image.fromarray(arr16))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = _rgb(data)
  np.testing.assert_array_equal(out[..., 0], [[0, 255], [100, 200]])
  np.testing.assert_array_equal(_rgb(arr16)[..., 1], [[0, 255], [100, 200]])  # uint16 array


# A 3-wide, 2-high image, every pixel its own colour; the stored top-left corner is pure red.
STORED = np.array(
  [
    [[255, 0, 0], [0, 60, 0], [0, 120, 0]],
    [[0, 0, 60], [0, 0, 120], [0, 0, 180]],
  ],
  np.uint8,
)  # [H=2, W=3, 3]

# EXIF 2.3 Orientation (tag 0x0112), as written in the spec: where the stored 0th row and 0th
# column are on display. The stored top-left pixel is where they meet, so it is displayed at:
EXIF_ORIENTATIONS = {
  # value: (0th row, 0th column, displayed shape [H, W], corner of the red pixel)
  1: ("top", "left", (2, 3), "top-left"),
  2: ("top", "right", (2, 3), "top-right"),  # mirrored horizontally
  3: ("bottom", "right", (2, 3), "bottom-right"),  # rotated 180°
  4: ("bottom", "left", (2, 3), "bottom-left"),  # mirrored vertically
  5: ("left", "top", (3, 2), "top-left"),  # transposed
  6: ("right", "top", (3, 2), "top-right"),  # stored rotated 90° CCW: rotate 90° CW to display
  7: ("right", "bottom", (3, 2), "bottom-right"),  # transverse
  8: ("left", "bottom", (3, 2), "bottom-left"),  # stored rotated 90° CW: rotate 90° CCW to display
}


def exif_display(stored: np.ndarray, orientation: int) -> np.ndarray:
  """How a viewer following the EXIF spec displays ``stored`` ([H, W, C]), for 1-8."""
  rows = {"top": lambda a: a, "bottom": lambda a: a[::-1]}  # row 0 on top or at the bottom
  row0, col0 = EXIF_ORIENTATIONS[orientation][:2]
  if row0 in ("top", "bottom"):  # no rotation: rows stay rows
    out = rows[row0](stored)
    return out if col0 == "left" else out[:, ::-1]
  # Rows become columns: displayed[i, j] = stored[j, i], then mirrored to put row 0 / column 0
  # on the named sides.
  out = stored.swapaxes(0, 1)
  out = out if col0 == "top" else out[::-1]
  return out if row0 == "left" else out[:, ::-1]


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str, scale: int = 1) -> bytes:
  """``arr`` (each pixel blown up to ``scale``²) encoded as ``fmt`` with an EXIF orientation."""
  big = np.repeat(np.repeat(arr, scale, 0), scale, 1)
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  extra = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
  Image.fromarray(big).save(buf, format=fmt, exif=exif.tobytes(), **extra)
  return buf.getvalue()


def test_exif_display_oracle_matches_numpy_rotations():
  """The spec table above, cross-checked against numpy's rotations (rot90 k=-1 is clockwise)."""
  a = STORED
  want = {
    1: a,
    2: a[:, ::-1],
    3: np.rot90(a, 2),
    4: a[::-1],
    5: a.swapaxes(0, 1),
    6: np.rot90(a, -1),
    7: np.rot90(a, -1)[::-1],
    8: np.rot90(a, 1),
  }
  for o, w in want.items():
    np.testing.assert_array_equal(exif_display(a, o), w, err_msg=str(o))


@pytest.mark.parametrize("orientation", list(EXIF_ORIENTATIONS))
def test_exif_orientation_puts_the_marked_corner_where_the_spec_says(orientation):
  """Lossless (PNG with an eXIf chunk), so every pixel is checked exactly: a clockwise/
  anticlockwise or mirror mix-up moves the red corner (6 and 8 put it on opposite sides)."""
  out = _rgb(_with_orientation(STORED, orientation, "PNG"))
  _, _, shape, corner = EXIF_ORIENTATIONS[orientation]
  assert out.shape == (*shape, 3)
  vertical, horizontal = corner.split("-")
  red = (0 if vertical == "top" else shape[0] - 1, 0 if horizontal == "left" else shape[1] - 1)
  assert tuple(np.argwhere((out == [255, 0, 0]).all(-1))[0]) == red
  assert (out == [255, 0, 0]).all(-1).sum() == 1
  np.testing.assert_array_equal(out, exif_display(STORED, orientation))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_of_jpeg(orientation):
  """JPEG, where cameras write the tag: 16x16 blocks per pixel survive the compression, so the
  centre of each displayed block must have that pixel's colour."""
  out = _rgb(_with_orientation(STORED, orientation, "JPEG", scale=16))
  want = exif_display(STORED, orientation)
  assert out.shape == (want.shape[0] * 16, want.shape[1] * 16, 3)
  centres = out[8::16, 8::16].astype(int)
  np.testing.assert_allclose(centres, want, atol=12)


@pytest.mark.parametrize("orientation", [0, 9])
def test_invalid_exif_orientation_leaves_the_image_as_stored(orientation):
  np.testing.assert_array_equal(_rgb(_with_orientation(STORED, orientation, "PNG")), STORED)


# ----------------------------------------------------------------------------------------------
# Bad data -> typed reasons.
# ----------------------------------------------------------------------------------------------


def _reason(data, **kw) -> str:
  with pytest.raises(pp.BadExample) as e:
    pp.to_rgb(pp.decode_image(data, **kw))
  return e.value.reason


def test_bad_inputs_have_reasons(tmp_path):
  jpeg = _jpeg_bytes(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)))
  assert _reason(jpeg[: len(jpeg) // 2]) == "corrupt"  # truncated
  assert _reason(np.random.default_rng(0).bytes(500)) == "corrupt"  # random bytes
  assert _reason(b"") == "corrupt"
  assert _reason(str(tmp_path / "missing.png")) == "unreadable"
  assert _reason(tmp_path) == "unreadable"  # a directory
  assert _reason(None) == "unreadable"
  assert _reason(np.zeros((4, 4, 2), np.uint8)) == "corrupt"  # unsupported array layout
  assert _reason(np.zeros((4, 4), np.float64)) == "corrupt"


def test_bomb_rejected_from_header_before_decoding():
  bomb = bomb_png()
  assert len(bomb) < 200
  # Our own limit: the header alone decides (the pixel data would not even decode).
  assert _reason(bomb, max_pixels=10_000) == "too_large"
  # No limit of ours: PIL's DecompressionBombError (> 2 * MAX_IMAGE_PIXELS) is also too_large,
  # and so is an image over its DecompressionBombWarning threshold (MAX_IMAGE_PIXELS).
  assert _reason(bomb, max_pixels=None) == "too_large"
  assert Image.MAX_IMAGE_PIXELS < 10_000**2 < 2 * Image.MAX_IMAGE_PIXELS
  with pytest.warns(Image.DecompressionBombWarning):
    assert _reason(bomb_png(10_000, 10_000), max_pixels=None) == "too_large"
  ok = _png_bytes(Image.new("RGB", (100, 100)))
  assert _reason(ok, max_pixels=9_999) == "too_large"
  assert pp.decode_image(ok, max_pixels=10_000).size == (100, 100)
  assert _reason(np.zeros((100, 101, 3), np.uint8), max_pixels=10_000) == "too_large"


def test_bad_example_reason_validated():
  with pytest.raises(ValueError):
    pp.BadExample("nope")
  assert str(pp.BadExample("corrupt", "x")) == "corrupt: x"


def test_draft_jpeg_keeps_at_least_draft_size():
  data = _jpeg_bytes(Image.new("RGB", (400, 300), (10, 200, 30)))
  img = pp.decode_image(data, draft_size=64)
  assert min(img.size) >= 64 and img.size[0] < 400  # DCT-downscaled, still big enough


# ----------------------------------------------------------------------------------------------
# Geometry, value range, SR pairs.
# ----------------------------------------------------------------------------------------------


def test_resize_shorter_side_and_crops():
  img = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  out = pp.resize_shorter_side(img, 12)
  assert out.shape == (12, 20, 3)
  assert pp.resize_shorter_side(img, 30) is img  # no-op at the target size
  assert pp.resize_shorter_side(img, 60).shape == (60, 100, 3)  # upscale
  c = pp.center_crop(out, 12)
  np.testing.assert_array_equal(c, out[:, 4:16])
  r1 = pp.random_crop(out, 12, np.random.default_rng(3))
  r2 = pp.random_crop(out, 12, np.random.default_rng(3))
  np.testing.assert_array_equal(r1, r2)
  offsets = set()
  for s in range(30):
    crop = pp.random_crop(out, 12, np.random.default_rng(s))
    offsets.update(x for x in range(9) if np.array_equal(crop, out[:, x : x + 12]))
  assert len(offsets) > 3


def test_flip_and_to_float():
  img = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
  np.testing.assert_array_equal(pp.flip(img)[0, 0], img[0, -1])
  f = pp.to_float(np.array([0, 255, 128], np.uint8))
  assert f.dtype == np.float32
  np.testing.assert_allclose(f, [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-7)


def test_sr_pair_matches_pil_antialiased_reference():
  hr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  lr = pp.make_sr_pair(hr, 16)
  ref = np.asarray(Image.fromarray(hr).resize((16, 16), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(lr, ref)
  # Antialiased: a 1-pixel checkerboard averages to grey instead of aliasing to black/white.
  checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
  lr = pp.make_sr_pair(np.repeat(checker[..., None], 3, -1), 16)
  assert np.abs(lr.astype(int) - 128).max() <= 2


def test_random_crop_pair_aligns():
  rng = np.random.default_rng(0)
  # A smooth image so the border effect of cropping after downsampling stays small.
  yy, xx = np.mgrid[0:128, 0:128]
  hr = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
  lowres = pp.make_sr_pair(hr, 32)  # k = 4
  for _ in range(5):
    hr_c, lr_c = pp.random_crop_pair(hr, lowres, 64, rng)
    assert hr_c.shape == (64, 64, 3) and lr_c.shape == (16, 16, 3)
    ref = pp.make_sr_pair(hr_c, 16).astype(int)
    diff = np.abs(lr_c.astype(int) - ref)
    assert diff[2:-2, 2:-2].max() <= 1  # identical away from the filter support at the border
    assert diff.mean() < 2.0
  with pytest.raises(ValueError):
    pp.random_crop_pair(hr, lowres, 66, rng)  # not a multiple of k


# ----------------------------------------------------------------------------------------------
# Captions and ops.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "raw, text, issues",
  [
    ("a cat\n", "a cat", ()),
    (b"a dog", "a dog", ()),
    (np.bytes_(b"x"), "x", ()),
    (None, "", ("missing_caption",)),
    ("  \n", "", ("missing_caption",)),
    (b"caf\xe9", "caf\ufffd", ("caption_encoding",)),
    (b"caf\xe9".decode("utf-8", "surrogateescape"), "caf\ufffd", ("caption_encoding",)),
    (b"\xff", "\ufffd", ("caption_encoding",)),
    ([b"first", b"second"], "first", ()),
    (np.array([b"one", b"two"]), "one", ()),
    (np.array([], dtype=object), "", ("missing_caption",)),
  ],
)
def test_normalize_caption(raw, text, issues):
  assert pp.normalize_caption(raw) == (text, issues)


def test_ops_registry_and_min_size():
  with pytest.raises(ValueError, match="Unknown preprocessing ops"):
    pp.build_ops([("nope", {})])
  rng = np.random.default_rng(0)
  small = {"image": np.zeros((10, 20, 3), np.uint8)}
  with pytest.raises(pp.BadExample) as e:
    pp.op_min_size(16, "reject")(small, rng)
  assert e.value.reason == "too_small"
  assert pp.op_min_size(16, "upscale")(small, rng)["issues"] == ("too_small",)
  assert "issues" not in pp.op_min_size(10, "reject")(small, rng)
  ops = pp.build_ops(
    [("to_rgb", {}), ("resize_shorter", {"size": 8}), ("crop", {"size": 8}), ("value_range", {})]
  )
  out = pp.apply_ops(ops, {"image": Image.new("L", (16, 32), 255)}, rng)
  assert out["image"].shape == (8, 8, 3) and out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"], 1.0)
