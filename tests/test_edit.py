"""Prompt-to-prompt through the samplers and the cascade, on the shared tiny two-stage run.

Equalities are bit for bit where XLA computes the rows of a batch identically (the base U-Net
here); elsewhere (this SR U-Net on CPU computes row 3 of a batch of 4 ~1 ulp apart from row 0
even for equal inputs, without any edit) and across batch sizes (plain sampling of 1 prompt and
of 4 differ by ~3e-7 already) they hold to float rounding.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.edit import PromptToPrompt, StageEdit, plan_edit, prompt_to_prompt
from imagen_jax.edit import cli as edit_cli
from imagen_jax.sample.cascade import Cascade
from tests.train_utils import two_stage_run

SRC = "a small red circle at the top left"
TGT = "a small blue circle at the top left"
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def workdir():
  return two_stage_run()


@pytest.fixture(scope="module")
def cascade(workdir):
  return Cascade.from_workdir(str(workdir), max_batch=4)


def _all(cascade, sampler):
  return {s.name: {"sampler": sampler} for s in cascade.stages}


def _close(a, b, exact):
  if exact:
    np.testing.assert_array_equal(a, b)
  else:
    np.testing.assert_allclose(a, b, atol=ROUNDING, rtol=0)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_an_edit_equal_to_the_source_is_the_source(cascade, sampler):
  settings = _all(cascade, sampler)
  plain = cascade([SRC], seed=3, settings=settings, progress=False)
  samplers_before = None
  for edit in [
    PromptToPrompt(mode="replace"),
    PromptToPrompt(mode="refine", cross_replace=(0.2, 1.0), self_replace=1.0),
    PromptToPrompt(mode="reweight", reweight={"red": 1.0}),
  ]:
    r = prompt_to_prompt(cascade, SRC, [SRC, TGT], edit=edit, seed=3, settings=settings,
                         progress=False)  # fmt: skip
    for name, images in r.images.items():
      assert images.shape[0] == 3
      _close(images[1], images[0], exact=name == "base")  # the edit that changes nothing
      _close(images[0], plain[name][0], exact=False)  # the source is plain sampling
      assert np.abs(images[2] - images[0]).max() > 1e-3  # a real edit changes the image
    # The modes differ only in data: one compiled program per stage for all three.
    counts = {k: f._cache_size() for k, f in cascade._samplers.items() if k[3] is not None}
    samplers_before = samplers_before or counts
    assert counts == samplers_before and set(counts.values()) == {1}


def test_no_injection_is_plain_sampling_of_the_edit(cascade):
  for sampler in ["ancestral", "ddim"]:  # per-step noise shared by the rows, and none
    settings = _all(cascade, sampler)
    r = prompt_to_prompt(cascade, SRC, TGT, seed=5, settings=settings, progress=False,
                         cross_replace=0.0, self_replace=0.0)  # fmt: skip
    # Plain sampling of the edited prompt from the source's noise (image index 0 of seed 5).
    plain = cascade([TGT], seed=5, settings=settings, progress=False)
    for name in r.images:
      _close(r.images[name][1], plain[name][0], exact=False)


def test_injection_keeps_the_edit_near_the_source(cascade):
  settings = _all(cascade, "ddim")
  free = prompt_to_prompt(cascade, SRC, TGT, seed=1, settings=settings, progress=False,
                          cross_replace=0.0, self_replace=0.0)  # fmt: skip
  tied = prompt_to_prompt(cascade, SRC, TGT, seed=1, settings=settings, progress=False,
                          cross_replace=1.0, self_replace=1.0)  # fmt: skip
  for name in free.images:
    np.testing.assert_array_equal(tied.images[name][0], free.images[name][0])  # source unedited
  # The base stage (the SR stage of a 2-step run hardly looks at its text).
  src = free.images["base"][0]
  d_free = np.abs(free.images["base"][1] - src).mean()
  d_tied = np.abs(tied.images["base"][1] - src).mean()
  assert d_tied < d_free, (d_tied, d_free)


def test_reweighting_and_local_blend(cascade):
  settings = _all(cascade, "ddim")
  base = prompt_to_prompt(cascade, SRC, SRC, seed=2, settings=settings, progress=False,
                          mode="reweight", reweight={"red": 1.0})  # fmt: skip
  for scale in (-1.0, 0.3, 4.0):
    r = prompt_to_prompt(cascade, SRC, SRC, seed=2, settings=settings, progress=False,
                         mode="reweight", reweight={"red": scale})  # fmt: skip
    # The base stage is bit-exact (see the module doc): any difference is the reweighting's.
    assert np.abs(r.images["base"][1] - base.images["base"][1]).max() > 1e-6, scale
  blend = prompt_to_prompt(cascade, SRC, TGT, seed=2, settings=settings, progress=False,
                           local_blend=["red", "blue"])  # fmt: skip
  free = prompt_to_prompt(cascade, SRC, TGT, seed=2, settings=settings, progress=False)
  for name in blend.images:
    np.testing.assert_array_equal(blend.images[name][0], free.images[name][0])


def test_local_blend_takes_the_source_outside_the_words_mask():
  """``after_step`` on known maps: the edit keeps its pixels where the chosen word attends
  (dilated by one map pixel), and has exactly the source's everywhere else."""
  b, r, length, size = 2, 8, 4, 16
  maps = np.zeros((b, r, r, length), np.float32)
  maps[1, 2:4, 2:4, 1] = 1.0  # the edit's word (token 1) attends to a 2x2 blob
  data = {"blend_tokens": jnp.asarray([[0, 0, 0, 0], [0, 1, 0, 0]], jnp.float32),
          "blend": jnp.asarray([0.0, 1.0])}  # fmt: skip
  spec = StageEdit(edits=True, record=True, self_replace=False, self_max_res=8, map_res=r,
                   local_blend=True, blend_threshold=0.3)  # fmt: skip
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, size, size, 3)), jnp.float32)
  state = {"step_maps": jnp.asarray(maps)}
  np.testing.assert_array_equal(spec.after_step(jnp.int32(0), x, state, data), x)  # not yet on
  out = np.asarray(spec.after_step(jnp.int32(1), x, state, data))
  np.testing.assert_array_equal(out[0], x[0])  # the source is never blended
  edited = np.all(out[1] == np.asarray(x[1]), axis=-1)
  from_src = np.all(out[1] == np.asarray(x[0]), axis=-1)
  assert (edited | from_src).all()
  # The blob spans map pixels 2-3 (image pixels 4-7), dilated to 1-4 (image ~2-9).
  assert edited[5, 5] and edited[6, 6] and not edited[0, 0] and not edited[15, 15]
  assert 0.05 < edited.mean() < 0.5


