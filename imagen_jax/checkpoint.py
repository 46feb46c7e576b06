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

import gc
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

# Orbax's own metadata files (orbax-checkpoint 0.12 on-disk format): the step's item handlers and
# commit time, and the ``state`` pytree's leaf paths, shapes and dtypes. Checked up front because
# Orbax only logs a warning and carries on (with ``None`` metadata) when they are missing.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"
# Suffix of a damaged step directory moved aside. Outside Orbax's step-name patterns (digits, or
# ``..._<digits>``, or ``.orbax-checkpoint-tmp``): never listed as a step, never cleaned up.
_DAMAGED_SUFFIX = ".damaged-"
# What Grain names a process's data-iterator state inside the ``data`` item.
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")

_T = TypeVar("_T")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the structure or shapes the config expects."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint step is damaged or incomplete: files missing, truncated or unreadable.

  Unlike :class:`CheckpointMismatchError` (intact files of another model), the cause is on disk; the
  message names the directory, each step tried and what failed, and the fix.
  """


class _StepDamaged(Exception):
  """One step could not be read; ``reason`` says what failed (internal: callers never see it)."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


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


def _short(err: BaseException) -> str:
  """``Type: first line`` of the root cause (TensorStore's outer errors say little, run long)."""
  while err.__cause__ is not None:
    err = err.__cause__
  text = str(err).strip().split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0]
  text = text if len(text) <= 300 else text[:300] + "…"
  return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _guard(what: str, fn: Callable[[], _T]) -> _T:
  """Runs ``fn``; any read error becomes ``_StepDamaged`` (a config mismatch passes through)."""
  try:
    return fn()
  except CheckpointMismatchError:
    raise
  except Exception as e:  # TensorStore, Orbax and Grain raise many kinds of read errors
    raise _StepDamaged(f"{what} failed ({_short(e)})") from e


class _ReadFailure:
  """What a restore handler of :func:`_errors_as_results` returns instead of raising."""

  def __init__(self, error: Exception):
    self.error = error


def _errors_as_results(handler_cls: type) -> type:
  """``handler_cls`` whose ``restore`` returns a failure (as ``_ReadFailure``) instead of raising.

  Why: in a multi-process run each process reads its own shards and its own data-iterator file, so
  damage can fail a read on some processes only. Raised there, the error would skip, on those
  processes only, the barrier that ends Orbax's restore, and the processes' next collectives would
  pair up wrongly (a crash or a hang). Returned, every process reaches the barrier, and then all
  agree whether the step is intact (``_on_all_processes``). The handler's name recorded on disk
  (``typestr``) stays the original's.
  """

  class Handler(handler_cls):
    def restore(self, directory, *args, **kwargs):
      try:
        return super().restore(directory, *args, **kwargs)
      except Exception as e:  # re-raised as _StepDamaged by _restored_item, after the barrier
        return _ReadFailure(e)

    @classmethod
    def typestr(cls) -> str:
      return handler_cls.typestr()

  Handler.__name__ = Handler.__qualname__ = f"ErrorsAsResults{handler_cls.__name__}"
  return Handler


_StateHandler = _errors_as_results(ocp.StandardCheckpointHandler)
_PartialStateHandler = _errors_as_results(ocp.PyTreeCheckpointHandler)
_DataHandler = _errors_as_results(grain.checkpoint.CheckpointHandler)


def _restored_item(what: str, restore: Callable[[], Any], item: str) -> Any:
  """``restore()[item]``; a read error, raised or returned as ``_ReadFailure``: ``_StepDamaged``."""
  result = _guard(what, lambda: restore()[item])
  if isinstance(result, _ReadFailure):
    raise _StepDamaged(f"{what} failed ({_short(result.error)})") from result.error
  return result


def _check_json_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise _StepDamaged(f"{what} {os.path.basename(path)} is missing")
  try:
    with open(path) as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise _StepDamaged(f"{what} {os.path.basename(path)} is unreadable ({_short(e)})") from e


def _check_metadata_files(step_dir: str) -> None:
  """Raises ``_StepDamaged`` unless Orbax's metadata files of the step exist and parse."""
  if not os.path.isdir(step_dir):
    raise _StepDamaged("the step directory is missing")
  _check_json_file(os.path.join(step_dir, _STEP_METADATA), "step metadata")
  if not os.path.isdir(os.path.join(step_dir, "state")):
    raise _StepDamaged("the 'state' item is missing")
  _check_json_file(os.path.join(step_dir, "state", _TREE_METADATA), "array metadata state/")


