"""The FID InceptionV3 in Flax NNX, numerically equivalent to pytorch-fid's ``InceptionV3([3])``.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) compare pool3 features (the 2048-d output
of the final average pool) of TensorFlow's 2015 Inception graph. pytorch-fid ports that graph to
PyTorch, and this module ports pytorch-fid's port (``use_fid_inception=True``,
``resize_input=True``, ``normalize_input=True``), so stats computed here and there are
interchangeable. It differs from torchvision's InceptionV3 in four places, all reproduced:

* the average pools inside Mixed_5b..5d, 6b..6e and 7b exclude the zero padding from the mean
  (TensorFlow's ``count_include_pad=False``);
* the pool branch of Mixed_7c is a 3×3 *max* pool, not an average pool;
* the classifier has 1008 classes (only its presence in the weight file is checked: FID stops at
  pool3);
* BatchNorm (eval mode, eps=0.001) follows every bias-free convolution, then ReLU.

Inputs are channels-last ``[B, H, W, 3]`` in [0, 1]. They are resized to 299×299 exactly as
``F.interpolate(mode="bilinear", align_corners=False)`` does (two taps per axis, *no*
antialiasing even when shrinking: ``jax.image.resize`` antialiases, so it is not used), then mapped
to [-1, 1] with ``2x - 1``.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (see :data:`FID_WEIGHTS_URL`),
read with ``torch.load(weights_only=True)`` when torch is installed, or the same tensors in a
``.safetensors`` file (:func:`save_fid_inception_safetensors`, or
``python -m imagen_jax.models.inception IN.pth OUT.safetensors``), which needs no torch.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from imagen_jax.sharding import logical_init

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the FID graph's classifier; torchvision's ImageNet InceptionV3 has 1000
BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


class InceptionWeightsError(ValueError):
  """A weight file that is not the FID Inception; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# Resizing and pooling: pure functions matching the PyTorch ops one for one.


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of ``F.interpolate(mode="bilinear", align_corners=False)``.

  Along one axis, in float32 as PyTorch's CPU kernel computes them::

    s(i) = max((i + 0.5) * in / out - 0.5, 0);  i0 = floor(s);  i1 = min(i0 + 1, in - 1)
    y[i] = (1 - w) * x[i0] + w * x[i1],  w = s - i0

  Returns:
    ``(i0, i1, w)``, each ``[out_size]`` (int32, int32, float32).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  # One rounding, like the fused multiply-add of PyTorch's compiled kernel (float64 holds the
  # product of a float32 and i + 0.5 exactly); rounding twice moves taps by up to 1e-5.
  src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.floor(src).astype(np.int32)
  i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
  w = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, w


def resize_bilinear(images, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
  """Bilinear resize of ``[B, H, W, C]`` without antialiasing, as PyTorch's ``F.interpolate``.

  Works on numpy arrays (on the host, used per image for folders of mixed sizes) and on jax
  arrays (traced inside :meth:`FIDInceptionV3.__call__`) with the same float32 arithmetic.
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  x = images
  for axis, out in ((1, size[0]), (2, size[1])):
    if x.shape[axis] == out:
      continue  # PyTorch's taps are then the identity (s(i) = i, w = 0)
    i0, i1, w = linear_taps(x.shape[axis], out)
    w = w.reshape((-1,) + (1,) * (x.ndim - axis - 1))  # broadcast over the later axes
    x = xp.take(x, i0, axis=axis) * (1 - w) + xp.take(x, i1, axis=axis) * w
  return x


def preprocess(images):
  """``[B, H, W, 3]`` in [0, 1] → ``[B, 299, 299, 3]`` in [-1, 1]: ``2 * resize(x) - 1``."""
  return 2 * resize_bilinear(images) - 1


def _window(x: jax.Array, init, op, k: int, stride: int, pad: int) -> jax.Array:
  return jax.lax.reduce_window(
    x, init, op, (1, k, k, 1), (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))
  )


def max_pool(x: jax.Array, k: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
  """``F.max_pool2d`` on ``[B, H, W, C]`` (padding never wins: it is -inf)."""
  return _window(x, -jnp.inf, jax.lax.max, k, stride, pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3×3/1 average pool with padding 1 and ``count_include_pad=False`` (TensorFlow's).

  ``y = sum_window(x) / n``, ``n`` the number of in-image pixels under the window (4 at corners,
  6 on edges, 9 inside).
  """
  total = _window(x, 0.0, jax.lax.add, 3, 1, 1)  # [B, H, W, C]
  count = _window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, 3, 1, 1)
  return total / count


