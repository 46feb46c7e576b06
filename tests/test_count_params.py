"""Parameter counts of the paper presets, from shapes only (Imagen: 2B / 600M / 400M, ±15%)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagen_jax import config as config_lib
from imagen_jax.tools import count_params

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"base64": 2.0e9, "sr256": 6.0e8, "sr1024": 4.0e8}


@pytest.mark.parametrize("name", ["sr256", "sr1024"])
def test_cli_in_process(name, capsys):
  assert count_params.main(["--config", str(ROOT / "configs" / f"{name}.py")]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("params: ")
  n = int(last.removeprefix("params: "))
  assert abs(n / PAPER[name] - 1) <= 0.15, f"{name}: {n:,} params vs paper {PAPER[name]:,.0f}"


def test_cli_subprocess_base64():
  """The documented command, as a user runs it."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-m", "imagen_jax.tools.count_params", "--config", "configs/base64.py"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  last = proc.stdout.strip().splitlines()[-1]
  n = int(last.removeprefix("params: "))
  assert abs(n / PAPER["base64"] - 1) <= 0.15, f"base64: {n:,} params vs paper 2B"


def test_tiny_arg_and_breakdown():
  config = config_lib.load_config(str(ROOT / "configs" / "sr1024.py") + ":tiny")
  (cfg,) = count_params.model_configs(config).values()
  assert cfg.name == "tiny_sr1024"
  total, breakdown = count_params.count_params(cfg)
  assert total == sum(breakdown.values()) and {"dblocks", "ublocks", "text"} <= set(breakdown)
  assert total < 1_000_000
  with pytest.raises(ValueError, match="unknown arg"):
    config_lib.load_config(str(ROOT / "configs" / "sr1024.py") + ":huge")
