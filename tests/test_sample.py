"""The cascade pipeline and sample.py on a tiny two-stage run (base 32², SR 32→64²)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax import diffusion
from imagen_jax.sample import cli as sample_cli
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.stage import SamplerSettings
from tests.train_utils import ROOT, subprocess_env, two_stage_run

PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def workdir():
  """A 2-step training run of both stages (random-ish weights, real checkpoints); shared."""
  return two_stage_run()


@pytest.fixture(scope="module")
def cascade(workdir):
  return Cascade.from_workdir(str(workdir), max_batch=4)


def _split_run(workdir, dest, name, *, copy_stage=True, **config_updates):
  """A run of stage ``name`` alone, as if trained separately: its config.json lists only that
  stage, and its checkpoints are the fixture run's (copied unless ``copy_stage=False``)."""
  config = json.loads((workdir / "config.json").read_text())
  config.update(stage_order=[name], stages={name: config["stages"][name]}, **config_updates)
  dest.mkdir()
  (dest / "config.json").write_text(json.dumps(config))
  if copy_stage:
    shutil.copytree(workdir / name, dest / name)
  return dest


@pytest.fixture(scope="module")
def split_runs(workdir, tmp_path_factory):
  """The fixture's stages as two separately trained runs: (base run, SR run)."""
  root = tmp_path_factory.mktemp("split")
  base, sr = _split_run(workdir, root / "base", "base"), _split_run(workdir, root / "sr", "sr")
  shutil.copytree(workdir / "text_encoder", base / "text_encoder")  # the first run's is used
  return base, sr


def test_shapes_range_determinism_and_seeds(cascade):
  out = cascade(PROMPTS, seed=0, progress=False)
  assert list(out) == ["base", "sr"]
  assert out["base"].shape == (2, 32, 32, 3) and out["sr"].shape == (2, 64, 64, 3)
  for x in out.values():
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0 + 1e-6  # dynamic thresholding
  again = cascade(PROMPTS, seed=0, progress=False)
  np.testing.assert_array_equal(out["sr"], again["sr"])
  other = cascade(PROMPTS, seed=1, progress=False)
  assert np.abs(other["base"] - out["base"]).mean() > 1e-3


def test_no_recompilation_for_new_prompts_within_a_bucket(cascade):
  cascade(PROMPTS, seed=0, progress=False)
  sizes = {k: f._cache_size() for k, f in cascade._samplers.items()}
  cascade(["a green triangle above a white circle", ""], seed=3, progress=False)
  cascade(["an orange square on the left"], seed=4, progress=False)  # 1 prompt: bucket 1
  cascade(["a", "b", "c"], seed=4, progress=False)  # 3 prompts: padded to bucket 4
  cascade(["d", "e", "f", "g"], seed=5, progress=False)  # 4 prompts: bucket 4 again
  after = {k: f._cache_size() for k, f in cascade._samplers.items()}
  # One compile per (stage, bucket): buckets 2, 1 and 4 → 3 per stage, whatever the prompts.
  assert set(after) == set(sizes)
  assert all(v == 3 for v in after.values()), after


def test_progress_bar_compiles_no_host_callback(cascade, capsys):
  """The bar advances per chunk from the host: sampling with it reuses the program sampled
  without it (a per-step host callback would be a second program, and one JAX cannot persist in
  the compilation cache)."""
  out = cascade(PROMPTS, seed=0, progress=False)
  sizes = {k: f._cache_size() for k, f in cascade._samplers.items()}
  shown = cascade(PROMPTS, seed=0, progress=True)
  assert {k: f._cache_size() for k, f in cascade._samplers.items()} == sizes
  np.testing.assert_array_equal(shown["sr"], out["sr"])
  err = capsys.readouterr().err
  assert "sample base" in err and "sample sr" in err and f"{len(PROMPTS)}/{len(PROMPTS)}" in err


def test_negative_prompt_changes_output(cascade):
  plain = cascade(PROMPTS, seed=0, progress=False)
  neg = cascade(PROMPTS, seed=0, negative_prompts=["a black triangle"] * 2, progress=False)
  assert np.abs(plain["base"] - neg["base"]).mean() > 1e-4


