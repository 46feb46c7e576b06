"""Peak host memory of a training run from scratch vs a resume, old code vs new code, side by side.

  python bench/resume_memory.py                       # --old_root=/tmp/base --new_root=<this repo>
  python bench/resume_memory.py --rounds=2 --init --workdir=/tmp/rm   # + repeats, + init rows
  python bench/resume_memory.py --rounds=2 --checkpoint_from=/tmp/rm/new   # resumes only (~6 min)

The old trainer built a random train state (params, EMA, Adam m and v) and then restored the
checkpoint while that state was still alive: two train states at the peak of every resume. The
new one restores straight into the abstract state. This bench runs the real entry point,
``python train.py --config=configs/shapes.py --config.stages.base...``, each run in a fresh
subprocess, on a ~104M-parameter U-Net (``shapes`` base stage widened to ``model_channels=192``;
float32 Adam state = 4 × 418 MB = 1.56 GiB), batch 1, one step:

* ``scratch``: a fresh workdir, ``total_steps=1``: builds the state, compiles and runs one step,
  saves the step-1 checkpoint (the peak includes the step's compile and activations);
* ``resume``: the same command on that workdir: restores step 1 and has nothing left to train (no
  compile, no eval, no save): the peak is the state plus the process's fixed cost;
* ``init`` (``--init``): a fresh workdir, stopped right after the state exists (before the loop):
  the scratch state alone, without the step.

The old code resumes from its own scratch checkpoint with ``--old_scratch``; by default it resumes
from a copy of the new code's (the format is the same; it saves ~3 min of CPU time, 5–8 min of
wall time on a shared 2-core host). Each resume also digests the params it restored (before the
trainer sees them) and compares them with ``python -m imagen_jax.tools.inspect_checkpoint``'s
``params_sha256`` of the checkpoint.

Memory is the child's ``getrusage(RUSAGE_SELF).ru_maxrss`` (on CPU, device memory is host
memory); ``jax.devices()[0].memory_stats()`` is recorded too (``None`` on the CPU backend). The
train state size is what the trainer itself computes, ``sharding.bytes_per_device(...)`` (recorded
by wrapping that function in the child). "base" is the child's RSS after importing JAX,
imagen_jax and the libraries every run loads (tensorboardX → torch, transformers, scipy; the old
tree imports them lazily, tensorboardX only after its restore, the new one at import:
``--no_preload`` measures the trees as they are) and starting the backend, before ``train.py``
runs, so ``(peak − base) / state`` counts the train states alive at the peak (plus the restore's
own buffers). Appends the results to ``bench/results.jsonl``. Default run: ~5 min of CPU time
(scratch ~3, old resume ~1.3, new ~0.5); ~13 min of wall time on 2 cores shared with other jobs
(load 8).
"""

from __future__ import annotations

import sys

_CHILD = "--_child"


