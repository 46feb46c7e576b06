"""Noise-conditioning augmentation (Imagen §2.4): forward-process corruption at t = aug_level."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import blur_augment, noise_augment
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule

SCHEDULE = get_schedule("cosine")
# One compiled program for the random ops instead of one per eager op; a float aug_level passed
# to it is traced, so range checks are exercised on the eager function in test_bad_levels.
AUGMENT = jax.jit(noise_augment, static_argnames=("schedule", "max_aug_level"))


def _lowres(batch=256, seed=0):
  # One shape for every test: each new shape costs a compile.
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 8, 8, 3)), jnp.float32)


@pytest.mark.parametrize("level", [0.1, 0.3, 0.7])
def test_fixed_level_is_the_forward_process(level):
  """noisy = α x + σ ε with λ = schedule(level): the implied ε is standard normal and
  independent of x."""
  x = _lowres()
  noisy, aug_logsnr = AUGMENT(jax.random.PRNGKey(1), x, SCHEDULE, level)
  assert noisy.shape == x.shape and aug_logsnr.shape == (256,)
  np.testing.assert_allclose(aug_logsnr, SCHEDULE(jnp.full((256,), level)), rtol=1e-5, atol=1e-5)
  alpha, sigma = alpha_sigma(SCHEDULE(level))
  eps = np.asarray((noisy - alpha * x) / sigma).ravel()
  assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1.0) < 0.03
  assert abs(np.corrcoef(eps, np.asarray(x).ravel())[0, 1]) < 0.03


def test_level_zero_keeps_the_image_and_level_one_destroys_it():
  x = _lowres()
  clean, _ = AUGMENT(jax.random.PRNGKey(1), x, SCHEDULE, 0.0)
  np.testing.assert_allclose(clean, x, atol=3e-4)  # σ(λ = 20) ≈ 4.5e-5
  noise, _ = AUGMENT(jax.random.PRNGKey(1), x, SCHEDULE, 1.0)
  assert abs(np.corrcoef(np.ravel(noise), np.ravel(x))[0, 1]) < 0.03
  assert abs(float(noise.std()) - 1.0) < 0.03


def test_random_levels_for_training():
  x = _lowres()
  _, aug_logsnr = AUGMENT(jax.random.PRNGKey(2), x, SCHEDULE, max_aug_level=0.5)
  t = np.asarray(SCHEDULE.t_from_logsnr(aug_logsnr))
  assert t.min() >= -1e-4 and t.max() <= 0.5 + 1e-4
  assert abs(t.mean() - 0.25) < 0.03  # U(0, 0.5) per example
  assert len(np.unique(np.round(t, 5))) > 250


def test_per_example_levels():
  x = _lowres()
  levels = jnp.linspace(0.0, 1.0, 256)
  _, aug_logsnr = AUGMENT(jax.random.PRNGKey(3), x, SCHEDULE, levels)
  np.testing.assert_allclose(aug_logsnr, SCHEDULE(levels), rtol=1e-5, atol=1e-5)


def test_jit_without_recompiling_for_new_levels():
  traces = []

  @jax.jit
  def run(rng, x, level):
    traces.append(None)
    return noise_augment(rng, x, SCHEDULE, level)

  x = _lowres()
  for i, level in enumerate([0.1, 0.25, 0.9]):
    got = run(jax.random.PRNGKey(i), x, jnp.full((256,), level))
    want = AUGMENT(jax.random.PRNGKey(i), x, SCHEDULE, level)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(traces) == 1


@pytest.mark.parametrize("level", [-0.1, 1.5, [0.2, 0.3, 1.2, 0.0], float("nan")])
def test_bad_levels(level):
  with pytest.raises(ValueError, match="aug_level"):
    noise_augment(jax.random.PRNGKey(0), _lowres(batch=4), SCHEDULE, np.asarray(level))


def test_bad_shapes_and_max_level():
  x = _lowres(batch=4)
  with pytest.raises(ValueError, match="aug_level"):
    noise_augment(jax.random.PRNGKey(0), x, SCHEDULE, jnp.full((5,), 0.2))
  with pytest.raises(ValueError, match="max_aug_level"):
    noise_augment(jax.random.PRNGKey(0), x, SCHEDULE, None, max_aug_level=0.0)
  with pytest.raises(ValueError, match="max_aug_level"):
    noise_augment(jax.random.PRNGKey(0), x, SCHEDULE, None, max_aug_level=1.5)


# ---- Gaussian blur augmentation (CDM §4.2) ----------------------------------------------------


def test_blur_matches_scipy_gaussian_filter_per_example():
  """Each example is blurred with its own σ exactly as scipy's Gaussian filter (edges replicated,
  the kernel cut at ⌈3 · max_sigma⌉); σ = 0 keeps the image."""
  from scipy import ndimage

  x = np.asarray(_lowres(batch=4, seed=3))
  sigma = np.array([0.0, 0.5, 1.0, 1.5], np.float32)
  y = np.asarray(blur_augment(jax.random.PRNGKey(0), x, 1.5, sigma))
  radius = 5  # ⌈3 · 1.5⌉
  np.testing.assert_array_equal(y[0], x[0])
  for i in range(1, 4):
    ref = ndimage.gaussian_filter(
      x[i], (sigma[i], sigma[i], 0), mode="nearest", truncate=radius / sigma[i]
    )
    np.testing.assert_allclose(y[i], ref, atol=1e-5)


def test_random_blur_levels_for_training():
  """Without ``sigma`` each example draws σ ~ U(0, max_sigma): a constant image stays constant,
  and the blur removes between none and most of the variance of white noise, varying per row."""
  x = _lowres(batch=64, seed=4)
  y = jax.jit(blur_augment, static_argnums=2)(jax.random.PRNGKey(5), x, 2.0)
  var_ratio = np.asarray(jnp.var(y, axis=(1, 2, 3)) / jnp.var(x, axis=(1, 2, 3)))  # [B]
  assert var_ratio.max() <= 1.0 + 1e-6 and var_ratio.min() < 0.2 and var_ratio.std() > 0.1
  flat = jnp.full((2, 8, 8, 3), 0.25)
  np.testing.assert_allclose(blur_augment(jax.random.PRNGKey(6), flat, 2.0), flat, atol=1e-6)
  assert blur_augment(jax.random.PRNGKey(6), x, 0.0) is x


@pytest.mark.parametrize(
  "args, match",
  [((-1.0,), "max_sigma"), ((float("nan"),), "max_sigma"), ((1.0, 2.0), "at most max_sigma")],
)
def test_bad_blur_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    blur_augment(jax.random.PRNGKey(0), _lowres(batch=2), *args)
  with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
    blur_augment(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8)), 1.0)
