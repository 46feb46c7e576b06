"""Sampling on any mesh: the same prompts and seed give the same images on 1 device, on 8 simulated
devices (data=8 and data=2 × fsdp=2 × tensor=2), through ``sample.py``, and on two
``jax.distributed`` processes (loopback, gloo).

The device count is fixed when JAX starts, so every multi-device run is a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import ROOT, subprocess_env, two_stage_run

ATOL = 1e-5
PROMPT_FLAGS = ["--prompt=a small red circle at the top left", "--prompt=a cat"]


def _env(devices: int) -> dict:
  env = subprocess_env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(cmd: list[str], devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    cmd, env=_env(devices), capture_output=True, text=True, timeout=timeout, cwd=ROOT
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def workdir():
  """A 2-step run of both stages (weights moved off their init, so every layer matters)."""
  return two_stage_run()


@pytest.fixture(scope="module")
def mesh_images(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh_images")
  # ~15 compiled cascades on 8 simulated devices: 6-7 minutes on 2 idle cores with a cold
  # compilation cache, more beside another test worker.
  worker = [sys.executable, str(ROOT / "tests" / "sample_mesh_worker.py"), str(workdir), str(out)]
  _run(worker, 8, timeout=1800)

  def load(case):
    with np.load(out / f"{case}.npz") as z:
      return {k: z[k] for k in z.files}

  return load, json.loads((out / "placement.json").read_text())


def _assert_same(got: dict, want: dict, what: str, atol: float = ATOL) -> None:
  assert list(got) == list(want), what
  for stage in want:
    assert got[stage].shape == want[stage].shape, (what, stage)
    err = float(np.max(np.abs(got[stage] - want[stage])))
    assert err <= atol, f"{what}: stage {stage} differs by {err:.2e} (max-abs)"


@pytest.mark.parametrize("case", ["data8", "d2f2t2"])
def test_cascade_on_8_devices_equals_one_device(mesh_images, case):
  load, _ = mesh_images
  one = load("one")
  assert one["base"].shape == (3, 32, 32, 3) and one["sr"].shape == (3, 64, 64, 3)
  assert np.abs(one["sr"][0] - one["sr"][1]).mean() > 1e-3  # the images are not all alike
  _assert_same(load(case), one, case)


@pytest.mark.parametrize("kind", ["upscale", "img2img"])
def test_upscale_only_and_img2img_on_8_devices(mesh_images, kind):
  load, _ = mesh_images
  _assert_same(load(f"{kind}_data8"), load(f"{kind}_one"), kind)


@pytest.mark.parametrize("kind", ["inpaint", "reconstruct", "inversion"])
def test_inpainting_and_inversion_on_a_sharded_mesh(mesh_images, kind):
  """Known pixels and masks, and inversion latents (with the SR stage's augmentation noise)
  placed on data=2 × fsdp=2 × tensor=2 give the one-device results: inpainting to ATOL, the
  latents and their reconstruction to 1e-4 (measured ~3e-6, 2e-5). The null-text conditions are
  computed on the mesh too but not compared: on this 2-step model their gradients are so small
  that Adam's normalised steps follow float rounding (7e-4 apart in the base, 0.1 in the SR stage,
  while the latents agree to 3e-6)."""
  load, _ = mesh_images
  _assert_same(
    load(f"{kind}_d2f2t2"), load(f"{kind}_one"), kind, ATOL if kind == "inpaint" else 1e-4
  )


def test_weights_are_replicated_by_default_and_sharded_with_fsdp_and_tensor(mesh_images):
  _, placement = mesh_images
  assert placement["one"]["devices"] == 1
  assert placement["data8"] == {
    "devices": 8,
    "text_devices": 8,
    "largest_param_shard_fraction": 1.0,  # data only: every device holds the whole weight
  }
  assert placement["d2f2t2"]["devices"] == 8
  # fsdp × tensor = 4: the largest U-Net kernel is split over 4 of the 8 devices.
  assert placement["d2f2t2"]["largest_param_shard_fraction"] == pytest.approx(1 / 4)


def _sample_py(workdir, outdir, *flags) -> list[str]:
  return [
    sys.executable,
    str(ROOT / "sample.py"),
    f"--workdir={workdir}",
    f"--outdir={outdir}",
    "--num_images=2",
    "--seed=5",
    *PROMPT_FLAGS,
    *flags,
  ]


def _pngs(outdir) -> dict[str, np.ndarray]:
  files = json.loads((outdir / "metadata.json").read_text())["files"]
  return {f["file"]: np.asarray(Image.open(outdir / f["file"]), np.int16) for f in files}


def _assert_same_pngs(got: dict, want: dict, what: str) -> None:
  assert sorted(got) == sorted(want) and len(want) == 8, (what, sorted(got))
  for name in want:
    # ≤ 1e-5 in float can flip the rounding of a pixel near a .5 boundary: at most one level.
    assert np.abs(got[name] - want[name]).max() <= 1, f"{what}: {name}"


@pytest.fixture(scope="module")
def one_device_pngs(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("png_one")
  _run(_sample_py(workdir, out), 1)
  return _pngs(out)


def test_sample_py_on_a_mesh_of_8_equals_one_device(workdir, one_device_pngs, tmp_path):
  out = tmp_path / "mesh"
  proc = _run(_sample_py(workdir, out, "--mesh=data=2,fsdp=2,tensor=2"), 8)
  assert "Wrote 8 images" in proc.stdout
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  _assert_same_pngs(_pngs(out), one_device_pngs, "sample.py data=2,fsdp=2,tensor=2")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_sampling_equals_one_process(workdir, one_device_pngs, tmp_path):
  out = tmp_path / "dist"
  port = _free_port()
  procs = [
    subprocess.Popen(
      _sample_py(
        workdir,
        out,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={pid}",
      ),
      env=_env(2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in range(2)
  ]
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-4000:]
  assert "Wrote 8 images" in results[0][0] and "Wrote" not in results[1][0]  # process 0 writes
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # 2 processes × 2 devices
  _assert_same_pngs(_pngs(out), one_device_pngs, "2 processes")
