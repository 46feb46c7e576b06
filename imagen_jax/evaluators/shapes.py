"""Pixel-analysis alignment evaluator for the ``shapes`` dataset (no learned model).

:func:`analyze_image` finds the objects in an image: the background colour is the median of the
image border, foreground pixels are far (in RGB) from it after a light blur (so noise does not
create foreground), connected components smaller than a fraction of the smallest dataset object
are dropped as speckles. For each component it estimates the object colour (mean of its most
distinct half, classified to the nearest palette colour in CIELAB), a soft coverage map
(projection of every pixel onto the background→object colour line), and then fits the three shape
templates by analysis-by-synthesis: each template is rendered with the dataset's own rasteriser at
the component's soft area and centroid (area and centroid survive blur), optionally blurred, and the
template with the least squared error wins. Size comes from the fitted radius, position from the
fitted centre's 3×3 cell.

:func:`score` compares detections with parsed prompts; see its docstring for the metrics. Run
``python -m imagen_jax.evaluators.shapes --help`` for the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from imagen_jax.data import shapes as ds
from imagen_jax.evaluators.images import load_images_dir

_FG_THRESHOLD = 40.0  # RGB distance from background; the closest palette colour is ~115 away
_FG_MAX_THRESHOLD = 80.0  # ...and stays below most of that on noisy images
_MAX_ANALYSIS_SIZE = 64  # images over 128² are box-downsampled to 64²…128² first
_MIN_AREA = 0.005  # of the image: a quarter of the smallest object (a small triangle, 0.0196)
_RADIUS_SPLIT = math.sqrt(ds.SIZE_RADIUS["small"] * ds.SIZE_RADIUS["large"])
_BLURS = (0.0, 0.6, 1.2)  # template blurs tried, in pixels at 32² (scaled with resolution)
# Expected per-prompt alignment of a generator with uniformly random attributes.
_CHANCE_SINGLE = (1 / 8 + 1 / 3 + 1 / 2 + 1 / 9) / 4  # colour, shape, size, 3×3 cell
_CHANCE_TWO = (2 / 8 + 2 / 3 + 1 / 4) / 5  # 2 colours, 2 shapes, relation


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 255] → CIELAB (D65); a cheap perceptual space for nearest-colour lookup."""
  c = np.asarray(rgb, np.float64) / 255.0
  lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
  xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
  f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
  return np.stack(
    [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
  )


_PALETTE_NAMES = list(ds.COLORS)
_PALETTE_LAB = _srgb_to_lab(np.array([ds.COLORS[c] for c in _PALETTE_NAMES]))


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """One object found in an image, with its classified attributes and raw measurements."""

  color: str
  shape: str
  size: str
  position: str
  center: tuple[float, float]  # fitted bounding-box centre (x, y), unit coordinates
  radius: float  # fitted radius, unit coordinates (compare with ds.SIZE_RADIUS)
  area: float  # soft area as a fraction of the image
  rgb: tuple[float, float, float]  # estimated object colour in [0, 255]
  fit_error: float  # template squared error / soft area (0 = perfect match)


def _as_float255(image, value_range: tuple[float, float]) -> np.ndarray:
  """Validates one ``[H, W, 3]`` square image and returns it as float32 in [0, 255].

  ``uint8`` (and other integer) images are taken as [0, 255]; float images as ``value_range``.

  Raises:
    ValueError: not a square RGB image of side >= 8, or a boolean/complex dtype.
  """
  img = np.asarray(image)
  if img.ndim != 3 or img.shape[-1] != 3 or img.shape[0] != img.shape[1] or img.shape[0] < 8:
    raise ValueError(f"expected a square RGB image [H, H, 3] with H >= 8, got shape {img.shape}")
  if np.issubdtype(img.dtype, np.integer):
    return img.astype(np.float32)
  if not np.issubdtype(img.dtype, np.floating):
    raise ValueError(f"expected an integer or float image, got dtype {img.dtype}")
  lo, hi = value_range
  out = (np.nan_to_num(img.astype(np.float32)) - lo) * (255.0 / (hi - lo))
  return np.clip(out, 0.0, 255.0)


def analyze_image(
  image, *, value_range: tuple[float, float] = (-1.0, 1.0), max_objects: int = 4
) -> list[DetectedObject]:
  """Detects and classifies the objects of one image by pixel analysis.

  Args:
    image: ``[H, H, 3]`` uint8 in [0, 255] or float in ``value_range``.
    value_range: range of float images (default [-1, 1], the diffusion models' output range).
    max_objects: only the largest this many components are classified (bounds the cost on
      noise-like images; any image with more objects already fails every count check).

  Returns:
    Detected objects, largest soft area first (empty for a blank image).
  """
  img = _as_float255(image, value_range)
  if img.shape[0] > 2 * _MAX_ANALYSIS_SIZE:
    # Box-downsample big images: objects are still >= 10 px across and analysis stays cheap.
    f = img.shape[0] // _MAX_ANALYSIS_SIZE
    m = img.shape[0] // f
    img = img[: m * f, : m * f].reshape(m, f, m, f, 3).mean(axis=(1, 3))
  n = img.shape[0]
  bw = max(1, n // 32)
  border = np.concatenate(
    [
      img[:bw].reshape(-1, 3),
      img[-bw:].reshape(-1, 3),
      img[:, :bw].reshape(-1, 3),
      img[:, -bw:].reshape(-1, 3),
    ]
  )
  bg = np.median(border, axis=0)
  sigma = max(0.5, n / 64)
  smooth = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
  sdist = np.linalg.norm(smooth - bg, axis=-1)
  # Raise the threshold on noisy images: the border's (smoothed) distance from the background
  # follows a scaled chi distribution with 3 dof, whose median is ~1.54 sigma.
  sd_border = np.concatenate(
    [sdist[:bw].ravel(), sdist[-bw:].ravel(), sdist[:, :bw].ravel(), sdist[:, -bw:].ravel()]
  )
  threshold = min(max(_FG_THRESHOLD, 4.5 * float(np.median(sd_border)) / 1.54), _FG_MAX_THRESHOLD)
  labels, num = ndimage.label(sdist > threshold)
  if num == 0:
    return []
  counts = np.bincount(labels.ravel(), minlength=num + 1)
  pad = int(math.ceil(2 * sigma + max(_BLURS) * 3 * n / 32)) + 1
  found = []
  slices = ndimage.find_objects(labels)
  for k in np.argsort(-counts[1:], kind="stable")[:max_objects] + 1:
    sl = slices[k - 1]
    if counts[k] < _MIN_AREA * n * n:
      continue
    y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, n)
    x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, n)
    obj = _fit_component(
      img[y0:y1, x0:x1], labels[y0:y1, x0:x1], k, sdist[y0:y1, x0:x1], bg, n, (y0, y1, x0, x1)
    )
    if obj is not None:
      found.append(obj)
  return sorted(found, key=lambda o: -o.area)


