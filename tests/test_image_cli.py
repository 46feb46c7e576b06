"""``sample.py``'s image operations (:mod:`imagen_jax.edit.image_cli`) on the shared tiny run.

One loaded cascade serves every test (``source=`` a :class:`Prepared`); the files, the grid and
``metadata.json`` are checked as ``sample.py`` writes them. The flag rules
(:func:`image_cli.check_flags`) are checked here without a run; ``tests/test_cli_errors.py``
runs some of them through ``sample.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagen_jax.edit import PromptToPrompt, image_cli
from imagen_jax.sample import cli as sample_cli
from tests.train_utils import two_stage_run

SRC = "a small red circle at the top left"
TGT = "a small blue circle at the top left"
SIZE = 64  # the run's last stage (base 32², sr 64²)


@pytest.fixture(scope="module")
def prep():
  return sample_cli.prepare(workdir=str(two_stage_run()), max_batch=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  a = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
  ImageDraw.Draw(a).ellipse((4, 4, 24, 24), fill=(220, 30, 30))
  b = Image.new("RGB", (48, 48), (128, 128, 128))  # another size: resized to 64²
  ImageDraw.Draw(b).rectangle((20, 20, 40, 40), fill=(30, 30, 220))
  mask = Image.new("L", (32, 32), 0)  # half the image's size: resized (nearest)
  ImageDraw.Draw(mask).rectangle((16, 0, 31, 31), fill=255)  # the right half
  paths = {"a": d / "a.png", "b": d / "b.png", "mask": d / "mask.png"}
  for image, key in ((a, "a"), (b, "b"), (mask, "mask")):
    image.save(paths[key])
  return {k: str(v) for k, v in paths.items()}


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def _meta(paths) -> dict:
  with open(f"{paths['outdir']}/metadata.json") as f:
    return json.load(f)


def test_inpainting_keeps_the_known_pixels(prep, inputs, tmp_path):
  paths = image_cli.inpaint(
    prep,
    init_image=inputs["a"],
    mask=inputs["mask"],
    prompts=[SRC],
    num_images=2,
    resample=2,
    seed=1,
    outdir=str(tmp_path),
  )
  init = _png(inputs["a"])
  regen = np.zeros((SIZE, SIZE), bool)
  regen[:, SIZE // 2 :] = True
  outs = [_png(tmp_path / f"{i:03d}_sr.png") for i in range(2)]
  for out in outs:
    np.testing.assert_array_equal(out[~regen], init[~regen])  # exactly, through the PNGs
    assert np.abs(out[regen].astype(int) - init[regen]).max() > 10
  assert np.abs(outs[0].astype(int) - outs[1]).max() > 0  # two images per prompt
  assert _png(tmp_path / "000_base.png").shape == (32, 32, 3)
  meta = _meta(paths)
  assert meta["inpaint"] == {"mask": inputs["mask"], "resample": 2, "jump": 1}
  assert meta["prompts"] == [SRC, SRC] and meta["init_image"] == inputs["a"]
  width, height = Image.open(paths["grid"]).size  # two rows, each with its prompt under it
  assert width == 2 * SIZE + 3 * 2 and height > 2 * SIZE + 3 * 2 + 2 * 8


def test_outpainting_writes_its_canvas_and_mask(prep, inputs, tmp_path):
  paths = image_cli.inpaint(
    prep,
    init_image=inputs["b"],
    outpaint={"left": 16, "top": 8},
    prompts=[TGT],
    num_images=2,
    resample=2,
    outdir=str(tmp_path),
  )
  canvas, mask = _png(paths["canvas"]), np.asarray(Image.open(paths["mask"]))
  assert canvas.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
  # The image shrinks to 48² (the room left by 16 + 8 px) at x 16..63, y 8 + (56 - 48) // 2 = 12.
  known = np.zeros((SIZE, SIZE), bool)
  known[12:60, 16:64] = True
  np.testing.assert_array_equal(mask == 0, known)
  assert set(np.unique(mask)) == {0, 255} and (canvas[~known] == 128).all()  # gray to fill
  for i in range(2):
    np.testing.assert_array_equal(_png(tmp_path / f"{i:03d}_sr.png")[known], canvas[known])
  meta = _meta(paths)
  assert meta["outpaint"] == {
    "left": 16,
    "right": 0,
    "top": 8,
    "bottom": 0,
    "canvas": "outpaint_canvas.png",
  }
  assert meta["inpaint"]["mask"] == "outpaint_mask.png"


def test_variations(prep, inputs, tmp_path):
  paths = image_cli.variations(
    prep, init_image=inputs["a"], prompt=SRC, num_images=3, stochasticity=0.5, outdir=str(tmp_path)
  )
  outs = [_png(tmp_path / f"{i:03d}_sr.png") for i in range(3)]
  assert not (tmp_path / "003_sr.png").exists()
  assert all(np.abs(outs[i].astype(int) - outs[j]).max() > 0 for i, j in ((0, 1), (1, 2)))
  meta = _meta(paths)
  assert meta["variations"] == {"num": 3, "stochasticity": 0.5} and meta["prompts"] == [SRC] * 3
  assert Image.open(paths["grid"]).size == (3 * SIZE + 4 * 2, 2 * SIZE + 3 * 2)  # stage rows


def test_interpolation_writes_frames_grid_and_gif(prep, inputs, tmp_path):
  paths = image_cli.interpolate(
    prep, images=[inputs["a"], inputs["b"]], prompts=[SRC, TGT], frames=3, outdir=str(tmp_path)
  )
  frames = [_png(tmp_path / f"{i:03d}_sr.png") for i in range(3)]
  with Image.open(paths["gif"]) as gif:
    assert gif.n_frames == 3 and gif.info["loop"] == 0 and gif.size == (SIZE, SIZE)
  grid = _png(paths["grid"])
  assert grid.shape == (SIZE + 2 * 2, 3 * SIZE + 4 * 2, 3)  # one row: the last stage's frames
  np.testing.assert_array_equal(grid[2 : 2 + SIZE, 2 + SIZE + 2 :][:, :SIZE], frames[1])
  meta = _meta(paths)["interpolate"]
  assert meta["frames"] == 3 and meta["alphas"] == [0.0, 0.5, 1.0] and meta["gif"] == image_cli.GIF
  assert meta["prompts"] == [SRC, TGT] and meta["images"] == [inputs["a"], inputs["b"]]


def test_text_diff_makes_one_image_per_eta(prep, inputs, tmp_path):
  # Three rows, as the interpolation's three frames: the two share their compiled samplers.
  paths = image_cli.text_diff(
    prep,
    init_image=inputs["a"],
    source_prompt=SRC,
    target_prompt=TGT,
    eta=[0.0, 0.5, 1.0],
    outdir=str(tmp_path),
  )
  assert len([f for f in paths["images"] if f["stage"] == "sr"]) == 3
  assert not (tmp_path / "003_sr.png").exists()
  meta = _meta(paths)
  assert meta["text_diff"] == {"source_prompt": SRC, "target_prompt": TGT, "eta": [0.0, 0.5, 1.0]}
  assert meta["prompts"][2].endswith("(η=1.00)")


def test_inversion_reconstructs_and_edits_the_image(prep, inputs, tmp_path):
  rec = image_cli.invert(prep, init_image=inputs["a"], prompt=SRC, outdir=str(tmp_path / "rec"))
  meta = _meta(rec)
  assert set(rec["psnr"]) == {"base", "sr"} and meta["invert"]["psnr"] == rec["psnr"]
  assert meta["invert"]["null_text"] and meta["invert"]["settings"]["sr"]["eta"] == 0.0
  # The PSNR is the written reconstruction's (a 3-step inversion of a 2-step model is rough).
  out = _png(tmp_path / "rec" / "000_sr.png").astype(float)
  mse = np.mean((out - _png(inputs["a"])) ** 2)
  assert rec["psnr"]["sr"] == round(10 * np.log10(255**2 / mse), 2) and rec["psnr"]["sr"] > 10
  assert Image.open(rec["grid"]).size == (2 * SIZE + 3 * 2,) * 2  # input above reconstruction
  # Prompt-to-prompt on the inverted image: row 0 is the reconstruction, row 1 the edit.
  edit = image_cli.invert(
    prep,
    init_image=inputs["a"],
    prompt=SRC,
    edit_prompts=[TGT],
    edit=PromptToPrompt(cross_replace=0.8),
    outdir=str(tmp_path / "edit"),
  )
  meta = _meta(edit)
  assert meta["prompts"] == [SRC, TGT] and meta["edit"]["edit_prompts"] == [TGT]
  assert meta["invert"]["null_text"] and meta["init_image"] == inputs["a"]
  source = _png(tmp_path / "edit" / "000_sr.png").astype(int)
  assert np.abs(source - _png(tmp_path / "rec" / "000_sr.png")).max() <= 2
  assert (tmp_path / "edit" / "001_sr.png").is_file()


OK = {"init_image": "x.png", "prompt": [SRC]}
MISUSE = [
  ({"mask": "m.png", "outpaint": ["left:8"], **OK}, "--mask and --outpaint"),
  ({"variations": True, "edit_prompt": [TGT], **OK}, "--edit_prompt does not apply to --variat"),
  ({"mask": "m.png", "prompt": [SRC]}, "--mask needs --init_image"),
  ({"mask": "m.png", "strength": 0.5, **OK}, "--strength does not apply to --mask"),
  ({"invert": True, "start_stage": "sr", **OK}, "--start_stage does not apply to --invert"),
  ({"resample": 10, **OK}, "--resample needs --mask or --outpaint"),
  ({"jump": 2, "variations": True, **OK}, "--jump does not apply to --variations"),
  ({"resample": 0, "mask": "m.png", **OK}, "--resample must be >= 1"),
  ({"interpolate": ["a", "b"], "frames": 1, "prompt": [SRC]}, "--frames must be >= 2"),
  ({"interpolate": ["a"], "prompt": [SRC]}, "--interpolate=a: expected two images"),
  ({"interpolate": ["a", "b"], **OK}, "--init_image does not apply to --interpolate"),
  ({"interpolate": ["a", "b"], "prompt": [SRC] * 3}, "--interpolate takes one --prompt"),
  ({"frames": 4}, "--frames needs --interpolate"),
  ({"eta": ["0.5"], **OK}, "--eta needs --text_diff"),
  ({"text_diff": TGT, "eta": ["x"], **OK}, "--eta=x"),
  ({"text_diff": " ", **OK}, "--text_diff is empty"),
  ({"text_diff": TGT, "init_image": "x.png", "prompt": [SRC, TGT]}, "--text_diff takes exactly"),
  ({"text_diff": TGT, "num_images": 2, **OK}, "--num_images does not apply to --text_diff"),
  ({"variations": True, "num_images": 0, **OK}, "--num_images must be >= 1"),
  ({"variations": True, "stochasticity": -1.0, **OK}, "--stochasticity"),
  ({"variations": True, "negative_prompt": "x", **OK}, "--negative_prompt does not apply"),
  ({"invert": True, "prompts_file": "p.txt", **OK}, "--prompts_file does not apply to --invert"),
  ({"null_text": False, **OK}, "--null_text needs --invert"),
  ({"outpaint": ["left16"], **OK}, "--outpaint=left16: expected SIDE:PIXELS"),
  ({"outpaint": ["left:8", "left:4"], **OK}, "each at most once"),
  ({"outpaint": ["left:-1"], **OK}, "margins must be >= 0"),
  ({"outpaint": ["left:0"], **OK}, "at least one margin"),
]


@pytest.mark.parametrize("given,message", MISUSE, ids=[m for _, m in MISUSE])
def test_check_flags_rejects_misuse(given, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    image_cli.check_flags(given)


def test_check_flags_finds_the_operation():
  assert image_cli.check_flags({}) is None
  assert image_cli.check_flags({"init_image": "x", "strength": 0.5}) is None  # img2img
  assert image_cli.check_flags({"variations": False, "num_images": 3}) is None
  assert image_cli.check_flags({"mask": "m", "resample": 10, "jump": 10, **OK}) == "mask"
  assert image_cli.check_flags({"outpaint": ["left:8", "top:4"], **OK}) == "outpaint"
  assert image_cli.check_flags({"variations": True, "num_images": 4, **OK}) == "variations"
  two = {"interpolate": ["a", "b"], "frames": 4, "prompt": [SRC, TGT]}
  assert image_cli.check_flags(two) == "interpolate"
  assert image_cli.check_flags({"text_diff": TGT, "eta": ["0", "1"], **OK}) == "text_diff"
  assert image_cli.check_flags({"invert": True, "edit_prompt": [TGT], **OK}) == "invert"
  assert image_cli.parse_outpaint(["left:16", "bottom:2"]) == {"left": 16, "bottom": 2}
  assert image_cli.parse_eta(["0", "0.25"]) == [0.0, 0.25] and image_cli.parse_eta(1) == [1.0]


def test_load_mask(tmp_path):
  Image.fromarray(np.array([[0, 200], [128, 127]], np.uint8)).save(tmp_path / "m.png")
  np.testing.assert_array_equal(
    image_cli.load_mask(str(tmp_path / "m.png"), (4, 4)),
    np.kron(np.array([[0, 1], [1, 0]], bool), np.ones((2, 2), bool)),
  )
  Image.new("L", (4, 4), 0).save(tmp_path / "black.png")
  with pytest.raises(ValueError, match="--mask=.*no white pixels"):
    image_cli.load_mask(str(tmp_path / "black.png"), (4, 4))
