"""``shapes``: a procedural image–caption dataset (no download, deterministic, infinite).

Each image shows one or two flat-coloured objects on a plain neutral-gray background; the caption
is generated from the object attributes with a fixed grammar:

  single object:  ``a {size} {color} {shape} {position phrase}``
                  e.g. "a small red circle at the top left", "a large blue square in the center"
  two objects:    ``a {color} {shape} {relation} a {color} {shape}``
                  e.g. "a blue square to the left of a yellow triangle"

("an" replaces "a" before a vowel: "an orange circle ..."). Two-object captions name no size or
absolute position: the sizes are random and the objects sit in opposite cells of the same row
(left/right relations) or column (above/below), so the relation is never ambiguous.

Scenes are resolution independent: geometry lives in unit coordinates and :func:`render` rasterises
signed-distance fields with analytic anti-aliasing (each pixel gets the covered fraction of its own
area), so the same scene renders consistently at 16² … 1024² and a 2×-box-downsampled 64² render
matches the 32² render. :class:`ShapesSource` is a grain random-access source whose item ``i`` is a
pure function of ``(seed, i)``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

# Saturated colours far apart from each other (in CIELAB) and from the gray background, so "white"
# and "black" objects stay visible and blur/colour shifts are still classified correctly.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (20, 100, 230),
  "yellow": (240, 220, 40),
  "purple": (160, 30, 180),
  "orange": (245, 140, 30),
  "white": (245, 245, 245),
  "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# 3×3 grid cells, row-major; the name is the position word(s) used in captions.
POSITIONS: tuple[str, ...] = (
  "top left", "top", "top right",
  "left", "center", "right",
  "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
  p: (
    "in the center" if p == "center" else f"on the {p}" if p in ("left", "right") else f"at the {p}"
  )
  for p in POSITIONS
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# Object "radius" as a fraction of the image side. Small objects are ≥ 5 px across at 32².
SIZE_RADIUS: dict[str, float] = {"small": 0.09, "large": 0.16}
SQUARE_HALF_SIDE = 0.89  # × radius: a square with the same area as the circle of that radius
TRIANGLE_SIDE = 2.2  # × radius: base and height of the upward-pointing isosceles triangle
_CELL_CENTERS = (1 / 6, 1 / 2, 5 / 6)
_MARGIN = 0.01  # objects never touch the image border (keeps the border-median background valid)


def cell_index(position: str) -> tuple[int, int]:
  """Returns ``(row, col)`` in the 3×3 grid for a position name such as ``"top left"``."""
  i = POSITIONS.index(position)
  return divmod(i, 3)


def shape_area(shape: str, radius: float) -> float:
  """Area of a shape of the given radius (same units squared)."""
  factor = {
    "circle": np.pi,
    "square": (2 * SQUARE_HALF_SIDE) ** 2,
    "triangle": TRIANGLE_SIDE**2 / 2,
  }
  return float(factor[shape] * radius * radius)


def shape_half_extent(shape: str, radius: float) -> float:
  """Half of the bounding-box side of a shape (all three have square bounding boxes)."""
  return radius * {"circle": 1.0, "square": SQUARE_HALF_SIDE, "triangle": TRIANGLE_SIDE / 2}[shape]


def centroid_offset(shape: str, radius: float) -> float:
  """Vertical offset (downwards) of the area centroid from the bounding-box centre."""
  # The triangle points up: its centroid is a sixth of its height below the box centre.
  return TRIANGLE_SIDE * radius / 6 if shape == "triangle" else 0.0


def _polygon_sdf(x: np.ndarray, y: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
  dist = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, np.float32)
  pos = np.ones(dist.shape, bool)
  neg = np.ones(dist.shape, bool)
  for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
    ex, ey, wx, wy = bx - ax, by - ay, x - ax, y - ay
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.minimum(dist, np.hypot(wx - ex * t, wy - ey * t))
    cross = ex * wy - ey * wx
    pos &= cross >= 0
    neg &= cross <= 0
  return np.where(pos | neg, -dist, dist)


def signed_distance(
  shape: str, x: np.ndarray, y: np.ndarray, center: tuple[float, float], radius: float
) -> np.ndarray:
  """Signed distance (negative inside) from points ``(x, y)`` to a shape, in unit coordinates."""
  cx, cy = center
  dx, dy = x - cx, y - cy
  if shape == "circle":
    return np.hypot(dx, dy) - radius
  if shape == "square":
    qx, qy = np.abs(dx) - SQUARE_HALF_SIDE * radius, np.abs(dy) - SQUARE_HALF_SIDE * radius
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
  if shape == "triangle":
    h = TRIANGLE_SIDE * radius / 2
    return _polygon_sdf(x, y, [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)])
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(
  shape: str,
  center: tuple[float, float],
  radius: float,
  size: int,
  window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of a shape rasterised on a ``size``×``size`` pixel grid.

  A pixel's value is ``clip(0.5 - d, 0, 1)`` with ``d`` the signed distance from its centre in
  pixels: the exact covered fraction for straight edges, so renders agree across resolutions.

  Args:
    shape: one of :data:`SHAPES`.
    center: bounding-box centre ``(x, y)`` in unit coordinates (y points down).
    radius: object radius in unit coordinates (see :data:`SIZE_RADIUS`).
    size: image side in pixels.
    window: optional ``(y0, y1, x0, x1)`` pixel sub-window to evaluate (default: whole image).

  Returns:
    float32 array of shape ``[y1 - y0, x1 - x0]``.
  """
  y0, y1, x0, x1 = window if window is not None else (0, size, 0, size)
  ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / size)[:, None]
  xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / size)[None, :]
  d = signed_distance(shape, xs, ys, center, radius) * size
  return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object of a scene: attributes plus its (hidden) jitter from the cell centre."""

  color: str
  shape: str
  size: str
  position: str
  offset: tuple[float, float] = (0.0, 0.0)  # (dx, dy) of the box centre from the cell centre

  def __post_init__(self):
    _check_attr("color", self.color, tuple(COLORS))
    _check_attr("shape", self.shape, SHAPES)
    _check_attr("size", self.size, SIZES)
    _check_attr("position", self.position, POSITIONS)

  @property
  def radius(self) -> float:
    return SIZE_RADIUS[self.size]

  @property
  def center(self) -> tuple[float, float]:
    """Bounding-box centre ``(x, y)`` in unit coordinates."""
    row, col = cell_index(self.position)
    return (_CELL_CENTERS[col] + self.offset[0], _CELL_CENTERS[row] + self.offset[1])


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  """What a caption says about one object (size/position are ``None`` in two-object captions)."""

  color: str
  shape: str
  size: str | None = None
  position: str | None = None


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
  """A caption's content: one object, or two and how ``objects[0]`` relates to ``objects[1]``."""

  objects: tuple[ObjectSpec, ...]
  relation: str | None = None