def _fit_component(
  img: np.ndarray,
  labels: np.ndarray,
  k: int,
  sdist: np.ndarray,
  bg: np.ndarray,
  n: int,
  window: tuple[int, int, int, int],
) -> DetectedObject | None:
  comp = labels == k
  # Object colour from the component's most distinct half: edge pixels are mixed with background.
  core = comp & (sdist >= np.median(sdist[comp]))
  rgb = img[core].mean(axis=0)
  v = rgb - bg
  # Soft coverage: position of each pixel on the background→object colour line. Not clipped at 0
  # so zero-mean noise stays zero-mean (unbiased area and centroid); other components are masked.
  grow = max(1, int(round(n / 32))) + 1
  region = ndimage.binary_dilation(comp, iterations=grow) & ((labels == 0) | comp)
  alpha = np.where(region, np.clip(((img - bg) @ v) / max(v @ v, 1e-6), -1.0, 1.5), 0.0)
  area = float(alpha.sum())
  if area <= 0.25 * _MIN_AREA * n * n:
    return None
  y0, y1, x0, x1 = window
  ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
  mx, my = float((alpha * xs).sum() / area) / n, float((alpha * ys).sum() / area) / n
  best = None
  for shape in ds.SHAPES:
    r = math.sqrt(area / (ds.shape_area(shape, 1.0) * n * n))
    center = (mx, my - ds.centroid_offset(shape, r))
    tmpl = ds.coverage(shape, center, r, n, window)
    for blur in _BLURS:
      t = ndimage.gaussian_filter(tmpl, blur * n / 32, mode="constant") if blur else tmpl
      err = float(((alpha - t) ** 2).sum())
      if best is None or err < best[0]:
        best = (err, shape, r, center)
  err, shape, r, center = best
  lab = _srgb_to_lab(np.clip(rgb, 0, 255))
  color = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - lab, axis=-1)))]
  col = min(max(int(center[0] * 3), 0), 2)
  row = min(max(int(center[1] * 3), 0), 2)
  return DetectedObject(
    color=color,
    shape=shape,
    size="small" if r < _RADIUS_SPLIT else "large",
    position=ds.POSITIONS[3 * row + col],
    center=(float(center[0]), float(center[1])),
    radius=float(r),
    area=area / (n * n),
    rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
    fit_error=err / area,
  )


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
  """The relation word of centre ``a`` relative to centre ``b`` along the dominant axis."""
  dx, dy = a[0] - b[0], a[1] - b[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def _match(spec: ds.ObjectSpec, det: DetectedObject | None) -> tuple[bool, bool]:
  return (det is not None and det.color == spec.color, det is not None and det.shape == spec.shape)


def _check_two(spec: ds.CaptionSpec, dets: list[DetectedObject]) -> tuple[list[bool], bool]:
  """Matches the two most salient detections to the prompt's objects (best of both orders)."""
  a, b = spec.objects
  top = dets[:2]
  if len(top) == 2:
    options = [(top[0], top[1]), (top[1], top[0])]
  elif len(top) == 1:
    options = [(top[0], None), (None, top[0])]
  else:
    options = [(None, None)]
  best = None
  for da, db in options:
    checks = [*_match(a, da), *_match(b, db)]
    rel_ok = (
      da is not None and db is not None and relation_of(da.center, db.center) == spec.relation
    )
    key = sum(checks) + rel_ok
    if best is None or key > best[0]:
      best = (key, checks, rel_ok)
  return best[1], best[2]


def _mean(xs: list[bool] | list[float]) -> float:
  return float(np.mean(xs)) if xs else float("nan")


def score(
  prompts: Sequence[str], images, *, value_range: tuple[float, float] = (-1.0, 1.0)
) -> dict[str, float]:
  """Per-attribute alignment of generated images with their ``shapes`` prompts.

  Single-object prompts are checked against the largest detected object, two-object prompts
  against the two largest (in whichever order matches better). Metrics (``nan`` when no prompt
  qualifies):

  - ``color_acc`` / ``shape_acc``: fraction of prompt objects (1 or 2 per prompt) whose colour /
    shape is right.
  - ``position_acc``: single-object: the 3×3 cell is right; two-object: the relation is right.
  - ``size_acc``: single-object prompts only. ``relation_acc``: two-object prompts only.
  - ``count_acc``: the image holds exactly as many objects as the prompt.
  - ``single_object_acc``: exactly one object with all four attributes right.
  - ``single_object_alignment``: mean per-attribute accuracy (colour, shape, size, cell) over
    single-object prompts only, i.e. ``alignment`` restricted to them; ``two_object_alignment``:
    the same over two-object prompts (2 colours, 2 shapes, relation).
  - ``two_object_acc``: exactly two objects, both colours and shapes and the relation right.
  - ``alignment``: mean over prompts of the fraction of that prompt's attribute checks passed
    (single: colour, shape, size, position; two: 2 colours, 2 shapes, relation).
  - ``chance_*``: the same metrics for a generator drawing the right number of objects with
    uniformly random attributes (colour 1/8, shape 1/3, size 1/2, cell 1/9, relation 1/4).
  - ``num_prompts``, ``num_single``, ``num_two``, ``unparsed``: prompts that are not captions of
    the grammar are counted in ``unparsed`` and excluded from every other metric.

  Args:
    prompts: N captions.
    images: N images, an ``[N, H, H, 3]`` array or a sequence of ``[H, H, 3]`` arrays (uint8 in
      [0, 255] or float in ``value_range``).
    value_range: range of float images.

  Raises:
    ValueError: ``prompts`` and ``images`` differ in length, or an image has the wrong shape.
  """
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of captions, not a single string")
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"expected images [N, H, H, 3], got shape {images.shape}")
  if len(prompts) != len(images):
    raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
  color, shape, position, size, relation, count, single, two, align = ([] for _ in range(9))
  align_single, align_two = [], []
  unparsed = n_single = n_two = 0
  chance_align, chance_pos = [], []
  for prompt, image in zip(prompts, images):
    try:
      spec = ds.parse_caption(prompt)
    except ValueError:
      unparsed += 1
      continue
    dets = analyze_image(image, value_range=value_range)
    count.append(len(dets) == len(spec.objects))
    if len(spec.objects) == 1:
      n_single += 1
      o, d = spec.objects[0], (dets[0] if dets else None)
      ok = [
        *_match(o, d),
        d is not None and d.size == o.size,
        d is not None and d.position == o.position,
      ]
      color.append(ok[0])
      shape.append(ok[1])
      size.append(ok[2])
      position.append(ok[3])
      single.append(all(ok) and count[-1])
      align.append(sum(ok) / 4)
      align_single.append(align[-1])
      chance_align.append(_CHANCE_SINGLE)
      chance_pos.append(1 / 9)
    else:
      n_two += 1
      checks, rel_ok = _check_two(spec, dets)
      color += checks[0::2]
      shape += checks[1::2]
      position.append(rel_ok)
      relation.append(rel_ok)
      two.append(all(checks) and rel_ok and count[-1])
      align.append((sum(checks) + rel_ok) / 5)
      align_two.append(align[-1])
      chance_align.append(_CHANCE_TWO)
      chance_pos.append(1 / 4)
  return {
    "alignment": _mean(align),
    "color_acc": _mean(color),
    "shape_acc": _mean(shape),
    "position_acc": _mean(position),
    "size_acc": _mean(size),
    "relation_acc": _mean(relation),
    "count_acc": _mean(count),
    "single_object_acc": _mean(single),
    "two_object_acc": _mean(two),
    "single_object_alignment": _mean(align_single),
    "two_object_alignment": _mean(align_two),
    "chance_alignment": _mean(chance_align),
    "chance_color_acc": 1 / 8,
    "chance_shape_acc": 1 / 3,
    "chance_position_acc": _mean(chance_pos),
    "chance_size_acc": 1 / 2,
    "chance_relation_acc": 1 / 4,
    "chance_single_object_acc": 1 / 432,
    "chance_two_object_acc": (1 / 24) ** 2 / 4,
    "chance_single_object_alignment": _CHANCE_SINGLE if align_single else math.nan,
    "chance_two_object_alignment": _CHANCE_TWO if align_two else math.nan,
    "num_prompts": float(len(prompts)),
    "num_single": float(n_single),
    "num_two": float(n_two),
    "unparsed": float(unparsed),
  }