def _state_tree(read_metadata: Callable[[], Any]) -> Any:
  """The ``state`` item's pytree of array metadata, from a step's Orbax ``StepMetadata``."""
  items = _guard("reading the checkpoint metadata", lambda: read_metadata().item_metadata)
  meta = items.get("state") if items is not None else None
  if meta is None:
    raise _StepDamaged("Orbax could not read the metadata of the 'state' item")
  return getattr(meta, "tree", meta)


def _check_data_item(step_dir: str, what: str) -> None:
  """Raises ``_StepDamaged`` if the data-iterator item is missing, ``CheckpointMismatchError``
  if it was written by a different number of processes (every step would fail the same way)."""
  data_dir = os.path.join(step_dir, "data")
  if not os.path.isdir(data_dir):
    raise _StepDamaged("the 'data' item (the data-iterator position) is missing")
  names = _guard("listing the 'data' item", lambda: os.listdir(data_dir))
  counts = {int(m.group(2)) for m in map(_DATA_FILE.fullmatch, names) if m}
  if counts and jax.process_count() not in counts:
    raise CheckpointMismatchError(
      f"Checkpoint {what} holds the data-iterator state of {sorted(counts)} process(es) but this "
      f"run has {jax.process_count()}; nothing was restored. The input pipeline resumes exactly "
      "only with the same number of processes: resume with it, or start a fresh --workdir."
    )


def _on_all_processes(fn: Callable[[], _T]) -> _T:
  """Runs ``fn`` (a stage of reading a step) and makes every process agree on its outcome.

  Each process reads its own part of a step, so one may fail where others succeed; all must
  then take the same branch, since the next stage (or step) starts with collective restores.
  A ``CheckpointMismatchError`` needs no agreement: every process reads the same metadata.

  Raises:
    _StepDamaged: on every process, if ``fn`` failed on any.
  """
  reason = None
  try:
    result = fn()
  except _StepDamaged as e:
    result, reason = None, e.reason
  if jax.process_count() > 1:
    ok = np.asarray(multihost_utils.process_allgather(np.asarray([reason is None], np.int32)))
    failed = [str(i) for i in np.flatnonzero(ok.reshape(-1) == 0)]
    if failed and reason is None:
      reason = f"process {', '.join(failed)} could not read its part of it"
  if reason is not None:
    raise _StepDamaged(reason)
  return result


