"""``train_and_evaluate``: train the stages of a cascade in turn, with exact resume.

Reads top to bottom like an algorithm box (house style, after big_vision's ``train.py``)::

  mesh = config.mesh over all devices (of all processes)
  for each stage in config.stage_order:
    1. model + optimizer built from shapes, materialised directly into their shardings
    2. data pipeline (Grain), checkpointable
    3. restore, in this order: (a) the stage's own latest checkpoint in the workdir,
       (b) config.init_from (params only), (c) from scratch
    4. loop: jitted donated step → metrics → checkpoint policy → periodic EMA samples + evals
    5. final checkpoint, sample grid, summary
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import config as config_lib
from imagen_jax import metrics, sharding
from imagen_jax.evaluators import registry as eval_registry
from imagen_jax.models.if_loading import load_if_unet
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.stage import SamplerSettings, make_stage_sampler
from imagen_jax.stage import step as step_lib
from imagen_jax.stage.if_model import IFStageModel
from imagen_jax.stage.model import is_diffusers_unet
from imagen_jax.stage.text_cond import TextEmbedder, build_text_embedder
from imagen_jax.train import data as data_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite updates: training stopped, last good checkpoint kept."""


def pooled_metrics(host: list[dict]) -> dict[str, float]:
  """One logging window's metrics: means over its steps; per-t-bucket losses pooled.

  ``loss_t{k}`` is the window's summed bucket loss over its example count: NaN (``null`` in
  metrics.jsonl) only when no example of the whole window fell in that quarter of t.
  """
  sums = np.sum([h["loss_t_sum"] for h in host], axis=0)  # [K]
  counts = np.sum([h["loss_t_count"] for h in host], axis=0)  # [K]
  out = {k: float(np.mean([h[k] for h in host])) for k in host[-1] if not k.startswith("loss_t_")}
  for k, (s, c) in enumerate(zip(sums, counts)):
    out[f"loss_t{k}"] = float(s / c) if c > 0 else float("nan")
  return out


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
) -> dict[str, dict]:
  """Trains every stage in ``config.stage_order`` (or ``config.train_stages``) under ``workdir``.

  Each stage writes ``workdir/<stage>/{checkpoints/, metrics.jsonl, tensorboard/, samples/}``.
  Every run resumes automatically from the latest complete checkpoint in its workdir (saved on
  any mesh: arrays are read straight into this run's shardings).

  Args:
    config: a run config (``configs/*.py``).
    workdir: the run directory.
    mesh: the device mesh; default ``sharding.make_mesh(config.mesh)`` over all devices. In a
      multi-process run call ``jax.distributed.initialize()`` first (``train.py --multihost``).

  Returns:
    stage name → summary dict (final step, last metrics, eval results, paths).
  """
  config_lib.validate(config)
  eval_registry.check_evals(config.evals, config.data.source)
  mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
  rules = config_lib.logical_rules(config)
  log.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  text = build_text_embedder(config, workdir, shardings=(mesh, rules))
  summaries = {}
  for name in config_lib.selected_stages(config):
    summaries[name] = train_stage(config, name, workdir, text, mesh=mesh, rules=rules)
  last = config.stage_order[-1]
  if last in summaries and summaries[last]["evals"]:
    summaries[last]["cascade_evals"] = evaluate_cascade(config, workdir, summaries[last], mesh)
  print_summary(workdir, summaries)
  return summaries


