"""CLIP for metrics and guidance: a Hugging Face ``CLIPModel`` checkpoint, its tokenizer and its
image preprocessing, with jitted embedding calls and pure functions for use inside ``jax.grad``.

Typical use (an evaluator or notebook)::

  from imagen_jax.clip import CLIP
  clip = CLIP.load("/ckpt/clip-vit-large-patch14")  # or a Hub id when online
  t = clip.embed_text(["a corgi on the beach"])  # [B, P], L2-normalised
  i = clip.embed_images(uint8_images)  # [B, P], from uint8 [B, H, W, 3] or PIL images
  clip_score = 100 * jnp.sum(t * i, axis=-1)

Two preprocessing paths exist. :meth:`CLIP.preprocess` equals transformers'
``CLIPImageProcessor`` (PIL resize of the shorter side, centre crop, rescale, normalise) on uint8
images, so embeddings match the PyTorch model. :meth:`CLIP.preprocess_jax` is its differentiable
approximation for images in ``[-1, 1]`` inside jitted code (``jax.image.resize`` bicubic with
antialiasing instead of PIL on uint8), used by :meth:`CLIP.image_features_fn` for guidance.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from transformers import AutoTokenizer

from imagen_jax.models.clip import CLIPConfig, CLIPModule, CLIPVisionConfig, l2_normalize
from imagen_jax.models.clip_loading import (
  CheckpointError,
  ShardingSpec,
  load_clip,
  resolve_clip_dir,
)
from imagen_jax.models.hf_loading import read_json

__all__ = ["CLIP", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "CheckpointError", "ImageProcessing"]

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the defaults of CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, CLIP's "resample"


# ---------------------------------------------------------------------------------------------
# Image preprocessing.


@dataclasses.dataclass(frozen=True, slots=True)
class ImageProcessing:
  """``CLIPImageProcessor`` settings (``preprocessor_config.json``).

  ``shortest_edge`` resizes the shorter side (keeping the aspect ratio, the longer side
  truncated to an int as transformers does); ``resize_to`` instead resizes to an exact
  ``(height, width)``. ``crop`` is the centre crop ``(height, width)``.
  """

  shortest_edge: int | None = 224
  resize_to: tuple[int, int] | None = None
  crop: tuple[int, int] | None = (224, 224)
  resample: int = _PIL_BICUBIC
  rescale_factor: float | None = 1 / 255
  mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
  std: tuple[float, ...] | None = OPENAI_CLIP_STD

  @classmethod
  def for_vision(cls, vision: CLIPVisionConfig) -> ImageProcessing:
    """The processor CLIP checkpoints ship: resize + crop to ``image_size``, OpenAI mean/std."""
    s = vision.image_size
    return cls(shortest_edge=s, crop=(s, s))

  @classmethod
  def from_hf_dict(cls, d: dict, vision: CLIPVisionConfig, source: str = "") -> ImageProcessing:
    """Parses ``preprocessor_config.json`` (missing keys take transformers' CLIP defaults)."""
    default = cls.for_vision(vision)
    size = d.get("size", default.shortest_edge) if d.get("do_resize", True) else None
    if isinstance(size, int):  # legacy configs store a bare int: the shortest edge
      size = {"shortest_edge": size}
    crop = d.get("crop_size", default.crop[0]) if d.get("do_center_crop", True) else None
    if isinstance(crop, int):
      crop = {"height": crop, "width": crop}
    rescale, norm = d.get("do_rescale", True), d.get("do_normalize", True)
    try:
      return cls(
        shortest_edge=size.get("shortest_edge") if size else None,
        resize_to=(size["height"], size["width"]) if size and "height" in size else None,
        crop=(crop["height"], crop["width"]) if crop else None,
        resample=int(d.get("resample", _PIL_BICUBIC)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)) if rescale else None,
        mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)) if norm else None,
        std=tuple(d.get("image_std", OPENAI_CLIP_STD)) if norm else None,
      )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{source}: unsupported image processor settings ({e!r})") from None

  def resized_hw(self, h: int, w: int) -> tuple[int, int]:
    """Output size of the resize step for an ``h x w`` image."""
    if self.resize_to is not None:
      return self.resize_to
    if self.shortest_edge is None:
      return h, w
    short, long = min(h, w), max(h, w)
    new_long = int(self.shortest_edge * long / short)  # transformers truncates, not rounds
    return (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge)