def _collect_abandoned_reads() -> None:
  """Garbage-collects what a failed read left behind, logging Python's complaints at DEBUG.

  Why: when one array's read fails, Orbax abandons its sibling reads' coroutines; when the GC
  later closes them, Python prints each on stderr with TensorStore's full spec (pages of it), at
  some random later point of the run. Collecting them here, with the complaints routed to the
  debug log, keeps a resume from a damaged step readable.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: log.debug("After a failed read: %s: %s", u.err_msg, u.exc_value)
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous


def _newest_intact(
  candidates: Sequence[_T],
  attempt: Callable[[_T], Any],
  describe: Callable[[_T], str],
  note: str = "",
) -> tuple[_T | None, Any, list[tuple[_T, str]]]:
  """Tries ``attempt`` on each candidate step, newest first, until one reads intact.

  A damaged step (``_StepDamaged``, raised on every process alike) is logged as a warning and
  skipped; a config mismatch propagates at once (older steps were written with the same config).

  Returns:
    ``(step, attempt(step), skipped)`` with ``skipped`` the ``(step, reason)`` of the damaged
    newer steps; ``step`` is None (and ``skipped`` lists every candidate) if none is intact.
  """
  skipped: list[tuple[_T, str]] = []
  for i, step in enumerate(candidates):
    try:
      return step, attempt(step), skipped
    except _StepDamaged as e:
      skipped.append((step, e.reason))
    _collect_abandoned_reads()
    if i + 1 < len(candidates):
      then = f"skipping to the previous step {describe(candidates[i + 1])}{note}"
    else:
      then = "no older step to fall back to"
    log.warning(
      "Checkpoint %s is damaged or incomplete (%s); %s.", describe(step), skipped[-1][1], then
    )
  return None, None, skipped


def _damaged_message(
  where: str, skipped: Sequence[tuple[_T, str]], describe: Callable[[_T], str], fix: str
) -> str:
  """The ``CheckpointDamagedError`` message: every step tried, what failed, and the fix."""
  if len(skipped) == 1:
    ((step, reason),) = skipped
    head = f"Checkpoint {describe(step)} is damaged or incomplete: {reason}."
  else:
    head = f"No intact checkpoint in {where}; every step is damaged or incomplete:" + "".join(
      f"\n  {describe(step).removeprefix(where).strip()}: {reason}" for step, reason in skipped
    )
  return head + f"\n  Fix: {fix}"


def _handler_registry(
  *, partial_state: bool = False
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Handlers for the three items, so Orbax reads their metadata without guessing (or warning).

  Args:
    partial_state: read ``state`` with ``PyTreeCheckpointHandler`` (same on-disk format as the
      ``StandardCheckpointHandler`` that writes it), which can restore a subtree.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  if partial_state:
    registry.add("state", ocp.args.PyTreeRestore, _PartialStateHandler())
  else:
    state = _StateHandler()
    registry.add("state", ocp.args.StandardSave, state)
    registry.add("state", ocp.args.StandardRestore, state)
  data = _DataHandler()
  registry.add("data", grain.checkpoint.CheckpointSave, data)
  registry.add("data", grain.checkpoint.CheckpointRestore, data)
  config = ocp.JsonCheckpointHandler()
  registry.add("config", ocp.args.JsonSave, config)
  registry.add("config", ocp.args.JsonRestore, config)
  return registry


def _step_reader(*, partial_state: bool = False) -> ocp.Checkpointer:
  """A read-only Orbax ``Checkpointer`` of whole step directories (all three items)."""
  return ocp.Checkpointer(
    ocp.CompositeCheckpointHandler(handler_registry=_handler_registry(partial_state=partial_state))
  )


def saved_state_metadata(step_dir: str) -> Any:
  """The pytree of array metadata (``.shape``, ``.dtype``) of a step's saved ``state`` item.

  Args:
    step_dir: one step directory (``.../checkpoints/<step>``).

  Raises:
    CheckpointDamagedError: the step's metadata files are missing or unreadable.
  """
  step_dir = os.path.abspath(step_dir)
  reader = _step_reader()
  try:
    _check_metadata_files(step_dir)
    return _state_tree(lambda: reader.metadata(step_dir))
  except _StepDamaged as e:
    raise CheckpointDamagedError(
      f"Checkpoint step {step_dir} is damaged or incomplete: {e.reason}."
    ) from e
  finally:
    reader.close()


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
      self.directory, options=options, handler_registry=_handler_registry()
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
        _check_metadata_files(step_dir)
        saved_tree = _state_tree(lambda: self._manager.metadata(s))
        check_matches(saved_tree, abstract_state, what=what)
        if data_iter is not None:
          _check_data_item(step_dir, what)

      _on_all_processes(check)
      state = _on_all_processes(
        lambda: _restored_item(
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
        _on_all_processes(
          lambda: _restored_item(
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

    restored, state, skipped = _newest_intact(steps, attempt, describe)
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
      raise CheckpointDamagedError(_damaged_message(self.directory, skipped, describe, fix))
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
        dst, n = f"{src}{_DAMAGED_SUFFIX}{stamp}", 1
        while os.path.exists(dst):
          dst, n = f"{src}{_DAMAGED_SUFFIX}{stamp}-{n}", n + 1
        try:
          os.rename(src, dst)
        except OSError as e:
          error = CheckpointDamagedError(
            f"Checkpoint {self.directory} step {s} is damaged and could not be moved aside "
            f"({_short(e)}); move or delete {src} by hand before resuming."
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
  reader = _step_reader(partial_state=True)

  def attempt(candidate: tuple[int | None, str]) -> Any:
    _, step_dir = candidate

    def check() -> None:
      _check_metadata_files(step_dir)
      tree = _state_tree(lambda: reader.metadata(step_dir))
      if key not in tree:
        raise CheckpointMismatchError(f"{step_dir}: no '{key}' in checkpoint (has {sorted(tree)})")
      check_matches(tree[key], abstract_params, what=f"{step_dir} [{key}]")

    _on_all_processes(check)
    restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
    )
    args = ocp.args.PyTreeRestore(
      item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True
    )
    full = _on_all_processes(
      lambda: _restored_item(
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
    found_step, params, skipped = _newest_intact(
      candidates, attempt, describe, note=" (read-only: nothing on disk is moved or changed)"
    )
  finally:
    reader.close()
  if found_step is None:
    fix = (
      "restore the files from a backup if there is one, or point at another (intact) "
      "checkpoint. Nothing on disk was changed."
    )
    raise CheckpointDamagedError(_damaged_message(where, skipped, describe, fix))
  if skipped:
    log.warning(
      "Loaded '%s' of %s, the newest intact checkpoint, instead of the damaged newer step(s) %s.",
      key,
      describe(found_step),
      ", ".join(str(s) for (s, _), _ in skipped),
    )
  return params, found_step[0]