def train_stage(
  config: ml_collections.ConfigDict,
  name: str,
  workdir: str,
  text: TextEmbedder,
  *,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> dict:
  """Trains one stage to ``total_steps`` (resuming if possible); returns its summary."""
  stage = config.stages[name]
  stage_dir = os.path.join(workdir, name)
  log.info("==== stage %s: %s at %d² ====", name, stage.model.preset, stage.image_size)
  _check_batch_fits_mesh(stage, mesh)

  # ---- 1. Model, optimizer, shardings, the jitted step (from shapes: nothing allocated yet) ----
  program = step_lib.build_stage_program(
    stage, text_dim=text.d_model, seed=config.seed, mesh=mesh, rules=rules
  )
  model, schedule = program.model, program.schedule
  per_device, total = sharding.bytes_per_device(program.shardings, program.abstract_state)
  log.info(
    "Stage %s: %d params; train state %.1f MiB per device of %.1f MiB",
    name,
    model.num_params(),
    per_device / 2**20,
    total / 2**20,
  )
  # T5 outputs are laid out by the compiler; pin every batch input to the batch sharding so the
  # step's input layout is fixed (one compilation, the same program tools.compile_check builds).
  to_batch_sharding = jax.jit(
    lambda b: {
      k: jax.lax.with_sharding_constraint(v, sharding.batch_sharding(mesh, v.ndim))
      for k, v in b.items()
    }
  )
  train_step = program.train_step

  # ---- 2. Data ---------------------------------------------------------------------------------
  data_iter = data_lib.make_train_iterator(config, stage, text)

  # ---- 3. State: (a) own checkpoint, (b) init_from, (c) scratch ----------------------------------
  # A resume reads straight into the abstract state's shardings: no random state is built first,
  # so the peak memory of a resume is one train state, not two.
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(stage_dir, "checkpoints"), save_every=stage.ckpt_every, keep=stage.keep_ckpts
  )
  if ckpt.latest_step() is not None:
    state = ckpt.restore(program.abstract_state, data_iter=data_iter)
    log.info("Resumed stage %s from step %d", name, int(state["step"]))
  elif stage.init_from or config.init_from:
    src = stage.init_from or config.init_from
    if is_diffusers_unet(src):  # a DeepFloyd IF (diffusers) checkpoint: its U-Net's weights
      params = _init_from_diffusers(src, program, mesh, rules, f"config.stages.{name}")
    else:
      src = _init_from_path(src, name)
      params = ckpt_lib.restore_params(src, program.abstract_state["params"])
    state = program.initial_state(params)
    log.info("Initialised stage %s from %s", name, src)
  else:
    state = program.initial_state()
  start = int(state["step"])

  # ---- 4. Loop ---------------------------------------------------------------------------------
  writer = metrics.MetricWriter(stage_dir)
  evaluator = _StageEvaluator(config, stage, model, schedule, text, stage_dir, mesh, rules)
  run_config = json.loads(config.to_json_best_effort())
  bad_totals: dict[str, int] = {}
  last_metrics: dict[str, float] = {}
  pending: list[dict] = []
  t_last, step_last = time.time(), start
  bar = tqdm(
    total=stage.total_steps, initial=start, desc=f"train {name}", disable=jax.process_index() != 0
  )
  step = start
  try:
    while step < stage.total_steps:
      batch = next(data_iter)
      for k in [k for k in batch if k.startswith("bad_")]:
        bad_totals[k] = bad_totals.get(k, 0) + int(np.sum(batch.pop(k)))
      batch = text.prepare_batch(sharding.global_batch(batch, mesh))
      state, m = train_step(state, to_batch_sharding(batch))
      step += 1
      pending.append(m)
      if step % stage.log_every == 0 or step == stage.total_steps:
        host = jax.device_get(pending)
        pending = []
        last_metrics = pooled_metrics(host)
        last_metrics["skipped_steps"] = float(host[-1]["skipped_steps"])
        if host[-1]["nonfinite_run"] >= stage.max_consecutive_nonfinite:
          raise NonFiniteError(
            f"stage {name}: {int(host[-1]['nonfinite_run'])} consecutive non-finite updates at "
            f"step {step} (limit config.stages.{name}.max_consecutive_nonfinite); stopped without "
            f"saving — the last good checkpoint in {ckpt.directory} is intact. Lower the learning "
            "rate or check the data."
          )
        now = time.time()
        steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        last_metrics.update(
          steps_per_s=steps_per_s, images_per_s=steps_per_s * stage.batch_size, **bad_totals
        )
        last_metrics.pop("nonfinite_run", None)
        writer.write_scalars(step, last_metrics)
        bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", refresh=False)
      bar.update(1)
      preempted = ckpt.should_stop_for_preemption(step)
      ckpt.save(step, state, data_iter=data_iter, config=run_config, force=preempted)
      if preempted:
        ckpt.wait()
        raise SystemExit(f"Preempted: checkpoint saved at step {step} in {ckpt.directory}")
      if stage.eval_every and step % stage.eval_every == 0 and step < stage.total_steps:
        evaluator.run(step, state["ema_params"], writer)
  finally:
    bar.close()

  # ---- 5. Final checkpoint, samples, summary ---------------------------------------------------
  if ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter=data_iter, config=run_config, force=True)
  ckpt.close()
  results = evaluator.run(step, state["ema_params"], writer) if stage.final_eval else {}
  writer.close()
  return {
    "step": step,
    "metrics": last_metrics,
    "evals": results,
    "stage_dir": stage_dir,
    "checkpoints": os.path.join(stage_dir, "checkpoints"),
    "prompts": list(evaluator.prompts),
  }


