"""Optimizers, learning-rate schedules and the EMA of parameters, built from a stage config.

Paper recipes (Imagen App. F): Adafactor ("default optax.adafactor parameters") for the base model,
Adam (b1 0.9, b2 0.999, eps 1e-8) for the super-resolution models; lr 1e-4 with 10k linear warmup
then cosine decay. Appendix F's ``end_value=2500000`` is a typo; we decay to ``end_lr`` (default 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "adafactor")
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup_steps``, then cosine or constant.

  Args:
    cfg: optimizer config with ``lr``, ``warmup_steps``, ``schedule`` and ``end_lr``.
    total_steps: optimizer updates in the run (the cosine spans warmup + decay, as in optax).
  """
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; choose one of {SCHEDULES}")
  if cfg.lr <= 0:
    raise ValueError(f"optimizer.lr must be > 0, got {cfg.lr}")
  warmup = int(min(cfg.warmup_steps, max(total_steps - 1, 0)))
  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(cfg.lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.get("end_lr", 0.0),
  )


def make_optimizer(
  cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping followed by Adam / AdamW / Adafactor with the lr schedule.

  Returns:
    ``(tx, schedule)``; ``schedule(step)`` is logged as ``lr``.
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={cfg.name!r}; choose one of {OPTIMIZERS}")
  schedule = learning_rate_schedule(cfg, total_steps)
  if cfg.name == "adam":
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(opt)
  return optax.chain(*parts), schedule


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay at ``step``: ``min(decay, (1 + step) / (10 + step))`` with warmup, else ``decay``.

  The warmup keeps early EMA weights from being dominated by the random initialisation.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """``ema ← decay · ema + (1 − decay) · params``, leaf-wise in the EMA's dtype."""
  return jax.tree.map(
    lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(
      e.dtype
    ),
    ema,
    params,
  )