class ShapesAlignmentEvaluator:
  """Scores a model's samples for a fixed prompt list (used by the trainer on EMA weights).

  The trainer samples one image per entry of :attr:`prompts` and calls :meth:`run` on them.
  """

  name = "shapes"

  def __init__(
    self,
    prompts: Sequence[str] | None = None,
    num_prompts: int = 64,
    two_object_fraction: float = 0.25,
    seed: int = 0,
    value_range: tuple[float, float] = (-1.0, 1.0),
  ):
    """Builds the evaluator.

    Args:
      prompts: explicit prompts (each must be a grammar caption); default: the
        dataset's :func:`~imagen_jax.data.shapes.default_prompts`.
      num_prompts: number of default prompts.
      two_object_fraction: share of two-object default prompts.
      seed: seed of the default prompt list.
      value_range: range of float images passed to :meth:`run`.

    Raises:
      ValueError: an explicit prompt is not a caption of the grammar.
    """
    if prompts is None:
      prompts = ds.default_prompts(num_prompts, two_object_fraction, seed)
    for p in prompts:
      ds.parse_caption(p)
    self.prompts: list[str] = list(prompts)
    self.value_range = value_range

  def run(self, images, prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Scores images ``[len(prompts), H, H, 3]`` sampled for :attr:`prompts` (see :func:`score`).

    Raises:
      ValueError: ``prompts`` given and not :attr:`prompts` (the images were sampled for others).
    """
    if prompts is not None and list(prompts) != self.prompts:
      raise ValueError("the shapes evaluator scores images sampled for its own prompts only")
    return score(self.prompts, images, value_range=self.value_range)

  __call__ = run


_TABLE_ROWS = (
  "alignment", "color_acc", "shape_acc", "position_acc", "size_acc", "relation_acc", "count_acc",
  "single_object_acc", "two_object_acc", "single_object_alignment", "two_object_alignment",
)  # fmt: skip


def format_table(metrics: dict[str, float]) -> str:
  """A plain-text table of metrics next to their chance levels."""
  lines = [f"{'metric':<24}{'score':>8}{'chance':>8}"]
  for k in _TABLE_ROWS:
    chance = f"{metrics[f'chance_{k}']:.3f}" if f"chance_{k}" in metrics else "-"
    lines.append(f"{k:<24}{metrics[k]:>8.3f}{chance:>8}")
  lines.append(
    f"prompts: {metrics['num_prompts']:.0f} ({metrics['num_single']:.0f} single, "
    f"{metrics['num_two']:.0f} two-object, {metrics['unparsed']:.0f} unparsed)"
  )
  return "\n".join(lines)


def self_test(num: int, image_size: int = 32, seed: int = 0) -> tuple[dict, dict]:
  """Scores ground-truth renders against their own and against shuffled captions."""
  src = ds.ShapesSource(seed=seed, image_size=image_size)
  items = [src[i] for i in range(num)]
  prompts = [it["caption"] for it in items]
  images = np.stack([it["image"] for it in items])
  shuffled = [prompts[i] for i in np.random.default_rng(seed).permutation(num)]
  return score(prompts, images), score(shuffled, images)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m imagen_jax.evaluators.shapes", description=__doc__.split("\n")[0]
  )
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--images_dir", help="PNGs + metadata.json (or NAME.txt prompts) to score")
  group.add_argument("--self_test", type=int, metavar="N", help="score N ground-truth renders")
  parser.add_argument("--image_size", type=int, default=32, help="render size for --self_test")
  parser.add_argument("--seed", type=int, default=0, help="dataset seed for --self_test")
  parser.add_argument("--json", action="store_true", help="also print all metrics as JSON")
  args = parser.parse_args(argv)
  if args.self_test is not None:
    if args.self_test < 2:
      parser.error("--self_test needs N >= 2")
    metrics, shuffled = self_test(args.self_test, args.image_size, args.seed)
    print(f"== {args.self_test} ground-truth renders at {args.image_size}², shuffled captions ==")
    print(format_table(shuffled))
    print(f"== {args.self_test} ground-truth renders at {args.image_size}², own captions ==")
  else:
    try:
      prompts, images = load_images_dir(args.images_dir)
    except ValueError as e:
      parser.error(str(e))
    metrics = score(prompts, images)
    print(f"== {len(images)} images from {args.images_dir} ==")
  print(format_table(metrics))
  if args.json:
    print(json.dumps(metrics, indent=2))
  print(f"alignment: {metrics['alignment']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
