"""The one checkpoint module: Orbax ``CheckpointManager``, async saves, policies, strict restore.

A checkpoint step holds three items:

* ``state``  — the train state pytree (params, EMA params, optimizer state, step, RNG), restored
  straight into the target shardings (no gather on one host);
* ``data``   — the Grain data-iterator state, so a resumed run continues at the exact next example;
* ``config`` — the run's config as JSON (for humans and for ``tools.inspect_checkpoint``).

Writes are atomic (Orbax writes to a temporary directory and renames it when complete), so a process
killed mid-save leaves the previous checkpoint as the latest *complete* one.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the structure or shapes the config expects."""


def _keystr(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_keystr(p): (tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for p, x in leaves}


def check_matches(saved: Any, target: Any, *, what: str) -> None:
  """Raises ``CheckpointMismatchError`` listing missing, unexpected and misshapen leaves.

  Args:
    saved: pytree of the checkpoint's array metadata (anything with ``.shape``).
    target: the abstract pytree the config builds (``jax.ShapeDtypeStruct`` leaves).
    what: a name for the message (e.g. the checkpoint path).
  """
  have, want = _leaf_shapes(saved), _leaf_shapes(target)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shape = sorted(
    f"{k}: checkpoint {have[k][0]} vs config {want[k][0]}"
    for k in set(have) & set(want)
    if have[k][0] != want[k][0]
  )
  if not (missing or extra or shape):
    return

  def fmt(title, items):
    if not items:
      return ""
    more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

  raise CheckpointMismatchError(
    f"Checkpoint {what} does not match the model/optimizer built from the config; nothing was "
    "restored."
    + fmt("missing from checkpoint", missing)
    + fmt("unexpected in checkpoint", extra)
    + fmt("shape mismatch", shape)
    + "\n  Fix: use the config the checkpoint was trained with (its config.json is saved beside "
    "it), or start a fresh --workdir; to fine-tune from other weights use --config.init_from."
  )


def saved_state_metadata(step_dir: str) -> Any:
  """The pytree of array metadata (shape, dtype) of a step's saved ``state`` item."""
  import os

  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


class _SigtermFlag:
  """Turns SIGTERM (preemption notice on most clusters) into a flag the train loop polls."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving a checkpoint at the next step, then exiting.")
    self.event.set()

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Checkpointer:
  """Orbax checkpoints for one training stage.

  Args:
    directory: where step directories are written (created if missing).
    save_every: save every this many steps (``FixedIntervalPolicy``).
    keep: keep the latest ``keep`` checkpoints (``LatestN``).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    save_policies = [policies.FixedIntervalPolicy(save_every)]
    if jax.process_count() > 1:
      # Cluster preemption notices go through JAX's multi-host sync manager.
      save_policies.insert(0, policies.PreemptionCheckpointingPolicy())
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(save_policies),
      preservation_policy=policies.LatestN(keep),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.directory = str(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._sigterm = _SigtermFlag()

  @property
  def preempted(self) -> bool:
    """True once SIGTERM arrived; the caller should save (``force=True``) and stop."""
    return self._sigterm.event.is_set()

  def should_stop_for_preemption(self, step: int) -> bool:
    """SIGTERM arrived, or (multi-host) JAX's preemption sync point was reached at ``step``."""
    return self.preempted or self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    """The latest *complete* checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_iter: Any = None,
    config: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Saves if the policy says so (or ``force``); returns whether a save was started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain

      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(dict(config))
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter: Any = None) -> Any:
    """Restores ``state`` (and the data iterator in place) strictly into ``abstract_state``.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set: the arrays are
        read straight into these shardings.
      step: which step (default: latest).
      data_iter: a Grain iterator whose position is restored in place.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointMismatchError: missing, unexpected or misshapen leaves (nothing restored).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}")
    import os

    saved_tree = saved_state_metadata(os.path.join(self.directory, str(step)))
    check_matches(saved_tree, abstract_state, what=f"{self.directory} step {step}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      import grain

      if "data" not in self._item_names(step):
        raise CheckpointMismatchError(
          f"Checkpoint {self.directory} step {step} has no data-iterator state; cannot resume the "
          "input pipeline exactly."
        )
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_config(self, step: int | None = None) -> dict | None:
    """The JSON config saved with a step, or None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None or "config" not in self._item_names(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def _item_names(self, step: int) -> set[str]:
    import os

    path = os.path.join(self.directory, str(step))
    return set(os.listdir(path)) if os.path.isdir(path) else set()

  def wait(self) -> None:
    """Blocks until any in-flight async save has committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    self._sigterm.restore()


def restore_params(path: str, abstract_params: Any, *, key: str = "ema_params") -> Any:
  """Loads only the params (EMA by default) of a checkpoint, strictly, e.g. for ``init_from``.

  Args:
    path: a stage checkpoint directory (latest step used) or one step directory.
    abstract_params: pytree of ``jax.ShapeDtypeStruct`` (with shardings) to restore into.
    key: which entry of the saved state to read (``"ema_params"`` or ``"params"``).
  """
  import os

  path = os.path.abspath(path)
  step_dir = path
  if not os.path.isdir(os.path.join(path, "state")):
    steps = ocp.utils.checkpoint_steps(path) if os.path.isdir(path) else []
    if not steps:
      raise FileNotFoundError(
        f"No checkpoint found at {path}: expected a stage checkpoint directory (with numbered "
        "step directories) or one step directory containing 'state/'."
      )
    step_dir = os.path.join(path, str(max(steps)))
  checkpointer = ocp.PyTreeCheckpointer()
  tree = saved_state_metadata(step_dir)
  if key not in tree:
    raise CheckpointMismatchError(f"{step_dir}: no '{key}' in checkpoint (has {sorted(tree)})")
  check_matches(tree[key], abstract_params, what=f"{step_dir} [{key}]")
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
  )
  full = checkpointer.restore(
    os.path.join(step_dir, "state"),
    args=ocp.args.PyTreeRestore(
      item={key: abstract_params},
      restore_args={key: restore_args},
      partial_restore=True,
    ),
  )
  return full[key]