def _status_kib(field: str) -> int:
  """A ``/proc/self/status`` field in KiB (``VmRSS``: now, ``VmHWM``: peak so far)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _child_main(argv: list[str]) -> None:
  """Runs ``train.py`` of ``root`` in this process and writes what it measured to ``out``.

  Only the standard library is imported before ``sys.path`` points at ``root``, so the old tree's
  ``imagen_jax`` (not this checkout's editable install) is the one that runs.
  """
  out, mode, root, preload = argv[:4]
  train_argv = argv[argv.index("--") + 1 :]
  import json
  import math
  import os
  import resource
  import runpy
  import time

  sys.path[0] = root  # this script's bench/ directory would otherwise come first
  os.chdir(root)
  t0 = time.time()
  result: dict = {"mode": mode, "root": root}

  def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

  import jax

  import imagen_jax
  import imagen_jax.train
  from imagen_jax import checkpoint, metrics, sharding
  from imagen_jax.tools.inspect_checkpoint import tree_digest

  if preload == "1":
    # Libraries every run loads (metrics, T5 tokenizer, shapes evaluator); the old tree imports
    # them lazily (tensorboardX, which pulls in torch, only after its restore), the new one at
    # module import: ~0.2 GiB. Loaded here, they are in both bases, so the peaks differ by the
    # restore alone.
    import scipy.ndimage  # noqa: F401
    import tensorboardX  # noqa: F401
    from transformers import AutoTokenizer, T5Tokenizer  # noqa: F401

  if not os.path.abspath(imagen_jax.__file__).startswith(os.path.abspath(root) + os.sep):
    raise RuntimeError(f"imported {imagen_jax.__file__}, not the code under {root}")
  result["imagen_jax_file"] = imagen_jax.__file__
  jax.devices()  # starts the backend, so its allocations are in the base
  result["rss_base"] = _status_kib("VmRSS") * 1024

  # Instrumentation only (the trainer is not edited): each wrapper records and then defers.
  bytes_per_device = sharding.bytes_per_device

  def recording_bytes_per_device(shardings, shapes):
    per_device, total = bytes_per_device(shardings, shapes)
    if isinstance(shapes, dict) and "params" in shapes and "state_bytes" not in result:
      result["state_bytes"] = total  # the trainer's log line: the whole train state
      result["state_bytes_per_device"] = per_device
      result["state_bytes_by_key"] = {
        k: bytes_per_device(shardings[k], v)[1] for k, v in shapes.items()
      }
      result["params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    return per_device, total

  sharding.bytes_per_device = recording_bytes_per_device

  restore = checkpoint.Checkpointer.restore

  def recording_restore(self, *args, **kwargs):
    result["rss_before_restore"] = _status_kib("VmRSS") * 1024
    result["peak_before_restore"] = maxrss()
    t = time.time()
    state = restore(self, *args, **kwargs)
    result["restore_s"] = round(time.time() - t, 2)
    result["peak_after_restore"] = maxrss()  # before the digest below touches anything
    result["restored_step"] = int(state["step"])
    result["restored_params_sha256"] = tree_digest(state["params"])
    return state

  checkpoint.Checkpointer.restore = recording_restore

  class _StateExists(Exception):
    """Raised where the loop would start (the MetricWriter is built right after the state)."""

  if mode == "init":

    def stop(*args, **kwargs):
      raise _StateExists

    metrics.MetricWriter.__init__ = stop

  sys.argv = [os.path.join(root, "train.py"), *train_argv]
  try:
    runpy.run_path(sys.argv[0], run_name="__main__")
  except SystemExit as e:  # absl's app.run exits
    if e.code not in (None, 0):
      raise
  except _StateExists:
    result["stopped_after_state"] = True
  result["peak_rss"] = maxrss()
  result["peak_hwm"] = _status_kib("VmHWM") * 1024
  stats = jax.devices()[0].memory_stats()
  result["device_peak_bytes"] = (stats or {}).get("peak_bytes_in_use")
  result["child_wall_s"] = round(time.time() - t0, 1)
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == _CHILD:
  _child_main(sys.argv[2:])
  sys.exit(0)

# ---- parent ------------------------------------------------------------------------------------

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2**30
STAGE = "base"


def train_args(model_channels: int, workdir: str) -> list[str]:
  """``train.py`` flags: the shapes base stage widened to ≥ 100M params, batch 1, one step."""
  s = f"--config.stages.{STAGE}"
  return [
    "--config=configs/shapes.py",
    f"--workdir={workdir}",
    f"--config.train_stages={STAGE}",
    f"{s}.model.model_channels={model_channels}",
    f"{s}.batch_size=1",
    f"{s}.total_steps=1",
    f"{s}.ckpt_every=1",
    f"{s}.log_every=1",
    f"{s}.eval_every=0",
    f"{s}.final_eval=False",
  ]


def run_child(
  code: str, root: str, mode: str, args: list[str], scratch_dir: str, preload: bool = True
) -> dict:
  """One ``train.py`` run of ``root`` in a fresh process; returns what the child measured."""
  tag = f"{code}_{mode}_{time.time_ns()}"
  out, log_path = (os.path.join(scratch_dir, f"{tag}.{ext}") for ext in ("json", "log"))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  flag = str(int(preload))
  cmd = [sys.executable, os.path.abspath(__file__), _CHILD, out, mode, root, flag, "--", *args]
  t = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - t
  if proc.returncode != 0 or not os.path.exists(out):
    with open(log_path) as f:
      tail = f.read()[-4000:]
    raise RuntimeError(f"{code} {mode} failed (rc {proc.returncode}); log {log_path}:\n{tail}")
  with open(out) as f:
    result = json.load(f)
  result.update(code=code, phase=mode, wall_s=round(wall, 1), log=log_path)
  print(
    f"  {code:>3} {mode:<7} {wall:6.1f} s  peak RSS {result['peak_rss'] / GIB:.2f} GiB  "
    f"(base {result['rss_base'] / GIB:.2f}, state {result.get('state_bytes', 0) / GIB:.2f})",
    flush=True,
  )
  return result


def params_digest(root: str, workdir: str) -> str:
  """``params_sha256`` of the latest checkpoint, by ``imagen_jax.tools.inspect_checkpoint``."""
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "imagen_jax.tools.inspect_checkpoint", workdir]
  text = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
  fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
  return fields["params_sha256"]


def summarise(runs: list[dict]) -> list[dict]:
  """One row per (code, phase): min and median over the rounds."""
  rows = []
  for code in ("old", "new"):
    for phase in ("init", "scratch", "resume"):
      rs = [r for r in runs if r["code"] == code and r["phase"] == phase]
      if not rs:
        continue
      state = rs[0]["state_bytes"]
      peaks = [r["peak_rss"] for r in rs]
      above = [r["peak_rss"] - r["rss_base"] for r in rs]
      rows.append(
        {
          "code": code,
          "phase": phase,
          "n": len(rs),
          "wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 1),
          "peak_rss_gib_min": round(min(peaks) / GIB, 3),
          "peak_rss_gib_median": round(statistics.median(peaks) / GIB, 3),
          "base_rss_gib_median": round(statistics.median(r["rss_base"] for r in rs) / GIB, 3),
          "state_gib": round(state / GIB, 3),
          "peak_over_state": round(statistics.median(peaks) / state, 2),
          "above_base_over_state": round(statistics.median(above) / state, 2),
          "rss_before_restore_gib": (
            round(statistics.median(r["rss_before_restore"] for r in rs) / GIB, 3)
            if "rss_before_restore" in rs[0]
            else None
          ),
        }
      )
  return rows


def print_table(rows: list[dict]) -> None:
  print(
    "\n| code | phase | runs | wall (s) | peak RSS (GiB), min / median | base RSS (GiB) | "
    "train state (GiB) | RSS before restore (GiB) | peak / state | (peak − base) / state |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    before = r["rss_before_restore_gib"]
    print(
      f"| {r['code']} | {r['phase']} | {r['n']} | {r['wall_s_median']:.0f} | "
      f"{r['peak_rss_gib_min']:.2f} / {r['peak_rss_gib_median']:.2f} | "
      f"{r['base_rss_gib_median']:.2f} | {r['state_gib']:.2f} | "
      f"{'' if before is None else f'{before:.2f}'} | {r['peak_over_state']:.2f} | "
      f"{r['above_base_over_state']:.2f} |"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old_root", default="/tmp/base", help="checkout of the old trainer")
  parser.add_argument("--new_root", default=ROOT, help="checkout of the new trainer")
  parser.add_argument("--model_channels", type=int, default=192, help="192: 104.4M params")
  parser.add_argument("--rounds", type=int, default=1, help="old/new resume pairs")
  parser.add_argument(
    "--old_scratch", action="store_true", help="old code trains its own checkpoint (+~6 min)"
  )
  parser.add_argument("--init", action="store_true", help="also init, once per code (+~7 min)")
  parser.add_argument(
    "--no_preload",
    action="store_true",
    help="measure the trees as they are: don't import tensorboardX/transformers before the base",
  )
  parser.add_argument(
    "--checkpoint_from",
    default="",
    help="a run dir of an earlier run (its new/ workdir, at step 1): no scratch run, both codes "
    "resume from copies of its checkpoint",
  )
  parser.add_argument("--workdir", default="", help="where the run dirs go (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the run dirs")
  parser.add_argument("--no_record", action="store_true", help="don't append to results.jsonl")
  args = parser.parse_args()

  roots = {"old": os.path.abspath(args.old_root), "new": os.path.abspath(args.new_root)}
  base = args.workdir or tempfile.mkdtemp(prefix="resume_memory_")
  os.makedirs(base, exist_ok=True)
  logs = os.path.join(base, "logs")
  os.makedirs(logs, exist_ok=True)
  wd = {code: os.path.join(base, code) for code in roots}
  for w in wd.values():
    shutil.rmtree(w, ignore_errors=True)
  t0 = time.time()
  runs: list[dict] = []

  def run(code: str, mode: str, workdir: str) -> dict:
    a = train_args(args.model_channels, workdir)
    runs.append(run_child(code, roots[code], mode, a, logs, preload=not args.no_preload))
    return runs[-1]

  def copy_checkpoint(src: str, code: str) -> None:
    dst = os.path.join(wd[code], STAGE, "checkpoints")
    shutil.copytree(os.path.join(src, STAGE, "checkpoints"), dst)

  print(f"run dirs under {base}; old = {roots['old']}, new = {roots['new']}", flush=True)
  # Scratch first (it writes the checkpoint the resumes read), then alternate old / new.
  if args.checkpoint_from:
    for code in roots:
      copy_checkpoint(os.path.abspath(args.checkpoint_from), code)
  else:
    run("new", "scratch", wd["new"])
    if args.old_scratch:
      run("old", "scratch", wd["old"])
    else:
      copy_checkpoint(wd["new"], "old")
  for r in range(args.rounds):
    order = ("old", "new") if r % 2 == 0 else ("new", "old")
    for code in order:
      run(code, "resume", wd[code])
    if args.init and r == 0:  # once: it is the slow half of a scratch run (init compile)
      for code in order:
        init_dir = os.path.join(base, f"{code}_init_{r}")
        run(code, "init", init_dir)
        shutil.rmtree(init_dir, ignore_errors=True)

  # Exact resume: each resume restored the bytes the scratch run saved (no step ran after it).
  digests = {"new_scratch": params_digest(roots["new"], wd["new"])}
  if args.old_scratch:
    digests["old_scratch"] = params_digest(roots["old"], wd["old"])
  for r in runs:
    if r["phase"] == "resume":
      source = "old_scratch" if r["code"] == "old" and args.old_scratch else "new_scratch"
      r["restored_matches_checkpoint"] = r["restored_params_sha256"] == digests[source]
  wall = time.time() - t0

  rows = summarise(runs)
  print_table(rows)
  print(f"\nparams: {runs[0]['params']:,}; train state {runs[0]['state_bytes'] / GIB:.3f} GiB")
  print(f"scratch checkpoint params_sha256: {digests}")
  for r in runs:
    if r["phase"] == "resume":
      print(
        f"  {r['code']} resume restored params_sha256 {r['restored_params_sha256'][:16]}… "
        f"matches checkpoint: {r['restored_matches_checkpoint']}"
      )
  print(f"device memory_stats peak: {[r['device_peak_bytes'] for r in runs]}")
  print(f"total wall {wall:.0f} s")

  if not args.no_record:
    from bench.common import record

    keep = (
      "code phase wall_s child_wall_s restore_s peak_rss peak_hwm rss_base rss_before_restore "
      "peak_before_restore peak_after_restore device_peak_bytes restored_step "
      "restored_params_sha256 restored_matches_checkpoint stopped_after_state imagen_jax_file"
    ).split()
    record(
      {
        "bench": "resume_memory",
        "config": "configs/shapes.py",
        "overrides": train_args(args.model_channels, "W")[2:],
        "stage": STAGE,
        "params": runs[0]["params"],
        "state_bytes": runs[0]["state_bytes"],
        "state_bytes_by_key": runs[0].get("state_bytes_by_key"),
        "old_root": roots["old"],
        "new_root": roots["new"],
        "old_scratch": args.old_scratch,
        "rounds": args.rounds,
        "preload": not args.no_preload,
        "checkpoint_from": args.checkpoint_from,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(wall, 1),
        "digests": digests,
        "rows": rows,
        "runs": [{k: r[k] for k in keep if k in r} for r in runs],
      }
    )
  if not args.keep and not args.workdir:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
