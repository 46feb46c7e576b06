"""A user mistake through a command line is one ``error: ...`` line, exit code 2, no traceback.

Each case runs ``train.py``, ``sample.py`` or ``python -m imagen_jax.tools.<name>`` in a process of
its own (through ``runpy``, as ``python`` runs them) and checks its exit code and stderr; so do
``--debug`` / ``IMAGEN_JAX_DEBUG=1`` (the traceback is back) and a bug in a config file (it keeps
its traceback). A fresh Python per case would import JAX, Flax, Orbax, Grain and transformers
~35 times, 10+ CPU-seconds each: the processes are forked instead from a ``multiprocessing`` fork
server that imported them once, and a case costs ~0.7 CPU-seconds. Every mistake fails before a
compilation and none needs a trained run: the ``sample.py`` cases use a workdir holding only
``config.json``, the damaged checkpoint is an empty step directory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen_jax import sharding
from imagen_jax.checkpoint_integrity import saved_state_metadata
from imagen_jax.config import load_config
from imagen_jax.tools import cli
from tests.train_utils import ROOT

# Imported once by the fork server (what makes a case cheap). The absl programs
# (imagen_jax.tools.train / .sample) are not: both define --workdir, and absl allows a flag once.
_PRELOAD = [
  "imagen_jax.train",
  "imagen_jax.sample.cli",
  "imagen_jax.tools.cli",
  "imagen_jax.tools.compile_check",
  "imagen_jax.tools.count_params",
  "imagen_jax.tools.encode_texts",
  "imagen_jax.tools.inspect_checkpoint",
  "absl.app",
  "ml_collections.config_flags",
  "pytest",
  __name__,  # each forked process unpickles its target from here
]
_PARALLEL = 4  # processes at a time (each is single-threaded for most of its life)
_CASE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
  """A command line (``entry``: a script, or ``-m module``) and what its error must name."""

  entry: str
  argv: tuple[str, ...]
  names: str
  env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str

  @property
  def last_line(self) -> str:
    lines = [line for line in self.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _child(entry: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
  """Runs in the forked process: what ``python ENTRY ARGV`` (or ``python -m``) would do."""
  os.chdir(cwd)
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  if entry.startswith("-m "):
    sys.argv = [entry[3:], *argv]
    runpy.run_module(entry[3:], run_name="__main__", alter_sys=True)
  else:
    sys.argv = [entry, *argv]
    sys.path[0] = os.path.dirname(entry)  # as `python train.py` sets it
    runpy.run_path(entry, run_name="__main__")
  # multiprocessing turns SystemExit(code) into the exit code, and prints any other exception's
  # traceback (exit code 1), as Python does.


def _run_all(cases: dict[str, Case], tmp: Path) -> dict[str, Result]:
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(_PRELOAD)
  results: dict[str, Result] = {}
  pending = list(cases.items())
  running: dict[str, tuple] = {}
  deadline = time.monotonic() + _CASE_TIMEOUT_S * 2
  with pytest.MonkeyPatch.context() as mp:
    # Read by the fork server's JAX at import: every case runs on the CPU.
    mp.setenv("JAX_PLATFORMS", "cpu")
    while pending or running:
      while pending and len(running) < _PARALLEL:
        name, case = pending.pop(0)
        out, err = tmp / f"{name}.out", tmp / f"{name}.err"
        cwd = tmp / f"{name}.cwd"
        cwd.mkdir()
        env = {"IMAGEN_JAX_DEBUG": "", **dict(case.env)}
        proc = ctx.Process(
          target=_child, args=(case.entry, list(case.argv), str(cwd), env, out, err)
        )
        proc.start()
        running[name] = (proc, out, err, time.monotonic())
      for name, (proc, out, err, started) in list(running.items()):
        proc.join(timeout=0.05)
        if proc.exitcode is None and time.monotonic() - started < _CASE_TIMEOUT_S:
          continue
        if proc.exitcode is None:
          proc.kill()
          proc.join()
        results[name] = Result(proc.exitcode, out.read_text(), err.read_text())
        del running[name]
      assert time.monotonic() < deadline, f"cases still running: {sorted(running)}"
  return results


def _fake_workdir(path: Path) -> Path:
  """A workdir as ``train.py`` leaves it before its first checkpoint: only ``config.json``."""
  path.mkdir(parents=True)
  (path / "config.json").write_text(load_config("shapes:ci").to_json())
  return path


def _inputs(tmp: Path) -> None:
  """The files the cases name (``{tmp}/...`` in their arguments)."""
  _fake_workdir(tmp / "run")
  _fake_workdir(tmp / "damaged")
  (tmp / "damaged" / "base" / "checkpoints" / "4").mkdir(parents=True)  # a step with no files
  (tmp / "empty").mkdir()
  (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "low.png")
  (tmp / "buggy_config.py").write_text("def get_config(arg=None):\n  return None + 1  # a bug\n")


TRAIN, SAMPLE = str(ROOT / "train.py"), str(ROOT / "sample.py")
CI, RUN = "--config=shapes:ci", "--workdir={tmp}/run"
INIT = "--init_image={tmp}/low.png"


def _train(names: str, *argv: str, env: tuple = ()) -> Case:
  return Case(TRAIN, ("--workdir={tmp}/train_run", *argv), names, env)


def _sample(names: str, *argv: str) -> Case:
  return Case(SAMPLE, argv, names)


def _tool(name: str, names: str, *argv: str) -> Case:
  return Case(f"-m imagen_jax.tools.{name}", argv, names)


# name → the command line and what its error line must name.
MISTAKES = {
  # train.py: the config flag, overrides, validation, paths.
  "train_unknown_config_name": _train("--config=nope", "--config=nope"),
  "train_missing_config_file": _train("--config={tmp}/missing.py", "--config={tmp}/missing.py"),
  "train_unknown_config_arg": _train("--config=shapes:bogus", "--config=shapes:bogus"),
  "train_config_path_as_two_args": _train(  # `--config PATH` is rewritten too; overrides apply
    "config.stages.sr.total_steps",
    "--config",
    str(ROOT / "configs" / "shapes.py:ci"),
    "--config.stages.sr.total_steps=0",
  ),
  "train_batch_size_zero": _train(
    "config.stages.base.batch_size", CI, "--config.stages.base.batch_size=0"
  ),
  "train_unknown_override": _train(
    "--config.stages.base.batchsize", CI, "--config.stages.base.batchsize=4"
  ),
  "train_override_not_an_int": _train(
    "--config.stages.base.batch_size", CI, "--config.stages.base.batch_size=abc"
  ),
  "train_mesh_too_big": _train("config.mesh", CI, "--config.mesh.data=7"),
  "train_folder_without_path": _train("config.data.path", CI, "--config.data.source=folder"),
  "train_folder_missing": _train(
    "config.data.path", CI, "--config.data.source=folder", "--config.data.path={tmp}/no_images"
  ),
  "train_encoder_missing": _train("config.text.encoder", CI, "--config.text.encoder={tmp}/no_t5"),
  "train_stray_argument": _train("shapes:ci", "shapes:ci"),
  "train_unknown_flag": _train("nope", "--nope=1"),
  # sample.py: flags, the workdir, the init image.
  "sample_workdir_missing": _sample("--workdir", "--workdir={tmp}/no_run"),
  "sample_workdir_without_config": _sample("--workdir", "--workdir={tmp}/empty"),
  "sample_num_images_zero": _sample("--num_images", RUN, "--num_images=0"),
  "sample_num_images_not_an_int": _sample("--num_images", RUN, "--num_images=x"),
  "sample_set_malformed": _sample("--set", RUN, "--set=bad"),
  "sample_set_unknown_sampler": _sample("--set", RUN, "--set=sr.sampler=foo"),
  "sample_unknown_start_stage": _sample("--start_stage", RUN, "--start_stage=nope"),
  "sample_corrupt_init_image": _sample(
    "--init_image", RUN, "--start_stage=sr", "--init_image={tmp}/corrupt.png"
  ),
  "sample_missing_init_image": _sample(
    "--init_image", RUN, "--start_stage=sr", "--init_image={tmp}/no.png"
  ),
  "sample_strength_out_of_range": _sample(
    "--strength", RUN, "--init_image={tmp}/low.png", "--strength=2"
  ),
  "sample_unknown_mesh_axis": _sample("--mesh", RUN, "--mesh=model=2"),
  "sample_unknown_stage": _sample("--stages", RUN, "--stages=unknown"),
  "sample_missing_prompts_file": _sample(
    "--prompts_file", RUN, "--prompts_file={tmp}/no_prompts.txt"
  ),
  # sample.py's prompt-to-prompt flags.
  "sample_edit_flag_without_edit_prompt": _sample("--edit_prompt", RUN, "--edit=refine"),
  "sample_edit_of_two_prompts": _sample(
    "--prompt", RUN, "--prompt=a red circle", "--prompt=a", "--edit_prompt=a blue circle"
  ),
  "sample_reweight_malformed": _sample(
    "--reweight", RUN, "--prompt=a red circle", "--edit_prompt=a red circle", "--reweight=red"
  ),
  # sample.py's CLIP guidance flags.
  "sample_clip_without_scale": _sample("--clip_guidance", RUN, "--clip={tmp}", "--clip_cutouts=4"),
  "sample_clip_guidance_without_clip": _sample("--clip=DIR", RUN, "--clip_guidance=100"),
  "sample_clip_guidance_missing_checkpoint": _sample(
    "{tmp}/no_clip", RUN, "--clip_guidance=100", "--clip={tmp}/no_clip"
  ),
  # sample.py's DeepFloyd IF flags.
  "sample_if_dirs_missing": _sample("--if_dirs", "--if_dirs={tmp}/no_if", "--prompt=a"),
  "sample_if_t5_without_if_dirs": _sample("--if_t5", RUN, "--if_t5={tmp}/t5"),
  "sample_if_dirs_and_workdir": _sample("--if_dirs replaces --workdir", RUN, "--if_dirs={tmp}/x"),
  "sample_if_dirs_edit": _sample(
    "--if_dirs", "--if_dirs={tmp}/no_if", "--prompt=a red circle", "--edit_prompt=a blue circle"
  ),
  # sample.py's image operations: misuse fails before the (absent) checkpoint is loaded.
  "sample_mask_and_outpaint": _sample(
    "--mask and --outpaint", RUN, INIT, "--mask={tmp}/low.png", "--outpaint=left:8"
  ),
  "sample_variations_with_edit_prompt": _sample(
    "--edit_prompt does not apply to --variations",
    RUN,
    INIT,
    "--prompt=a red circle",
    "--variations",
    "--edit_prompt=a blue circle",
  ),
  "sample_mask_without_init_image": _sample(
    "--mask needs --init_image", RUN, "--prompt=a", "--mask={tmp}/low.png"
  ),
  "sample_strength_with_mask": _sample(
    "--strength does not apply to --mask", RUN, INIT, "--mask={tmp}/low.png", "--strength=0.5"
  ),
  "sample_resample_without_mask": _sample(
    "--resample needs --mask or --outpaint", RUN, "--resample=10"
  ),
  "sample_interpolate_one_frame": _sample(
    "--frames", RUN, "--interpolate={tmp}/low.png,{tmp}/low.png", "--prompt=a", "--frames=1"
  ),
  "sample_outpaint_too_wide": _sample(  # the last stage's size comes from config.json
    "--outpaint=left:40,right:30", RUN, INIT, "--prompt=a", "--outpaint=left:40,right:30"
  ),
  "sample_missing_mask": _sample("--mask", RUN, INIT, "--prompt=a", "--mask={tmp}/no_mask.png"),
  "sample_black_mask": _sample("no white pixels", RUN, INIT, "--prompt=a", "--mask={tmp}/low.png"),
  "sample_text_diff_bad_eta": _sample(
    "--eta", RUN, INIT, "--prompt=a", "--text_diff=b", "--eta=0,x"
  ),
  "sample_invert_two_prompts": _sample(
    "--invert takes exactly one --prompt", RUN, INIT, "--invert", "--prompt=a", "--prompt=b"
  ),
  # The tools.
  "compile_check_missing_config": _tool("compile_check", "--config", "--config={tmp}/no.py"),
  "compile_check_unknown_stage": _tool("compile_check", "--stage", CI, "--stage=nope"),
  "count_params_unknown_config": _tool("count_params", "--config", "--config=shapes:bogus"),
  "flops_unknown_config": _tool("flops", "--config", "--config=nope"),
  "inspect_checkpoint_empty_dir": _tool("inspect_checkpoint", "no checkpoint", "{tmp}/empty"),
  "inspect_checkpoint_damaged": _tool("inspect_checkpoint", "checkpoint", "{tmp}/damaged"),
  "encode_texts_missing_captions": _tool(
    "encode_texts",
    "--captions",
    "--captions={tmp}/no_captions.txt",
    "--encoder=shapes_demo",
    "--output_dir={tmp}/cache",
  ),
}
# The traceback asked for, and a bug (in a config file) that keeps its traceback.
OTHERS = {
  "debug_flag": _train("--config=nope", "--config=nope", "--debug"),
  "debug_env": _train("--config=nope", "--config=nope", env=(("IMAGEN_JAX_DEBUG", "1"),)),
  "bug_in_config_file": _train("TypeError", "--config={tmp}/buggy_config.py"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Case, Result]]:
  tmp = tmp_path_factory.mktemp("cli_errors")
  _inputs(tmp)
  cases = {}
  for name, case in {**MISTAKES, **OTHERS}.items():
    fill = lambda text: text.replace("{tmp}", str(tmp))
    cases[name] = Case(case.entry, tuple(map(fill, case.argv)), fill(case.names), case.env)
  got = _run_all(cases, tmp)
  return {name: (cases[name], got[name]) for name in cases}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_mistake_is_one_error_line(results, name):
  case, r = results[name]
  assert r.returncode == 2, f"exit code {r.returncode}; stderr:\n{r.stderr[-3000:]}"
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.last_line.startswith("error: "), r.stderr[-3000:]
  assert case.names in r.stderr.split("error: ")[-1], r.stderr[-3000:]


@pytest.mark.parametrize("name", ["debug_flag", "debug_env"])
def test_debug_shows_the_traceback(results, name):
  case, r = results[name]
  assert "Traceback (most recent call last)" in r.stderr
  assert case.names in r.stderr and r.returncode == 1


def test_a_bug_keeps_its_traceback(results):
  _, r = results["bug_in_config_file"]
  assert "Traceback (most recent call last)" in r.stderr and "TypeError" in r.stderr
  assert r.returncode == 1


# In-process: where the line between a mistake and a bug is drawn.


def test_run_cli_reports_a_package_valueerror(capsys):
  assert cli.run_cli(lambda: sharding.parse_mesh("model=2")) == 2
  assert capsys.readouterr().err == "error: --mesh: unknown axis 'model'; the axes are " + (
    f"{list(sharding.MESH_AXES)}\n"
  )


def test_run_cli_reports_the_package_error_classes(tmp_path, capsys):
  assert cli.run_cli(lambda: saved_state_metadata(str(tmp_path))) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_run_cli_reraises_bugs():
  def bug():
    raise TypeError("a bug")

  with pytest.raises(TypeError):
    cli.run_cli(bug)


def test_run_cli_reraises_a_valueerror_from_outside_the_package():
  # Raised inside the json module (like one from inside JAX or XLA): kept with its traceback.
  with pytest.raises(json.JSONDecodeError):
    cli.run_cli(lambda: json.loads("{"))
  with pytest.raises(ValueError):
    cli.run_cli(lambda: np.reshape(np.zeros(3), (2, 2)))


def test_run_cli_reraises_everything_in_debug_mode():
  with pytest.raises(ValueError, match="unknown axis"):
    cli.run_cli(lambda: sharding.parse_mesh("model=2"), debug=True)


def test_run_cli_passes_the_exit_code_through():
  assert cli.run_cli(lambda: 3) == 3 and cli.run_cli(lambda: None) == 0
  assert cli.run_cli(lambda: {"counts": 1}) == 0  # encode_texts returns its statistics


def test_debug_requested(monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  assert not cli.debug_requested(["--config=x"])
  assert cli.debug_requested(["--config=x", "--debug"])
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  assert cli.debug_requested([])


def test_error_line_of_a_keyerror_is_its_message():
  assert cli.error_line(KeyError("no field 'x'")) == "error: no field 'x'"
  assert cli.error_line(ValueError("a\nb")) == "error: a\nb"
