"""FID and KID of generated images against reference statistics, pytorch-fid/torchmetrics-exact.

* Features: pool3 of the FID InceptionV3 (:mod:`imagen_jax.models.inception`), from images in
  [0, 1] exactly as pytorch-fid reads files (``uint8 / 255``, float32).
* FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two feature sets
  (:func:`frechet_distance`), computed from a pivoted Cholesky factor and a symmetric
  eigenvalue problem instead of pytorch-fid's ``scipy.linalg.sqrtm``: same value, no complex
  parts, and still defined when the covariances are singular (fewer images than the 2048
  feature dimensions).
* KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel, averaged over
  random subsets, exactly as torchmetrics' ``KernelInceptionDistance`` (:func:`kid`). It needs the
  reference *features*, which :func:`reference_stats` keeps in the ``.npz`` by default.

Statistics files are pytorch-fid's ``.npz`` (keys ``mu`` and ``sigma``) with two optional extra
keys, ``count`` and ``features``; pytorch-fid ignores the extras, and its own files load here
(without KID).

Typical use::

  inception = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
  reference_stats("data/coco_val_256/", inception, "coco_val_256.npz")
  FIDEvaluator("pt_inception-...pth", "coco_val_256.npz").run(samples)  # [N, H, W, 3] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
from PIL import Image

from imagen_jax.models.inception import (
  FEATURE_DIM,
  FIDInceptionV3,
  extract_features,
  load_fid_inception,
)

# The extensions pytorch-fid's fid_score reads (it matches them case-sensitively; we do not).
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


# ---------------------------------------------------------------------------------------------
# Statistics.


def _warn_few(n: int, dim: int) -> None:
  if n < 2:
    raise ValueError(f"FID/KID need at least 2 images to estimate a covariance, got {n}")
  if n <= dim:
    warnings.warn(
      f"{n} images for {dim}-dimensional features: the covariance has rank <= {n - 1} < {dim} "
      "(singular), so FID is computed on a rank-deficient estimate and is strongly biased upward; "
      "published FIDs use 10k-50k images",
      stacklevel=3,
    )


@dataclasses.dataclass
class FeatureStats:
  """Gaussian statistics of Inception features, optionally with the features themselves.

  Attributes:
    mu: mean ``[D]`` (float64).
    sigma: covariance ``[D, D]`` with ``ddof=1`` (as ``np.cov``; float64).
    count: number of images, or ``None`` when unknown (pytorch-fid's files do not store it).
    features: ``[N, D]`` float32 features (needed for KID), or ``None``.
  """

  mu: np.ndarray
  sigma: np.ndarray
  count: int | None = None
  features: np.ndarray | None = None

  def __post_init__(self):
    self.mu = np.asarray(self.mu, np.float64)
    self.sigma = np.asarray(self.sigma, np.float64)
    d = self.mu.shape[0] if self.mu.ndim == 1 else -1
    if self.mu.ndim != 1 or self.sigma.shape != (d, d):
      raise ValueError(f"FeatureStats: mu must be [D] and sigma [D, D], got "
                       f"{self.mu.shape} and {self.sigma.shape}")  # fmt: skip
    if self.features is not None:
      self.features = np.asarray(self.features, np.float32)
      if self.features.ndim != 2 or self.features.shape[1] != d:
        raise ValueError(f"FeatureStats: features must be [N, {d}], got {self.features.shape}")

  @classmethod
  def from_features(cls, features: np.ndarray, *, keep_features: bool = False) -> FeatureStats:
    """``mu = mean(f)``, ``sigma = cov(f, ddof=1)`` of ``[N, D]`` features, in float64.

    Raises:
      ValueError: fewer than 2 feature rows. Warns when ``N <= D`` (singular covariance).
    """
    f = np.asarray(features)
    if f.ndim != 2:
      raise ValueError(f"features must be [N, D], got shape {f.shape}")
    _warn_few(f.shape[0], f.shape[1])
    f64 = f.astype(np.float64)
    return cls(
      mu=f64.mean(axis=0),
      sigma=np.cov(f64, rowvar=False),
      count=f.shape[0],
      features=f if keep_features else None,
    )

  def save(self, path: str | os.PathLike) -> Path:
    """Writes an ``.npz`` with ``mu``, ``sigma`` (pytorch-fid's keys), ``count`` and ``features``
    when known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(mu=self.mu, sigma=self.sigma)
    if self.count is not None:
      arrays["count"] = np.asarray(self.count, np.int64)
    if self.features is not None:
      arrays["features"] = self.features
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
      np.savez(f, **arrays)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    """Reads an ``.npz`` written by :meth:`save` or by pytorch-fid (``--save-stats``).

    Raises:
      ValueError: the file lacks ``mu``/``sigma`` or their shapes disagree.
    """
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such statistics file")
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise ValueError(f"{path}: not an FID statistics file (keys {f.files}, missing {missing})")
      count = int(f["count"]) if "count" in f.files else None
      feats = f["features"] if "features" in f.files else None
      try:
        return cls(mu=f["mu"], sigma=f["sigma"], count=count, features=feats)
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def psd_factor(sigma: np.ndarray) -> np.ndarray:
  """``F [D, r]`` with ``F Fᵀ = sigma`` and ``r`` its numerical rank (pivoted Cholesky).

  LAPACK ``dpstrf`` gives ``Pᵀ sigma P = L Lᵀ`` and stops at pivots below ``D · eps · max(diag)``,
  so singular covariances (fewer samples than dimensions) factor cleanly; ``F = P L``.
  """
  c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1)
  if info < 0:
    raise ValueError(f"dpstrf: illegal argument {-info}")
  lower = np.tril(c)[:, :rank]
  factor = np.empty_like(lower)
  factor[piv - 1] = lower  # undo the pivoting: row piv[k] of F is row k of L
  return factor


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (FID on pool3 stats).

  ``d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)``, with
  ``tr((S1 S2)^½) = Σ_i sqrt(λ_i(Fᵀ S_other F))`` for ``F Fᵀ = S`` the lower-rank covariance
  (:func:`psd_factor`): ``F Fᵀ S_other`` and ``Fᵀ S_other F`` share their non-zero eigenvalues,
  and the latter is symmetric PSD, so ``eigvalsh`` applies; its round-off negatives are clamped
  to 0. Same value as pytorch-fid's ``scipy.linalg.sqrtm`` route, without complex parts, defined
  for singular covariances, and ~4× faster at D = 2048 (much more when one side has few
  samples). float64.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
    raise ValueError(
      f"frechet_distance: shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
      f"{s2.shape}"
    )
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  factor, other = psd_factor(s1), s2
  if factor.shape[1] == len(mu1):  # full rank: the other side may have fewer samples
    f2 = psd_factor(s2)
    if f2.shape[1] < factor.shape[1]:
      factor, other = f2, s1
  a = factor.T @ (other @ factor)  # [r, r]
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((a + a.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# KID: torchmetrics' KernelInceptionDistance, in float64 numpy.


def poly_kernel(f1: np.ndarray, f2: np.ndarray, degree: int = 3, gamma: float | None = None,
                coef: float = 1.0) -> np.ndarray:  # fmt: skip
  """``k(x, y) = (gamma x·y + coef)^degree`` for all row pairs, ``gamma = 1 / D`` by default."""
  gamma = 1.0 / f1.shape[1] if gamma is None else gamma
  return (f1 @ f2.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
  """Unbiased MMD² of two equal-size samples (``m`` each) from their kernel matrices.

  ``MMD² = (Σ_{i≠j} k_xx + Σ_{i≠j} k_yy) / (m (m - 1)) - 2 Σ_{i,j} k_xy / m²``
  """
  m = k_xx.shape[0]
  off = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
  return float(off / (m * (m - 1)) - 2 * k_xy.sum() / m**2)


def poly_mmd(f1: np.ndarray, f2: np.ndarray, degree: int = 3, gamma: float | None = None,
             coef: float = 1.0) -> float:  # fmt: skip
  """Unbiased polynomial-kernel MMD² of two ``[m, D]`` feature sets (torchmetrics' ``poly_mmd``)."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  k = lambda a, b: poly_kernel(a, b, degree, gamma, coef)
  return mmd2_unbiased(k(f1, f1), k(f1, f2), k(f2, f2))


def kid_subsets(n1: int, n2: int, subsets: int, subset_size: int, seed: int = 0):
  """The row indices of each KID subset: per subset, ``m`` rows of set 1 then of set 2 drawn
  without replacement (``permutation[:m]``, torchmetrics' scheme, numpy's generator)."""
  rng = np.random.default_rng(seed)
  return [(rng.permutation(n1)[:subset_size], rng.permutation(n2)[:subset_size])
          for _ in range(subsets)]  # fmt: skip


def kid(
  feats1: np.ndarray,
  feats2: np.ndarray,
  *,
  subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  gamma: float | None = None,
  coef: float = 1.0,
  seed: int = 0,
) -> tuple[float, float]:
  """Kernel Inception Distance: mean and (population) std of :func:`poly_mmd` over subsets.

  As torchmetrics' ``KernelInceptionDistance.compute`` (``std(unbiased=False)``), except that a
  ``subset_size`` above either set's size is reduced to it (with a warning) instead of raising.

  Returns:
    ``(kid_mean, kid_std)``.

  Raises:
    ValueError: fewer than 2 features in a set, or feature widths that differ.
  """
  f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"kid: features must be [N, D] with equal D, got {f1.shape} and {f2.shape}")
  n = min(len(f1), len(f2))
  if n < 2:
    raise ValueError(f"kid needs at least 2 features per set, got {len(f1)} and {len(f2)}")
  if subset_size > n:
    warnings.warn(f"KID subset_size {subset_size} > {n} features: using {n}", stacklevel=2)
    subset_size = n
  scores = [
    poly_mmd(f1[i], f2[j], degree, gamma, coef)
    for i, j in kid_subsets(len(f1), len(f2), subsets, subset_size, seed)
  ]
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Images → features.


def _as_model(inception: FIDInceptionV3 | str | os.PathLike) -> FIDInceptionV3:
  return inception if isinstance(inception, FIDInceptionV3) else load_fid_inception(inception)


def to_unit_range(image: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0),
                  quantize: bool = True) -> np.ndarray:  # fmt: skip
  """One ``[H, W, 3]`` image → float32 in [0, 1], as pytorch-fid sees a file (``uint8 / 255``).

  ``uint8`` images are divided by 255. Float images in ``value_range`` are, with ``quantize``
  (default), first rounded to ``uint8`` as saving them to PNG would
  (``round((x - lo) * 255 / (hi - lo))``, the rounding of :func:`imagen_jax.metrics.to_uint8`), so
  FIDs of in-memory samples equal those of the same samples written to disk and scored with
  pytorch-fid; without it they are mapped linearly and clipped.
  """
  x = np.asarray(image)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {x.shape}")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255)
  lo, hi = value_range
  if quantize:
    u8 = np.clip(np.round((x.astype(np.float32) - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8)
    return u8.astype(np.float32) / np.float32(255)
  return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0, 1)


def features_from_array(
  inception: FIDInceptionV3 | str | os.PathLike,
  images: np.ndarray | Sequence[np.ndarray],
  *,
  value_range: tuple[float, float] = (-1.0, 1.0),
  quantize: bool = True,
  batch_size: int = 50,
) -> np.ndarray:
  """pool3 features ``[N, 2048]`` of ``[N, H, W, 3]`` images (or a list of ``[H, W, 3]`` of any
  sizes), ``uint8`` or float in ``value_range`` (see :func:`to_unit_range`)."""
  model = _as_model(inception)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = [to_unit_range(im, value_range, quantize) for im in images[start : start + batch_size]]
    out.append(extract_features(model, chunk, batch_size=batch_size))
  return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def image_files(folder: str | os.PathLike) -> list[Path]:
  """The image files directly in ``folder`` (pytorch-fid's extensions, any case), sorted."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: not a directory")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
  if not files:
    raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  return files


def load_image(path: str | os.PathLike) -> np.ndarray:
  """``uint8 [H, W, 3]``: Pillow's ``convert("RGB")``, as pytorch-fid reads files."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def features_from_folder(
  inception: FIDInceptionV3 | str | os.PathLike, folder: str | os.PathLike, *, batch_size: int = 50
) -> np.ndarray:
  """pool3 features ``[N, 2048]`` of the images in ``folder`` (sizes may differ), streamed in
  batches so the folder never has to fit in memory."""
  model = _as_model(inception)
  files = image_files(folder)
  out = []
  for start in range(0, len(files), batch_size):
    chunk = [load_image(p) for p in files[start : start + batch_size]]
    out.append(features_from_array(model, chunk, batch_size=batch_size))
  return np.concatenate(out)


def reference_stats(
  folder: str | os.PathLike,
  inception: FIDInceptionV3 | str | os.PathLike,
  out_npz: str | os.PathLike | None = None,
  *,
  batch_size: int = 50,
  keep_features: bool = True,
) -> FeatureStats:
  """Statistics of a folder of reference images, written to ``out_npz`` when given.

  Args:
    keep_features: also store the ``[N, 2048]`` float32 features (8 KiB per image, e.g. 400 MB
      for 50k images), which KID needs; without them :class:`FIDEvaluator` reports FID only.
  """
  feats = features_from_folder(inception, folder, batch_size=batch_size)
  stats = FeatureStats.from_features(feats, keep_features=keep_features)
  if out_npz is not None:
    stats.save(out_npz)
  return stats


class FIDEvaluator:
  """FID (and KID when the reference file holds features) of samples against reference stats.

  Args:
    inception_path: FID Inception weights (pytorch-fid's ``.pth`` or a converted
      ``.safetensors``; see :mod:`imagen_jax.models.inception`).
    ref_stats_path: ``.npz`` from :func:`reference_stats` or pytorch-fid. KID needs its
      ``features``; pytorch-fid's files have none, and then ``kid``/``kid_std`` are absent from
      the results.
    batch_size: Inception batch size.
    kid_subsets, kid_subset_size, seed: KID subsets (torchmetrics' defaults: 100 of 1000).
    quantize: round float samples to ``uint8`` first, as saving them to PNG would.
  """

  name = "fid"
  prompts = None  # scores any images, whatever they were sampled for

  def __init__(
    self,
    inception_path: str | os.PathLike,
    ref_stats_path: str | os.PathLike,
    batch_size: int = 50,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    quantize: bool = True,
  ):
    self.inception = load_fid_inception(inception_path)
    self.reference = FeatureStats.load(ref_stats_path)
    if self.reference.mu.shape != (FEATURE_DIM,):
      raise ValueError(
        f"{ref_stats_path}: stats of {self.reference.mu.shape[0]}-d features, expected pool3 "
        f"({FEATURE_DIM}); pytorch-fid --dims must be 2048"
      )
    self.batch_size = batch_size
    self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
    self.quantize = quantize

  def run(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Scores ``[N, H, W, 3]`` samples (float in [-1, 1], or ``uint8``).

    Returns:
      ``{"fid", "kid", "kid_std"}``; the KID keys only when the reference has features.

    Raises:
      ValueError: fewer than 2 images. Warns when ``N <= 2048`` (singular covariance).
    """
    if len(images) < 2:
      raise ValueError(f"FIDEvaluator needs at least 2 images, got {len(images)}")
    feats = features_from_array(
      self.inception, images, quantize=self.quantize, batch_size=self.batch_size
    )
    stats = FeatureStats.from_features(feats)
    ref = self.reference
    out = {"fid": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)}
    if ref.features is not None:
      out["kid"], out["kid_std"] = kid(
        ref.features, feats, subsets=self.kid_subsets, subset_size=self.kid_subset_size,
        seed=self.seed,
      )  # fmt: skip
    return out

  __call__ = run