@dataclasses.dataclass(frozen=True)
class Scene:
  """A renderable scene: one or two objects on a plain background."""

  objects: tuple[ShapeObject, ...]
  relation: str | None = None  # two objects: how objects[0] relates to objects[1] in the caption
  background: tuple[int, int, int] = BACKGROUND

  def __post_init__(self):
    if len(self.objects) not in (1, 2) or (self.relation is None) != (len(self.objects) == 1):
      raise ValueError(f"a scene has 1 object, or 2 objects and a relation; got {self}")
    if self.relation is not None:
      _check_attr("relation", self.relation, RELATIONS)

  def spec(self) -> CaptionSpec:
    """The caption-visible content (two-object captions omit sizes and positions)."""
    if len(self.objects) == 1:
      o = self.objects[0]
      return CaptionSpec((ObjectSpec(o.color, o.shape, o.size, o.position),))
    return CaptionSpec(tuple(ObjectSpec(o.color, o.shape) for o in self.objects), self.relation)


def _check_attr(name: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene | CaptionSpec) -> str:
  """Renders the fixed-grammar caption of a scene (or of a parsed :class:`CaptionSpec`)."""
  spec = scene.spec() if isinstance(scene, Scene) else scene
  if len(spec.objects) == 1:
    o = spec.objects[0]
    return f"{_article(o.size)} {o.size} {o.color} {o.shape} {POSITION_PHRASES[o.position]}"
  a, b = spec.objects
  first, second = (f"{_article(o.color)} {o.color} {o.shape}" for o in (a, b))
  return f"{first} {spec.relation} {second}"


def _alt(words: Sequence[str]) -> str:
  return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


@functools.cache
def _caption_patterns() -> tuple[re.Pattern, re.Pattern, dict[str, str]]:
  colors, shapes, sizes = _alt(list(COLORS)), _alt(SHAPES), _alt(SIZES)
  phrase_to_pos = {v: k for k, v in POSITION_PHRASES.items()}
  single = re.compile(rf"an? {sizes} {colors} {shapes} {_alt(list(phrase_to_pos))}")
  double = re.compile(rf"an? {colors} {shapes} {_alt(RELATIONS)} an? {colors} {shapes}")
  return single, double, phrase_to_pos


