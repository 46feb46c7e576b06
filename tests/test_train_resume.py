"""Exact resume: 2N steps straight == N steps, ``kill -9``, restart, N more (bit-identical).

Runs real ``train.py`` subprocesses and kills them with SIGKILL — once while an async checkpoint is
being written (the half-written step must be ignored) and once right after a checkpoint committed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_utils import ROOT, run_train, subprocess_env

STEPS = 8
FLAGS = [
  "--config=configs/shapes.py:ci",
  "--config.train_stages=base",
  f"--config.stages.base.total_steps={STEPS}",
  "--config.stages.base.batch_size=4",
  "--config.stages.base.ckpt_every=2",
  "--config.stages.base.log_every=1",
  "--config.stages.base.eval_every=0",
  "--config.stages.base.final_eval=False",
]


@pytest.fixture(scope="module")
def env():
  return subprocess_env()  # shares the session's persistent compilation cache


def _digests(path: Path, env) -> dict[str, str]:
  out = subprocess.run(
    [sys.executable, "-m", "imagen_jax.tools.inspect_checkpoint", str(path)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  ).stdout
  return dict(re.findall(r"^(\w+): (.+)$", out, re.M))


def _start(workdir: Path, env) -> subprocess.Popen:
  cmd = [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *FLAGS]
  return subprocess.Popen(
    cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )


def _kill_when(proc: subprocess.Popen, ckdir: Path, predicate, timeout: float = 300) -> str:
  """SIGKILLs ``proc`` as soon as ``predicate(names in ckdir)`` holds; returns what was seen."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    names = sorted(os.listdir(ckdir)) if ckdir.is_dir() else []
    if predicate(names):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return ",".join(names)
    if proc.poll() is not None:
      pytest.fail(f"training exited (rc {proc.returncode}) before the kill point; saw {names}")
    time.sleep(0.005)
  proc.kill()
  pytest.fail("timed out waiting for the kill point")


@pytest.mark.slow
def test_kill9_resume_is_bit_identical(tmp_path, env):
  straight = tmp_path / "straight"
  r = run_train(straight, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  want = _digests(straight / "base", env)
  assert want["step"] == str(STEPS)

  killed = tmp_path / "killed"
  ckdir = killed / "base" / "checkpoints"
  # 1. Kill while a checkpoint is being written (its temporary directory exists).
  proc = _start(killed, env)
  seen = _kill_when(proc, ckdir, lambda names: any("tmp" in n for n in names))
  assert "tmp" in seen
  # 2. Restart; kill again right after step 6 has committed.
  proc = _start(killed, env)
  _kill_when(proc, ckdir, lambda names: "6" in names)
  # 3. Restart and finish.
  r = run_train(killed, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  got = _digests(killed / "base", env)
  assert got["step"] == str(STEPS)
  assert got["params_sha256"] == want["params_sha256"]
  assert got["ema_params_sha256"] == want["ema_params_sha256"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, env):
  workdir = tmp_path / "run"
  ckdir = workdir / "base" / "checkpoints"
  flags = [f for f in FLAGS if "total_steps" not in f] + ["--config.stages.base.total_steps=100000"]
  cmd = [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(
    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 300
  while not (ckdir / "2").is_dir():
    assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  m = re.search(r"Preempted: checkpoint saved at step (\d+)", err)
  assert m, err[-2000:]
  step = m.group(1)
  assert (ckdir / step / "state").is_dir()
  assert _digests(workdir / "base", env)["step"] == step