def test_attention_maps(cascade):
  r = prompt_to_prompt(cascade, SRC, TGT, seed=0, settings=_all(cascade, "ddim"), progress=False)
  length = r.tokens[0].length
  assert set(r.attention) == {"base", "sr"}
  for maps in r.attention.values():
    assert maps.shape == (2, 16, 16, length)
    assert (maps >= 0).all() and (maps.sum(-1) <= 1 + 1e-5).all()
    n_real = int(r.tokens[0].mask.sum())
    assert (maps[0, ..., n_real:] == 0).all()  # padding gets no attention
  words = r.word_maps("base", 1)
  assert list(words) == TGT.split() and words["blue"].shape == (16, 16)
  rows = r.attention_rows("sr")
  assert len(rows) == 2 and rows[0].size == (96 * 9, 96 + 14)


def test_controller_edits_only_the_conditional_half():
  """Under CFG the U-Net sees [cond; uncond]: edits change rows < B only, rows stay
  distributions, and the source row (0) is never changed."""
  rng = np.random.default_rng(0)
  b, heads, hw, length = 2, 2, 4, 5
  logits = rng.normal(size=(2 * b, heads, hw, hw + length))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  image, text = jnp.asarray(probs[..., :hw], jnp.float32), jnp.asarray(probs[..., hw:], jnp.float32)
  steps = 2
  data = {
    "matrix": jnp.stack([jnp.eye(length)] * b),
    "has_source": jnp.ones((b, length)),
    "weights": jnp.ones((b, length)),
    "cross": jnp.asarray(np.stack([[[0.0] * length, [1.0] * length]] * steps)),
    "self": jnp.asarray([[0.0, 1.0]] * steps),
    "blend_tokens": jnp.zeros((b, length)),
    "blend": jnp.zeros(steps),
  }
  spec = StageEdit(edits=True, record=True, self_replace=True, self_max_res=8, map_res=2,
                   local_blend=False, blend_threshold=0.3)  # fmt: skip
  state = spec.init_state(data, b)
  ctrl = spec.controller(jnp.int32(0), state, data, cond_batch=b)
  new_image, new_text = ctrl.edit("s", image, text, hw=(2, 2))
  np.testing.assert_array_equal(new_text[b:], text[b:])  # unconditional half untouched
  np.testing.assert_array_equal(new_image[b:], image[b:])
  np.testing.assert_array_equal(new_text[0], text[0])  # the source row
  np.testing.assert_array_equal(new_image[0], image[0])
  np.testing.assert_allclose(new_text[1], text[0], rtol=1e-6)  # the edit took the source's maps
  np.testing.assert_allclose(new_image[1], image[0], rtol=1e-6)
  total = np.asarray(new_image).sum(-1) + np.asarray(new_text).sum(-1)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  # Reweighting a token changes the text mass; the image columns absorb it.
  data["weights"] = data["weights"].at[1, 2].set(0.5)
  ctrl = spec.controller(jnp.int32(1), state, data, cond_batch=b)  # step 1: self off, cross on
  new_image, new_text = ctrl.edit("s", image, text, hw=(2, 2))
  np.testing.assert_allclose(new_text[1, ..., 2], 0.5 * text[0, ..., 2], rtol=1e-6)
  total = np.asarray(new_image[:b]).sum(-1) + np.asarray(new_text[:b]).sum(-1)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  out = ctrl.outputs()
  assert out["maps"].shape == (b, 2, 2, length) and float(out["count"]) == 1.0