def parse_caption(text: str) -> CaptionSpec:
  """Parses a caption of the ``shapes`` grammar (inverse of :func:`caption`).

  Case, repeated whitespace, a trailing period and "a"/"an" are normalised; anything else outside
  the grammar is rejected.

  Raises:
    ValueError: ``text`` is not a caption of the grammar (the message quotes it).
  """
  if not isinstance(text, str):
    raise ValueError(f"caption must be a str, got {type(text).__name__}: {text!r}")
  norm = " ".join(text.lower().strip().rstrip(".").split())
  single, double, phrase_to_pos = _caption_patterns()
  if m := single.fullmatch(norm):
    size, color, shape, phrase = m.groups()
    return CaptionSpec((ObjectSpec(color, shape, size, phrase_to_pos[phrase]),))
  if m := double.fullmatch(norm):
    c1, s1, rel, c2, s2 = m.groups()
    return CaptionSpec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), rel)
  raise ValueError(f"not a caption of the shapes grammar: {text!r}")


def vocabulary() -> list[str]:
  """Every word the grammar can emit, sorted (for building a word-level tokenizer)."""
  words = {"a", "an", *COLORS, *SHAPES, *SIZES}
  for phrase in [*POSITION_PHRASES.values(), *RELATIONS]:
    words.update(phrase.split())
  return sorted(words)


def all_single_object_captions() -> list[str]:
  """All 8 colors × 3 shapes × 2 sizes × 9 positions = 432 single-object captions, fixed order."""
  return [
    caption(CaptionSpec((ObjectSpec(c, s, z, p),)))
    for c in COLORS
    for s in SHAPES
    for z in SIZES
    for p in POSITIONS
  ]


def sample_spec(rng: np.random.Generator, *, two_object_prob: float = 0.3) -> CaptionSpec:
  """Samples caption content uniformly: attributes i.i.d.; two objects differ in color or shape."""
  pick = lambda seq: seq[int(rng.integers(len(seq)))]
  colors = list(COLORS)
  if rng.random() >= two_object_prob:
    return CaptionSpec((ObjectSpec(pick(colors), pick(SHAPES), pick(SIZES), pick(POSITIONS)),))
  pairs = [(c, s) for c in colors for s in SHAPES]
  i, j = rng.choice(len(pairs), size=2, replace=False)
  return CaptionSpec((ObjectSpec(*pairs[i]), ObjectSpec(*pairs[j])), pick(RELATIONS))


def _placed(
  color: str, shape: str, size: str, row: int, col: int, rng: np.random.Generator, jitter: float
) -> ShapeObject:
  """An object in cell (row, col), its centre jittered but kept inside the cell and the image."""
  half = shape_half_extent(shape, SIZE_RADIUS[size])
  offset = []
  for k in (col, row):
    lo = max(k / 3 + _MARGIN, half + _MARGIN)
    hi = min((k + 1) / 3 - _MARGIN, 1 - half - _MARGIN)
    c = float(np.clip(_CELL_CENTERS[k] + rng.uniform(-jitter, jitter), lo, hi))
    offset.append(c - _CELL_CENTERS[k])
  return ShapeObject(color, shape, size, POSITIONS[3 * row + col], (offset[0], offset[1]))


def scene_from_spec(
  spec: CaptionSpec,
  rng: np.random.Generator,
  *,
  position_jitter: float = 0.03,
  background: tuple[int, int, int] = BACKGROUND,
) -> Scene:
  """Samples a scene matching a caption spec (hidden attributes: jitter, two-object sizes/cells).

  Two-object scenes put the objects in opposite columns of one row (left/right relations) or
  opposite rows of one column (above/below), so they never overlap and the relation is clear.
  """
  if len(spec.objects) == 1:
    o = spec.objects[0]
    if o.size is None or o.position is None:
      raise ValueError(f"a single-object spec needs a size and a position: {spec}")
    row, col = cell_index(o.position)
    return Scene(
      (_placed(o.color, o.shape, o.size, row, col, rng, position_jitter),), None, background
    )
  a, b = spec.objects
  line = int(rng.integers(3))  # the shared row or column
  first, second = {
    "to the left of": (0, 2),
    "to the right of": (2, 0),
    "above": (0, 2),
    "below": (2, 0),
  }[spec.relation]
  horizontal = spec.relation in ("to the left of", "to the right of")
  objs = []
  for o, k in ((a, first), (b, second)):
    size = SIZES[int(rng.integers(len(SIZES)))]
    row, col = (line, k) if horizontal else (k, line)
    objs.append(_placed(o.color, o.shape, size, row, col, rng, position_jitter))
  return Scene(tuple(objs), spec.relation, background)


def sample_scene(
  rng: np.random.Generator,
  *,
  two_object_prob: float = 0.3,
  position_jitter: float = 0.03,
  background: tuple[int, int, int] = BACKGROUND,
) -> Scene:
  """Samples a random scene (see :func:`sample_spec` and :func:`scene_from_spec`)."""
  spec = sample_spec(rng, two_object_prob=two_object_prob)
  return scene_from_spec(spec, rng, position_jitter=position_jitter, background=background)


