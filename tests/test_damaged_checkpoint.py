"""A damaged latest checkpoint loses no data: resume and sampling use the newest intact step.

End to end through ``train.py`` (the case a full disk produces: files of the latest step cut
short); ``tests/test_checkpoint.py`` covers every kind of damage at the ``Checkpointer`` level.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagen_jax.sample.cascade import Cascade
from tests.train_utils import ROOT, run_train, subprocess_env

FLAGS = [
  "--config=configs/shapes.py:ci",
  "--config.train_stages=base",
  "--config.stages.base.total_steps=4",
  "--config.stages.base.batch_size=4",
  "--config.stages.base.ckpt_every=2",
  "--config.stages.base.eval_every=0",
  "--config.stages.base.final_eval=False",
]


def _digests(path: Path) -> dict[str, str]:
  out = subprocess.run(
    [sys.executable, "-m", "imagen_jax.tools.inspect_checkpoint", str(path)],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  ).stdout
  return dict(re.findall(r"^(\w+): (.+)$", out, re.M))


def _truncate_data_files(step_dir: Path) -> list[Path]:
  """Cuts every array data file of a step to a third (a full disk mid-save). All of them: OCDBT
  groups arrays into files at random, so cutting only some may spare what a reader needs."""
  files = [p for p in (step_dir / "state").rglob("d/*") if p.is_file()]
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
  return files


@pytest.mark.slow
def test_truncated_latest_step_falls_back_without_loss(tmp_path, caplog):
  work = tmp_path / "run"
  first = run_train(work, *FLAGS)
  assert first.returncode == 0, first.stderr[-3000:]
  ckdir = work / "base" / "checkpoints"
  assert sorted(p.name for p in ckdir.iterdir() if p.name.isdigit()) == ["2", "4"]
  want = _digests(work / "base")
  assert want["step"] == "4"
  assert _truncate_data_files(ckdir / "4")

  # Sampling reads the newest intact step (read-only: the damaged step stays where it is).
  with caplog.at_level(logging.WARNING, logger="imagen_jax"):
    cascade = Cascade.from_workdir(str(work), stages=["base"])
  assert cascade.stages[0].checkpoint_step == 2
  assert any("4" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert (ckdir / "4").is_dir()
  images = cascade(["a small red circle at the top left"], seed=0, progress=False)["base"]
  assert images.shape == (1, 32, 32, 3)

  # Resume: falls back to step 2 with a warning naming step 4, retrains 3-4, and ends exactly
  # where the uninterrupted run ended (resume is bit-exact).
  again = run_train(work, *FLAGS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed stage base from step 2" in again.stderr
  warning = [line for line in again.stderr.splitlines() if "damaged" in line.lower()]
  assert warning and any("4" in line for line in warning), again.stderr[-3000:]
  got = _digests(work / "base")
  assert got["step"] == "4"
  assert got["params_sha256"] == want["params_sha256"]
  assert got["ema_params_sha256"] == want["ema_params_sha256"]
  # Nothing was deleted: the damaged step was kept aside for inspection.
  assert any(p.name.startswith("4") and not p.name.isdigit() for p in ckdir.iterdir())