def test_guidance_one_equals_the_conditional_sample(cascade):
  stage = cascade.stages[0]
  out = cascade(PROMPTS, seed=0, settings={"base": {"guidance": 1.0}}, progress=False)
  # Oracle: the conditional model alone through the diffusion core's sampler.
  emb, mask = cascade.text.encode_prompts(PROMPTS)
  key = jax.random.key(0)
  x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (32, 32, 3)))(
    jnp.arange(2)
  )

  def model_fn(x, t):
    return stage.model.apply(stage.params, x, stage.schedule(t), emb, mask)

  s = stage.settings
  want = diffusion.sample(
    model_fn,
    x_T,
    None,
    sampler=s.sampler,
    steps=s.steps,
    schedule=stage.schedule,
    pred_type=stage.pred_type,
    thresholding=s.thresholding,
    percentile=s.percentile,
    spacing=s.grid_spacing,
  )
  np.testing.assert_allclose(out["base"], np.asarray(want), atol=1e-5)
  # DPM-Solver++ steps uniformly in log-SNR by default; the uniform-in-t grid is another program.
  assert (s.sampler, s.spacing, s.grid_spacing) == ("dpmpp_2m", "auto", "logsnr")
  uniform = cascade(PROMPTS, seed=0, settings={"base": {"guidance": 1.0, "spacing": "uniform"}},
                    progress=False)  # fmt: skip
  assert np.abs(uniform["base"] - out["base"]).mean() > 1e-4
  guided = cascade(PROMPTS, seed=0, settings={"base": {"guidance": 4.0}}, progress=False)
  assert np.abs(guided["base"] - out["base"]).mean() > 1e-4


def test_upscale_only_and_img2img(cascade):
  rng = np.random.default_rng(0)
  low = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  up = cascade(PROMPTS, start_stage="sr", init_image=low, progress=False)
  assert list(up) == ["sr"] and up["sr"].shape == (2, 64, 64, 3)
  up2 = cascade(PROMPTS, start_stage="sr", init_image=-low, progress=False)
  assert np.abs(up["sr"] - up2["sr"]).mean() > 1e-4  # the low-res input matters
  init = np.clip(rng.normal(0, 0.5, (2, 32, 32, 3)), -1, 1).astype(np.float32)
  weak = cascade(PROMPTS, start_stage="base", init_image=init, strength=0.1, progress=False)
  strong = cascade(PROMPTS, start_stage="base", init_image=init, strength=1.0, progress=False)
  assert np.abs(weak["base"] - init).mean() < np.abs(strong["base"] - init).mean()
  assert weak["sr"].shape == (2, 64, 64, 3)


def test_callback_sees_every_step(cascade):
  seen = []
  cascade(
    PROMPTS[:1], seed=0, progress=False, callback=lambda s, i, x0: seen.append((s, i, x0.shape))
  )
  steps = {s.name: s.settings.steps for s in cascade.stages}
  assert sorted(i for s, i, _ in seen if s == "base") == list(range(steps["base"]))
  assert {shape for s, _, shape in seen if s == "sr"} == {(1, 64, 64, 3)}


def test_bad_input_fails_before_compiling(cascade, workdir):
  with pytest.raises(ValueError, match="steps must be >= 1"):
    cascade(PROMPTS, settings={"base": {"steps": 0}})
  with pytest.raises(ValueError, match="guidance must be >= 0"):
    cascade(PROMPTS, settings={"sr": {"guidance": -1.0}})
  with pytest.raises(ValueError, match="percentile"):
    cascade(PROMPTS, settings={"sr": {"percentile": 120.0}})
  with pytest.raises(ValueError, match="needs init_image"):
    cascade(PROMPTS, start_stage="sr")
  with pytest.raises(ValueError, match="do not chain"):
    Cascade([cascade.stages[1], cascade.stages[0]], cascade.text)
  with pytest.raises(FileNotFoundError, match="config.json"):
    Cascade.from_workdir(str(workdir / "nope"))


def test_settings_for_an_unknown_stage_fail_fast(cascade, workdir):
  with pytest.raises(ValueError, match=r"settings for unknown stages \['bse'\]"):
    cascade(PROMPTS, settings={"bse": {"steps": 2}}, progress=False)
  with pytest.raises(ValueError, match="settings for unknown stage 'bse'"):
    Cascade.from_workdir(str(workdir), settings={"bse": {"steps": 2}})