def evaluate_cascade(
  config: ml_collections.ConfigDict, workdir: str, final: dict, mesh: jax.sharding.Mesh
) -> dict:
  """Scores the whole cascade: the final stage's eval prompts through every stage in turn.

  The per-stage evals score an SR stage on low-res inputs rendered from the prompts, i.e. the
  stage alone; this is what a user of the cascade gets: each SR stage upsamples the previous
  stage's samples, with the EMA weights of the run's checkpoints and each stage's own sampler
  settings (``Cascade.from_workdir``, as ``sample.py`` loads them). Runs when
  ``config.evals.cascade`` is set and the cascade has more than one stage.

  Args:
    config: the run config.
    workdir: the run directory (every stage of ``config.stage_order`` has a checkpoint there).
    final: the final stage's :func:`train_stage` summary (its step, prompts and stage dir).
    mesh: the device mesh to sample on.

  Returns:
    The evaluators' scalars (``eval/...`` keys, written to the final stage's metrics as
    ``cascade/...``) and ``grid``, the path of the captioned sample grid; {} when disabled.
  """
  if not config.evals.cascade or len(config.stage_order) < 2 or not final["prompts"]:
    return {}
  evaluators = eval_registry.build_evaluators(config.evals, config.data.source)
  prompts = list(final["prompts"])
  log.info("Sampling %d eval prompts through the cascade %s", len(prompts), config.stage_order)
  cascade = Cascade.from_workdir(workdir, mesh=mesh, max_batch=len(prompts))
  images = cascade(prompts, seed=config.seed + 1, progress=False)[config.stage_order[-1]]
  results, pictures = eval_registry.run_evaluators(evaluators, images, prompts)
  writer = metrics.MetricWriter(final["stage_dir"])
  writer.write_scalars(
    final["step"], {"cascade/" + k.removeprefix("eval/"): v for k, v in results.items()}
  )
  paths = writer.write_images(final["step"], {f"cascade_{k}": v for k, v in pictures.items()})
  writer.close()
  results["grid"] = paths.get("cascade_samples", "")
  return results


def _check_batch_fits_mesh(stage: Any, mesh: jax.sharding.Mesh) -> None:
  """The global (micro-)batch must split evenly over the data-parallel devices."""
  shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  micro = stage.batch_size // stage.grad_accum
  if micro % shards:
    raise ValueError(
      f"config.stages.{stage.name}.batch_size={stage.batch_size} (grad_accum="
      f"{stage.grad_accum}: micro-batch {micro}) does not split over the {shards} data-parallel "
      f"devices of mesh {dict(mesh.shape)} (data × fsdp); use a multiple of {shards}, or change "
      "config.mesh"
    )


def _init_from_diffusers(path: str, program: Any, mesh: Any, rules: Any, where: str) -> Any:
  """The U-Net weights of a diffusers checkpoint, read into the stage's param shardings."""
  if not isinstance(program.model, IFStageModel):
    raise ValueError(
      f"{where}.init_from={path} is a diffusers (DeepFloyd IF) U-Net; set "
      f"{where}.model.family='if' to fine-tune it (see configs/if_stage1.py)"
    )
  cfg = program.model.config
  loaded = load_if_unet(path, mesh=mesh, rules=rules, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), program.abstract_state["params"])
  have = jax.tree.map(lambda a: (a.shape, a.dtype), loaded.params)
  if want != have:
    raise ValueError(f"{where}.init_from={path}: its U-Net does not match the stage's model")
  return loaded.params


def _init_from_path(path: str, stage_name: str) -> str:
  """A run workdir maps to its ``<stage>/checkpoints``; anything else is used as given."""
  candidate = os.path.join(path, stage_name, "checkpoints")
  return candidate if os.path.isdir(candidate) else path