def render(scene: Scene, size: int) -> np.ndarray:
  """Rasterises a scene to a ``uint8 [size, size, 3]`` RGB image with anti-aliased edges."""
  if int(size) < 8:
    raise ValueError(f"image size must be >= 8 pixels, got {size}")
  size = int(size)
  img = np.empty((size, size, 3), np.float32)
  img[...] = np.asarray(scene.background, np.float32)
  for o in scene.objects:
    # Only evaluate the SDF inside the object's padded bounding box: rendering stays cheap at 1024².
    half = shape_half_extent(o.shape, o.radius)
    (cx, cy), pad = o.center, 2 / size
    x0, x1 = (
      max(int((cx - half - pad) * size), 0),
      min(int(np.ceil((cx + half + pad) * size)), size),
    )
    y0, y1 = (
      max(int((cy - half - pad) * size), 0),
      min(int(np.ceil((cy + half + pad) * size)), size),
    )
    a = coverage(o.shape, o.center, o.radius, size, (y0, y1, x0, x1))[..., None]
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch + a * (np.asarray(COLORS[o.color], np.float32) - patch)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_pair(scene: Scene, sizes: Sequence[int] = (32, 64)) -> dict[int, np.ndarray]:
  """Renders one scene at several resolutions (e.g. a cascade stage's low/high-res pair)."""
  return {int(s): render(scene, int(s)) for s in sizes}


class ShapesSource:
  """Grain random-access source of ``shapes`` examples; item ``i`` is a pure function of (seed, i).

  Each item is ``{"image": uint8 [S, S, 3], "caption": str, "id": int}``; with a tuple
  ``image_size`` the single ``"image"`` key becomes one ``"image_{S}"`` key per size, all rendered
  from the same scene (consistent pairs for super-resolution stages).
  """

  def __init__(
    self,
    seed: int = 0,
    image_size: int | Sequence[int] = 32,
    length: int = 2**31 - 1,
    two_object_prob: float = 0.3,
    position_jitter: float = 0.03,
  ):
    if seed < 0 or length <= 0 or not 0.0 <= two_object_prob <= 1.0:
      raise ValueError(f"need seed >= 0, length > 0, 0 <= two_object_prob <= 1: {seed=} {length=}")
    self.seed, self.length = int(seed), int(length)
    self.image_size = (
      image_size if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    )
    self.two_object_prob, self.position_jitter = float(two_object_prob), float(position_jitter)

  def __len__(self) -> int:
    return self.length

  def scene(self, index: int) -> Scene:
    """The scene of item ``index`` (without rendering it)."""
    index = int(index)
    if not -self.length <= index < self.length:
      raise IndexError(f"index {index} out of range for ShapesSource of length {self.length}")
    index %= self.length
    return sample_scene(
      np.random.default_rng([self.seed, index]),
      two_object_prob=self.two_object_prob,
      position_jitter=self.position_jitter,
    )

  def __getitem__(self, index: int) -> dict:
    scene = self.scene(index)
    item = {"caption": caption(scene), "id": int(index) % self.length}
    if isinstance(self.image_size, int):
      item["image"] = render(scene, self.image_size)
    else:
      item.update({f"image_{s}": render(scene, s) for s in self.image_size})
    return item

  def __repr__(self) -> str:
    return (
      f"ShapesSource(seed={self.seed}, image_size={self.image_size}, length={self.length}, "
      f"two_object_prob={self.two_object_prob}, position_jitter={self.position_jitter})"
    )


def default_prompts(
  num_prompts: int = 64, two_object_fraction: float = 0.25, seed: int = 0
) -> list[str]:
  """A fixed, deterministic evaluation prompt list mixing single- and two-object captions.

  Single-object prompts are distinct (drawn without replacement from the 432 possible ones until
  they run out), so colours, shapes, sizes and cells are all covered evenly.
  """
  if num_prompts <= 0 or not 0.0 <= two_object_fraction <= 1.0:
    raise ValueError(f"need num_prompts > 0 and 0 <= two_object_fraction <= 1: {num_prompts=}")
  rng = np.random.default_rng([seed, 0x5A4E])
  n_two = int(round(num_prompts * two_object_fraction))
  singles = all_single_object_captions()
  order = np.concatenate(
    [rng.permutation(len(singles)) for _ in range(-(-num_prompts // len(singles)))]
  )
  prompts = [singles[i] for i in order[: num_prompts - n_two]]
  prompts += [caption(sample_spec(rng, two_object_prob=1.0)) for _ in range(n_two)]
  return [prompts[i] for i in rng.permutation(len(prompts))]
