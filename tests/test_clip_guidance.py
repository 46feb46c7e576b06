"""CLIP guidance through the cascade (GLIDE §2.3) with a tiny random CLIP and the shared 2-step run.

The guidance math itself (ε̂ shift, gradients, exactness on the tilted Gaussian for every sampler)
is tested in ``tests/diffusion/test_guidance.py``; here: the plumbing into the jitted stage
samplers, that guidance raises the CLIP similarity it ascends, and the options and errors.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.clip import CLIP
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.clip_guidance import ClipGuidance, random_cutouts
from tests.clip_fixtures import make_tiny_clip_dir
from tests.torch_oracles import declare_torchvision_ops
from tests.train_utils import two_stage_run

PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def cascade():
  return Cascade.from_workdir(str(two_stage_run()), max_batch=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  declare_torchvision_ops()  # the tiny checkpoint is written by transformers (torch)
  return CLIP.load(make_tiny_clip_dir(tmp_path_factory.mktemp("clip")))


SETTINGS = {"base": {"steps": 4}, "sr": {"steps": 2}}  # one compiled program per stage, shared


@pytest.fixture(scope="module")
def plain(cascade):
  return cascade.generate(PROMPTS, seed=3, settings=SETTINGS, progress=False)[0]


def _generate(cascade, guide):
  return cascade.generate(PROMPTS, seed=3, settings=SETTINGS, progress=False, guide=guide)[0]


def _cos(clip, images, prompts):
  img = clip.image_features_fn()(clip.state, jnp.asarray(images))  # the guided objective
  return np.asarray(jnp.sum(img * clip.embed_text(prompts), -1))


def test_guidance_raises_the_clip_similarity_and_scale_zero_is_plain(cascade, clip, plain):
  same = _generate(cascade, ClipGuidance(clip, scale=0.0))
  np.testing.assert_array_equal(same["base"], plain["base"])
  guided = _generate(cascade, ClipGuidance(clip, scale=3000.0))
  before, after = _cos(clip, plain["base"], PROMPTS), _cos(clip, guided["base"], PROMPTS)
  assert np.all(after > before + 0.02), (before, after)
  assert np.isfinite(guided["sr"]).all() and guided["sr"].shape == plain["sr"].shape


def test_cutouts_and_gradient_through_the_model_on_a_chosen_stage(cascade, clip, plain):
  guide = ClipGuidance(
    clip, scale=500.0, cutouts=3, cut_min=0.6, grad_through_model=True, stages=["sr"]
  )
  out = _generate(cascade, guide)
  np.testing.assert_array_equal(out["base"], plain["base"])  # the base stage is not guided
  assert np.abs(out["sr"] - plain["sr"]).max() > 1e-3


def test_random_cutouts_are_crops_of_the_image():
  """A crop of a horizontal ramp stays a ramp within the image's range, of the asked size."""
  ramp = jnp.broadcast_to(jnp.linspace(-1, 1, 32)[None, None, :, None], (2, 32, 32, 3))
  crops = random_cutouts(jax.random.key(0), ramp, 4, 8, 0.5)
  assert crops.shape == (8, 8, 8, 3)
  rows = np.asarray(crops[..., 0])
  assert np.all(np.diff(rows, axis=2) > 0)  # increasing left to right, as the ramp
  assert rows.min() >= -1 and rows.max() <= 1


def test_bad_settings_fail_with_the_field(cascade, clip):
  with pytest.raises(ValueError, match="scale"):
    ClipGuidance(clip, scale=-1.0)
  with pytest.raises(ValueError, match="cut_min"):
    ClipGuidance(clip, scale=1.0, cutouts=2, cut_min=0.0)
  with pytest.raises(ValueError, match="unknown stages.*'upsampler'"):
    cascade.generate(PROMPTS, progress=False, guide=ClipGuidance(clip, 1.0, stages=["upsampler"]))


def test_sample_cli_records_the_guidance(tmp_path, clip, plain):
  """sample.py's library call (what --clip_guidance runs): guided PNGs and the settings."""
  from imagen_jax.sample import cli as sample_cli

  guide = ClipGuidance(clip, scale=3000.0)
  paths = sample_cli.run(
    workdir=str(two_stage_run()), prompts=PROMPTS, seed=3, settings=SETTINGS,
    outdir=str(tmp_path), guide=guide,
  )  # fmt: skip
  meta = json.loads((tmp_path / "metadata.json").read_text())
  assert meta["clip_guidance"]["scale"] == 3000.0 and meta["clip_guidance"]["stages"] == "first"
  first = next(f for f in paths["images"] if f["stage"] == "base" and f["index"] == 0)
  base = np.asarray(Image.open(tmp_path / first["file"]), np.float32) / 127.5 - 1.0
  assert np.abs(base - plain["base"][0]).max() > 0.05  # guided, not the plain sample


def test_a_noised_clip_scores_x_t_and_a_clean_one_x0(clip):
  """GLIDE's noised CLIP reads (x_t, t); the public, clean CLIPs read the model's x̂0."""
  image_fn = clip.image_features_fn()
  seen = []

  def noised(state, x_t, t):  # a stand-in t-conditioned tower: the clean one on x_t · (1 + t)
    seen.append(t.shape)
    return image_fn(state, x_t * (1.0 + t[:, None, None, None]))

  x_t, x0 = (jax.random.uniform(jax.random.key(i), (2, 32, 32, 3), minval=-1) for i in (0, 1))
  t = jnp.array([0.3, 0.7])
  text = clip.embed_text(PROMPTS)
  for fn, want_input in [(noised, x_t * (1.0 + t[:, None, None, None])), (None, x0)]:
    static, data = ClipGuidance(clip, 1.0, noised_image_fn=fn).for_stage("base", 0, PROMPTS)
    data = ClipGuidance.merge(data["rows"], data["shared"])
    want = jnp.sum(image_fn(clip.state, want_input) * text, -1)
    np.testing.assert_allclose(static.log_prob(data, x_t, t, x0), want, rtol=1e-5, atol=1e-6)
  assert seen == [(2,)]
  assert ClipGuidance(clip, 1.0).for_stage("sr", 1, PROMPTS) == (None, None)  # first stage only
