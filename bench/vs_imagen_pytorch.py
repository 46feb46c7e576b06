"""imagen-jax vs imagen-pytorch 2.1.0, side by side in one run on the same machine.

  bash bench/peer/setup.sh && python bench/vs_imagen_pytorch.py          # CPU, ~7 min
  python bench/vs_imagen_pytorch.py --rounds 3 --train_steps 10 --sample_steps 25 --threads 1

Both projects build models of the SAME size — same resolutions (32² base, 32→64² SR), batch, text
length and text width, and parameter counts within ±5% per U-Net (both printed; the run fails
outside). The architectures are each project's own (ADM base + Efficient U-Net SR here; Unet with
transformer blocks and ``memory_efficient`` there), so FLOPs per image differ even at equal size:
ours come from ``imagen_jax.tools.flops``, theirs from ``torch.utils.flop_counter`` (train only).

Timed, alternating ours / theirs for ``--rounds`` rounds, warmup and compile excluded:

1. one training step of the base U-Net (forward, loss with min-SNR-5 weighting, backward,
   global-norm clipping at 1, Adam, EMA update) at batch ``--train_batch``;
2. the same for the SR U-Net (with noise-conditioning augmentation of the low-res input). This pair
   is close in FLOPs as well as in parameters, so its ratio is the implementations' speed;
3. a two-stage sampling run with classifier-free guidance at ``--sample_steps`` ancestral steps
   per stage (imagen-pytorch's only discrete-step sampler; ours with ``sampler=ancestral``),
   dynamic thresholding at the 95th percentile in both, aug level 0.2 for the SR input.

imagen-pytorch runs in ``bench/peer/.venv-peer`` (``bench/peer/setup.sh``) as a subprocess
(``bench/peer/run_peer.py``, one JSON line out) with text embeddings passed directly and
``HF_HUB_OFFLINE=1``; it is never imported here. Ratios are theirs / ours (>1: we are faster).
Both sides get the same CPU thread budget (``--threads``, default 1: see ``limit_threads``).

CPU "MFU" = model FLOP/s / the peak of the cores the run is pinned to. The peak is measured in the
same run: the best fp32 rate of an ``n × n × n`` matrix product (``--matmul_n``) in XLA and in
torch, whichever is higher (``--peak_gflops`` sets it instead, e.g. from a datasheet). It is what
dense fp32 arithmetic reaches on these cores, so the MFU shows each side's gap to the machine's
limit next to the ratio. Appends one JSON line to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import record  # noqa: E402

PEER_DIR = os.path.join(ROOT, "bench", "peer")
PEER_PY = os.path.join(PEER_DIR, ".venv-peer", "bin", "python")

BASE_SIZE, SR_SIZE, TEXT_LENGTH, TEXT_DIM = 32, 64, 16, 64
PARAM_TOLERANCE = 0.05

# imagen-pytorch U-Nets: the env-notes tiny Unet (3.2M) as the base; a memory-efficient SR Unet.
_PEER_COMMON = dict(
  cond_dim=64, attn_heads=2, attn_dim_head=16, text_embed_dim=TEXT_DIM, max_text_len=TEXT_LENGTH
)
PEER_BASE = dict(
  dim=32,
  dim_mults=[1, 2, 4],
  num_resnet_blocks=1,
  layer_attns=[False, True, True],
  layer_cross_attns=[False, True, True],
  **_PEER_COMMON,
)
PEER_SR = dict(
  dim=32,
  dim_mults=[1, 2, 4],
  num_resnet_blocks=[1, 1, 2],
  layer_attns=[False, False, True],
  layer_cross_attns=[False, False, True],
  memory_efficient=True,
  lowres_cond=True,
  **_PEER_COMMON,
)
# imagen-jax U-Nets of the same parameter count (UNetConfig overrides of the tiny presets).
_OURS_COMMON = dict(text_max_length=TEXT_LENGTH, pool_heads=2, num_groups=8)
OURS_BASE = dict(
  model_channels=32,
  channel_mult=(1, 2, 4),
  num_res_blocks=(1, 1, 1),
  attn_resolutions=(16, 8),
  cross_attn_resolutions=(16, 8),
  head_dim=16,
  emb_dim=96,
  context_dim=32,
  **_OURS_COMMON,
)
OURS_SR = dict(
  model_channels=48,
  channel_mult=(1, 2, 4),
  num_res_blocks=(1, 1, 2),
  attn_resolutions=(8,),
  cross_attn_resolutions=(8,),
  num_heads=2,
  emb_dim=128,
  context_dim=64,
  lowres_size=BASE_SIZE,
  **_OURS_COMMON,
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2, help="alternating ours/theirs rounds")
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--train_steps", type=int, default=8, help="timed train steps per round")
  p.add_argument("--sample_batch", type=int, default=4)
  p.add_argument("--sample_steps", type=int, default=25, help="steps per stage, both stages")
  p.add_argument("--guidance", type=float, default=5.0, help="CFG weight (cond_scale)")
  p.add_argument(
    "--threads",
    type=int,
    default=1,
    help="CPU threads for BOTH sides (torch.set_num_threads / XLA intra-op); 0 = library defaults",
  )
  p.add_argument("--matmul_n", type=int, default=2048, help="matrix size of the peak probe")
  p.add_argument(
    "--peak_gflops", type=float, default=0.0, help="fp32 peak of the budget (0: measure it)"
  )
  p.add_argument("--skip", default="", help="comma list of parts to skip: train,train_sr,sample")
  p.add_argument("--no_record", action="store_true")
  return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# The peer, in its own venv.


def run_peer(spec: dict, timeout: float = 900) -> dict:
  """Runs ``bench/peer/run_peer.py`` with ``spec`` in the peer venv; returns its JSON line."""
  if not os.path.exists(PEER_PY):
    raise SystemExit(f"imagen-pytorch venv missing: run `bash bench/peer/setup.sh` ({PEER_PY})")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
  env.pop("PYTHONPATH", None)
  proc = subprocess.run(
    [PEER_PY, os.path.join(PEER_DIR, "run_peer.py"), json.dumps(spec)],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    cwd=PEER_DIR,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"peer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Ours.


def our_stages():
  """Stage configs (the trainer's schema) for the base and SR U-Nets, with the peer's recipe."""
  from imagen_jax.config import stage_config

  base = stage_config("base", "tiny_base", image_size=BASE_SIZE)
  sr = stage_config("sr", "tiny_sr", image_size=SR_SIZE, lowres_size=BASE_SIZE)
  for stage, overrides in ((base, OURS_BASE), (sr, OURS_SR)):
    stage.model.update(overrides)
    stage.optimizer.update(name="adam", clip_norm=1.0, lr=1e-4, warmup_steps=10)
    stage.update(min_snr_gamma=5.0, objective="eps", text_drop_prob=0.1, total_steps=1000)
    stage.sample.update(sampler="ancestral", thresholding="dynamic", percentile=95.0, aug_level=0.2)
  return base, sr


def check_sizes(base, sr) -> dict:
  """Parameter counts of both projects' U-Nets; fails when a pair differs by more than 5%."""
  from imagen_jax.stage.model import StageModel
  from imagen_jax.tools.flops import unet_flops

  models = [StageModel.create(s, text_dim=TEXT_DIM) for s in (base, sr)]
  ours = [m.num_params() for m in models]
  our_flops = [unet_flops(m.config, 1, text_length=TEXT_LENGTH) for m in models]
  peer = run_peer(
    {
      "task": "params",
      "unets": [PEER_BASE, PEER_SR],
      "image_sizes": [BASE_SIZE, SR_SIZE],
      "text_length": TEXT_LENGTH,
      "text_dim": TEXT_DIM,
    }
  )
  theirs, their_flops = peer["params"], peer["fwd_flops_per_image"]
  print(
    f"{'U-Net':6s} {'params: ours':>13s} {'imagen-pytorch':>15s} {'diff':>7s}   "
    f"{'fwd GFLOPs/image: ours':>22s} {'imagen-pytorch':>15s}"
  )
  bad = []
  for i, name in enumerate(("base", "sr")):
    diff = ours[i] / theirs[i] - 1
    print(
      f"{name:6s} {ours[i]:13,d} {theirs[i]:15,d} {diff:+7.1%}   {our_flops[i] / 1e9:22.3f} "
      f"{their_flops[i] / 1e9:15.3f}"
    )
    if abs(diff) > PARAM_TOLERANCE:
      bad.append(name)
  if bad:
    raise SystemExit(f"parameter counts differ by more than 5% for {bad}: not the same size")
  return {
    "ours": ours,
    "theirs": theirs,
    "ours_fwd_gflops_per_image": [round(f / 1e9, 4) for f in our_flops],
    "theirs_fwd_gflops_per_image": [round(f / 1e9, 4) for f in their_flops],
  }


class OurSampler:
  """Two-stage CFG sampling with the library's per-stage samplers (compiled once)."""

  def __init__(self, base, sr, batch: int, steps: int, guidance: float):
    import jax
    import jax.numpy as jnp

    from imagen_jax.sample.stage import SamplerSettings, make_stage_sampler
    from imagen_jax.stage.model import StageModel, stage_schedule

    self.stages = []
    t0 = time.perf_counter()
    for stage in (base, sr):
      model = StageModel.create(stage, text_dim=TEXT_DIM)
      params = jax.jit(model.init_params)()
      settings = SamplerSettings.from_config(
        {**dict(stage.sample), "steps": steps, "guidance": guidance}
      )
      fn = make_stage_sampler(model.apply, stage_schedule(stage), stage.objective, settings)
      self.stages.append((stage, params, fn))
    self.init_s = time.perf_counter() - t0
    key = jax.random.key(0)
    self.emb = jax.random.normal(key, (batch, TEXT_LENGTH, TEXT_DIM))
    mask = jnp.arange(TEXT_LENGTH)[None, :] < TEXT_LENGTH // 2
    self.mask = jnp.broadcast_to(mask, (batch, TEXT_LENGTH))
    self.null_emb, self.null_mask = jnp.zeros_like(self.emb), jnp.zeros_like(self.mask)
    self.batch = batch
    # Compile both stages ahead of time from shapes, so compile time is measured apart.
    t0 = time.perf_counter()
    self.compiled = []
    low = jax.ShapeDtypeStruct((batch, BASE_SIZE, BASE_SIZE, 3), jnp.float32)
    for stage, params, fn in self.stages:
      x_T = jax.ShapeDtypeStruct((batch, stage.image_size, stage.image_size, 3), jnp.float32)
      lowres = low if stage.lowres_size else None
      args = (params, key, self.emb, self.mask, self.null_emb, self.null_mask, x_T, lowres)
      self.compiled.append(fn.lower(*args).compile())
    self.compile_s = time.perf_counter() - t0

  def __call__(self, seed: int = 0):
    import jax

    key = jax.random.key(seed)
    low = None
    for (stage, params, _), fn in zip(self.stages, self.compiled):
      key, k_noise, k_sample = jax.random.split(key, 3)
      x_T = jax.random.normal(k_noise, (self.batch, stage.image_size, stage.image_size, 3))
      args = (params, k_sample, self.emb, self.mask, self.null_emb, self.null_mask, x_T, low)
      low = fn(*args)
    return jax.block_until_ready(low)


# --------------------------------------------------------------------------------------------------


def _threads(args) -> dict:
  return {"threads": args.threads} if args.threads > 0 else {}


def bench_train(args, stage, unet_number: int) -> dict:
  """Times one U-Net's train step on both sides; ``unet_number`` 1 = base, 2 = SR."""
  from bench.train_step import build_train_step, run_steps
  from imagen_jax.tools import flops

  model, compiled, state, batch, compile_s = build_train_step(
    stage, args.train_batch, TEXT_LENGTH, TEXT_DIM
  )
  state, _ = run_steps(compiled, state, batch, 2)  # warmup
  spec = {
    "task": "train",
    "unets": [PEER_BASE, PEER_SR][:unet_number],
    "unet_number": unet_number,
    "image_sizes": [BASE_SIZE, SR_SIZE][:unet_number],
    "batch": args.train_batch,
    "text_length": TEXT_LENGTH,
    "text_dim": TEXT_DIM,
    "steps": args.train_steps,
    "warmup": 2,
    **_threads(args),
  }
  name = ("base", "sr")[unet_number - 1]
  ours, theirs, peer = [], [], None
  for r in range(args.rounds):
    state, times = run_steps(compiled, state, batch, args.train_steps)
    ours += times
    peer = run_peer(spec)
    theirs += peer["step_times"]
    print(
      f"  {name} train round {r + 1}: ours {statistics.median(times) * 1e3:7.1f} ms/step, "
      f"imagen-pytorch {peer['step_s_median'] * 1e3:7.1f} ms/step"
    )
  our_fwd = flops.unet_flops(model.config, args.train_batch, text_length=TEXT_LENGTH)
  o, t = statistics.median(ours), statistics.median(theirs)
  # Model FLOP rate: 3 × forward FLOPs (forward + backward) per step.
  ours_rate, theirs_rate = 3 * our_fwd / o, 3 * peer["fwd_flops"] / t
  return {
    "unet": name,
    "batch": args.train_batch,
    "ours_step_s": round(o, 5),
    "theirs_step_s": round(t, 5),
    "ours_compile_s": round(compile_s, 2),
    "theirs_first_step_s": round(peer["first_step_s"], 3),
    "ours_images_per_s": round(args.train_batch / o, 2),
    "theirs_images_per_s": round(args.train_batch / t, 2),
    "speedup": round(t / o, 3),
    "ours_fwd_gflops": round(our_fwd / 1e9, 3),
    "theirs_fwd_gflops": round(peer["fwd_flops"] / 1e9, 3),
    "ours_model_gflops_per_s": round(ours_rate / 1e9, 1),
    "theirs_model_gflops_per_s": round(theirs_rate / 1e9, 1),
    "speedup_per_flop": round(ours_rate / theirs_rate, 3),
    "ours_all_step_s": [round(x, 5) for x in ours],
    "theirs_all_step_s": [round(x, 5) for x in theirs],
  }


def bench_sample(args, base, sr) -> dict:
  sampler = OurSampler(base, sr, args.sample_batch, args.sample_steps, args.guidance)
  sampler(seed=1)  # warmup, excluded
  spec = {
    "task": "sample",
    "unets": [PEER_BASE, PEER_SR],
    "image_sizes": [BASE_SIZE, SR_SIZE],
    "batch": args.sample_batch,
    "text_length": TEXT_LENGTH,
    "text_dim": TEXT_DIM,
    "steps": args.sample_steps,
    "cond_scale": args.guidance,
    "aug_level": 0.2,
    "repeats": 1,
    **_threads(args),
  }
  ours, theirs, peer = [], [], None
  for r in range(args.rounds):
    t0 = time.perf_counter()
    sampler(seed=2 + r)
    ours.append(time.perf_counter() - t0)
    peer = run_peer(spec)
    theirs += peer["run_times"]
    print(
      f"  sample round {r + 1}: ours {ours[-1]:7.2f} s, "
      f"imagen-pytorch {peer['run_s_median']:7.2f} s "
      f"({args.sample_batch} images, 2 stages x {args.sample_steps} steps, CFG)"
    )
  o, t = statistics.median(ours), statistics.median(theirs)
  return {
    "batch": args.sample_batch,
    "steps_per_stage": args.sample_steps,
    "guidance": args.guidance,
    "ours_run_s": round(o, 4),
    "theirs_run_s": round(t, 4),
    "ours_s_per_image": round(o / args.sample_batch, 4),
    "theirs_s_per_image": round(t / args.sample_batch, 4),
    "ours_compile_s": round(sampler.compile_s, 2),
    "theirs_first_run_s": round(peer["first_run_s"], 3),
    "speedup": round(t / o, 3),
    "ours_all_run_s": [round(x, 4) for x in ours],
    "theirs_all_run_s": [round(x, 4) for x in theirs],
  }


def matmul_peak(args) -> dict:
  """Best fp32 GFLOP/s of an n × n × n product on the run's cores, in XLA and in torch."""
  import jax
  import jax.numpy as jnp

  n = args.matmul_n
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  ours = 2 * n**3 / min(times) / 1e9
  theirs = run_peer({"task": "matmul", "n": n, "repeats": 5, **_threads(args)})
  theirs = theirs["matmul_gflops_per_s"]
  measured = max(ours, theirs)
  return {
    "matmul_n": n,
    "xla_matmul_gflops_per_s": round(ours, 1),
    "torch_matmul_gflops_per_s": round(theirs, 1),
    "peak_gflops_per_s": round(args.peak_gflops or measured, 1),
    "peak_source": "--peak_gflops" if args.peak_gflops else "best measured fp32 matmul",
  }


def add_mfu(part: dict, peak: float) -> None:
  """Adds each side's model FLOP/s as a fraction of ``peak`` (GFLOP/s)."""
  for side in ("ours", "theirs"):
    part[f"{side}_mfu"] = round(part[f"{side}_model_gflops_per_s"] / peak, 4)


def limit_threads(threads: int) -> None:
  """Gives both sides the same CPU budget: ``threads`` cores (call before jax is imported).

  The process is pinned to the first ``threads`` CPUs (``os.sched_setaffinity``; the peer
  subprocess inherits the mask) and each library is told to use that many threads. The affinity is
  what makes the budget real: XLA's CPU client ignores ``intra_op_parallelism_threads`` for its
  dot thunks and still runs them on every core. On a small machine shared with other jobs, torch's
  OpenMP pool with as many threads as cores also slows down by several times whenever another
  process takes a core (its threads spin at barriers). ``--threads 0`` keeps each library's
  default (all cores, no pinning).
  """
  if threads <= 0:
    return
  if "jax" in sys.modules:
    raise RuntimeError("limit_threads must run before jax is imported")
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise SystemExit(f"--threads {threads} but only {len(cpus)} CPUs are available")
  os.sched_setaffinity(0, cpus[:threads])
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  else:
    flags += f" intra_op_parallelism_threads={threads}"
  os.environ["XLA_FLAGS"] = flags.strip()


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def main(argv=None) -> dict:
  args = parse_args(argv)
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  limit_threads(args.threads)
  import jax

  base, sr = our_stages()
  print(
    f"imagen-jax vs imagen-pytorch on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
    f"{BASE_SIZE}² base + {BASE_SIZE}→{SR_SIZE}² SR, text {TEXT_LENGTH} x {TEXT_DIM}"
  )
  result = {
    "bench": "vs_imagen_pytorch",
    "rounds": args.rounds,
    "threads": args.threads or "default",
    "params": check_sizes(base, sr),
    "loadavg_1min": [_load()],
  }
  result["peak"] = peak = matmul_peak(args)
  print(
    f"  fp32 {peak['matmul_n']}³ matmul: XLA {peak['xla_matmul_gflops_per_s']} GFLOP/s, torch "
    f"{peak['torch_matmul_gflops_per_s']} GFLOP/s; MFU denominator {peak['peak_gflops_per_s']}"
  )
  if "train" not in skip:
    result["train"] = bench_train(args, base, 1)
    result["loadavg_1min"].append(_load())
  if "train_sr" not in skip:
    result["train_sr"] = bench_train(args, sr, 2)
    result["loadavg_1min"].append(_load())
  if "sample" not in skip:
    result["sample"] = sa = bench_sample(args, base, sr)
    result["loadavg_1min"].append(_load())
    # Model FLOP rate of sampling: images × 2 (CFG) × steps × (base + SR forward FLOPs per image).
    work = sa["batch"] * 2 * sa["steps_per_stage"]
    per_image = {k: sum(result["params"][f"{k}_fwd_gflops_per_image"]) for k in ("ours", "theirs")}
    flop = {k: work * v for k, v in per_image.items()}
    sa["ours_model_gflops_per_s"] = round(flop["ours"] / sa["ours_run_s"], 1)
    sa["theirs_model_gflops_per_s"] = round(flop["theirs"] / sa["theirs_run_s"], 1)
    sa["speedup_per_flop"] = round(sa["speedup"] * flop["theirs"] / flop["ours"], 3)
  for key in ("train", "train_sr", "sample"):
    if key in result:
      add_mfu(result[key], peak["peak_gflops_per_s"])
  print(f"\n{'':34s} {'imagen-jax':>12s} {'imagen-pytorch':>15s} {'ratio':>7s}")
  for key in ("train", "train_sr"):
    if key not in result:
      continue
    tr = result[key]
    label = f"{tr['unet']} train step (ms), batch {tr['batch']}"
    print(
      f"{label:34s} {tr['ours_step_s'] * 1e3:12.1f} {tr['theirs_step_s'] * 1e3:15.1f} "
      f"{tr['speedup']:6.2f}x"
    )
    print(
      f"{'  forward GFLOPs per step':34s} {tr['ours_fwd_gflops']:12.2f} "
      f"{tr['theirs_fwd_gflops']:15.2f}"
    )
    print(
      f"{'  model GFLOP/s (3 x fwd / step)':34s} {tr['ours_model_gflops_per_s']:12.1f} "
      f"{tr['theirs_model_gflops_per_s']:15.1f} {tr['speedup_per_flop']:6.2f}x"
    )
    print(f"{'  CPU MFU':34s} {tr['ours_mfu']:12.1%} {tr['theirs_mfu']:15.1%}")
    print(
      f"{'  compile / first step (s)':34s} {tr['ours_compile_s']:12.2f} "
      f"{tr['theirs_first_step_s']:15.2f}"
    )
  if "sample" in result:
    label = f"2-stage sample (s), {sa['batch']} imgs"
    print(f"{label:34s} {sa['ours_run_s']:12.2f} {sa['theirs_run_s']:15.2f} {sa['speedup']:6.2f}x")
    print(
      f"{'  model GFLOP/s':34s} {sa['ours_model_gflops_per_s']:12.1f} "
      f"{sa['theirs_model_gflops_per_s']:15.1f} {sa['speedup_per_flop']:6.2f}x"
    )
    print(f"{'  CPU MFU':34s} {sa['ours_mfu']:12.1%} {sa['theirs_mfu']:15.1%}")
    print(
      f"{'  compile / first run (s)':34s} {sa['ours_compile_s']:12.2f} "
      f"{sa['theirs_first_run_s']:15.2f}"
    )
  print(
    "ratio = imagen-pytorch time / imagen-jax time (>1: imagen-jax faster); medians; "
    f"threads per side: {args.threads or 'library default'}; 1-min load average during the run: "
    f"{result['loadavg_1min']}; MFU = model GFLOP/s / {peak['peak_gflops_per_s']} GFLOP/s "
    f"({peak['peak_source']}, {args.threads or 'all'} core(s))"
  )
  if not args.no_record:
    record(result)
  return result


if __name__ == "__main__":
  main()
