"""The one checkpoint module: Orbax ``CheckpointManager``, async saves, policies, strict restore.

A checkpoint step holds three items:

* ``state``  — the train state pytree (params, EMA params, optimizer state, step, RNG), restored
  straight into the target shardings (no gather on one host);
* ``data``   — the Grain data-iterator state, so a resumed run continues at the exact next example;
* ``config`` — the run's config as JSON (for humans and for ``tools.inspect_checkpoint``).

Writes are atomic (Orbax writes to a temporary directory and renames it when complete), so a process
killed mid-save leaves the previous checkpoint as the latest *complete* one.

A complete step can still be *damaged* afterwards (truncated or deleted files: a full disk, a bad
copy, a cleanup script). Restoring tells the two failure kinds apart:

* :class:`CheckpointMismatchError` — the files read fine but hold another model's leaves or shapes
  (wrong config). Raised at once: older steps were written by the same run.
* :class:`CheckpointDamagedError` — files are missing, truncated or unreadable. Without an explicit
  step, restore falls back to the newest *intact* step, with a warning; :meth:`Checkpointer.restore`
  then moves the damaged newer step directories aside (renamed ``<step>.damaged-<time>``, nothing
  deleted) so they never shadow the checkpoints the resumed run writes. The error is raised only
  when no step is intact.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

# saved_state_metadata and the two errors stay importable from here (the public checkpoint API).
from imagen_jax.checkpoint_integrity import (
  DAMAGED_SUFFIX,
  CheckpointDamagedError,
  CheckpointMismatchError,
  check_data_item,
  check_matches,
  check_metadata_files,
  damaged_message,
  handler_registry,
  newest_intact,
  on_all_processes,
  restored_item,
  saved_state_metadata,
  short_error,
  state_tree,
  step_reader,
)

log = logging.getLogger(__name__)


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

  Attributes:
    restored_step: the step the last :meth:`restore` read (None before one succeeded).
    skipped_steps: ``(step, reason)`` of the damaged steps the last :meth:`restore` skipped, newest
      first (moved aside if an older step restored; every step tried if none did).
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
      # Don't read every step's metadata up front (commit times, metrics: unused here); a step
      # whose metadata is damaged is then reported by `restore`, not warned about by Orbax.
      lightweight_initialize=True,
    )
    self.directory = str(directory)
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, handler_registry=handler_registry()
    )
    self._sigterm = _SigtermFlag()
    self.restored_step: int | None = None
    self.skipped_steps: list[tuple[int, str]] = []

  @property
  def preempted(self) -> bool:
    """True once SIGTERM arrived; the caller should save (``force=True``) and stop."""
    return self._sigterm.event.is_set()

  def should_stop_for_preemption(self, step: int) -> bool:
    """SIGTERM arrived, or (multi-host) JAX's preemption sync point was reached at ``step``."""
    return self.preempted or self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    """The latest *complete* checkpoint step (Orbax's notion; it may still be damaged), or None."""
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
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(dict(config))
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter: Any = None) -> Any:
    """Restores ``state`` (and the data iterator in place) strictly into ``abstract_state``.

    Without ``step``, a damaged newest step (missing, truncated or unreadable files) is skipped
    with a warning and the next older one tried, and so on; the damaged steps skipped are then
    moved aside (renamed ``<step>.damaged-<time>``, nothing deleted) so that the checkpoints the
    resumed run writes neither collide with them nor sort below them. ``restored_step`` and
    ``skipped_steps`` record what happened.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set: the arrays are
        read straight into these shardings.
      step: which step (default: the newest intact one). An explicit step never falls back.
      data_iter: a Grain iterator whose position is restored in place (only once the state of
        the same step has restored, so a failed attempt leaves no mix of two steps).

    Returns:
      The restored state pytree.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointMismatchError: missing, unexpected or misshapen leaves (nothing restored; raised
        for the newest step, without falling back: older steps have the same config).
      CheckpointDamagedError: no intact step (or the requested ``step`` is damaged).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}")
    if step is not None:
      if int(step) not in steps:
        raise FileNotFoundError(
          f"No complete checkpoint step {step} in {self.directory} (has steps {sorted(steps)})"
        )
      steps = [int(step)]

    def attempt(s: int) -> Any:
      step_dir, what = self._step_dir(s), f"{self.directory} step {s}"

      def check() -> None:
        check_metadata_files(step_dir)
        saved_tree = state_tree(lambda: self._manager.metadata(s))
        check_matches(saved_tree, abstract_state, what=what)
        if data_iter is not None:
          check_data_item(step_dir, what)

      on_all_processes(check)
      state = on_all_processes(
        lambda: restored_item(
          "restoring the 'state' item",
          lambda: self._manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
          ),
          "state",
        )
      )
      if data_iter is not None:
        # Only once the state restored: Grain parses the saved position, then ``set_state``s
        # the iterator in place. A failure may leave it half-set, but the next (older) step's
        # restore sets it again in full.
        on_all_processes(
          lambda: restored_item(
            "restoring the 'data' item (the data-iterator position)",
            lambda: self._manager.restore(
              s, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter))
            ),
            "data",
          )
        )
      return state

    def describe(s: int) -> str:
      return f"{self.directory} step {s}"

    restored, state, skipped = newest_intact(steps, attempt, describe)
    self.skipped_steps = skipped
    if restored is None:
      if step is not None:
        fix = "restore the files from a backup if there is one, or restore another step."
      else:
        fix = (
          "restore the files from a backup if there is one; otherwise delete (or move aside) "
          "the damaged step directories, then the stage starts over (or from init_from), or "
          "start a fresh --workdir. Nothing was restored or moved."
        )
      raise CheckpointDamagedError(damaged_message(self.directory, skipped, describe, fix))
    self.restored_step = restored
    if skipped:
      moved = self._move_aside([s for s, _ in skipped])
      log.warning(
        "Resumed %s from step %d, the newest intact checkpoint. Moved the damaged newer step(s) "
        "aside (nothing deleted; inspect or delete them): %s",
        self.directory,
        restored,
        ", ".join(moved),
      )
    return state

  def _move_aside(self, steps: Sequence[int]) -> list[str]:
    """Renames damaged step directories out of Orbax's sight; returns ``"old -> new"`` lines.

    Process 0 renames (one shared directory), then all processes sync and reload the manager.
    """
    moved, error = [], None
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%dT%H%M%S")
      for s in steps:
        src = self._step_dir(s)
        dst, n = f"{src}{DAMAGED_SUFFIX}{stamp}", 1
        while os.path.exists(dst):
          dst, n = f"{src}{DAMAGED_SUFFIX}{stamp}-{n}", n + 1
        try:
          os.rename(src, dst)
        except OSError as e:
          error = CheckpointDamagedError(
            f"Checkpoint {self.directory} step {s} is damaged and could not be moved aside "
            f"({short_error(e)}); move or delete {src} by hand before resuming."
          )
          break
        moved.append(f"{src} -> {os.path.basename(dst)}")
    else:
      moved = [f"{self._step_dir(s)} (renamed by process 0)" for s in steps]
    if jax.process_count() > 1:  # before raising: the other processes wait here
      multihost_utils.sync_global_devices("imagen_jax.checkpoint: damaged steps moved aside")
    if error is not None:
      raise error
    self._manager.reload()  # forget the damaged steps: saves continue from the restored one
    return moved

  def restore_config(self, step: int | None = None) -> dict | None:
    """The JSON config saved with a step, or None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None or "config" not in self._item_names(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _item_names(self, step: int) -> set[str]:
    path = self._step_dir(step)
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

  Reads the newest intact step: damaged newer steps are skipped with a warning (read-only:
  nothing on disk is moved or changed). :func:`restore_params_with_step` also says which step.

  Args:
    path: a stage checkpoint directory (newest intact step used) or one step directory.
    abstract_params: pytree of ``jax.ShapeDtypeStruct`` (with shardings) to restore into.
    key: which entry of the saved state to read (``"ema_params"`` or ``"params"``).

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    CheckpointMismatchError: no ``key`` in the checkpoint, or its leaves/shapes differ.
    CheckpointDamagedError: no intact step (or the given step directory is damaged).
  """
  return restore_params_with_step(path, abstract_params, key=key)[0]


def restore_params_with_step(
  path: str, abstract_params: Any, *, key: str = "ema_params"
) -> tuple[Any, int | None]:
  """:func:`restore_params`, also returning the step it read.

  Returns:
    ``(params, step)``; ``step`` is None for a step directory whose name is not a step number.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    name = os.path.basename(path)
    candidates = [(int(name) if name.isdigit() else None, path)]
    where = os.path.dirname(path) if name.isdigit() else path
  else:
    found = ocp.step.standard_name_format().find_all(path) if os.path.isdir(path) else []
    candidates = sorted(((m.step, str(m.path)) for m in found), reverse=True)
    where = path
    if not candidates:
      raise FileNotFoundError(
        f"No checkpoint found at {path}: expected a stage checkpoint directory (with numbered "
        "step directories) or one step directory containing 'state/'."
      )
  reader = step_reader(partial_state=True)

  def attempt(candidate: tuple[int | None, str]) -> Any:
    _, step_dir = candidate

    def check() -> None:
      check_metadata_files(step_dir)
      tree = state_tree(lambda: reader.metadata(step_dir))
      if key not in tree:
        raise CheckpointMismatchError(f"{step_dir}: no '{key}' in checkpoint (has {sorted(tree)})")
      check_matches(tree[key], abstract_params, what=f"{step_dir} [{key}]")

    on_all_processes(check)
    restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
    )
    args = ocp.args.PyTreeRestore(
      item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True
    )
    full = on_all_processes(
      lambda: restored_item(
        f"restoring '{key}' of the 'state' item",
        lambda: reader.restore(step_dir, args=ocp.args.Composite(state=args)),
        "state",
      )
    )
    return full[key]

  def describe(candidate: tuple[int | None, str]) -> str:
    step, step_dir = candidate
    return f"{where} step {step}" if step is not None else step_dir

  try:
    found_step, params, skipped = newest_intact(
      candidates, attempt, describe, note=" (read-only: nothing on disk is moved or changed)"
    )
  finally:
    reader.close()
  if found_step is None:
    fix = (
      "restore the files from a backup if there is one, or point at another (intact) "
      "checkpoint. Nothing on disk was changed."
    )
    raise CheckpointDamagedError(damaged_message(where, skipped, describe, fix))
  if skipped:
    log.warning(
      "Loaded '%s' of %s, the newest intact checkpoint, instead of the damaged newer step(s) %s.",
      key,
      describe(found_step),
      ", ".join(str(s) for (s, _), _ in skipped),
    )
  return params, found_step[0]


__all__ = [
  "CheckpointDamagedError",
  "CheckpointMismatchError",
  "Checkpointer",
  "restore_params",
  "restore_params_with_step",
  "saved_state_metadata",
]
