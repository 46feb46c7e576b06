"""Inpainting, inversion, variations, interpolations and text diffs through the cascade.

On the shared tiny two-stage run (tests/train_utils.two_stage_run). Its U-Nets are 2 training
steps from random: the images mean nothing, but every operation is a fixed function of a fixed
network, so its algebra is testable exactly: known pixels kept, inversion error falling with the
steps, end points reconstructing. The stages are read as v-prediction here (the demo's base is
trained for ε; an ε-model's x̂0 = (x − σε̂)/α is ill-conditioned at t = 1, where α = 4.5e-5, so a
barely trained ε-base would amplify float rounding ~10⁴×); the closed-form checks of the same
math are in tests/diffusion/test_inpaint_inversion.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from imagen_jax.edit import image_ops as ops
from imagen_jax.sample.cascade import Cascade, StageInputs
from imagen_jax.sample.inversion import invert_cascade, resize
from tests.train_utils import two_stage_run

P = ["a small red circle at the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def cascade():
  c = Cascade.from_workdir(str(two_stage_run()), max_batch=4)
  stages = [dataclasses.replace(s, pred_type="v") for s in c.stages]
  return Cascade(stages, c.text, max_batch=4, mesh=c.mesh)


def _steps(cascade, steps, **extra):
  return {s.name: {"steps": steps, **extra} for s in cascade.stages}


@pytest.fixture(scope="module")
def images(cascade):
  return cascade(P, seed=0, progress=False, settings=_steps(cascade, 4))["sr"]  # [2, 64, 64, 3]


def _rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def test_inpainting_keeps_known_pixels_at_every_stage(cascade, images):
  mask = np.zeros((2, 64, 64), bool)
  mask[:, 8:40, 8:40] = True
  out = ops.inpaint(
    cascade, images, mask, P[::-1], seed=1, resample=2, jump=1, settings=_steps(cascade, 4),
    progress=False,
  )  # fmt: skip
  for s in cascade.stages:
    m = ops.resize_mask(mask, s.image_size)
    known = resize(images, s.image_size)
    np.testing.assert_array_equal(out[s.name][~m], known[~m])
    assert np.abs(out[s.name][m] - known[m]).mean() > 0.05  # the masked region was regenerated
  with pytest.raises(ValueError, match="mask must be"):
    ops.inpaint(cascade, images, mask[:, :32], P, progress=False)


def test_outpaint_canvas():
  img = np.ones((1, 64, 64, 3), np.float32)
  canvas, mask = ops.outpaint_canvas(img, 64, left=16)
  assert canvas.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
  assert mask[0, :, :16].all() and not mask[0, 8:56, 16:64].any()  # 48² image, centred vertically
  assert mask[0, :8].all() and mask[0, 56:].all()
  with pytest.raises(ValueError, match="outpaint margins"):
    ops.outpaint_canvas(img, 64, left=40, right=30)


def test_a_latent_input_is_the_starting_noise(cascade):
  """Passing the seed's own noise as the latent changes nothing."""
  import jax

  plain = cascade(P[:1], seed=5, progress=False, settings=_steps(cascade, 3))
  key = jax.random.fold_in(jax.random.key(5), 0)
  noise = {
    s.name: np.asarray(jax.random.normal(key, (1, s.image_size, s.image_size, 3)))
    for s in cascade.stages
  }
  got, _ = cascade.generate(
    P[:1], seed=5, progress=False, settings=_steps(cascade, 3),
    inputs={k: StageInputs(latent=v) for k, v in noise.items()},
  )  # fmt: skip
  for k in plain:
    np.testing.assert_allclose(got[k], plain[k], atol=1e-6)


def test_noise_scale_scales_the_starting_noise(cascade):
  """GLIDE's upsampler temperature: ``noise_scale`` s starts from s × the seed's noise."""
  import jax

  sr = cascade.stages[-1]
  shape = (1, sr.image_size, sr.image_size, 3)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(5), 0), shape))
  common = dict(start_stage="sr", init_image=np.zeros((1, 32, 32, 3)), progress=False)
  st = {"sr": {"steps": 3, "noise_scale": 0.5}}
  scaled = cascade.generate(P[:1], seed=5, settings=st, **common)[0]["sr"]
  given = cascade.generate(
    P[:1], seed=5, settings={"sr": {"steps": 3}}, inputs={"sr": StageInputs(latent=0.5 * noise)},
    **common,
  )[0]["sr"]  # fmt: skip
  np.testing.assert_allclose(scaled, given, atol=1e-6)
  plain = cascade.generate(P[:1], seed=5, settings={"sr": {"steps": 3}}, **common)[0]["sr"]
  assert _rms(scaled, plain) > 1e-3


