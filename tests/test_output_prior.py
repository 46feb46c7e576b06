"""``UNetConfig.output_prior`` (the output as a correction to a Gaussian posterior mean of x0)
against the closed-form posterior, for ε, v and x0 predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.config import stage_config
from imagen_jax.diffusion.gaussian import predict_x0
from imagen_jax.models.unet import build_unet, output_prior
from imagen_jax.models.unet_config import UNetConfig
from imagen_jax.stage.model import unet_config_for_stage

S0 = 0.05  # the prior's variance before augmentation, s0²


def _sig(x):
  return 1 / (1 + np.exp(-x))


def _posterior(z, logsnr, up=None, aug_logsnr=None):
  """Numpy, from Bayes' rule: mean and std of x0 | z for x0 ~ N(m, v), z | x0 ~ N(α x0, σ²),
  with m = α_a·up, v = s0² + σ_a² (or m = 0, v = s0² without ``up``)."""
  a2 = _sig(logsnr)
  if up is None:
    m, v = 0.0, S0
  else:
    m, v = np.sqrt(_sig(aug_logsnr)) * up, S0 + _sig(-aug_logsnr)
  prec = 1 / v + a2 / (1 - a2)
  return (m / v + np.sqrt(a2) * z / (1 - a2)) / prec, np.sqrt(1 / prec)


def _x0(f, z, logsnr, prediction, up=None, aug=None):
  """x̂0 of ``output_prior`` with network output ``f``, through the diffusion core's conversion."""
  z, logsnr = jnp.asarray(z, jnp.float32), jnp.asarray(logsnr, jnp.float32)
  aug = None if aug is None else jnp.asarray(aug, jnp.float32)
  pred = output_prior(f, z, logsnr, prediction, S0, mean=up, aug_logsnr=aug)
  return np.asarray(predict_x0(pred, z, logsnr, prediction))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("prior", ["gaussian", "lowres"])
def test_zero_output_is_the_posterior_mean(prediction, prior):
  rng = np.random.default_rng(0)
  logsnr = np.array([-12.0, -3.0, 0.0, 4.0, 15.0])  # [B]
  aug = np.array([20.0, 2.0, 0.0, -1.0, 5.0]) if prior == "lowres" else None
  up = rng.normal(size=(5, 4, 4, 3)) if prior == "lowres" else None
  z = rng.normal(size=(5, 4, 4, 3))
  x0_hat = _x0(jnp.zeros(z.shape), z, logsnr, prediction, up, aug)
  b = (slice(None), None, None, None)
  mean, _ = _posterior(z, logsnr[b], up, None if aug is None else aug[b])
  np.testing.assert_allclose(x0_hat, mean, rtol=2e-4, atol=2e-4)
  # High noise: the prior mean (the shrunk low-res image, or 0); low noise: z / α.
  prior_mean = 0.0 if up is None else up[0] * np.sqrt(_sig(20.0))
  np.testing.assert_allclose(x0_hat[0], np.broadcast_to(prior_mean, z[0].shape), atol=1e-3)
  np.testing.assert_allclose(x0_hat[4], z[4] / np.sqrt(_sig(15.0)), atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("prior", ["gaussian", "lowres"])
def test_output_is_in_posterior_std_units(prediction, prior):
  """On data drawn from the prior, the F that makes x̂0 exact has unit variance at every noise
  level, and a unit F moves x̂0 by exactly the posterior std."""
  rng = np.random.default_rng(1)
  n = 20000
  for lam, a_lam in [(-6.0, 20.0), (0.0, 0.0), (6.0, 3.0)]:
    if prior == "lowres":
      up, aug = rng.normal(size=(1, n, 1, 1)), jnp.full((1,), a_lam)
      x0 = np.sqrt(_sig(a_lam)) * up + np.sqrt(S0 + _sig(-a_lam)) * rng.normal(size=up.shape)
    else:
      up = aug = None
      x0 = np.sqrt(S0) * rng.normal(size=(1, n, 1, 1))
    z = np.sqrt(_sig(lam)) * x0 + np.sqrt(_sig(-lam)) * rng.normal(size=x0.shape)
    lam_b = jnp.full((1,), lam)
    base = _x0(jnp.zeros(z.shape), z, lam_b, prediction, up, aug)
    moved = _x0(jnp.ones(z.shape), z, lam_b, prediction, up, aug)
    _, std = _posterior(z, lam, up, a_lam)
    np.testing.assert_allclose(moved - base, np.broadcast_to(std, z.shape), rtol=1e-3)
    f_star = (x0 - base) / std
    assert abs(f_star.var() - 1.0) < 0.05, (lam, f_star.var())


@pytest.mark.parametrize("preset", ["tiny_sr", "tiny_base"])
def test_untrained_unet_returns_the_prior_and_learns_a_correction(preset):
  prior = "lowres" if preset == "tiny_sr" else "gaussian"
  cfg = UNetConfig.from_preset(preset, output_prior=prior, prediction="v", prior_var=S0)
  graphdef, state = nnx.split(build_unet(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def apply(state, x, logsnr, text, mask, lowres, aug):
    return nnx.merge(graphdef, state)(x, logsnr, text, mask, lowres=lowres, aug_logsnr=aug)

  k = jax.random.split(jax.random.key(0), 4)
  b, hw = 2, cfg.image_size
  x = jax.random.normal(k[0], (b, hw, hw, 3))
  lowres = aug = up = None
  if cfg.lowres_cond:
    lowres = jax.random.normal(k[1], (b, cfg.lowres_size, cfg.lowres_size, 3))
    aug, up = jnp.array([20.0, 1.0]), jax.image.resize(lowres, (b, hw, hw, 3), "bilinear")
  text, mask = jax.random.normal(k[2], (b, 8, cfg.text_dim)), jnp.ones((b, 8), bool)
  logsnr = jnp.array([-2.0, 3.0])
  out = apply(state, x, logsnr, text, mask, lowres, aug)
  # The output conv starts at zero, so F = 0 and the prediction is the prior's.
  expected = output_prior(jnp.zeros_like(x), x, logsnr, "v", S0, mean=up, aug_logsnr=aug)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  kernel = state["out_conv"]["kernel"]
  kernel.set_value(0.1 * jax.random.normal(k[3], kernel.shape))
  assert float(jnp.abs(apply(state, x, logsnr, text, mask, lowres, aug) - out).max()) > 1e-3


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="output_prior='lowres' needs a super-resolution model"):
    UNetConfig.tiny_base(output_prior="lowres")
  with pytest.raises(ValueError, match="output_prior must be one of"):
    UNetConfig.tiny_sr(output_prior="wiener")
  with pytest.raises(ValueError, match="prior_var must be > 0"):
    UNetConfig.tiny_sr(output_prior="lowres", prior_var=0.0)
  with pytest.raises(ValueError, match="prediction must be"):
    UNetConfig.tiny_sr(prediction="score")
  stage = stage_config("sr", "tiny_sr", image_size=64, lowres_size=32, objective="v")
  stage.model.update(lowres_size=32, prediction="eps")
  with pytest.raises(ValueError, match=r"config.stages.sr.model.prediction='eps'.*objective='v'"):
    unet_config_for_stage(stage, 64)
  del stage.model["prediction"]
  assert unet_config_for_stage(stage, 64).prediction == "v"
