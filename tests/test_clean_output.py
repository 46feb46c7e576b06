"""A normal run prints only what the project means to print: no stray library warnings.

``train.py --config=shapes:ci``, the same command again (a resume), and ``sample.py`` run in
subprocesses as the runtime install has them: without torch (it is a test-only dependency; a
``sitecustomize`` hides it, as if it were not installed). Any warning line in stderr fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.train_utils import ROOT, subprocess_env

# absl's warning prefix (W1202 00:07:00.40 ...), Python logging's default format (WARNING:name:),
# the warnings module (...: DeprecationWarning: ...), and transformers' advisory when torch is
# missing.
STRAY = re.compile(
  r"^W\d{4} |WARNING|(Deprecation|Future|User|Runtime|Resource)Warning|PyTorch was not found"
)


def _env(tmp_path) -> dict:
  hide = tmp_path / "no_torch"
  hide.mkdir(exist_ok=True)
  (hide / "sitecustomize.py").write_text(
    "import sys\nsys.modules['torch'] = None  # as if torch were not installed\n"
  )
  env = subprocess_env()
  env["PYTHONPATH"] = str(hide) + os.pathsep + env["PYTHONPATH"]
  env.pop("PYTHONWARNINGS", None)
  return env


def _run(cmd, env) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _stray(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if STRAY.search(line)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("clean")
  env = _env(tmp)
  probe = subprocess.run(
    [sys.executable, "-c", "import torch"], env=env, cwd=ROOT, capture_output=True, text=True
  )
  assert probe.returncode != 0, "the sitecustomize must hide torch"
  work = tmp / "run"
  train = [sys.executable, str(ROOT / "train.py"), "--config=configs/shapes.py:ci"]
  train += [f"--workdir={work}", "--config.stages.base.final_eval=False"]
  first = _run(train, env)
  resumed = _run(train, env)
  sample = _run(
    [
      sys.executable,
      str(ROOT / "sample.py"),
      f"--workdir={work}",
      "--prompt=a small red circle at the top left",
      "--set=*.steps=2",
    ],
    env,
  )
  return {"train": first, "resume": resumed, "sample": sample}


@pytest.mark.parametrize("which", ["train", "resume", "sample"])
def test_no_stray_warnings(runs, which):
  proc = runs[which]
  assert not _stray(proc.stderr), f"{which} printed:\n" + "\n".join(_stray(proc.stderr))


def test_resume_resumed_and_sample_wrote_images(runs):
  assert "Resumed stage base from step 4" in runs["resume"].stderr
  assert "Wrote 2 images" in runs["sample"].stdout


def test_the_pattern_catches_what_it_must():
  for line in (
    "WARNING:absl:Metadata file does not exist: /w/state/_CHECKPOINT_METADATA",
    "W1202 00:07:00.408912 1403 checkpoint.py:12] something",
    "/x/y.py:3: DeprecationWarning: old",
    "[transformers] PyTorch was not found. Models won't be available",
  ):
    assert STRAY.search(line), line
  assert not STRAY.search("I1202 00:07:00.408912 1403 trainer.py:80] Mesh {'data': 1}")
