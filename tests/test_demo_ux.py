"""What a demo run shows its user: captioned sample grids, the closing summary (the alignment it
reached and how to sample), and a compilation cache that is on by default."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from imagen_jax import metrics
from imagen_jax.tools import cli
from imagen_jax.train import trainer
from tests.train_utils import ROOT, subprocess_env

# ---- Captioned grids -------------------------------------------------------------------------

H, W, PAD = 16, 20, 2  # H != W: a transposed tile would not fit
CAPTIONS = ["a red circle", "", "a large yellow triangle to the left of a small purple square"]


@pytest.fixture(scope="module")
def tiles():
  return np.random.default_rng(0).integers(0, 256, (3, H, W, 3), dtype=np.uint8)


def _x(col: int) -> int:
  return PAD + col * (W + PAD)


def test_captions_add_a_band_under_each_tile_and_leave_tiles_unchanged(tiles):
  plain = metrics.image_grid(tiles, ncols=3)
  grid = metrics.image_grid(tiles, ncols=3, captions=CAPTIONS)
  band = grid.shape[0] - plain.shape[0]
  assert grid.shape[1:] == plain.shape[1:] and band > 0  # one row: one band
  for i in range(3):
    np.testing.assert_array_equal(grid[PAD : PAD + H, _x(i) : _x(i) + W], tiles[i])
  below = [grid[PAD + H : PAD + H + band, _x(i) : _x(i) + W] for i in range(3)]
  for i in (0, 2):  # dark text on a white band
    assert (below[i].min(axis=-1) < 100).any() and np.median(below[i]) == 255
  assert (below[1] == 255).all()  # an empty caption: a blank band
  gutters = grid[PAD + H :, _x(0) + W : _x(1)]  # text is wrapped to the tile width
  assert (gutters == 255).all()
  np.testing.assert_array_equal(grid, metrics.image_grid(tiles, ncols=3, captions=CAPTIONS))


def test_long_captions_wrap_to_several_lines_or_are_cut(tiles):
  def band(captions, **kw):
    plain = metrics.image_grid(tiles, ncols=3)
    return metrics.image_grid(tiles, ncols=3, captions=captions, **kw).shape[0] - plain.shape[0]

  short = band(["a red circle", "", ""])
  assert band(CAPTIONS) >= short + 2 * (short - 4)  # 4: the band's margins; ≥ 3 lines vs 1
  assert band(CAPTIONS, max_lines=2) < band(CAPTIONS)
  assert band(["", "", ""]) == 0
  with pytest.raises(ValueError, match="3 images but 2 captions"):
    metrics.image_grid(tiles, captions=CAPTIONS[:2])


def test_captioned_grid_scales_tiles_then_captions_them(tiles):
  grid = metrics.captioned_grid(tiles, CAPTIONS, ncols=3, tile=2 * W)
  np.testing.assert_array_equal(grid[4 : 4 + 2 * H : 2, 4 : 4 + 2 * W : 2], tiles[0])  # nearest
  assert grid.shape[0] > 4 + 2 * H + 4 + 2 * 11  # with room for two lines of text


# ---- The closing summary ------------------------------------------------------------------------


def _summary(step: int, evals: dict, prompts=("a large black square at the bottom right",)):
  return {
    "step": step,
    "metrics": {"loss": 0.05},
    "evals": evals,
    "checkpoints": f"/runs/x/s{step}/checkpoints",
    "prompts": list(prompts),
  }


def test_summary_reports_the_final_single_object_alignment_and_the_sample_command():
  shapes = {
    "eval/alignment": 0.41,
    "eval/single_object_alignment": 0.5312,
    "eval/chance_single_object_alignment": 0.2674,
    "eval/num_prompts": 64.0,
    "grid": "/runs/x/sr/samples/samples_ema_00000200.png",
  }
  base = _summary(500, {**shapes, "eval/single_object_alignment": 0.1})
  text = trainer.summary_text("/runs/x", {"base": base, "sr": _summary(200, shapes)})
  lines = text.splitlines()
  assert "Final stage sr, step 200: single-object alignment 0.531 (chance 0.267)" in lines
  assert lines[-1] == (
    "Sample from it:  python sample.py --workdir=/runs/x "
    "--prompt='a large black square at the bottom right'"
  )
  assert "    sample grid: /runs/x/sr/samples/samples_ema_00000200.png" in lines
  assert not any("whole cascade" in line for line in lines)
  # With the whole-cascade eval (config.evals.cascade), its score and grid follow.
  sr = _summary(200, shapes)
  sr["cascade_evals"] = {
    **shapes,
    "eval/single_object_alignment": 0.4,
    "grid": "/runs/x/sr/samples/cascade_samples_00000200.png",
  }
  lines = trainer.summary_text("/runs/x", {"base": base, "sr": sr}).splitlines()
  i = lines.index(
    "Final stage sr through the whole cascade: single-object alignment 0.400 (chance 0.267)"
  )
  assert lines[i + 1] == "    cascade sample grid: /runs/x/sr/samples/cascade_samples_00000200.png"


def test_summary_of_other_runs_lists_their_final_scores_or_none():
  scores = {"eval/clip_score": 24.125, "eval/fid": 80.5, "grid": ""}
  text = trainer.summary_text("/r", {"base": _summary(4, scores, prompts=["it's a cat"])})
  assert "Final stage base, step 4: clip_score 24.12, fid 80.5" in text.splitlines()
  assert text.endswith("--workdir=/r --prompt='it'\"'\"'s a cat'")  # shell-quoted
  text = trainer.summary_text("/r", {"base": _summary(4, {}, prompts=[])})
  assert "Final stage" not in text and text.endswith(
    "Sample from it:  python sample.py --workdir=/r"
  )


def test_only_process_0_prints_the_summary(monkeypatch, capsys):
  runs = {"base": _summary(4, {})}
  trainer.print_summary("/r", runs)
  assert "Training finished" in capsys.readouterr().out
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  trainer.print_summary("/r", runs)
  assert capsys.readouterr().out == ""


# ---- The compilation cache ----------------------------------------------------------------------

_OPTIONS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def jax_options(monkeypatch):
  """Restores the cache options the test changes (the session's own cache stays in use)."""
  saved = {name: getattr(jax.config, name) for name in _OPTIONS}
  for name in _OPTIONS:
    monkeypatch.delenv(name.upper(), raising=False)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_cache_flag_sets_jax_options_and_none_turns_it_off(tmp_path, jax_options):
  path = str(tmp_path / "cache")
  assert cli.enable_compilation_cache(path) == path
  assert jax.config.jax_compilation_cache_dir == path and jax.config.jax_enable_compilation_cache
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  assert not (tmp_path / "cache").exists()  # JAX creates it at the first compile
  assert cli.enable_compilation_cache("none") is None
  assert not jax.config.jax_enable_compilation_cache
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="--compilation_cache=.*file/cache: cannot create"):
    cli.enable_compilation_cache(str(tmp_path / "file" / "cache"))