def test_cascade_from_several_workdirs_equals_one_workdir(cascade, split_runs):
  base_run, sr_run = split_runs
  multi = Cascade.from_workdir([str(base_run), sr_run], max_batch=4)
  assert [(s.name, s.workdir) for s in multi.stages] == [
    ("base", str(base_run)),
    ("sr", str(sr_run)),
  ]
  want, got = cascade(PROMPTS, seed=0, progress=False), multi(PROMPTS, seed=0, progress=False)
  assert list(got) == ["base", "sr"]
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_several_workdirs_must_form_one_cascade(workdir, split_runs, tmp_path):
  base_run, sr_run = split_runs
  # Fails on the configs alone: before any text encoder or checkpoint is loaded.
  with pytest.raises(ValueError, match=f"'sr' is in two runs, {re.escape(str(workdir))} and "):
    Cascade.from_workdir([workdir, sr_run])
  text = json.loads((workdir / "config.json").read_text())["text"]
  for field, value in (("max_length", 32), ("encoder", "google/t5-v1_1-base")):
    other = _split_run(workdir, tmp_path / field, "sr", text={**text, field: value})
    with pytest.raises(ValueError, match=rf"different text encoders: config\.text\.{field} is"):
      Cascade.from_workdir([base_run, other])
  other_seed = _split_run(workdir, tmp_path / "seed", "sr", seed=123, copy_stage=False)
  with pytest.raises(ValueError, match="config.seed .the shapes_demo encoder"):
    Cascade.from_workdir([base_run, other_seed])
  with pytest.raises(
    ValueError, match="'base' is a base stage .* after stage 'sr': the stages do not chain"
  ):
    Cascade.from_workdir([sr_run, base_run])
  sr16 = _split_run(workdir, tmp_path / "sr16", "sr", copy_stage=False)
  config = json.loads((sr16 / "config.json").read_text())
  config["stages"]["sr"]["lowres_size"] = 16
  (sr16 / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="takes 16² .* produces 32²: the stages do not chain"):
    Cascade.from_workdir([base_run, sr16])  # sr16 has no checkpoint: checked before loading
  with pytest.raises(ValueError, match="stages \\['sr256'\\] not in the runs"):
    Cascade.from_workdir([base_run, sr_run], stages=["base", "sr256"])


def _sha(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_py_end_to_end(workdir, split_runs, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_bytes(b"a small red circle at the top left\n\xffa green square\n")

  def run(outdir, seed, workdirs=(workdir,)):
    cmd = [
      sys.executable,
      str(ROOT / "sample.py"),
      f"--workdir={','.join(map(str, workdirs))}",
      f"--prompts_file={prompts_file}",
      "--num_images=2",
      f"--seed={seed}",
      *([f"--outdir={outdir}"] if outdir else []),
      "--set=*.steps=2",
    ]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  r = run(tmp_path / "a", 0)
  assert "Images are in" in r.stdout
  assert "not valid UTF-8" in r.stderr
  meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
  assert len(meta["prompts"]) == 4 and meta["prompts"][2].startswith("\ufffd")
  assert (
    meta["stages"]["sr"]["settings"]["steps"] == 2
    and meta["stages"]["base"]["checkpoint_step"] == 2
  )
  for i in range(4):
    for stage, size in (("base", 32), ("sr", 64)):
      assert Image.open(tmp_path / "a" / f"{i:03d}_{stage}.png").size == (size, size)
  assert Image.open(tmp_path / "a" / "grid.png").mode == "RGB"
  # The same stages as two separately trained runs: same PNGs, in the first run's samples_cli.
  run(None, 0, workdirs=split_runs)
  b = split_runs[0] / "samples_cli"
  meta_b = json.loads((b / "metadata.json").read_text())
  assert meta_b["workdirs"] == [str(d) for d in split_runs]
  assert {k: (v["workdir"], v["checkpoint_step"]) for k, v in meta_b["stages"].items()} == {
    "base": (str(split_runs[0]), 2),
    "sr": (str(split_runs[1]), 2),
  }
  run(tmp_path / "c", 1)
  same = [_sha(tmp_path / "a" / f"00{i}_sr.png") == _sha(b / f"00{i}_sr.png") for i in range(4)]
  diff = [
    _sha(tmp_path / "a" / f"00{i}_sr.png") != _sha(tmp_path / "c" / f"00{i}_sr.png")
    for i in range(4)
  ]
  assert all(same) and all(diff)


def test_spacing_and_percentile_kernel_settings():
  """``spacing="auto"`` resolves per sampler; both fields are checked, by the dataclass and by
  ``--set`` before anything loads."""
  assert SamplerSettings(sampler="ancestral").grid_spacing == "uniform"
  assert SamplerSettings(sampler="ddim").grid_spacing == "uniform"
  assert SamplerSettings(sampler="dpmpp_3m").grid_spacing == "logsnr"
  assert SamplerSettings(sampler="ddim", spacing="karras").grid_spacing == "karras"
  with pytest.raises(ValueError, match="spacing='linear'"):
    SamplerSettings(spacing="linear")
  with pytest.raises(ValueError, match="percentile_impl"):
    SamplerSettings(percentile_impl="fast")
  assert sample_cli.parse_settings(["*.spacing=uniform"]) == {"*": {"spacing": "uniform"}}
  with pytest.raises(ValueError, match="spacing"):
    sample_cli.parse_settings(["base.spacing=linear"])
