"""Shared by the bench scripts: machine description and appending results to results.jsonl."""

from __future__ import annotations

import datetime
import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def machine_info() -> dict:
  """CPU model, core count, accelerator and library versions, for every recorded number."""
  import flax
  import jax

  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "cpu": cpu,
    "cores": os.cpu_count(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "flax": flax.__version__,
  }


def record(result: dict) -> None:
  """Appends ``result`` + machine info as one JSON line to ``bench/results.jsonl``."""
  with open(RESULTS, "a") as f:
    f.write(json.dumps({**machine_info(), **result}) + "\n")
  print(f"recorded in {RESULTS}")
