"""The cascade pipeline: text → 64² → 256² → 1024² (any number of stages), usable from Python.

  cascade = Cascade.from_workdir("runs/shapes")            # EMA weights of every trained stage
  out = cascade(["a small red circle at the top left"], seed=0)
  out["base"], out["sr"]                                    # [N, H, W, 3] float in [-1, 1]

  # Stages trained as separate runs (one workdir each), chained in the given order:
  cascade = Cascade.from_workdir(["runs/base64", "runs/sr256", "runs/sr1024"])

  # Weights sharded like training (FSDP over 4 devices, batch over 2 × 4): a 2B base + T5-XXL on
  # devices that cannot each hold a full copy.
  cascade = Cascade.from_workdir("runs/base64", mesh={"data": 2, "fsdp": 4})

Each stage's whole sampling loop is one jitted program. Prompts are tokenized to a fixed length and
batches are padded to power-of-two buckets (and to a multiple of the data-parallel devices), so new
prompts (or a different number of them within a bucket) never recompile. Everything runs on one
device mesh (:func:`imagen_jax.sharding.make_mesh`, the same axes and logical rules as training):
by default ``data`` over all devices with the weights replicated; with ``fsdp`` / ``tensor`` axes
the stage weights and the T5 are sharded, restored from their checkpoints straight into those
shardings. The same prompts and seed give the same images on any mesh (up to float reduction
order), and in a multi-process run (``jax.distributed``) every process gets all the images.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from imagen_jax import config as config_lib
from imagen_jax import diffusion, metrics, sharding
from imagen_jax.checkpoint import restore_params_with_step
from imagen_jax.sample.batching import MeshSpec, as_mesh, batch_size, chunk_rng, to_host
from imagen_jax.sample.deepfloyd import IF_NULL_PROMPT, load_if_stages
from imagen_jax.sample.runs import Workdirs, check_chain, load_run_configs
from imagen_jax.sample.stage import SamplerSettings, make_stage_sampler
from imagen_jax.sample.stages import CascadeStage, StageInputs
from imagen_jax.stage.model import create_stage_model
from imagen_jax.stage.text_cond import build_text_embedder

OUTPUT_TYPES = ("np", "pil")


class Cascade:
  """Samples a chain of stages; each SR stage is conditioned on the previous stage's output.

  Args:
    stages: the stages in order (base first). Resolutions must chain: a stage's ``lowres_size``
      equals the previous stage's ``image_size``.
    text: a ``TextEmbedder`` (``encode_prompts(prompts) -> (emb, mask)``).
    max_batch: largest batch per compiled call; larger requests run in chunks.
    mesh: the device mesh to sample on, or its axis sizes (``{"data": 2, "fsdp": 4}``, -1 =
      the rest); default ``data`` over all devices (weights replicated, batch split).
    rules: logical axis rules for the weights (default :data:`imagen_jax.sharding.DEFAULT_RULES`;
      a run's ``config.logical_rules`` in :meth:`from_workdir`).
    null_prompt: the unconditional branch's prompt when no negative prompts are given
      (DeepFloyd IF: ``""``); None = the null condition (zero embeddings, all-false mask) the
      project's U-Nets are trained with.

  Stage params are placed on ``mesh`` by their logical axis names (a no-op when they were restored
  into those shardings, as :meth:`from_workdir` does).
  """

  def __init__(
    self,
    stages: Sequence[CascadeStage],
    text: Any,
    *,
    max_batch: int = 16,
    mesh: MeshSpec = None,
    rules: sharding.Rules | None = None,
    null_prompt: str | None = None,
  ):
    if not stages:
      raise ValueError("Cascade needs at least one stage")
    if int(max_batch) < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    check_chain([(s.name, s.image_size, s.lowres_size) for s in stages])
    self.mesh = as_mesh(mesh)
    self.rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
    self.stages = [
      dataclasses.replace(s, params=jax.device_put(s.params, self.param_shardings(s)))
      for s in stages
    ]
    self.text = text
    self.null_prompt = null_prompt
    self.max_batch = int(max_batch)
    # Every compiled batch splits evenly over the data-parallel devices (data × fsdp).
    self.batch_shards = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
    self._samplers: dict[tuple, Callable] = {}
    self._progress: dict[str, Any] = {"callback": None, "stage": None}

  def param_shardings(self, stage: CascadeStage) -> Any:
    """Where ``stage``'s params live on this cascade's mesh (by their logical axis names)."""
    return sharding.param_shardings(stage.model.abstract_state, self.mesh, self.rules)

  # ---- construction -------------------------------------------------------------------------

  @classmethod
  def from_workdir(
    cls,
    workdir: Workdirs,
    *,
    stages: Sequence[str] | None = None,
    use_ema: bool = True,
    settings: dict[str, dict] | None = None,
    max_batch: int = 16,
    mesh: MeshSpec = None,
  ) -> Cascade:
    """Loads the latest checkpoint of every stage (EMA weights by default) of training runs.

    Args:
      workdir: the ``--workdir`` of ``train.py``, or several (e.g. ``["runs/base64",
        "runs/sr256", "runs/sr1024"]``, one run per stage): their stages, each run's
        ``stage_order`` in turn, form the cascade. See :func:`load_run_configs` for the checks;
        the text encoder is the first run's.
      stages: which stages, by name (default: all of them, in order).
      use_ema: EMA params (default) or raw params.
      settings: per-stage overrides of the runs' ``sample`` settings, e.g.
        ``{"sr": {"steps": 50, "guidance": 7.0}}``.
      max_batch: largest batch per compiled call.
      mesh: the mesh to sample on, or its axis sizes (see :class:`Cascade`); the weights and the
        text encoder are read straight into their shardings on it, with the first run's
        ``config.logical_rules``.

    Raises:
      ValueError: inconsistent runs, unknown stages, or stages that do not chain (checked before
        any checkpoint or text encoder is loaded).
      FileNotFoundError: a workdir without ``config.json`` or a stage without a checkpoint.
    """
    runs = load_run_configs(workdir)
    owner = {name: (d, config) for d, config in runs for name in config.stage_order}
    names = list(stages or owner)
    unknown = [n for n in names if n not in owner]
    if unknown:
      where = f"the run {runs[0][0]}" if len(runs) == 1 else f"the runs {[d for d, _ in runs]}"
      raise ValueError(f"stages {unknown} not in {where} (stages: {list(owner)})")
    settings = settings or {}
    for key in settings:
      if key not in names:
        raise ValueError(f"settings for unknown stage {key!r}; stages: {names}")
    check_chain(
      [(n, int(owner[n][1].stages[n].image_size), owner[n][1].stages[n].lowres_size) for n in names]
    )
    mesh = as_mesh(mesh)
    rules = config_lib.logical_rules(runs[0][1])
    text = build_text_embedder(runs[0][1], runs[0][0], shardings=(mesh, rules))
    out = []
    for name in names:
      run_dir, config = owner[name]
      stage = config.stages[name]
      ckdir = os.path.join(run_dir, name, "checkpoints")
      model = create_stage_model(stage, text_dim=text.d_model, seed=config.seed)
      shardings = sharding.param_shardings(model.abstract_state, mesh, rules)
      abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        model.abstract_params(),
        shardings,
      )
      try:
        params, step = restore_params_with_step(
          ckdir, abstract, key="ema_params" if use_ema else "params"
        )
      except FileNotFoundError:
        raise FileNotFoundError(
          f"stage {name!r}: no checkpoint in {ckdir}; train it first (python train.py "
          f"--workdir={run_dir} --config.train_stages={name})"
        ) from None
      out.append(
        CascadeStage.from_stage_config(
          stage,
          model,
          params,
          settings=settings.get(name),
          name=name,
          checkpoint_step=step,
          workdir=run_dir,
        )
      )
    null = None if text.zero_padding else IF_NULL_PROMPT  # IF's null: the empty prompt
    return cls(out, text, max_batch=max_batch, mesh=mesh, rules=rules, null_prompt=null)

  @classmethod
  def from_diffusers(
    cls,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    t5: str | os.PathLike | None = None,
    settings: dict[str, dict] | None = None,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    max_batch: int = 16,
    mesh: MeshSpec = None,
  ) -> Cascade:
    """DeepFloyd IF stages from diffusers pipeline directories (or Hub ids), base first.

    E.g. ``Cascade.from_diffusers(["/ckpt/IF-I-XL-v1.0", "/ckpt/IF-II-L-v1.0"])``. Stages are
    named by their directory; each gets IF's sampling defaults (see
    :mod:`imagen_jax.sample.deepfloyd`), T5 comes from ``t5`` or the first directory's
    ``text_encoder/`` + ``tokenizer/``, and the unconditional branch is the empty prompt.

    Args:
      paths: the stages' pipeline directories, base first.
      t5: a T5 checkpoint (with its tokenizer) instead of the first stage's ``text_encoder/``.
      settings: per-stage overrides of the sampler settings, by stage name.
      variant: weight-file variant (``"fp16"``).
      dtype: compute dtype of the U-Nets and T5 (``jnp.bfloat16`` on accelerators).
      max_batch: largest batch per compiled call.
      mesh: the mesh to sample on (see :class:`Cascade`); weights are read straight into their
        shardings on it.
    """
    mesh = as_mesh(mesh)
    stages, text = load_if_stages(
      paths, t5=t5, settings=settings, variant=variant, dtype=dtype, mesh=mesh
    )
    return cls(
      [CascadeStage(**fields) for fields in stages],
      text,
      max_batch=max_batch,
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      null_prompt=IF_NULL_PROMPT,
    )

  # ---- sampling -----------------------------------------------------------------------------

  def __call__(
    self,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    negative_prompts: Sequence[str] | None = None,
    settings: dict[str, dict] | None = None,
    start_stage: str | None = None,
    init_image: np.ndarray | None = None,
    strength: float | None = None,
    progress: bool = True,
    callback: Callable[[str, int, np.ndarray], None] | None = None,
    output_type: str = "np",
  ) -> dict[str, np.ndarray] | dict[str, list[Image.Image]]:
    """Generates images for ``prompts`` through the stages (see :meth:`generate` for the args)."""
    images, _ = self.generate(
      prompts,
      seed=seed,
      negative_prompts=negative_prompts,
      settings=settings,
      start_stage=start_stage,
      init_image=init_image,
      strength=strength,
      progress=progress,
      callback=callback,
      output_type=output_type,
    )
    return images

  def generate(
    self,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    negative_prompts: Sequence[str] | None = None,
    settings: dict[str, dict] | None = None,
    start_stage: str | None = None,
    init_image: np.ndarray | None = None,
    strength: float | None = None,
    progress: bool = True,
    callback: Callable[[str, int, np.ndarray], None] | None = None,
    output_type: str = "np",
    control: Any = None,
    inputs: Mapping[str, StageInputs] | None = None,
    embeddings: tuple[np.ndarray, np.ndarray] | None = None,
    guide: Any = None,
  ) -> tuple[dict[str, np.ndarray] | dict[str, list[Image.Image]], dict[str, Any]]:
    """Generates images for ``prompts`` through the stages, optionally steered by ``control``.

    Args:
      prompts: N prompts (``""`` = unconditional).
      seed: same seed and settings → identical images.
      negative_prompts: N prompts for the unconditional branch of guidance (default: the null
        condition, zero embeddings with an all-false mask).
      settings: per-stage overrides of the sampler settings for this call.
      start_stage: begin at this stage (earlier stages are skipped); needs ``init_image``.
      init_image: ``[N, h, w, 3]`` in [-1, 1]. Upscale-only: the low-res input of ``start_stage``
        (h = its ``lowres_size``). With ``strength``: img2img, the image to start
        ``start_stage`` from (h = its ``image_size``).
      strength: img2img strength in (0, 1]: the image is noised to t = strength and denoised.
      progress: a tqdm bar per stage, advancing per chunk of ``max_batch`` images.
      callback: ``callback(stage, step, x0_pred [N, H, W, 3])`` at every step.
      output_type: ``"np"`` (arrays) or ``"pil"`` (lists of ``PIL.Image``, see :func:`to_pil`).
      control: steers every stage's sampling (e.g. a prompt-to-prompt
        :class:`imagen_jax.edit.EditPlan`): ``control.for_stage(stage, settings, batch) ->
        (static control, data)``, see :func:`make_stage_sampler`. All N prompts then run as one
        batch (N ≤ ``max_batch``) from one shared noise (image 0's).
      inputs: stage name → :class:`StageInputs` (a starting latent, inpainting's known image and
        mask, per-step null conditions), as the editing operations of :mod:`imagen_jax.edit`
        use them.
      embeddings: ``(emb [N, L, D], mask [N, L])`` to condition on instead of encoding
        ``prompts`` (interpolated or shifted text embeddings); ``prompts`` then only label rows.
      guide: classifier guidance for some stages, e.g. a
        :class:`~imagen_jax.sample.clip_guidance.ClipGuidance`: ``guide.for_stage(name, index,
        prompts) -> (static, {"rows": per-prompt arrays, "shared": arrays})`` or ``(None, None)``.

    Returns:
      ``(images, states)``: stage name → images ``[N, H, W, 3]`` float32 in [-1, 1] (or N PIL
      images), for every stage run; stage name → the control's final state (host arrays, rows
      cut to N; empty without ``control``). In a multi-process run every process returns all.
    """
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
    prompts = [p if isinstance(p, str) else bytes(p).decode("utf-8", "replace") for p in prompts]
    n = len(prompts)
    if n == 0:
      raise ValueError("prompts is empty")
    if negative_prompts is not None and len(negative_prompts) != n:
      raise ValueError(f"negative_prompts has {len(negative_prompts)} entries for {n} prompts")
    unknown = sorted(set(settings or {}) - {s.name for s in self.stages})
    if unknown:
      raise ValueError(
        f"settings for unknown stages {unknown}; stages: {[s.name for s in self.stages]}"
      )
    if control is not None and n > self.max_batch:
      raise ValueError(
        f"a controlled (edit) batch runs in one piece: {n} prompts exceed max_batch="
        f"{self.max_batch}; raise max_batch or edit fewer prompts at once"
      )
    stages, lowres, img2img = self._plan(n, start_stage, init_image, strength)
    if guide is not None:
      guide.check_stages([s.name for s in self.stages])
    per_stage = {s.name: self._settings(s, (settings or {}).get(s.name)) for s in stages}
    inputs = dict(inputs or {})
    self._check_inputs(inputs, {s.name: s for s in stages}, per_stage, n)
    # Embeddings come back to the host once (every process holds the same values), then each
    # chunk is placed batch-sharded on the mesh.
    if embeddings is None:
      emb, mask = map(to_host, self.text.encode_prompts(prompts))
    else:
      emb, mask = (np.asarray(a) for a in embeddings)
      if emb.ndim != 3 or emb.shape[0] != n or mask.shape != emb.shape[:2]:
        raise ValueError(
          f"embeddings must be (emb [{n}, L, D], mask [{n}, L]), got {emb.shape}, {mask.shape}"
        )
    if negative_prompts is None and self.null_prompt is not None:
      negative_prompts = [self.null_prompt] * n
    if negative_prompts is None:
      null_emb, null_mask = np.zeros_like(emb), np.zeros_like(mask)
    else:
      null_emb, null_mask = map(to_host, self.text.encode_prompts(list(negative_prompts)))
    key = jax.random.key(seed)
    out: dict[str, np.ndarray] = {}
    states: dict[str, Any] = {}
    first = len(self.stages) - len(stages)
    for si, stage in enumerate(stages, start=first):  # si: the stage's place in the cascade
      cfg = per_stage[stage.name]
      start = img2img if (si == first and img2img is not None) else None
      guided = guide.for_stage(stage.name, si, prompts) if guide is not None else (None, None)
      if guided[0] is not None:  # shared arrays (the CLIP weights) go to the mesh once per stage
        put = lambda a: self._put(np.asarray(a), sharding.replicated(self.mesh))
        guided = (guided[0], {**guided[1], "shared": jax.tree.map(put, guided[1]["shared"])})
      images = []
      # The bar advances per chunk of images, not per step: a per-step host callback would sync
      # the device with the host at every step, and JAX does not persist programs that hold one
      # in the compilation cache (sample.py would recompile its sampler on every run).
      bar = tqdm(total=n, desc=f"sample {stage.name}", unit="img", disable=not progress)
      self._progress.update(callback=callback, stage=stage.name)
      try:
        for lo in range(0, n, self.max_batch):
          hi = min(n, lo + self.max_batch)
          x0, state = self._run_chunk(
            stage,
            cfg,
            key,
            si,
            lo,
            hi,
            (emb, mask, null_emb, null_mask),
            lowres,
            start,
            control,
            inputs.get(stage.name),
            guided,
          )
          images.append(x0)
          bar.update(hi - lo)
          if state is not None:
            states[stage.name] = state
      finally:
        bar.close()
        self._progress.update(callback=None)
      lowres = np.concatenate(images)
      out[stage.name] = lowres
    if output_type == "pil":
      return {name: to_pil(images) for name, images in out.items()}, states
    return out, states

  def _check_inputs(self, inputs, stages, per_stage, n):
    for name, given in inputs.items():
      if name not in stages:
        raise ValueError(f"inputs for stage {name!r}, which does not run; running: {list(stages)}")
      size = stages[name].image_size
      if given.latent is not None:
        _check_image(np.asarray(given.latent), n, size, f"inputs[{name!r}].latent")
      if (given.known is None) != (given.mask is None):
        raise ValueError(f"inputs[{name!r}]: inpainting needs both known and mask")
      if given.known is not None:
        _check_image(np.asarray(given.known), n, size, f"inputs[{name!r}].known")
        if np.shape(given.mask) != (n, size, size):
          raise ValueError(
            f"inputs[{name!r}].mask must be [{n}, {size}, {size}] (True = generate), got "
            f"{np.shape(given.mask)}"
          )
      if given.null_emb is not None:
        steps = per_stage[name].steps
        if np.ndim(given.null_emb) != 4 or np.shape(given.null_emb)[:2] != (steps, n):
          raise ValueError(
            f"inputs[{name!r}].null_emb must be [steps={steps}, {n}, L, D], got "
            f"{np.shape(given.null_emb)} (per-step null conditions are tied to the steps)"
          )

  def _plan(self, n, start_stage, init_image, strength):
    names = [s.name for s in self.stages]
    if start_stage is not None and start_stage not in names:
      raise ValueError(f"start_stage={start_stage!r}; stages are {names}")
    first = names.index(start_stage) if start_stage else 0
    stages = self.stages[first:]
    s0 = stages[0]
    if strength is not None and not 0.0 < strength <= 1.0:
      raise ValueError(f"strength must be in (0, 1], got {strength}")
    if init_image is None:
      if strength is not None or s0.lowres_size is not None:
        raise ValueError(
          f"stage {s0.name!r} needs init_image (its {s0.lowres_size or s0.image_size}² input)"
        )
      return stages, None, None
    init = np.asarray(init_image, np.float32)
    if strength is None:  # upscale-only: init is the low-res input of the first stage
      want = s0.lowres_size
      if want is None:
        raise ValueError(f"stage {s0.name!r} is not super-resolution: pass strength= for img2img")
      _check_image(init, n, want, "init_image (upscale-only)")
      return stages, init, None
    _check_image(init, n, s0.image_size, "init_image (img2img)")
    lowres = None
    if s0.lowres_size is not None:
      lowres = resize(init, s0.lowres_size)
    return stages, lowres, (init, float(strength))

  def _settings(self, stage: CascadeStage, overrides: dict | None) -> SamplerSettings:
    if not overrides:
      return stage.settings
    return dataclasses.replace(stage.settings, **overrides)  # validated in __post_init__

  def _sampler(
    self, stage: CascadeStage, cfg: SamplerSettings, report: str | None, control: Any, guide: Any
  ) -> Callable:
    """The jitted sampler; ``report``: None (no host callback) or "x0" (the user's callback)."""
    key = (stage.name, cfg, report, control, guide)
    if key not in self._samplers:
      # Without a callback no per-step host callback is compiled in: on accelerators it would
      # sync the device with the host at every step.
      self._samplers[key] = make_stage_sampler(
        stage.model.apply,
        stage.schedule,
        stage.pred_type,
        cfg,
        progress_fn=self._on_step if report else None,
        progress_x0=report == "x0",
        control=control,
        guide=guide,
        learned_variance=stage.learned_variance,
      )
    return self._samplers[key]

  def _on_step(self, step, x0):
    cb = self._progress["callback"]
    if cb is not None and x0 is not None:
      cb(self._progress["stage"], int(step), np.asarray(x0))

  def _run_chunk(self, stage, cfg, key, si, lo, hi, text, lowres, start, control, given, guided):
    emb, mask, null_emb, null_mask = text
    given = given or StageInputs()
    m = hi - lo
    bucket = batch_size(m, self.max_batch, self.batch_shards)

    def pad(x, axis=0):  # host [m, ...] → [bucket, ...], repeating the last row
      x = np.take(np.asarray(x), np.arange(lo, hi), axis=axis)
      last = np.take(x, [-1], axis=axis)
      return np.concatenate([x, np.repeat(last, bucket - m, axis=axis)], axis) if bucket > m else x

    shape = (stage.image_size, stage.image_size, 3)
    # Per-image noise from (seed, image index): an image depends neither on its batch-mates nor
    # on the mesh. Drawn on the host side, identically in every process.
    rows = jnp.arange(lo, lo + bucket)
    if control is not None:  # edits start from the source's noise (image 0's)
      rows = jnp.zeros_like(rows)
    x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(rows)
    if cfg.noise_scale != 1.0:
      x_T = x_T * cfg.noise_scale
    if given.latent is not None:
      x_T = jnp.asarray(pad(given.latent), jnp.float32)
    t_start = 1.0
    if start is not None:
      init, t_start = start
      logsnr = stage.schedule(jnp.full((bucket,), t_start))
      x_T = diffusion.q_sample(jnp.asarray(pad(init)), logsnr, x_T)
    if given.null_emb is not None:
      null_emb, null_mask, null_axis = given.null_emb, given.null_mask, 1
    else:
      null_axis = 0
    args = [pad(emb), pad(mask), pad(null_emb, null_axis), pad(null_mask), np.asarray(x_T)]
    if lowres is not None:
      args.append(pad(stage.model.prepare_lowres(lowres, stage.image_size)))
    args = [
      self._put(a, sharding.batch_sharding(self.mesh, a.ndim))
      if i != 2 or null_axis == 0
      else self._put(a, sharding.replicated(self.mesh))
      for i, a in enumerate(args)
    ]
    if lowres is None:
      args.append(None)
    inpaint = {}
    if given.known is not None:
      known, where = pad(np.asarray(given.known, np.float32)), pad(np.asarray(given.mask, bool))
      inpaint = {
        "known": self._put(known, sharding.batch_sharding(self.mesh, 4)),
        "mask": self._put(where, sharding.batch_sharding(self.mesh, 3)),
      }
    if given.aug_eps is not None and lowres is not None:
      eps = pad(np.asarray(given.aug_eps, np.float32))
      inpaint["aug_eps"] = self._put(eps, sharding.batch_sharding(self.mesh, 4))
    if guided[0] is not None:  # this chunk's rows of the guide's per-prompt arrays
      rows = {
        k: self._put(pad(v), sharding.batch_sharding(self.mesh, v.ndim))
        for k, v in guided[1]["rows"].items()
      }
      inpaint["guide_data"] = {**guided[1]["shared"], **rows}
    report = "x0" if self._progress["callback"] is not None else None
    static, data = None, None
    if control is not None:
      static, data = control.for_stage(stage, cfg, bucket)
      data = jax.tree.map(lambda a: self._put(np.asarray(a), sharding.replicated(self.mesh)), data)
    sampler = self._sampler(stage, cfg, report, static, guided[0])
    rng = self._put(chunk_rng(key, si, lo), sharding.replicated(self.mesh))
    with sharding.use_rules(self.mesh, self.rules):  # activations constrained while tracing
      if static is None:
        return to_host(sampler(stage.params, rng, *args, t_start=t_start, **inpaint))[:m], None
      x0, state = sampler(stage.params, rng, *args, control_data=data, t_start=t_start, **inpaint)
    state = jax.tree.map(lambda a: to_host(a)[:m] if np.ndim(a) else to_host(a), state)
    return to_host(x0)[:m], state

  def _put(self, x: np.ndarray, where: jax.sharding.NamedSharding) -> jax.Array:
    """A host array (the same in every process) as a global array on the mesh."""
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """``[N, h, w, 3]`` → ``[N, size, size, 3]`` (antialiased linear; identity at the same size)."""
  images = np.asarray(images, np.float32)
  if images.shape[1:3] == (size, size):
    return images
  n = images.shape[0]
  return np.asarray(jax.image.resize(images, (n, size, size, 3), "linear", antialias=True))


def to_pil(images: np.ndarray) -> list[Image.Image]:
  """``[N, H, W, 3]`` float images in [-1, 1] (a :class:`Cascade` output) → N ``PIL.Image``."""
  return [Image.fromarray(x) for x in metrics.to_uint8(images)]


def _check_image(x: np.ndarray, n: int, size: int, what: str) -> None:
  if x.shape != (n, size, size, 3):
    raise ValueError(f"{what} must be [{n}, {size}, {size}, 3] in [-1, 1], got {x.shape}")
