"""Shared by the bench scripts: machine description and appending results to results.jsonl."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def machine_info() -> dict:
  """CPU model, core count, accelerator and library versions, for every recorded number."""
  import flax
  import jax

  cpu = platform.processor() or "unknown"
  flags: list[str] = []
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.readlines()
    fields = {}
    for line in lines:
      key, _, value = line.partition(":")
      fields.setdefault(key.strip(), value.strip())  # the first CPU's entry
    cpu = fields.get("model name", cpu)
    flags = fields.get("flags", "").split()
  except OSError:
    pass
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "cpu": cpu,
    "cores": os.cpu_count(),
    # The same "AMD EPYC" name covers hosts with and without AVX-512, which XLA:CPU's kernels
    # (and so every CPU number) depend on: record the vector extensions the host really has.
    "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "avx2", "fma"))),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "commit": _commit(),
  }


def _commit() -> str:
  """The checkout's commit (short hash, ``+dirty`` with uncommitted changes), or ``unknown``: so
  side-by-side runs of two versions of the code say which is which."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    run = lambda *a: subprocess.run(
      ["git", "-C", root, *a], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain") else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def record(result: dict) -> None:
  """Appends ``result`` + machine info as one JSON line to ``bench/results.jsonl``."""
  with open(RESULTS, "a") as f:
    f.write(json.dumps({**machine_info(), **result}) + "\n")
  print(f"recorded in {RESULTS}")