class _StageEvaluator:
  """Samples the eval prompts with EMA params and runs ``config.evals.evaluators`` on them."""

  def __init__(self, config, stage, model, schedule, text, stage_dir, mesh, rules):
    self.stage, self.text, self.model = stage, text, model
    self.mesh, self.rules = mesh, rules
    self.settings = SamplerSettings.from_config(stage.sample)
    self.sampler = make_stage_sampler(
      model.apply,
      schedule,
      stage.objective,
      self.settings,
      learned_variance=model.learned_variance,
    )
    self.evaluators = eval_registry.build_evaluators(config.evals, config.data.source)
    default = list(config.evals.prompts) or data_lib.eval_prompts(config, stage.num_eval_samples)
    self.prompts = eval_registry.eval_prompts(self.evaluators, default)
    self.lowres = None
    if stage.lowres_size is not None:
      lowres = data_lib.eval_lowres(config, stage, self.prompts)
      self.lowres = np.asarray(model.prepare_lowres(lowres, stage.image_size))
    self.rng = jax.random.key(config.seed + 1)

  def run(self, step: int, ema_params: Any, writer: metrics.MetricWriter) -> dict:
    emb, mask = self.text.encode_prompts(self.prompts)
    null_emb, null_mask = self.text.null_condition(len(self.prompts))
    shape = (len(self.prompts), self.stage.image_size, self.stage.image_size, 3)
    # Host arrays for the per-call inputs: every process passes the same values (multi-host).
    x_T = np.asarray(jax.random.normal(self.rng, shape))
    with sharding.use_rules(self.mesh, self.rules):
      images = self.sampler(ema_params, self.rng, emb, mask, null_emb, null_mask, x_T, self.lowres)
    if images.is_fully_addressable:
      images = np.asarray(jax.device_get(images))
    else:
      images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    results, pictures = eval_registry.run_evaluators(self.evaluators, images, self.prompts)
    if results:
      writer.write_scalars(step, results)
    # "_ema": these come from the EMA weights (samples/samples_ema_<step>.png).
    paths = writer.write_images(step, {f"{k}_ema": v for k, v in pictures.items()})
    results["grid"] = paths.get("samples_ema", "")
    return results


def print_summary(workdir: str, summaries: dict[str, dict]) -> None:
  """Prints :func:`summary_text` on process 0 (the only one that prints)."""
  if jax.process_index() == 0:
    print(summary_text(workdir, summaries), flush=True)


def summary_text(
  workdir: str, summaries: dict[str, dict], *, sample_command: str = "python sample.py"
) -> str:
  """What a finished run reports: each stage's step, loss and files, the final stage's evals, and
  the command that samples from the run (with the first eval prompt).

  Args:
    workdir: the run directory.
    summaries: :func:`train_and_evaluate`'s result (stage name → summary), in training order.
    sample_command: how to invoke the sampler (``imagen-jax-sample`` when installed).

  Returns:
    The text, without a trailing newline.
  """
  lines = [f"\nTraining finished. Workdir: {workdir}"]
  for name, s in summaries.items():
    loss = s["metrics"].get("loss", float("nan"))
    align = s["evals"].get("eval/alignment")
    extra = f", alignment {align:.3f}" if align is not None else ""
    lines.append(f"  {name}: step {s['step']}, loss {loss:.4f}{extra}")
    lines.append(f"    checkpoints: {s['checkpoints']}")
    if s["evals"].get("grid"):
      lines.append(f"    sample grid: {s['evals']['grid']}")
  if summaries:
    name, last = list(summaries.items())[-1]
    reached = _final_scores(last["evals"])
    if reached:
      lines.append(f"Final stage {name}, step {last['step']}: {reached}")
    through = _final_scores(last.get("cascade_evals") or {})
    if through:
      lines.append(f"Final stage {name} through the whole cascade: {through}")
      if last["cascade_evals"].get("grid"):
        lines.append(f"    cascade sample grid: {last['cascade_evals']['grid']}")
  command = f"{sample_command} --workdir={shlex.quote(workdir)}"
  prompts = [s.get("prompts") for s in summaries.values() if s.get("prompts")]
  if prompts:
    command += f" --prompt={shlex.quote(prompts[-1][0])}"
  lines.append(f"Sample from it:  {command}")
  return "\n".join(lines)


_HEADLINES = {"single_object_alignment": "single-object alignment", "alignment": "alignment"}


def _final_scores(evals: dict[str, Any]) -> str | None:
  """A stage's final evals in one phrase: on ``shapes`` its single-object alignment (the demo's
  headline number; all-prompt alignment without single-object prompts), else every score."""
  for key, label in _HEADLINES.items():
    value = evals.get(f"eval/{key}")
    if value is not None and np.isfinite(value):
      chance = evals.get(f"eval/chance_{key}")
      vs = f" (chance {chance:.3f})" if chance is not None and np.isfinite(chance) else ""
      return f"{label} {value:.3f}{vs}"
  skip = ("eval/chance_", "eval/num_", "eval/unparsed")
  scores = {
    k.removeprefix("eval/"): v
    for k, v in evals.items()
    if k.startswith("eval/") and not k.startswith(skip) and isinstance(v, (int, float))
  }
  return ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())) or None
