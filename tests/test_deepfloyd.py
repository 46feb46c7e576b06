"""DeepFloyd IF through the Cascade against diffusers' IFPipeline + IFSuperResolutionPipeline.

Tiny random IF stages are written in IF's pipeline layout (``unet/``, ``scheduler/``, stage I's
sharded ``text_encoder/`` + ``tokenizer/``); ``Cascade.from_diffusers`` loads them, and both
sides sample from the same starting noise and augmentation noise with the same T5 states.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

try:
  from tests.if_fixtures import IF_SCHEDULER, make_if_dir
except ImportError:  # pragma: no cover
  from if_fixtures import IF_SCHEDULER, make_if_dir

import diffusers
from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution

from imagen_jax.edit import PromptToPrompt, image_cli, image_ops, prompt_to_prompt
from imagen_jax.edit import cli as edit_cli
from imagen_jax.sample import cli as sample_cli
from imagen_jax.sample.cascade import Cascade, StageInputs, resize
from imagen_jax.sample.deepfloyd import IF_MAX_LENGTH
from imagen_jax.sample.inversion import invert_cascade

PROMPTS = ["a red circle", "a big blue square on the left"]


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("deepfloyd")
  one = make_if_dir(root / "IF-I-tiny", "tiny", seed=0, sample_size=16)
  two = make_if_dir(root / "IF-II-tiny", "tiny_sr", seed=1, sample_size=32, text=False)
  return one, two


@pytest.fixture(scope="module")
def cascade(if_dirs):
  return Cascade.from_diffusers(list(if_dirs))


def _nchw(x):
  return torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())


def _assert_close(ours, ref_nchw, tol):
  """Max error relative to the images' scale (random tiny U-Nets without thresholding give
  x̂0 far outside [−1, 1] at the noisiest steps)."""
  ref = ref_nchw.numpy().transpose(0, 2, 3, 1)
  err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
  print(f"max error {err:.2e} of the images' scale")
  assert err <= tol, f"max error {err:.2e} of the images' scale (tolerance {tol})"


def _rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def _queue(monkeypatch, module, arrays):
  queue = [_nchw(a) for a in arrays]
  monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue.pop(0))
  return queue


def test_t5_states_are_ifs(if_dirs, cascade):
  """IF's text: 77 tokens, padding states kept (not zeroed), as transformers' T5 gives them."""
  from transformers import AutoTokenizer, T5EncoderModel

  emb, mask = cascade.text.encode_prompts(PROMPTS)
  tok = AutoTokenizer.from_pretrained(if_dirs[0] / "tokenizer")
  ids = tok(
    PROMPTS, padding="max_length", max_length=IF_MAX_LENGTH, truncation=True, return_tensors="pt"
  )
  ref = T5EncoderModel.from_pretrained(if_dirs[0] / "text_encoder")(**ids).last_hidden_state
  assert emb.shape == (2, IF_MAX_LENGTH, ref.shape[-1])
  np.testing.assert_allclose(np.asarray(emb), ref.detach().numpy(), atol=1e-4)
  assert np.abs(np.asarray(emb)[~np.asarray(mask)]).max() > 0  # padding is not zeroed
  assert [s.name for s in cascade.stages] == ["IF-I-tiny", "IF-II-tiny"]
  assert cascade.stages[1].lowres_size == 16 and cascade.stages[1].learned_variance


def test_cascade_equals_if_pipelines(if_dirs, cascade, monkeypatch):
  """Stage I then stage II with CFG, negative prompts = "", stage II's noise augmentation at
  IF's noise level 250, DDIM (deterministic) on both sides: the same images."""
  one, two = if_dirs
  n = len(PROMPTS)
  rng = np.random.default_rng(0)
  x1 = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  x2 = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  aug = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  ddim = dict(sampler="ddim", thresholding="none")
  images, _ = cascade.generate(
    PROMPTS,
    progress=False,
    settings={
      "IF-I-tiny": dict(ddim, steps=4, guidance=3.0),
      "IF-II-tiny": dict(ddim, steps=5, guidance=2.0),
    },
    inputs={"IF-I-tiny": StageInputs(latent=x1), "IF-II-tiny": StageInputs(latent=x2, aug_eps=aug)},
  )
  emb = torch.from_numpy(np.array(cascade.text.encode_prompts(PROMPTS)[0]))
  neg = torch.from_numpy(np.array(cascade.text.encode_prompts([""] * n)[0]))
  sched = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False)

  def ddim_scheduler():  # IF's pipelines read variance_type; "fixed_small" drops the variance
    scheduler = diffusers.DDIMScheduler(**sched)
    scheduler.register_to_config(variance_type="fixed_small")
    return scheduler

  common = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None,
                watermarker=None, requires_safety_checker=False)  # fmt: skip
  pipe1 = diffusers.IFPipeline(
    unet=diffusers.UNet2DConditionModel.from_pretrained(one / "unet"),
    scheduler=ddim_scheduler(),
    **common,
  )
  _queue(monkeypatch, pipeline_if, [x1])
  ref1 = pipe1(
    prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=3.0,
    output_type="pt", height=16, width=16,
  ).images  # fmt: skip
  _assert_close(images["IF-I-tiny"], ref1, 1e-4)
  pipe2 = diffusers.IFSuperResolutionPipeline(
    unet=diffusers.UNet2DConditionModel.from_pretrained(two / "unet"),
    scheduler=ddim_scheduler(),
    image_noising_scheduler=diffusers.DDPMScheduler(**IF_SCHEDULER),
    **common,
  )
  _queue(monkeypatch, pipeline_if_superresolution, [x2, aug])  # intermediate, then augmentation
  ref2 = pipe2(
    image=_nchw(images["IF-I-tiny"]), prompt_embeds=emb, negative_prompt_embeds=neg,
    num_inference_steps=5, guidance_scale=2.0, noise_level=250, output_type="pt",
    height=32, width=32,
  ).images  # fmt: skip
  _assert_close(images["IF-II-tiny"], ref2, 1e-4)


