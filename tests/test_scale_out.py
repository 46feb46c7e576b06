"""Scale-out: the same training on 1 device, on 8 (data × fsdp, and with tensor > 1), and on two
``jax.distributed`` processes gives the same losses and params; checkpoints move between meshes.

The runs happen in subprocesses (``tests/scale_out_worker.py``) because the device count is fixed
when JAX starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulates 8 CPU devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.scale_out_worker import summarize
from tests.train_utils import ROOT, subprocess_env

WORKER = str(ROOT / "tests" / "scale_out_worker.py")
RTOL = 1e-5


def _env(devices: int) -> dict:
  env = subprocess_env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _load(path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  with np.load(path) as z:
    params = {k: z[k] for k in z.files if k != "losses"}
    return z["losses"], params


def _assert_same_run(got, want, what: str) -> None:
  """Same losses (1e-5 relative) and params (1e-5 relative over the whole tree).

  Per tensor the tolerance is looser (1e-4): zero-initialised output layers have moved only a few
  Adam steps, whose direction m/√v is sensitive to the summation order of near-zero gradients.
  """
  (loss_a, params_a), (loss_b, params_b) = got, want
  assert len(loss_a) == len(loss_b) == 3, (loss_a, loss_b)
  np.testing.assert_allclose(loss_a, loss_b, rtol=RTOL, err_msg=f"{what}: losses")
  assert params_a.keys() == params_b.keys()
  diff = np.sqrt(sum(np.sum((params_a[k] - params_b[k]) ** 2) for k in params_b))
  norm = np.sqrt(sum(np.sum(params_b[k] ** 2) for k in params_b))
  assert diff / norm <= RTOL, f"{what}: params differ by {diff / norm:.2e} (relative)"
  for k in params_b:
    err = np.linalg.norm(params_a[k] - params_b[k]) / max(np.linalg.norm(params_b[k]), 1e-12)
    assert err <= 10 * RTOL, f"{what}: {k} differs by {err:.2e} (relative)"


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes")
  proc = subprocess.run(
    [sys.executable, WORKER, "meshes", str(out)],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out


@pytest.mark.slow
def test_eight_devices_match_one_device(mesh_runs):
  """data 2 × fsdp 2 × tensor 2: all three kinds of parallelism at once."""
  _assert_same_run(
    _load(mesh_runs / "data2_fsdp2_tensor2.npz"), _load(mesh_runs / "one_device.npz"), "8 devices"
  )
  # And training moved the weights far beyond that tolerance (not a comparison of two inits).
  _, trained = _load(mesh_runs / "one_device.npz")
  _, init = _load(mesh_runs / "init.npz")
  assert init.keys() == trained.keys()
  moved = np.sqrt(sum(np.sum((trained[k] - init[k]) ** 2) for k in init))
  norm = np.sqrt(sum(np.sum(init[k] ** 2) for k in init))
  assert moved / norm > 100 * RTOL, f"3 steps moved the params by only {moved / norm:.2e}"


@pytest.mark.slow
def test_checkpoint_from_eight_devices_restores_onto_other_meshes(mesh_runs):
  report = json.loads((mesh_runs / "restore.json").read_text())
  for mesh in ("fsdp8", "fsdp4_tensor2", "one_device"):
    assert report[mesh]["identical"], (mesh, report[mesh])
  # FSDP really shards: each of the 8 devices holds 1/8 of the largest kernel (and its Adam
  # moments live on all 8 too); on one device it holds all of it.
  assert report["fsdp8"]["fraction"] == pytest.approx(1 / 8), report["fsdp8"]
  assert report["fsdp8"]["devices"] == report["fsdp8"]["opt_devices"] == 8
  assert report["fsdp4_tensor2"]["fraction"] == pytest.approx(1 / 8), report["fsdp4_tensor2"]
  assert report["one_device"]["fraction"] == 1.0


@pytest.mark.slow
def test_compile_check_reports_sharded_state_memory(mesh_runs):
  r = json.loads((mesh_runs / "compile_check.json").read_text())
  whole = r["params"] * 4  # float32
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # fsdp 2 × tensor 2: a device holds ~1/4 of the weights (small vectors and RGB convs are
  # split only one way or replicated).
  assert whole / 4 <= r["params_bytes"] < whole / 3, r
  assert r["ema_params_bytes"] == r["params_bytes"]
  assert 2 * r["params_bytes"] <= r["opt_state_bytes"] <= 2 * r["params_bytes"] + 1024, r  # Adam
  assert r["temp_bytes"] > 0 and r["total_bytes"] > r["opt_state_bytes"] + r["temp_bytes"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(mesh_runs, tmp_path):
  """Two ``jax.distributed`` processes (gloo, 2 CPU devices each) on 127.0.0.1."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, "process", str(tmp_path), str(port), str(pid)],
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      cwd=ROOT,
    )
    for pid in range(2)
  ]
  try:
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:  # never leave a process (or its port) behind
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid}:\n{log[-4000:]}"
  summarize(str(tmp_path), "two_processes")
  _assert_same_run(
    _load(tmp_path / "two_processes.npz"), _load(mesh_runs / "one_device.npz"), "2 processes"
  )
  # Both processes wrote their own data-iterator state into the collective checkpoint.
  step_dir = tmp_path / "two_processes" / "base" / "checkpoints" / "3"
  assert len([f for f in os.listdir(step_dir / "data") if f.startswith("process_")]) == 2