def test_cache_default_keeps_jax_setting_else_shared_else_user_dir(
  tmp_path, jax_options, monkeypatch
):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "from_env"))
  assert cli.enable_compilation_cache(None, shared_dir="/w/.jax_cache") == str(
    tmp_path / "from_env"
  )
  jax.config.update("jax_compilation_cache_dir", None)
  shared = str(tmp_path / "w" / ".jax_cache")
  assert cli.enable_compilation_cache(None, shared_dir=shared) == shared
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.enable_compilation_cache(None) == str(tmp_path / "xdg" / "imagen_jax" / "jax")


_JIT_TWICE = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np
  from jax import monitoring
  from imagen_jax.tools import cli

  hits = []
  monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
  )
  cli.enable_compilation_cache(sys.argv[1])
  jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)))
  print("hits", len(hits))
  """
)


def test_a_fresh_process_loads_a_tiny_program_from_the_cache(tmp_path):
  env = subprocess_env()
  for name in _OPTIONS:  # this test's directory, not the session's cache
    env.pop(name.upper(), None)
  cache = tmp_path / "cache"

  def run() -> str:
    cmd = [sys.executable, "-c", _JIT_TWICE, str(cache)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]

  assert run() == "0" and any(p.name.endswith("-cache") for p in cache.iterdir())
  assert int(run()) >= 1


def test_train_py_reports_an_unusable_cache_flag_in_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  flag = f"--compilation_cache={tmp_path / 'file' / 'cache'}"
  cmd = [
    sys.executable,
    str(ROOT / "train.py"),
    "--config=shapes:ci",
    f"--workdir={tmp_path}",
    flag,
  ]
  proc = subprocess.run(
    cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == cli.USAGE_EXIT_CODE, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {flag}: cannot create")
  assert not os.path.exists(tmp_path / "base")  # nothing trained