def test_sample_cli_with_if_defaults(if_dirs, tmp_path):
  """``sample.py --if_dirs``'s library path with IF's own defaults (DDPM with the learned
  variance, thresholding at 95% capped at 1.5, noise level 250), few steps: PNGs of both
  stages, finite, and the settings in metadata.json."""
  few = {"IF-I-tiny": dict(steps=4), "IF-II-tiny": dict(steps=2)}
  paths = sample_cli.run(
    workdir=None,
    if_dirs=[str(d) for d in if_dirs],
    prompts=PROMPTS[:1],
    outdir=str(tmp_path / "out"),
    settings=few,
    negative_prompt="blurry",
  )
  meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
  one, two = (meta["stages"][n]["settings"] for n in ("IF-I-tiny", "IF-II-tiny"))
  assert (one["sampler"], one["percentile"], one["threshold_max"], one["guidance"]) == (
    "ancestral", 95.0, 1.5, 7.0,
  )  # fmt: skip
  assert (two["steps"], two["guidance"], two["aug_level"]) == (2, 4.0, 0.251)
  assert meta["negative_prompt"] == "blurry"
  sizes = {f["stage"]: Image.open(tmp_path / "out" / f["file"]).size for f in paths["images"]}
  assert sizes == {"IF-I-tiny": (16, 16), "IF-II-tiny": (32, 32)}


def test_prompt_to_prompt_on_if_stages(if_dirs):
  """Prompt-to-prompt on an IF stage (DDPM with the learned variance, CFG): an edit equal to the
  source is the source, a word swap changes the image, and with no injection an edit is plain
  sampling of its prompt from the source's noise."""
  cascade = Cascade.from_diffusers([if_dirs[0]], settings={"IF-I-tiny": dict(steps=3)})
  src, tgt = "a red circle", "a blue circle"
  r = prompt_to_prompt(cascade, src, [src, tgt], seed=3, progress=False)
  images = r.images["IF-I-tiny"]
  np.testing.assert_array_equal(images[1], images[0])
  assert np.abs(images[2] - images[0]).max() > 1e-3
  free = prompt_to_prompt(cascade, src, tgt, seed=3, progress=False, cross_replace=0.0,
                          self_replace=0.0)  # fmt: skip
  plain = cascade([tgt], seed=3, progress=False)
  # A batch of 2 rows (source + edit) vs 1 rounds differently on XLA:CPU; guidance at w = 7 on
  # a random U-Net amplifies it to ~1e-4 (a hundredth of an 8-bit level).
  np.testing.assert_allclose(free.images["IF-I-tiny"][1], plain["IF-I-tiny"][0], atol=3e-4)


