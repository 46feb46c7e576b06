"""Per-example image/caption preprocessing: pure numpy/PIL functions plus small composable ops.

Functions take and return ``uint8 [H, W, 3]`` arrays (``decode_image`` returns a ``PIL.Image``).
Problems with the *data* (not with the code) raise ``BadExample(reason, detail)``, which the
pipeline counts per reason and answers by replacing the example with the next good one.

The ops at the bottom (``OPS``) are the per-example map of the training pipeline, registered by name
(house style rule 12, lite): each is a factory returning ``op(example, rng) -> example``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Reasons an image is replaced by the next good example.
IMAGE_REASONS = ("corrupt", "too_large", "too_small", "unreadable")
# Reasons a caption is repaired (kept, not replaced): None/blank -> "" and non-UTF-8 -> U+FFFD.
CAPTION_REASONS = ("missing_caption", "caption_encoding")
BAD_REASONS = IMAGE_REASONS + CAPTION_REASONS

_RESAMPLE = {
  "box": Image.Resampling.BOX,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
}

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]


class BadExample(Exception):
  """An example whose data cannot be used; ``reason`` is one of ``BAD_REASONS``."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in BAD_REASONS:
      raise ValueError(f"Unknown bad-example reason {reason!r}; expected one of {BAD_REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# ----------------------------------------------------------------------------------------------
# Decoding and colour conversion.
# ----------------------------------------------------------------------------------------------


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
  if max_pixels is not None and size[0] * size[1] > max_pixels:
    raise BadExample("too_large", f"{size[0]}x{size[1]} > max_pixels={max_pixels}")


def _from_array(arr: np.ndarray) -> Image.Image:
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.dtype == np.uint16 and arr.ndim == 2:
    return Image.fromarray(arr)  # mode I;16, scaled to 8 bits by to_rgb
  if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise BadExample("corrupt", f"unsupported image array {arr.dtype}{list(arr.shape)}")
  return Image.fromarray(arr)


def decode_image(
  data: bytes | str | os.PathLike | np.ndarray | Image.Image | None,
  *,
  max_pixels: int | None = None,
  draft_size: int | None = None,
) -> Image.Image:
  """Decodes encoded bytes, a file path or an array into a fully loaded ``PIL.Image``.

  The pixel limit is checked on the header size *before* the pixel data is decoded (``Image.open``
  is lazy), so a decompression bomb costs a header read. Files are also held to PIL's own guard,
  ``Image.MAX_IMAGE_PIXELS`` (~89M): above it PIL emits ``DecompressionBombWarning`` (we reject the
  image instead of decoding it) and above twice it raises ``DecompressionBombError``; both are
  ``too_large``. (We do not turn the warning into an error with ``warnings.catch_warnings``, which
  is not thread-safe; PIL may still print it.) Raise ``Image.MAX_IMAGE_PIXELS`` to allow more.
  EXIF orientation is applied.

  Args:
    data: encoded image bytes, a path, a ``uint8 [H, W(, C)]``/``uint16 [H, W]`` array, or an image.
    max_pixels: reject images with more than this many pixels (``None``: no limit of our own).
    draft_size: if set, JPEGs may be DCT-downscaled while decoding to no smaller than this on either
      side (``Image.draft``), which makes decoding large photos for small stages much cheaper.

  Returns:
    The loaded image, in whatever mode the file has (see ``to_rgb``).

  Raises:
    BadExample: ``unreadable`` (missing file / IO error), ``too_large``, or ``corrupt``.
  """
  if data is None:
    raise BadExample("unreadable", "record has no image")
  if isinstance(data, Image.Image):
    _check_pixels(data.size, max_pixels)
    return data
  if isinstance(data, np.ndarray):
    _check_pixels((data.shape[1], data.shape[0]) if data.ndim >= 2 else (0, 0), max_pixels)
    return _from_array(data)
  if isinstance(data, str | os.PathLike):
    try:
      with open(data, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadExample("unreadable", f"{type(e).__name__}: {e}") from e
  try:
    img = Image.open(io.BytesIO(bytes(data)))
  except Image.DecompressionBombError as e:
    raise BadExample("too_large", str(e)) from e
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...).
    raise BadExample("corrupt", f"{type(e).__name__}: {e}") from e
  _check_pixels(img.size, max_pixels)
  _check_pixels(img.size, Image.MAX_IMAGE_PIXELS)  # PIL's DecompressionBombWarning threshold.
  try:
    if draft_size is not None and img.format == "JPEG":
      img.draft(img.mode, (draft_size, draft_size))
    img.load()  # Truncated files fail here, not in open().
  except Exception as e:
    raise BadExample("corrupt", f"{type(e).__name__}: {e}") from e
  try:
    img = ImageOps.exif_transpose(img)
  except Exception:  # A broken EXIF block should not cost the image; keep it unrotated.
    pass
  return img


def _over_white(rgba: np.ndarray) -> np.ndarray:
  rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
  return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
  """Converts any PIL mode to ``uint8 [H, W, 3]`` RGB.

  Transparent images (RGBA, LA, PA, palette or RGB/L with a ``transparency`` entry) are composited
  over white, since captioned web images with alpha are almost always drawn on a white page.
  16-bit (``I;16*``, ``I``) is scaled by 255/65535; float (``F``) is taken as [0, 1] if its maximum
  is at most 1, else as [0, 255]. CMYK, 1-bit, YCbCr etc. go through PIL's ``convert``.

  Raises:
    BadExample: ``corrupt`` if PIL cannot convert the mode.
  """
  try:
    mode = img.mode
    if mode == "RGB":
      return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
      arr = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
      return np.repeat(np.clip(np.rint(arr), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "F":
      arr = np.asarray(img, dtype=np.float64)
      arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
      arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
      return np.repeat(arr[..., None], 3, axis=-1)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
      return _over_white(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except BadExample:
    raise
  except Exception as e:
    raise BadExample("corrupt", f"cannot convert mode {img.mode!r} to RGB: {e}") from e


# ----------------------------------------------------------------------------------------------
# Geometry and value range.
# ----------------------------------------------------------------------------------------------


def _resize(img: np.ndarray, size_hw: tuple[int, int], resample: str) -> np.ndarray:
  if img.shape[:2] == tuple(size_hw):
    return img
  pil = Image.fromarray(img).resize((size_hw[1], size_hw[0]), _RESAMPLE[resample])
  return np.asarray(pil, dtype=np.uint8)


def resize_shorter_side(img: np.ndarray, size: int, *, resample: str = "bicubic") -> np.ndarray:
  """Resizes so the shorter side equals ``size``, keeping the aspect ratio.

  PIL's filters widen their support when shrinking, so downsampling is antialiased.
  """
  h, w = img.shape[:2]
  scale = size / min(h, w)
  new = (max(size, round(h * scale)), max(size, round(w * scale)))
  return _resize(img, new, resample)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """Crops the central ``size x size`` window (``img`` must be at least that large)."""
  h, w = img.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return img[top : top + size, left : left + size]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Crops a uniformly placed ``size x size`` window."""
  h, w = img.shape[:2]
  top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  return img[top : top + size, left : left + size]


def flip(img: np.ndarray) -> np.ndarray:
  """Mirrors left-right."""
  return img[:, ::-1]


def to_float(img: np.ndarray) -> np.ndarray:
  """Maps ``uint8`` [0, 255] to ``float32`` [-1, 1]."""
  return img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def make_sr_pair(hr: np.ndarray, lowres_size: int, *, resample: str = "bicubic") -> np.ndarray:
  """The low-res conditioning image of a super-resolution pair: ``hr`` downsampled, antialiased.

  Args:
    hr: ``uint8 [S, S, 3]`` high-res image.
    lowres_size: side of the low-res image (e.g. 64 for the 64->256 stage).
    resample: PIL filter; bicubic by default (PIL scales its support by the shrink factor, so this
      is an antialiased downsample, not point sampling).

  Returns:
    ``uint8 [lowres_size, lowres_size, 3]``.
  """
  return _resize(hr, (lowres_size, lowres_size), resample)


def random_crop_pair(
  hr: np.ndarray, lowres: np.ndarray, crop_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Aligned random crops of a high-res image and its low-res version (the 1024 stage).

  Imagen trains the 256->1024 model on 64->256 crops: a ``crop_size`` (256) window of the 1024
  image and the matching ``crop_size / k`` (64) window of the 256 low-res image, where
  ``k = S_hr / S_lr``. The offset is drawn on the low-res grid and multiplied by ``k``, so both
  crops cover exactly the same region. The low-res crop is a crop of the downsampled *full* image,
  so it equals a downsample of the high-res crop except within the filter's support of the border
  (bicubic: ~2 low-res pixels).

  Returns:
    ``(hr_crop [crop, crop, 3], lowres_crop [crop/k, crop/k, 3])``.
  """
  k, rem = divmod(hr.shape[0], lowres.shape[0])
  if rem or hr.shape[1] != lowres.shape[1] * k or crop_size % k:
    raise ValueError(
      f"random_crop_pair needs an integer scale dividing crop_size: hr {hr.shape[:2]}, "
      f"lowres {lowres.shape[:2]}, crop_size {crop_size}"
    )
  lc = crop_size // k
  top = int(rng.integers(0, lowres.shape[0] - lc + 1))
  left = int(rng.integers(0, lowres.shape[1] - lc + 1))
  hr_crop = hr[top * k : top * k + crop_size, left * k : left * k + crop_size]
  return hr_crop, lowres[top : top + lc, left : left + lc]


# ----------------------------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------------------------


def normalize_caption(raw: Any) -> tuple[str, tuple[str, ...]]:
  """Turns a raw caption into a clean ``str`` and the caption problems found.

  ``None`` or a blank caption becomes ``""`` (trained as unconditional) with ``missing_caption``;
  bytes that are not UTF-8 (or a str carrying surrogate escapes of such bytes) are decoded with
  ``errors="replace"`` and reported as ``caption_encoding``. Surrounding whitespace is stripped
  (``.txt`` files usually end in a newline); a text-embedding cache must use the same normalization.
  A list/array of captions uses its first one.
  """
  issues: list[str] = []
  if isinstance(raw, np.ndarray):
    raw = raw.item() if raw.ndim == 0 else (raw.tolist() or None)
  if isinstance(raw, list | tuple):
    raw = raw[0] if raw else None
  if isinstance(raw, bytes | bytearray | np.bytes_):
    try:
      raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
      raw = bytes(raw).decode("utf-8", errors="replace")
      issues.append("caption_encoding")
  elif isinstance(raw, str):
    try:
      raw.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from errors="surrogateescape" reads
      raw = raw.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
      issues.append("caption_encoding")
  elif raw is not None:
    raw = str(raw)
  text = (raw or "").strip()
  if not text:
    issues.append("missing_caption")
  return text, tuple(issues)


# ----------------------------------------------------------------------------------------------
# Composable ops: factories returning ``op(example, rng) -> example``. ``example["image"]`` goes
# raw -> PIL.Image (decode) -> uint8 RGB array -> ... -> float32; ``example["issues"]`` collects
# problems that are counted but do not cause replacement (too_small under "upscale").
# ----------------------------------------------------------------------------------------------


def op_decode(max_pixels: int | None = None, draft_size: int | None = None) -> Op:
  def decode(ex: Example, rng: np.random.Generator) -> Example:
    return {**ex, "image": decode_image(ex["image"], max_pixels=max_pixels, draft_size=draft_size)}

  return decode


def op_to_rgb() -> Op:
  return lambda ex, rng: {**ex, "image": to_rgb(ex["image"])}


def op_min_size(size: int, policy: str = "reject") -> Op:
  """Shorter side below ``size``: ``reject`` raises ``too_small``; ``upscale`` only flags it."""
  if policy not in ("reject", "upscale"):
    raise ValueError(f"min_size policy must be 'reject' or 'upscale', got {policy!r}")

  def min_size(ex: Example, rng: np.random.Generator) -> Example:
    h, w = ex["image"].shape[:2]
    if min(h, w) >= size:
      return ex
    if policy == "reject":
      raise BadExample("too_small", f"{w}x{h} < {size}")
    return {**ex, "issues": (*ex.get("issues", ()), "too_small")}

  return min_size


def op_resize_shorter(size: int, resample: str = "bicubic") -> Op:
  return lambda ex, rng: {**ex, "image": resize_shorter_side(ex["image"], size, resample=resample)}


def op_crop(size: int, mode: str = "center") -> Op:
  if mode not in ("center", "random"):
    raise ValueError(f"crop must be 'center' or 'random', got {mode!r}")
  if mode == "center":
    return lambda ex, rng: {**ex, "image": center_crop(ex["image"], size)}
  return lambda ex, rng: {**ex, "image": random_crop(ex["image"], size, rng)}


def op_random_flip(p: float = 0.5) -> Op:
  return lambda ex, rng: {**ex, "image": flip(ex["image"])} if rng.random() < p else ex


def op_sr_pair(lowres_size: int, resample: str = "bicubic") -> Op:
  return lambda ex, rng: {**ex, "lowres": make_sr_pair(ex["image"], lowres_size, resample=resample)}


def op_crop_pair(crop_size: int) -> Op:
  def crop_pair(ex: Example, rng: np.random.Generator) -> Example:
    hr, lr = random_crop_pair(ex["image"], ex["lowres"], crop_size, rng)
    return {**ex, "image": hr, "lowres": lr}

  return crop_pair


def op_value_range() -> Op:
  def value_range(ex: Example, rng: np.random.Generator) -> Example:
    out = {**ex, "image": to_float(ex["image"])}
    if "lowres" in ex:
      out["lowres"] = to_float(ex["lowres"])
    return out

  return value_range


OPS: dict[str, Callable[..., Op]] = {
  "decode": op_decode,
  "to_rgb": op_to_rgb,
  "min_size": op_min_size,
  "resize_shorter": op_resize_shorter,
  "crop": op_crop,
  "random_flip": op_random_flip,
  "sr_pair": op_sr_pair,
  "crop_pair": op_crop_pair,
  "value_range": op_value_range,
}


def build_ops(spec: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Op]]:
  """``[("resize_shorter", {"size": 64}), ...]`` -> named ops, looked up in ``OPS``."""
  unknown = [name for name, _ in spec if name not in OPS]
  if unknown:
    raise ValueError(f"Unknown preprocessing ops {unknown}; registered: {sorted(OPS)}")
  return [(name, OPS[name](**kwargs)) for name, kwargs in spec]


def apply_ops(ops: list[tuple[str, Op]], ex: Example, rng: np.random.Generator) -> Example:
  """Runs named ops in order."""
  for _, op in ops:
    ex = op(ex, rng)
  return ex
