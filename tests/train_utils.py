"""Shared helpers for training tests: small configs and running ``train.py`` in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import filelock

from imagen_jax import config as config_lib
from imagen_jax.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)`` (the built-in config ``name``)."""
  return config_lib.load_config(f"{name}:{arg}" if arg else name)


def two_stage_run() -> Path:
  """A 2-step run of both stages of ``shapes:ci``, trained once per test session and shared.

  Weights are moved off their initialisation (no warmup, lr 2e-2: two Adam steps move every
  weight, zero-initialised output layers too), so the text pathway and hence guidance matter.
  The run lives in the session's cache directory (conftest's ``IMAGEN_JAX_TEST_CACHE``, shared by
  the xdist workers); a file lock makes the first test to ask train it. Treat it as read-only:
  tests that change a run copy it first.
  """
  cache = Path(os.environ.get("IMAGEN_JAX_TEST_CACHE") or tempfile.gettempdir())
  path = cache / "runs" / "two_stage_2steps"
  path.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(path) + ".lock"):
    if not (path / "DONE").is_file():
      shutil.rmtree(path, ignore_errors=True)
      config = load_config("shapes", "ci")
      for s in (config.stages.base, config.stages.sr):
        s.total_steps, s.batch_size, s.eval_every, s.final_eval = 2, 2, 0, False
        s.sample.update(steps=3, guidance=3.0)
        s.optimizer.update(warmup_steps=0, lr=2e-2)
      train_and_evaluate(config, str(path))
      (path / "DONE").touch()
  return path


def tiny_base_config(steps: int = 4, **stage_overrides):
  """The shapes demo's base stage only: tiny, fast, no periodic evals."""
  config = load_config("shapes", "ci")
  config.stage_order = ("base",)
  s = config.stages.base
  s.total_steps = steps
  s.batch_size = 4
  s.log_every = 1
  s.ckpt_every = 2
  s.eval_every = 0
  s.final_eval = False
  s.update(stage_overrides)
  return config


def subprocess_env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  if "IMAGEN_JAX_TEST_CACHE" in env:  # set by conftest: share compiled programs with subprocesses
    env["JAX_COMPILATION_CACHE_DIR"] = env["IMAGEN_JAX_TEST_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def run_train(workdir: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """Runs ``python train.py --workdir=... flags`` to completion and returns the result."""
  cmd = [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *flags]
  return subprocess.run(
    cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
  )