def test_inpainting_img2img_and_upscaling_on_if_stages(cascade):
  """The cascade's image inputs on IF stages: inpainting keeps the known pixels exactly at both
  stages; stage II alone upscales a given image; img2img starts stage I from an image."""
  few = {"IF-I-tiny": dict(steps=3), "IF-II-tiny": dict(steps=2)}
  rng = np.random.default_rng(1)
  known = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  mask = np.zeros((1, 32, 32), bool)
  mask[:, 8:24, 4:20] = True
  out = image_ops.inpaint(cascade, known, mask, PROMPTS[:1], seed=1, settings=few, progress=False)
  for stage in cascade.stages:
    k, m = resize(known, stage.image_size), image_ops.resize_mask(mask, stage.image_size)
    np.testing.assert_array_equal(out[stage.name][~m], k[~m])
    assert np.abs(out[stage.name][m] - k[m]).max() > 0.1  # the masked pixels were generated
  low = out["IF-I-tiny"]
  up = cascade(PROMPTS[:1], start_stage="IF-II-tiny", init_image=low, settings=few, progress=False)
  assert list(up) == ["IF-II-tiny"] and up["IF-II-tiny"].shape == (1, 32, 32, 3)
  img2img = cascade(PROMPTS[:1], init_image=low, strength=0.5, settings=few, progress=False, seed=2)
  assert np.isfinite(img2img["IF-II-tiny"]).all()


def test_inversion_and_variations_on_if_stages(cascade):
  """Inversion on IF stages: stage II's low-res input is upscaled before it is augmented (as in
  sampling) and its augmentation noise, drawn at the stage's size, is kept, so DDIM inversion +
  sampling reconstructs with an error that falls with the steps at both stages. Null-text
  inversion starts from IF's null condition (the empty prompt's states, not zeros). The U-Nets
  are read as v-prediction: a random ε-U-Net's x̂0 = (x − σε̂)/α is ill-conditioned at t = 1
  (α ≈ 5e-5 on IF's table), see test_image_ops."""
  c = Cascade(
    [dataclasses.replace(s, pred_type="v") for s in cascade.stages],
    cascade.text,
    max_batch=2,
    null_prompt=cascade.null_prompt,
  )
  plain = {s.name: dict(guidance=1.0, thresholding="none") for s in c.stages}
  images = c(PROMPTS, seed=0, settings=plain, progress=False)["IF-II-tiny"]  # [2, 32, 32, 3]
  errs = []
  for steps in (3, 12):
    st = {k: {**v, "steps": steps} for k, v in plain.items()}
    inv = invert_cascade(c, images, PROMPTS, seed=0, settings=st)
    assert inv.stages["IF-II-tiny"].aug_eps.shape == (2, 32, 32, 3)
    rec = image_ops.reconstruct(c, inv, PROMPTS, settings=st, progress=False)
    errs.append([_rms(rec[k], resize(images, rec[k].shape[1])) for k in rec])
  print("reconstruction RMS per stage at 3 and 12 steps:", errs)
  assert all(a > 1.5 * b for a, b in zip(*errs, strict=True)), errs
  guided = {"IF-I-tiny": dict(steps=2, guidance=4.0, thresholding="none")}
  inv = invert_cascade(c, images, PROMPTS, seed=0, settings=guided, null_text=True, inner_steps=1,
                       stages=["IF-I-tiny"])  # fmt: skip
  empty = c.text.encode_prompts([""] * 2)
  np.testing.assert_array_equal(inv.stages["IF-I-tiny"].null_mask, np.asarray(empty[1]))
  start = np.asarray(empty[0], np.float32)
  moved = np.abs(inv.stages["IF-I-tiny"].null_emb - start).max()
  assert 0 < moved < 0.1 * np.abs(start).max(), moved  # one small step from the empty prompt


def test_sample_cli_edits_and_image_operations_on_if_stages(if_dirs, tmp_path):
  """``sample.py --if_dirs`` with an image operation: ``--invert --edit_prompt`` (inversion,
  then prompt-to-prompt from it) on both IF stages writes the reconstruction and the edit."""
  source = dict(workdir=None, if_dirs=[str(d) for d in if_dirs],
                settings={"*": dict(steps=2)}, max_batch=2)  # fmt: skip
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
  image.save(tmp_path / "x.png")
  paths = image_cli.invert(
    source, init_image=str(tmp_path / "x.png"), prompt="a red circle", null_text=False,
    edit_prompts=["a blue circle"], outdir=str(tmp_path / "inv"),
  )  # fmt: skip
  meta = json.loads((tmp_path / "inv" / "metadata.json").read_text())
  assert meta["edit"]["edit_prompts"] == ["a blue circle"] and "invert" in meta
  assert {(f["stage"], f["index"]) for f in paths["images"]} == {
    (s, i) for s in ("IF-I-tiny", "IF-II-tiny") for i in (0, 1)
  }
  with pytest.raises(ValueError, match="--if_dtype=float16"):  # edits forward the IF flags
    edit_cli.run(source_prompt="a", edit_prompts=["b"], edit=PromptToPrompt(),
                 **{**source, "if_dtype": "float16"})  # fmt: skip
  with pytest.raises(ValueError, match="super-resolution stage"):
    image_cli.final_size({"workdir": None, "if_dirs": [str(if_dirs[1])]})
