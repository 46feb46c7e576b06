"""The train state and the one jitted, donated, sharded training step of a cascade stage.

The state is a plain pytree (checkpointed as-is by Orbax)::

  {"step": int32 [], "params": ..., "ema_params": ..., "opt_state": ...,
   "rng": uint32 [2] (raw key data), "nonfinite_run": int32 [], "skipped": int32 []}

One step: text dropout (the CFG null condition), noise-conditioning augmentation of the low-res
image (SR stages), t ~ U(0, 1) and z_t = α_t x + σ_t ε, the objective's loss, gradients averaged
over ``grad_accum`` micro-batches, a finite check (non-finite → the update is skipped and
counted), the optimizer update and the EMA update.

:func:`build_stage_program` is the one place that turns a stage config and a mesh into the model,
optimizer, state shardings and the compiled step: the trainer runs it and
``tools.compile_check`` lowers it, so both compile the same program by construction.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from imagen_jax import diffusion, sharding
from imagen_jax.stage import optim
from imagen_jax.stage.model import create_stage_model, stage_schedule

NUM_T_BUCKETS = 4  # per-t-bucket loss: t in [0, .25), [.25, .5), [.5, .75), [.75, 1]


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  """A fresh train state; EMA starts equal to the params."""
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "ema_params": jax.tree.map(jnp.copy, params),
    "opt_state": tx.init(params),
    "rng": jax.random.key_data(rng),
    "nonfinite_run": jnp.zeros((), jnp.int32),
    "skipped": jnp.zeros((), jnp.int32),
  }


def state_shardings(model: Any, tx: optax.GradientTransformation, mesh: Any, rules: Any) -> dict:
  """Shardings of the train state on ``mesh``: params and EMA by their logical axis names (FSDP /
  tensor), optimizer moments like their parameter, scalars replicated."""
  params = sharding.param_shardings(model.abstract_state, mesh, rules)
  replicated = sharding.replicated(mesh)
  return {
    "step": replicated,
    "params": params,
    "ema_params": params,
    "opt_state": sharding.optimizer_shardings(tx, model.abstract_params(), params, mesh),
    "rng": replicated,
    "nonfinite_run": replicated,
    "skipped": replicated,
  }


def abstract_state(model: Any, tx: optax.GradientTransformation, shardings: dict) -> dict:
  """The train state as ``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (no allocation).

  What :meth:`imagen_jax.checkpoint.Checkpointer.restore` reads into, and what
  ``tools.compile_check`` compiles against.
  """
  shapes = jax.eval_shape(lambda: init_state(model.init_params(), tx, jax.random.key(0)))
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def drop_text(
  rng: jax.Array,
  emb: jax.Array,
  mask: jax.Array,
  p: float,
  null_emb: jax.Array | None = None,
  null_mask: jax.Array | None = None,
):
  """Imagen §4.1: zero the text embeddings (and mask) of a fraction ``p`` of examples.

  Zeroed embeddings with an all-false mask are the same null condition the sampler uses for the
  unconditional branch of classifier-free guidance. ``null_emb`` ``[B, L, D]`` / ``null_mask``
  replace them by another null condition (DeepFloyd IF's: the empty prompt's T5 states).
  """
  drop = jax.random.bernoulli(rng, p, (emb.shape[0],))  # [B]
  if null_emb is not None:
    emb = jnp.where(drop[:, None, None], null_emb.astype(emb.dtype), emb)  # [B, L, D]
    return emb, jnp.where(drop[:, None], null_mask, mask)  # [B, L]
  emb = jnp.where(drop[:, None, None], 0.0, emb).astype(emb.dtype)  # [B, L, D]
  mask = jnp.logical_and(mask, ~drop[:, None])  # [B, L]
  return emb, mask


def make_loss_fn(
  apply_fn: Callable, stage: Any, schedule: Any, prepare_lowres: Callable | None = None
) -> Callable:
  """``loss_fn(params, batch, rng) -> (mean loss, aux)`` for one micro-batch.

  ``apply_fn(params, x_t, logsnr, text_emb, text_mask, lowres=None, aug_logsnr=None)`` is the
  U-Net's pure forward; ``prepare_lowres(lowres, size)`` turns an SR batch's low-res images into
  the U-Net's input before they are noise-augmented, as sampling does (DeepFloyd IF upscales
  them first; the model's ``prepare_lowres``).
  """
  is_sr = stage.lowres_size is not None

  def loss_fn(params, batch, rng):
    rng_drop, rng_aug, rng_t = jax.random.split(rng, 3)
    x0 = batch["image"]  # [B, H, W, C]
    emb, mask = drop_text(
      rng_drop,
      batch["text_emb"],
      batch["text_mask"],
      stage.text_drop_prob,
      batch.get("null_emb"),
      batch.get("null_mask"),
    )
    kwargs = {}
    if is_sr:
      b = x0.shape[0]
      # Imagen §2.4: a random aug level per example; the model is told the level.
      level = jax.random.uniform(rng_aug, (b,), maxval=stage.max_aug_level)
      lowres = batch["lowres"]  # [B, h, w, C]
      if stage.lowres_blur:  # CDM §4.2: blurred inputs, so the stage restores soft detail
        lowres = diffusion.blur_augment(jax.random.fold_in(rng_aug, 2), lowres, stage.lowres_blur)
      if prepare_lowres is not None:
        lowres = prepare_lowres(lowres, x0.shape[1])
      lowres, aug_logsnr = diffusion.noise_augment(
        jax.random.fold_in(rng_aug, 1), lowres, schedule, level
      )
      kwargs = {"lowres": lowres, "aug_logsnr": aug_logsnr}
    x_t, t, logsnr, eps = diffusion.sample_training_inputs(rng_t, x0, schedule)
    # A learned-variance U-Net (DeepFloyd IF) outputs [prediction, variance]: fine-tuning trains
    # the prediction (L_simple, as IF's diffusers fine-tuning does); the variance head is kept.
    pred = apply_fn(params, x_t, logsnr, emb, mask, **kwargs)[..., : x0.shape[-1]]
    per_example = diffusion.diffusion_loss(
      pred.astype(jnp.float32),
      x0,
      eps,
      logsnr,
      objective=stage.objective,
      min_snr_gamma=stage.min_snr_gamma or None,
    )  # [B]
    bucket = jnp.clip((t * NUM_T_BUCKETS).astype(jnp.int32), 0, NUM_T_BUCKETS - 1)  # [B]
    onehot = jax.nn.one_hot(bucket, NUM_T_BUCKETS)  # [B, K]
    aux = {"bucket_sum": per_example @ onehot, "bucket_count": onehot.sum(0)}
    return per_example.mean(), aux

  return loss_fn


def _split_micro(batch: dict, n: int) -> dict:
  """``[B, ...]`` → ``[n, B/n, ...]`` with micro-batch i = rows i, i+n, i+2n, ...

  The strided split keeps every micro-batch spread over all data-parallel devices (a contiguous
  split of a batch-sharded array would put each micro-batch on 1/n of them).
  """

  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)  # [n, B/n, ...]
    return sharding.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def make_train_step(
  apply_fn: Callable,
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  stage: Any,
  schedule: Any,
  prepare_lowres: Callable | None = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
  """Builds ``train_step(state, batch) -> (state, metrics)`` (pure; jit it with donation).
  ``prepare_lowres``: see :func:`make_loss_fn`."""
  loss_fn = make_loss_fn(apply_fn, stage, schedule, prepare_lowres)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n_micro = int(stage.grad_accum)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params = state["params"]
    if n_micro == 1:
      (loss, aux), grads = grad_fn(params, batch, rng)
    else:
      micro = _split_micro(batch, n_micro)

      def body(carry, inp):
        i, mb = inp
        (loss_i, a), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, a, g)), None

      zeros = (
        jnp.zeros(()),
        {"bucket_sum": jnp.zeros(NUM_T_BUCKETS), "bucket_count": jnp.zeros(NUM_T_BUCKETS)},
        jax.tree.map(jnp.zeros_like, params),
      )
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(n_micro), micro))
      loss = loss / n_micro
      grads = jax.tree.map(lambda g: g / n_micro, grads)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A non-finite loss or gradient skips the whole update (params, optimizer, EMA unchanged).
    # One conditional rather than a select per leaf: the same result, and several times fewer
    # ops for XLA to compile (a where per parameter, EMA and optimizer leaf adds up).
    def apply_update(_):
      updates, new_opt = tx.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
      decay = optim.ema_decay(state["step"], stage.ema_decay, stage.ema_warmup)
      new_ema = optim.ema_update(state["ema_params"], new_params, decay)
      return new_params, new_ema, new_opt, optax.tree.norm(updates)

    def skip_update(_):
      return params, state["ema_params"], state["opt_state"], jnp.zeros((), jnp.float32)

    new_params, new_ema, new_opt, update_norm = jax.lax.cond(
      finite, apply_update, skip_update, None
    )
    new_state = {
      "step": state["step"] + 1,
      "params": new_params,
      "ema_params": new_ema,
      "opt_state": new_opt,
      "rng": state["rng"],
      "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
      "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": update_norm,
      "lr": lr_schedule(state["step"]),
      "skipped_steps": new_state["skipped"],
      "nonfinite_run": new_state["nonfinite_run"],
    }
    # Per-t-bucket loss as sums and counts: the trainer pools them over its logging window, so a
    # bucket that no example of one step fell in does not turn the window's mean into NaN.
    metrics["loss_t_sum"] = aux["bucket_sum"]  # [NUM_T_BUCKETS]
    metrics["loss_t_count"] = aux["bucket_count"]  # [NUM_T_BUCKETS]
    return new_state, metrics

  return train_step


def stage_rng(seed: int, name: str) -> jax.Array:
  """The stage's training RNG: ``fold_in(key(seed), crc32(name))``.

  crc32, not ``hash()``: Python salts str hashes per process, which would break exact resume.
  """
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) % (2**31))


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """Everything compiled about training one stage on a mesh, built from shapes only.

  Attributes:
    model: the stage's U-Net (static half + pure ``apply``).
    schedule: its noise schedule.
    tx: the optimizer; ``lr_schedule(step)`` its learning rate.
    shardings: of the train state (params / EMA by logical axis names, moments like their
      parameter, scalars replicated).
    abstract_state: the train state as ``jax.ShapeDtypeStruct`` with those shardings: what a
      checkpoint is restored into and what ``tools.compile_check`` compiles against.
    train_step: jitted ``(state, batch) -> (state, metrics)``, the state donated; the batch is
      split over ``data`` × ``fsdp`` (:func:`imagen_jax.sharding.batch_sharding`).
  """

  model: Any  # StageModel, or IFStageModel for a DeepFloyd IF stage
  schedule: diffusion.Schedule
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  shardings: dict
  abstract_state: dict
  train_step: Callable[[dict, dict], tuple[dict, dict]]
  rng: jax.Array

  def initial_state(self, params: Any = None) -> dict:
    """A fresh train state in its shardings: random params, or ``params`` (e.g. ``init_from``)."""
    if params is None:
      params = jax.jit(self.model.init_params, out_shardings=self.shardings["params"])()
    init = jax.jit(lambda p: init_state(p, self.tx, self.rng), out_shardings=self.shardings)
    return init(params)


def build_stage_program(
  stage: Any, *, text_dim: int, seed: int, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> StageProgram:
  """Model, optimizer, state shardings and the jitted sharded train step of ``stage`` on ``mesh``.

  Args:
    stage: ``config.stages.<name>``.
    text_dim: width of the text embeddings (the encoder's ``d_model``).
    seed: the run's ``config.seed`` (model init and the stage RNG).
    mesh: the device mesh (:func:`imagen_jax.sharding.make_mesh`).
    rules: logical axis rules (``config.logical_rules``).
  """
  model = create_stage_model(stage, text_dim=text_dim, seed=seed)
  schedule = stage_schedule(stage)
  tx, lr_schedule = optim.make_optimizer(stage.optimizer, stage.total_steps)
  shardings = state_shardings(model, tx, mesh, rules)
  step_fn = make_train_step(model.apply, tx, lr_schedule, stage, schedule, model.prepare_lowres)

  def sharded_step(state, batch):
    with sharding.use_rules(mesh, rules):  # activates constrain() while tracing
      return step_fn(state, batch)

  train_step = jax.jit(
    sharded_step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0
  )
  return StageProgram(
    model=model,
    schedule=schedule,
    tx=tx,
    lr_schedule=lr_schedule,
    shardings=shardings,
    abstract_state=abstract_state(model, tx, shardings),
    train_step=train_step,
    rng=stage_rng(seed, stage.name),
  )