# ---------------------------------------------------------------------------------------------
# The network. Attribute names are PyTorch's, so a parameter path is its state-dict name.


class ConvBN(nnx.Module):
  """torchvision's ``BasicConv2d``: bias-free conv, eval-mode BatchNorm (eps=0.001), ReLU.

  ``y = relu((conv(x) - mean) * scale / sqrt(var + eps) + bias)``
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    kernel: int | tuple[int, int],
    *,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    precision: Any = _HIGHEST,
    rngs: nnx.Rngs,
  ):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))
    self.precision = precision
    init = logical_init(nnx.initializers.lecun_normal(), ("keep", "keep", "conv_in", "conv_out"))
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_ch, out_ch), jnp.float32))
    norm = lambda fill: logical_init(nnx.initializers.constant(fill), ("norm",))
    self.scale = nnx.Param(norm(1.0)(rngs.params(), (out_ch,), jnp.float32))
    self.bias = nnx.Param(norm(0.0)(rngs.params(), (out_ch,), jnp.float32))
    # Running statistics: frozen here, BatchStat so optimisers over nnx.Param never see them.
    self.mean = nnx.BatchStat(jnp.zeros((out_ch,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((out_ch,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[...],
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )  # [B, H', W', out]
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return jax.nn.relu((y - self.mean[...]) * inv + self.bias[...])


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool (padding excluded)→1×1."""

  def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(ConvBN, rngs=rngs, **kw)
    self.branch1x1 = c(in_ch, 64, 1)
    self.branch5x5_1 = c(in_ch, 48, 1)
    self.branch5x5_2 = c(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = c(in_ch, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
    self.branch_pool = c(in_ch, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid 35→17): 3×3/2 | 1×1→3×3→3×3/2 | max pool 3×3/2."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(ConvBN, rngs=rngs, **kw)
    self.branch3x3 = c(in_ch, 384, 3, stride=2)
    self.branch3x3dbl_1 = c(in_ch, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: factorised 7×7 branches (1×7 and 7×1 convs) and an avg-pool branch."""

  def __init__(self, in_ch: int, c7: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(ConvBN, rngs=rngs, **kw)
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.branch1x1 = c(in_ch, 192, 1)
    self.branch7x7_1 = c(in_ch, c7, 1)
    self.branch7x7_2 = c(c7, c7, **row)
    self.branch7x7_3 = c(c7, 192, **col)
    self.branch7x7dbl_1 = c(in_ch, c7, 1)
    self.branch7x7dbl_2 = c(c7, c7, **col)
    self.branch7x7dbl_3 = c(c7, c7, **row)
    self.branch7x7dbl_4 = c(c7, c7, **col)
    self.branch7x7dbl_5 = c(c7, 192, **row)
    self.branch_pool = c(in_ch, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3):
      bd = layer(bd)
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid 17→8): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool 3×3/2."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(ConvBN, rngs=rngs, **kw)
    self.branch3x3_1 = c(in_ch, 192, 1)
    self.branch3x3_2 = c(192, 320, 3, stride=2)
    self.branch7x7x3_1 = c(in_ch, 192, 1)
    self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = c(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c: split 1×3 + 3×1 branches; the pool branch averages (7b) or, in FID's graph,
  takes the max (7c)."""

  def __init__(self, in_ch: int, *, pool: str, rngs: nnx.Rngs, **kw):
    if pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
    c = functools.partial(ConvBN, rngs=rngs, **kw)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    self.pool = pool
    self.branch1x1 = c(in_ch, 320, 1)
    self.branch3x3_1 = c(in_ch, 384, 1)
    self.branch3x3_2a = c(384, 384, **row)
    self.branch3x3_2b = c(384, 384, **col)
    self.branch3x3dbl_1 = c(in_ch, 448, 1)
    self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = c(384, 384, **row)
    self.branch3x3dbl_3b = c(384, 384, **col)
    self.branch_pool = c(in_ch, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 up to pool3 (``InceptionV3([3])``), channels-last.

  Args:
    precision: of every convolution; HIGHEST by default so GPUs do not switch to TF32 (FID is
      sensitive to small feature changes, and the reference stats were made in full fp32).
    rngs: initialises the (random) weights; use :func:`load_fid_inception` for the real ones.
  """

  def __init__(self, *, precision: Any = _HIGHEST, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, precision=precision)
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
    self.Mixed_7c = InceptionE(2048, pool="max", **kw)

  def pool3(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` already in [-1, 1] (299×299 for FID) → pool3 features ``[B, 2048]``."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x)))  # [B, 71, 71, 192]
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(max_pool(x))))  # [B, 35, 35, 288]
    x = self.Mixed_6a(x)  # [B, 17, 17, 768]
    x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 8, 8, 2048]
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1)

  def __call__(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] → ``[B, 2048]``: pytorch-fid's resize, ``2x - 1``, pool3."""
    return self.pool3(preprocess(jnp.asarray(images, jnp.float32)))


@functools.partial(jax.jit, static_argnums=0)
def _pool3_jit(graphdef, state, x: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).pool3(x)


def pool3_features(model: FIDInceptionV3, x) -> jax.Array:
  """Compiled :meth:`FIDInceptionV3.pool3` (one compilation per batch shape for all models)."""
  graphdef, state = nnx.split(model)
  return _pool3_jit(graphdef, state, jnp.asarray(x, jnp.float32))


def extract_features(
  model: FIDInceptionV3, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 50
) -> np.ndarray:
  """pool3 features of images in [0, 1], each ``[H, W, 3]`` of any size, in batches.

  Each image is resized on the host (sizes may differ per image), then batches of
  ``batch_size`` (the last one zero-padded, so the network compiles once) run through the
  compiled network.

  Returns:
    float32 ``[N, 2048]``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  out = []
  for start in range(0, len(images), batch_size):
    chunk = [
      preprocess(np.asarray(im, np.float32)[None])[0] for im in images[start : start + batch_size]
    ]
    batch = np.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    batch[: len(chunk)] = np.stack(chunk)
    out.append(np.asarray(pool3_features(model, batch))[: len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


# ---------------------------------------------------------------------------------------------
# Weights: pytorch-fid's .pth (torch) or the same tensors in .safetensors (no torch).

_BN_NAMES = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean",
             "var": "bn.running_var", "kernel": "conv.weight"}  # fmt: skip


def torch_name(path: Sequence) -> str:
  """State-dict name of a parameter path: ``Mixed_5b/branch1x1/kernel`` → ``...conv.weight``."""
  *module, leaf = (str(p) for p in path)
  return ".".join([*module, _BN_NAMES[leaf]])


def read_weight_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

  Raises:
    InceptionWeightsError: a missing or unreadable file, or torch not installed for a ``.pth``.
  """
  path = Path(path)
  if not path.is_file():
    raise InceptionWeightsError(
      f"{path}: file not found (download the FID Inception weights from {FID_WEIGHTS_URL})"
    )
  if path.suffix == ".safetensors":
    try:
      return load_file(str(path))
    except (SafetensorError, OSError) as e:
      raise InceptionWeightsError(f"{path}: not a readable safetensors file ({e})") from None
  try:
    import torch
  except ImportError:
    raise InceptionWeightsError(
      f"{path}: reading a PyTorch .pth needs torch, which is not installed. Convert it once where "
      "torch is available: python -m imagen_jax.models.inception IN.pth OUT.safetensors"
    ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle/zip errors: a corrupt or non-weights file
    raise InceptionWeightsError(
      f"{path}: cannot read with torch.load(weights_only=True): {e}"
    ) from e
  if not isinstance(state, Mapping):
    raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _check_extras(tensors: Mapping[str, np.ndarray], used: set[str], origin: str) -> None:
  fc = tensors.get("fc.weight")
  if fc is not None and tuple(fc.shape) != (NUM_CLASSES, FEATURE_DIM):
    raise InceptionWeightsError(
      f"{origin}: tensor fc.weight has shape {list(fc.shape)}, expected "
      f"{[NUM_CLASSES, FEATURE_DIM]}: this is not the FID Inception (torchvision's ImageNet "
      f"InceptionV3 has 1000 classes and gives different features); use {FID_WEIGHTS_URL}"
    )
  # The classifier and BN step counters are not needed for pool3 features.
  ignored = lambda k: k in ("fc.weight", "fc.bias") or k.endswith(".num_batches_tracked")
  unexpected = sorted(k for k in tensors if k not in used and not ignored(k))
  if unexpected:
    raise InceptionWeightsError(
      f"{origin}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}: "
      "not the FID InceptionV3 state dict"
    )


@functools.cache
def _abstract_model(precision: Any):
  """``(graphdef, state)`` of an abstract model: shapes only (tracing the inits takes ~2 s)."""
  return nnx.split(nnx.eval_shape(lambda: FIDInceptionV3(precision=precision, rngs=nnx.Rngs(0))))


def load_fid_inception(
  path_or_tensors: str | os.PathLike | Mapping[str, Any], *, precision: Any = _HIGHEST
) -> FIDInceptionV3:
  """Builds :class:`FIDInceptionV3` from pytorch-fid's weights, checking every name and shape.

  Nothing random is materialised: an abstract model gives the expected shapes, every tensor is
  validated, then each variable is filled from the file.

  Args:
    path_or_tensors: ``pt_inception-2015-12-05-6726825d.pth`` (needs torch), a ``.safetensors``
      file with the same tensor names, or a state dict (name → numpy array or torch tensor).
    precision: convolution precision (see :class:`FIDInceptionV3`).

  Raises:
    InceptionWeightsError: the file cannot be read, a tensor is missing, has the wrong shape or
      is unexpected (the message names the tensor).
  """
  if isinstance(path_or_tensors, Mapping):
    tensors, origin = _to_numpy(path_or_tensors), "state dict"
  else:
    tensors, origin = read_weight_file(path_or_tensors), str(path_or_tensors)
  graphdef, abstract = _abstract_model(precision)
  flat = nnx.to_flat_state(abstract)
  for key, var in flat:  # validate everything before converting anything
    name = torch_name(key)
    if name not in tensors:
      raise InceptionWeightsError(f"{origin}: tensor {name} is missing")
    expected = tuple(var.get_value().shape)
    if key[-1] == "kernel":
      expected = tuple(expected[i] for i in (3, 2, 0, 1))  # HWIO → torch OIHW
    if tuple(tensors[name].shape) != expected:
      raise InceptionWeightsError(
        f"{origin}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(expected)}"
      )
  _check_extras(tensors, {torch_name(key) for key, _ in flat}, origin)
  filled = []
  for key, var in flat:
    arr = np.asarray(tensors[torch_name(key)], np.float32)
    arr = arr.transpose(2, 3, 1, 0) if key[-1] == "kernel" else arr  # OIHW → HWIO
    filled.append((key, var.replace(jnp.asarray(arr))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _to_numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tensors.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().float().cpu().numpy()
    out[k] = np.asarray(v)
  return out


def state_dict(model: FIDInceptionV3) -> dict[str, np.ndarray]:
  """The model's tensors under pytorch-fid names and layouts (conv weights OIHW), float32."""
  out = {}
  for key, var in nnx.to_flat_state(nnx.state(model)):
    arr = np.asarray(var.get_value(), np.float32)
    out[torch_name(key)] = np.ascontiguousarray(
      arr.transpose(3, 2, 0, 1) if key[-1] == "kernel" else arr
    )
  return out


def save_fid_inception_safetensors(
  source: FIDInceptionV3 | Mapping[str, Any] | str | os.PathLike, path: str | os.PathLike
) -> Path:
  """Writes FID Inception weights as ``.safetensors`` (pytorch-fid names), loadable without torch.

  Args:
    source: a model, a state dict, or a weight file (e.g. pytorch-fid's ``.pth``). It is
      validated by loading it first, so a wrong file never gets converted.
    path: the ``.safetensors`` file to write.
  """

  model = source if isinstance(source, FIDInceptionV3) else load_fid_inception(source)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(state_dict(model), str(path))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m imagen_jax.models.inception",
    description="Convert pytorch-fid's Inception weights (.pth) to .safetensors, once, where torch "
    f"is installed. Weights: {FID_WEIGHTS_URL}",
  )
  parser.add_argument("pth", help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("out", help="output .safetensors file")
  args = parser.parse_args(argv)
  try:
    out = save_fid_inception_safetensors(args.pth, args.out)
  except InceptionWeightsError as e:
    parser.error(str(e))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
