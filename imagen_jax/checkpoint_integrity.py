"""Telling a damaged checkpoint step from a mismatched one, and finding the newest intact step.

What :class:`imagen_jax.checkpoint.Checkpointer` restores through (see that module's docstring):

* :func:`check_matches` — the saved tree's leaves and shapes against the target's
  (:class:`CheckpointMismatchError`: another model, raised at once);
* the ``_check_*`` helpers — Orbax's metadata files, the ``state`` tree, Grain's data item, read
  up front because Orbax only warns and carries on when they are missing or truncated
  (:class:`CheckpointDamagedError`);
* :func:`newest_intact` — walks the steps newest first, skipping damaged ones, agreed on by every
  process; :func:`saved_state_metadata` — a step's ``state`` leaf shapes without reading arrays.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Its warnings are the restore's: logged under the checkpoint module's name, as users filter them.
log = logging.getLogger("imagen_jax.checkpoint")

# Orbax's own metadata files (orbax-checkpoint 0.12 on-disk format): the step's item handlers and
# commit time, and the ``state`` pytree's leaf paths, shapes and dtypes. Checked up front because
# Orbax only logs a warning and carries on (with ``None`` metadata) when they are missing.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"
# Suffix of a damaged step directory moved aside. Outside Orbax's step-name patterns (digits, or
# ``..._<digits>``, or ``.orbax-checkpoint-tmp``): never listed as a step, never cleaned up.
DAMAGED_SUFFIX = ".damaged-"
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
    + (_STACKED_HINT if any("/module/" in k for k in missing + extra) else "")
    + "\n  Fix: use the config the checkpoint was trained with (its config.json is saved beside "
    "it), or start a fresh --workdir; to fine-tune from other weights use --config.init_from."
  )


_STACKED_HINT = (
  "\n  The U-Net's runs of blocks are stacked ('.../module/...') on one side only: the checkpoint "
  "and the config differ in model.scan_blocks. Set it as it was when the checkpoint was saved, or "
  "convert the weights with imagen_jax.models.unet.with_scan_blocks."
)


def short_error(err: BaseException) -> str:
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
    raise _StepDamaged(f"{what} failed ({short_error(e)})") from e


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
  agree whether the step is intact (``on_all_processes``). The handler's name recorded on disk
  (``typestr``) stays the original's.
  """

  class Handler(handler_cls):
    def restore(self, directory, *args, **kwargs):
      try:
        return super().restore(directory, *args, **kwargs)
      except Exception as e:  # re-raised as _StepDamaged by restored_item, after the barrier
        return _ReadFailure(e)

    @classmethod
    def typestr(cls) -> str:
      return handler_cls.typestr()

  Handler.__name__ = Handler.__qualname__ = f"ErrorsAsResults{handler_cls.__name__}"
  return Handler


_StateHandler = _errors_as_results(ocp.StandardCheckpointHandler)
_PartialStateHandler = _errors_as_results(ocp.PyTreeCheckpointHandler)
_DataHandler = _errors_as_results(grain.checkpoint.CheckpointHandler)


def restored_item(what: str, restore: Callable[[], Any], item: str) -> Any:
  """``restore()[item]``; a read error, raised or returned as ``_ReadFailure``: ``_StepDamaged``."""
  result = _guard(what, lambda: restore()[item])
  if isinstance(result, _ReadFailure):
    raise _StepDamaged(f"{what} failed ({short_error(result.error)})") from result.error
  return result


def _check_json_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise _StepDamaged(f"{what} {os.path.basename(path)} is missing")
  try:
    with open(path) as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise _StepDamaged(f"{what} {os.path.basename(path)} is unreadable ({short_error(e)})") from e


def check_metadata_files(step_dir: str) -> None:
  """Raises ``_StepDamaged`` unless Orbax's metadata files of the step exist and parse."""
  if not os.path.isdir(step_dir):
    raise _StepDamaged("the step directory is missing")
  _check_json_file(os.path.join(step_dir, _STEP_METADATA), "step metadata")
  if not os.path.isdir(os.path.join(step_dir, "state")):
    raise _StepDamaged("the 'state' item is missing")
  _check_json_file(os.path.join(step_dir, "state", _TREE_METADATA), "array metadata state/")


def state_tree(read_metadata: Callable[[], Any]) -> Any:
  """The ``state`` item's pytree of array metadata, from a step's Orbax ``StepMetadata``."""
  items = _guard("reading the checkpoint metadata", lambda: read_metadata().item_metadata)
  meta = items.get("state") if items is not None else None
  if meta is None:
    raise _StepDamaged("Orbax could not read the metadata of the 'state' item")
  return getattr(meta, "tree", meta)


def check_data_item(step_dir: str, what: str) -> None:
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


def on_all_processes(fn: Callable[[], _T]) -> _T:
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


def newest_intact(
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


def damaged_message(
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


def handler_registry(
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


def step_reader(*, partial_state: bool = False) -> ocp.Checkpointer:
  """A read-only Orbax ``Checkpointer`` of whole step directories (all three items)."""
  return ocp.Checkpointer(
    ocp.CompositeCheckpointHandler(handler_registry=handler_registry(partial_state=partial_state))
  )


def saved_state_metadata(step_dir: str) -> Any:
  """The pytree of array metadata (``.shape``, ``.dtype``) of a step's saved ``state`` item.

  Args:
    step_dir: one step directory (``.../checkpoints/<step>``).

  Raises:
    CheckpointDamagedError: the step's metadata files are missing or unreadable.
  """
  step_dir = os.path.abspath(step_dir)
  reader = step_reader()
  try:
    check_metadata_files(step_dir)
    return state_tree(lambda: reader.metadata(step_dir))
  except _StepDamaged as e:
    raise CheckpointDamagedError(
      f"Checkpoint step {step_dir} is damaged or incomplete: {e.reason}."
    ) from e
  finally:
    reader.close()