def test_plan_rejects_bad_edits(cascade):
  tokenizer = cascade.text.encoder.tokenizer
  with pytest.raises(ValueError, match="refine"):
    plan_edit(tokenizer, SRC, ["a small red circle"], PromptToPrompt(mode="replace"))
  with pytest.raises(ValueError, match="not in any edited prompt"):
    plan_edit(tokenizer, SRC, [TGT], PromptToPrompt(reweight={"green": 2.0}))
  with pytest.raises(ValueError, match="local_blend"):
    plan_edit(tokenizer, SRC, [TGT], PromptToPrompt(local_blend=["green"]))
  with pytest.raises(ValueError, match="mode"):
    PromptToPrompt(mode="swap")
  with pytest.raises(ValueError, match="max_batch"):
    prompt_to_prompt(cascade, SRC, [TGT] * 4, progress=False)
  # A refinement (words added) is planned: the new word has no source token.
  plan = plan_edit(tokenizer, "a red circle", ["a large red circle"], PromptToPrompt(mode="refine"))
  large = plan.tokens[1].positions("large")
  assert plan.has_source[1, large].tolist() == [0.0] * len(large)


def test_sample_py_edit_writes_grid_maps_and_metadata(workdir, tmp_path):
  paths = edit_cli.run(
    workdir=str(workdir),
    source_prompt=SRC,
    edit_prompts=[TGT],
    edit=PromptToPrompt(local_blend=("red", "blue")),
    attention_maps=True,
    outdir=str(tmp_path),
    settings={"*": {"sampler": "ddim"}},
  )
  meta = json.loads((tmp_path / "metadata.json").read_text())
  assert meta["prompts"] == [SRC, TGT] and meta["edit"]["edit_prompts"] == [TGT]
  assert meta["edit"]["local_blend"] == ["red", "blue"] and meta["edit"]["mode"] == "replace"
  # Source and edit side by side (columns), one row per stage, each row with a caption band
  # under it (stage names, then the prompts): the tile at (sr, edit) is the edit's SR image.
  grid = np.asarray(Image.open(paths["grid"]))
  pad, size = 2, 64
  band = (grid.shape[0] - pad) // 2 - size - pad
  assert band > 0 and grid.shape[0] == 2 * (size + band + pad) + pad
  top = pad + size + band + pad
  tile = grid[top : top + size, pad + (size + pad) :][:, :size]
  np.testing.assert_array_equal(tile, np.asarray(Image.open(tmp_path / "001_sr.png")))
  assert (tmp_path / "attention_base_001.png").is_file()
  assert (tmp_path / "attention_sr_000_red.png").is_file()
  assert (tmp_path / "001_sr.png").is_file()


def test_rows_attending_only_to_text_stay_finite_distributions():
  """A source row whose mass is all on text (image columns 0 or denormal, 1 − text mass
  rounding to ≤ 0) is injected into an edit that attends to pixels: the rescaling must stay
  finite and keep every row a distribution (it overflowed to NaN: a black image in the bench)."""
  b, heads, hw, length, steps = 2, 1, 4, 3, 1
  text = np.full((2 * b, heads, hw, length), 0.1, np.float32)
  image = np.full((2 * b, heads, hw, hw), 0.7 / hw, np.float32)
  text[0] = np.float32(1.0) / length  # the source: all on text ...
  image[0] = 0.0
  image[0, 0, 0, 0] = 1e-38  # ... with a denormal left in one row
  data = {
    "matrix": jnp.stack([jnp.eye(length)] * b),
    "has_source": jnp.ones((b, length)),
    "weights": jnp.asarray([[1.0] * length, [1.0, 0.5, 1.0]]),
    "cross": jnp.ones((steps, b, length)),
    "self": jnp.asarray([[0.0, 1.0]]),
    "blend_tokens": jnp.zeros((b, length)),
    "blend": jnp.zeros(steps),
  }
  spec = StageEdit(edits=True, record=False, self_replace=True, self_max_res=8, map_res=2,
                   local_blend=False, blend_threshold=0.3)  # fmt: skip
  ctrl = spec.controller(jnp.int32(0), spec.init_state(data, b), data, cond_batch=b)
  new_image, new_text = ctrl.edit("s", jnp.asarray(image), jnp.asarray(text), hw=(2, 2))
  assert np.isfinite(np.asarray(new_image)).all() and np.isfinite(np.asarray(new_text)).all()
  total = np.asarray(new_image).sum(-1) + np.asarray(new_text).sum(-1)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