def _center_crop(x: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
  """``[H, W, C]`` centre crop, zero-padding an image smaller than the crop (as transformers)."""
  h, w = x.shape[:2]
  ch, cw = crop
  ph, pw = max(ch - h, 0), max(cw - w, 0)
  if ph or pw:
    top, left = (ph + 1) // 2, (pw + 1) // 2  # ceil, as transformers pads
    x = np.pad(x, ((top, ph - top), (left, pw - left), (0, 0)))
    h, w = x.shape[:2]
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[top : top + ch, left : left + cw]


def _as_pil(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(
      f"images must be uint8 [H, W, 3] arrays or PIL images, got {arr.dtype} {arr.shape}; "
      "use preprocess_jax for float images in [-1, 1]"
    )
  return Image.fromarray(arr)


def preprocess_image(image: Any, proc: ImageProcessing) -> np.ndarray:
  """One image (uint8 ``[H, W, 3]`` or PIL) -> float32 ``[h, w, 3]``, as CLIPImageProcessor."""
  pil = _as_pil(image)
  if proc.resize_to is not None or proc.shortest_edge is not None:
    nh, nw = proc.resized_hw(pil.height, pil.width)
    pil = pil.resize((nw, nh), resample=proc.resample)  # PIL on uint8, as the processor
  x = np.asarray(pil)
  if proc.crop is not None:
    x = _center_crop(x, proc.crop)
  x = x.astype(np.float64) * proc.rescale_factor if proc.rescale_factor else x
  x = x.astype(np.float32)  # transformers rescales in float64, then normalises in float32
  if proc.mean is not None:
    x = (x - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32)
  return x


def preprocess_jax(x: jax.Array, proc: ImageProcessing) -> jax.Array:
  """Differentiable approximation of :func:`preprocess_image` for ``[B, H, W, 3]`` in [-1, 1].

  Bicubic (Keys a=-0.5, as PIL) resize with antialiasing on float values instead of PIL on
  uint8, so results differ by about the uint8 quantisation plus PIL's fixed-point filter
  weights (mean abs difference about 0.005 in normalised units on random images, where one
  uint8 level is 0.015); the crop and normalisation are exact. ``processing.resample`` is
  ignored: this path is always bicubic. Shapes are static, so it jits and differentiates.
  """
  b, h, w, c = x.shape
  x = (x.astype(jnp.float32) + 1) / 2  # [-1, 1] -> [0, 1]
  nh, nw = proc.resized_hw(h, w)
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    x = jnp.clip(x, 0, 1)  # PIL's uint8 output clips the bicubic overshoot too
  if proc.crop is not None:
    ch, cw = proc.crop
    if ch > nh or cw > nw:
      raise ValueError(f"preprocess_jax: crop {proc.crop} exceeds the resized image {(nh, nw)}")
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[:, top : top + ch, left : left + cw]
  if proc.rescale_factor is None:
    x = x * 255  # the model then sees unscaled pixel values, as the processor would give it
  if proc.mean is not None:
    x = (x - jnp.asarray(proc.mean)) / jnp.asarray(proc.std)
  return x


# ---------------------------------------------------------------------------------------------
# Pure functions of (graphdef, state): jitted in CLIP, usable in other jitted code.


def _text_features(graphdef, state, input_ids, attention_mask, normalize: bool = False):
  feats = nnx.merge(graphdef, state).text_features(input_ids, attention_mask)
  return l2_normalize(feats) if normalize else feats.astype(jnp.float32)


def _image_features(graphdef, state, pixels, normalize: bool = False):
  feats = nnx.merge(graphdef, state).image_features(pixels)
  return l2_normalize(feats) if normalize else feats.astype(jnp.float32)


def _as_text(prompt: Any) -> str:
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, bytes | np.bytes_):
    return bytes(prompt).decode("utf-8", errors="replace")
  raise TypeError(f"prompts must be str or bytes, got {type(prompt).__name__}: {prompt!r}")


class CLIP:
  """A frozen CLIP model (parameters as an ``nnx.State``), its tokenizer and preprocessing.

  Args:
    model: the module (e.g. from :func:`imagen_jax.models.clip_loading.load_clip`).
    tokenizer: a transformers CLIP tokenizer, or ``None`` (then only array inputs work).
    processing: image preprocessing; defaults to :meth:`ImageProcessing.for_vision`.
    source: where the weights came from (for messages).
  """

  def __init__(
    self,
    model: CLIPModule,
    tokenizer: Any = None,
    processing: ImageProcessing | None = None,
    *,
    source: str | None = None,
  ):
    self.config: CLIPConfig = model.config
    self.dtype = model.dtype
    self.tokenizer = tokenizer
    self.processing = processing or ImageProcessing.for_vision(self.config.vision_config)
    self.source = source
    self.graphdef, self.state = nnx.split(model)
    self._text = jax.jit(functools.partial(_text_features, self.graphdef), static_argnums=3)
    self._image = jax.jit(functools.partial(_image_features, self.graphdef), static_argnums=2)

  @classmethod
  def load(
    cls,
    path_or_hub_id: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    shardings: ShardingSpec = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    progress: bool = True,
  ) -> CLIP:
    """Loads a Hugging Face ``CLIPModel`` checkpoint with its tokenizer and processor config.

    Args:
      path_or_hub_id: a directory (``config.json`` + weights, optionally the tokenizer files
        and ``preprocessor_config.json``) or a Hub id such as ``openai/clip-vit-large-patch14``.
      dtype: compute dtype (``jnp.float32`` exact, ``jnp.bfloat16`` faster on accelerators).
      param_dtype: parameter storage dtype; defaults to ``dtype``.
      shardings: parameter placement, see :func:`imagen_jax.models.clip_loading.load_clip`.
      subfolder: checkpoint subfolder.
      revision: Hub revision.
      progress: show a progress bar while loading.

    Raises:
      CheckpointError: missing/corrupt/incompatible files (the message names file and tensor).
    """
    local = resolve_clip_dir(path_or_hub_id, subfolder=subfolder, revision=revision)
    model = load_clip(
      local, dtype=dtype, param_dtype=param_dtype, shardings=shardings, progress=progress
    )
    tokenizer = None
    if any((local / f).is_file() for f in _TOKENIZER_FILES):
      tokenizer = AutoTokenizer.from_pretrained(str(local))
    proc_file = Path(local) / "preprocessor_config.json"
    vision = model.config.vision_config
    processing = (
      ImageProcessing.from_hf_dict(read_json(proc_file), vision, str(proc_file))
      if proc_file.is_file()
      else ImageProcessing.for_vision(vision)
    )
    return cls(model, tokenizer, processing, source=str(path_or_hub_id))

  @property
  def model(self) -> CLIPModule:
    """The model as an NNX module (shares the parameter arrays)."""
    return nnx.merge(self.graphdef, self.state)

  @property
  def projection_dim(self) -> int:
    """Width ``P`` of the embeddings."""
    return self.config.projection_dim

  @property
  def max_length(self) -> int:
    """Token length ``L`` of :meth:`tokenize` (77 for every published CLIP)."""
    return self.config.text_config.max_position_embeddings

  # -- text --------------------------------------------------------------------------------

  def tokenize(self, prompts: str | Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [B, L], mask bool [B, L])``, padded/truncated to ``L = max_length``.

    Truncation keeps the final EOS token, as ``CLIPTokenizer(..., truncation=True)``.
    """
    if self.tokenizer is None:
      raise CheckpointError(
        f"{self.source or 'this CLIP checkpoint'}: no tokenizer files "
        f"({', '.join(_TOKENIZER_FILES)}) next to the weights"
      )
    if isinstance(prompts, str | bytes):
      prompts = [prompts]
    texts = [_as_text(p) for p in prompts]
    out = self.tokenizer(
      texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
    )
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)

  def text_features(self, input_ids: Any, attention_mask: Any, *, normalize: bool = False):
    """Projected text features ``[B, P]`` float32 (``CLIPModel.get_text_features``).

    Args:
      input_ids: int ``[B, L]``.
      attention_mask: ``[B, L]``, 1/True for real tokens.
      normalize: L2-normalise (what the contrastive logits and CLIP score use).
    """
    return self._text(
      self.state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask), normalize
    )

  def embed_text(self, prompts: str | Sequence[str | bytes], *, normalize: bool = True):
    """Tokenizes and embeds prompts: ``[B, P]`` float32, L2-normalised unless told not to."""
    ids, mask = self.tokenize(prompts)
    return self.text_features(ids, mask, normalize=normalize)

  # -- images ------------------------------------------------------------------------------

  def preprocess(self, images: Any) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` (or a list of uint8 arrays / PIL images of any sizes) ->
    float32 ``[B, S, S, 3]``, equal to ``CLIPImageProcessor`` output (channels-last)."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
      images = [images]
    return np.stack([preprocess_image(im, self.processing) for im in images])

  def preprocess_jax(self, x: jax.Array) -> jax.Array:
    """Differentiable preprocessing of ``[B, H, W, 3]`` images in [-1, 1] (any size).

    Approximates :meth:`preprocess` (see :func:`preprocess_jax`); jit- and grad-friendly.
    """
    return preprocess_jax(x, self.processing)

  def image_features(self, pixels: Any, *, normalize: bool = False) -> jax.Array:
    """Projected image features ``[B, P]`` float32 from preprocessed pixels ``[B, S, S, 3]``."""
    return self._image(self.state, jnp.asarray(pixels, jnp.float32), normalize)

  def embed_images(self, images: Any, *, normalize: bool = True) -> jax.Array:
    """Embeds uint8 images (``[B, H, W, 3]`` or a list of arrays / PIL images): ``[B, P]``
    float32, L2-normalised unless ``normalize=False``."""
    return self.image_features(self.preprocess(images), normalize=normalize)

  # -- pure functions for jitted / differentiated code -------------------------------------

  def image_features_fn(
    self, *, preprocess: bool = True, normalize: bool = True
  ) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """A pure ``(state, images) -> [B, P]`` for ``jax.jit``/``jax.grad`` (pass ``clip.state``).

    Args:
      preprocess: ``images`` are ``[B, H, W, 3]`` in [-1, 1] of any size, passed through
        :meth:`preprocess_jax`; otherwise they are already the model's normalised input.
      normalize: L2-normalise the features.
    """
    graphdef, proc = self.graphdef, self.processing

    def fn(state: nnx.State, images: jax.Array) -> jax.Array:
      pixels = preprocess_jax(images, proc) if preprocess else images
      return _image_features(graphdef, state, pixels, normalize)

    return fn

  def text_features_fn(
    self, *, normalize: bool = True
  ) -> Callable[[nnx.State, jax.Array, jax.Array], jax.Array]:
    """A pure ``(state, input_ids, attention_mask) -> [B, P]`` for jitted code."""
    return functools.partial(_text_features, self.graphdef, normalize=normalize)

  def __repr__(self) -> str:
    t, v = self.config.text_config, self.config.vision_config
    return (
      f"CLIP(vision={v.hidden_size}x{v.num_hidden_layers}/p{v.patch_size}@{v.image_size}, "
      f"text={t.hidden_size}x{t.num_hidden_layers}, P={self.projection_dim}, "
      f"dtype={jnp.dtype(self.dtype).name}, source={self.source!r})"
    )