def test_inversion_error_falls_with_steps(cascade, images):
  """DDIM inversion + sampling of each stage reconstructs it with first-order error (measured
  RMS on the SR stage 0.153, 0.087, 0.047 at 5, 10, 20 steps)."""
  errs = {s.name: [] for s in cascade.stages}
  for steps in (4, 8, 16):
    st = _steps(cascade, steps, guidance=1.0, thresholding="none", sampler="ddim")
    inv = invert_cascade(cascade, images, P, seed=0, settings=st)
    rec = ops.reconstruct(cascade, inv, P, settings=st, progress=False)
    sr = cascade.generate(
      P, seed=0, start_stage="sr", init_image=resize(images, 32), settings=st,
      inputs={"sr": inv.inputs()["sr"]}, progress=False,
    )[0]["sr"]  # fmt: skip
    errs["sr"].append(_rms(sr, images))
    errs["base"].append(_rms(rec["base"], resize(images, 32)))
  for name, e in errs.items():
    assert e[0] / e[1] > 1.5 and e[1] / e[2] > 1.5, (name, e)


def test_null_text_inversion_reconstructs_under_guidance(cascade, images):
  # On the uniform grid (the ratio below was measured there: with DPM-Solver++'s default
  # log-SNR grid null-text still helps at 6 steps, 0.088 vs 0.133 RMS, but by less).
  st = {
    "sr": {"steps": 6, "guidance": 4.0, "thresholding": "none", "spacing": "uniform"},
    "base": {"steps": 6, "guidance": 1.0},  # no null-text for the base: the SR stage is measured
  }
  inv = ops.invert(cascade, images, P, seed=0, settings=st, null_text=True, inner_steps=10)
  assert inv.stages["sr"].null_emb.shape[:2] == (6, 2)
  lowres = {"start_stage": "sr", "init_image": resize(images, 32), "progress": False}
  full = {"sr": {**st["sr"], **inv.settings["sr"]}}
  with_nt = cascade.generate(P, seed=0, settings=full, inputs={"sr": inv.inputs()["sr"]}, **lowres)
  plain = cascade.generate(
    P, seed=0, settings=full, inputs={"sr": inv.inputs(null_text=False)["sr"]}, **lowres
  )
  e_nt, e_plain = _rms(with_nt[0]["sr"], images), _rms(plain[0]["sr"], images)
  assert e_nt < 0.5 * e_plain, (e_nt, e_plain)


def test_interpolation_end_points_and_text_diff_zero_reconstruct(cascade, images):
  st = _steps(cascade, 6, guidance=1.0, thresholding="none")
  inv = invert_cascade(cascade, images, P, seed=0, settings=st)
  rec = ops.reconstruct(cascade, inv, P, settings=st, progress=False)
  frames = ops.interpolate(
    cascade, images[0], images[1], P[0], P[1], frames=3, settings=st, progress=False
  )
  for k in rec:
    np.testing.assert_allclose(frames[k][0], rec[k][0], atol=1e-4)
    np.testing.assert_allclose(frames[k][2], rec[k][1], atol=1e-4)
    assert _rms(frames[k][1], rec[k][0]) > 1e-3 and _rms(frames[k][1], rec[k][1]) > 1e-3
  diff = ops.text_diff(cascade, images[0], P[0], P[1], eta=[0.0, 1.0], settings=st, progress=False)
  inv0 = invert_cascade(cascade, images[:1], P[:1], seed=0, settings=st)
  rec0 = ops.reconstruct(cascade, inv0, P[:1], settings=st, progress=False)
  np.testing.assert_allclose(diff["sr"][0], rec0["sr"][0], atol=1e-4)
  assert _rms(diff["sr"][1], rec0["sr"][0]) > 1e-3


def test_variations(cascade, images):
  st = _steps(cascade, 6, guidance=1.0, thresholding="none")
  same = ops.variations(cascade, images[0], P[0], num=2, stochasticity=0.0, settings=st,
                        progress=False)  # fmt: skip
  np.testing.assert_allclose(same["sr"][0], same["sr"][1], atol=1e-5)
  varied = ops.variations(cascade, images[0], P[0], num=2, stochasticity=1.0, settings=st,
                          progress=False)  # fmt: skip
  assert _rms(varied["sr"][0], varied["sr"][1]) > 1e-2


def test_stage_inputs_are_checked(cascade):
  with pytest.raises(ValueError, match="does not run"):
    cascade.generate(P, inputs={"nope": StageInputs()}, progress=False)
  with pytest.raises(ValueError, match="null_emb must be"):
    cascade.generate(
      P, inputs={"base": StageInputs(null_emb=np.zeros((2, 2, 4, 8)), null_mask=np.ones((2, 4)))},
      progress=False,
    )  # fmt: skip
  with pytest.raises(ValueError, match="both known and mask"):
    cascade.generate(
      P, inputs={"base": StageInputs(known=np.zeros((2, 32, 32, 3)))}, progress=False
    )
