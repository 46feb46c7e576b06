"""Shared helpers for training tests: small configs and running ``train.py`` in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


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
