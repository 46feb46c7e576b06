"""Damaged checkpoints vs config mismatches: fall back to the newest intact step; quiet Orbax reads.

A tiny train-state-like pytree plus a Grain iterator is saved at steps 1, 2 and 3 (sync saves), then
files of the newest steps are truncated or deleted the way a full disk or a bad copy would.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.checkpoint_integrity import CheckpointDamagedError, CheckpointMismatchError
from tests.train_utils import ROOT, subprocess_env

STEPS = (1, 2, 3)

# A failed read of damaged files can leave TensorStore callbacks that later report "Event loop is
# closed" from another thread (checkpoint.py quietly collects the abandoned read coroutines, not
# these); pytest pins that on whichever test runs then. Noise of reading damaged files, not a bug.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int) -> dict:
  """Distinct values per step; 64² / 4096 floats exceed OCDBT's inline limit, so these arrays
  live in data files (tiny arrays are inlined into the b-tree node and truncating data files
  would not touch them)."""
  rng = np.random.default_rng(step)
  return {
    "params": {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
    "ema_params": {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
    "opt_state": {"mu": jnp.asarray(rng.standard_normal(4096), jnp.float32)},
    "step": jnp.asarray(step, jnp.int32),
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _data_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4))


BATCHES = [b for _, b in zip(range(10), _data_iter())]  # step s resumes at BATCHES[s]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
  """A stage checkpoint dir with steps 1, 2, 3; each test damages its own copy."""
  path = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  it = _data_iter()
  ckpt = ckpt_lib.Checkpointer(path, save_every=1, keep=5, async_save=False)
  for step in STEPS:
    next(it)
    assert ckpt.save(step, _state(step), data_iter=it, config={"seed": 0})
  ckpt.close()
  return path


@pytest.fixture
def ckdir(saved, tmp_path) -> str:
  path = str(tmp_path / "checkpoints")
  shutil.copytree(saved, path)
  return path


def _files(path: str) -> dict[str, tuple[int, int]]:
  """``relative path -> (size, mtime_ns)`` of every file under ``path``."""
  out = {}
  for p in glob.glob(os.path.join(path, "**"), recursive=True):
    if os.path.isfile(p):
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _truncate(path: str, size: int | None = None) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _truncate_array_files(step_dir, size=None):  # the OCDBT data files holding the array bytes
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  assert files
  for p in files:
    _truncate(p, size)


def _truncate_ocdbt_index(step_dir):  # the merged manifest and b-tree nodes
  for p in [os.path.join(step_dir, "state", "manifest.ocdbt")] + glob.glob(
    os.path.join(step_dir, "state", "d", "*")
  ):
    _truncate(p)


def _delete_tree_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  os.remove(os.path.join(step_dir, "state", "_sharding"))


def _delete_step_metadata(step_dir):
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


def _truncate_tree_metadata(step_dir):
  _truncate(os.path.join(step_dir, "state", "_METADATA"))


def _delete_data_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))


def _truncate_data_file(step_dir):
  _truncate(os.path.join(step_dir, "data", "process_0-of-1.json"))


def _garble_data_file(step_dir):  # valid JSON, but not an iterator state: set_state fails
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write('{"next_index": "soon"}')


DAMAGES = {
  "truncated array files": (_truncate_array_files, "restoring the 'state' item failed"),
  "truncated ocdbt index": (_truncate_ocdbt_index, "failed"),
  "deleted _METADATA": (_delete_tree_metadata, "_METADATA is missing"),
  "truncated _METADATA": (_truncate_tree_metadata, "_METADATA is unreadable"),
  "deleted _CHECKPOINT_METADATA": (_delete_step_metadata, "_CHECKPOINT_METADATA is missing"),
  "deleted data item": (_delete_data_item, "'data' item"),
  "truncated data file": (_truncate_data_file, "restoring the 'data' item"),
  "garbled data file": (_garble_data_file, "restoring the 'data' item"),
}


def _assert_state_equals(got, step: int) -> None:
  want = _state(step)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_restore_falls_back_past_a_damaged_newest_step(ckdir, caplog, damage):
  damage_fn, reason = DAMAGES[damage]
  damage_fn(os.path.join(ckdir, "3"))
  before = _files(os.path.join(ckdir, "3"))
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  it = _data_iter()
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore(_abstract(_state(0)), data_iter=it)
  ckpt.close()

  assert ckpt.restored_step == 2 and int(state["step"]) == 2
  _assert_state_equals(state, 2)
  np.testing.assert_array_equal(next(it), BATCHES[2])  # exactly the batch after step 2
  assert [s for s, _ in ckpt.skipped_steps] == [3] and reason in ckpt.skipped_steps[0][1]
  warnings = [r.getMessage() for r in caplog.records if r.name == "imagen_jax.checkpoint"]
  assert any("step 3 is damaged" in m and reason in m and "previous step" in m for m in warnings)
  # Moved aside, not deleted: every file is still there, byte for byte.
  (moved,) = glob.glob(os.path.join(ckdir, "3.damaged-*"))
  assert not os.path.exists(os.path.join(ckdir, "3"))
  assert _files(moved) == before
  assert any(os.path.basename(moved) in m for m in warnings)


def test_two_damaged_steps_are_skipped(ckdir, caplog):
  _truncate_array_files(os.path.join(ckdir, "3"))
  _delete_data_item(os.path.join(ckdir, "2"))
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  it = _data_iter()
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore(_abstract(_state(0)), data_iter=it)
  ckpt.close()
  assert ckpt.restored_step == 1 and [s for s, _ in ckpt.skipped_steps] == [3, 2]
  _assert_state_equals(state, 1)
  np.testing.assert_array_equal(next(it), BATCHES[1])
  assert sorted(os.path.basename(p).split(".")[0] for p in glob.glob(f"{ckdir}/*.damaged-*")) == [
    "2",
    "3",
  ]


def test_saves_after_a_fallback_are_not_shadowed_by_the_damaged_step(ckdir):
  """Restored 2 with a damaged 3 on disk: the run saves 3 and 4 again, and resumes from 4."""
  _truncate_array_files(os.path.join(ckdir, "3"))
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, keep=2, async_save=False)
  it = _data_iter()
  ckpt.restore(_abstract(_state(0)), data_iter=it)
  assert ckpt.latest_step() == 2
  for step in (3, 4):
    next(it)
    assert ckpt.save(step, _state(step), data_iter=it)
  ckpt.close()
  assert sorted(n for n in os.listdir(ckdir) if n.isdigit()) == ["3", "4"]  # LatestN(2) ...
  assert len(glob.glob(f"{ckdir}/3.damaged-*")) == 1  # ... never prunes the damaged step

  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  it = _data_iter()
  state = ckpt.restore(_abstract(_state(0)), data_iter=it)
  ckpt.close()
  assert ckpt.restored_step == 4 and ckpt.skipped_steps == []
  _assert_state_equals(state, 4)
  np.testing.assert_array_equal(next(it), BATCHES[4])


def test_a_config_mismatch_raises_without_falling_back(ckdir, caplog):
  _truncate_array_files(os.path.join(ckdir, "2"))  # an older damaged step changes nothing
  before = _files(ckdir)
  other = _state(0)
  other["params"]["w"] = jnp.zeros((32, 64))
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  with caplog.at_level(logging.WARNING), pytest.raises(CheckpointMismatchError) as err:
    ckpt.restore(_abstract(other), data_iter=_data_iter())
  ckpt.close()
  assert "step 3 does not match" in str(err.value) and "shape mismatch" in str(err.value)
  assert "params/w: checkpoint (64, 64) vs config (32, 64)" in str(err.value)
  assert ckpt.restored_step is None and not caplog.records
  assert _files(ckdir) == before


def test_no_intact_step_raises_damaged_error_naming_every_step(ckdir):
  for step in STEPS:
    _truncate_array_files(os.path.join(ckdir, str(step)))
  before = _files(ckdir)
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  with pytest.raises(CheckpointDamagedError) as err:
    ckpt.restore(_abstract(_state(0)))
  ckpt.close()
  msg = str(err.value)
  assert ckdir in msg and all(f"\n  step {s}: restoring the 'state'" in msg for s in STEPS)
  assert "Fix:" in msg and "--workdir" in msg
  assert _files(ckdir) == before  # nothing moved when nothing could be restored


def test_an_explicit_damaged_step_does_not_fall_back(ckdir):
  _delete_step_metadata(os.path.join(ckdir, "3"))
  ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
  with pytest.raises(CheckpointDamagedError, match="step 3 is damaged.*_CHECKPOINT_METADATA"):
    ckpt.restore(_abstract(_state(0)), step=3)
  _assert_state_equals(ckpt.restore(_abstract(_state(0)), step=1), 1)
  with pytest.raises(FileNotFoundError, match="step 7"):
    ckpt.restore(_abstract(_state(0)), step=7)
  ckpt.close()
  assert os.path.isdir(os.path.join(ckdir, "3"))


def test_restore_params_falls_back_read_only(ckdir, caplog):
  # Emptied, not halved: a data file holds several arrays, and restore_params reads only the
  # ones it needs, so params in an intact first half would (rightly) still load from step 3.
  _truncate_array_files(os.path.join(ckdir, "3"), size=0)
  before = _files(ckdir)
  abstract = _abstract(_state(0)["ema_params"])
  with caplog.at_level(logging.WARNING):
    ema, step = ckpt_lib.restore_params_with_step(ckdir, abstract)
    params = ckpt_lib.restore_params(ckdir, abstract, key="params")
  assert step == 2
  np.testing.assert_array_equal(ema["w"], _state(2)["ema_params"]["w"])
  np.testing.assert_array_equal(params["w"], _state(2)["params"]["w"])
  warnings = [r.getMessage() for r in caplog.records if r.name == "imagen_jax.checkpoint"]
  assert any("step 3 is damaged" in m and "read-only" in m for m in warnings)
  assert _files(ckdir) == before  # sampling never changes a training run's directory

  # One step directory: that step or an error, never another step.
  ema, step = ckpt_lib.restore_params_with_step(os.path.join(ckdir, "1"), abstract)
  assert step == 1
  np.testing.assert_array_equal(ema["w"], _state(1)["ema_params"]["w"])
  with pytest.raises(CheckpointDamagedError, match="step 3 is damaged"):
    ckpt_lib.restore_params(os.path.join(ckdir, "3"), abstract)
  with pytest.raises(CheckpointMismatchError, match="no 'nope'"):
    ckpt_lib.restore_params(ckdir, abstract, key="nope")
  assert _files(ckdir) == before


def test_saved_state_metadata(ckdir):
  tree = ckpt_lib.saved_state_metadata(os.path.join(ckdir, "2"))
  assert tree["params"]["w"].shape == (64, 64) and tree["step"].dtype == np.int32
  # The handlers recorded on disk are Orbax's and Grain's own (readable without this module).
  with open(os.path.join(ckdir, "2", "_CHECKPOINT_METADATA")) as f:
    handlers = json.load(f)["item_handlers"]
  assert handlers == {
    "state": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
    "data": "grain._src.python.checkpoint.handler.CheckpointHandler",
    "config": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
  }
  _delete_tree_metadata(os.path.join(ckdir, "2"))
  with pytest.raises(CheckpointDamagedError, match="_METADATA is missing"):
    ckpt_lib.saved_state_metadata(os.path.join(ckdir, "2"))


def _loud(records) -> list[str]:
  return [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]


def test_reading_an_intact_checkpoint_is_quiet(ckdir, caplog):
  """No Orbax warnings (e.g. ``Metadata file does not exist: …/state/_CHECKPOINT_METADATA``)."""
  with caplog.at_level(logging.INFO):  # INFO: Orbax's own logger levels must not hide anything
    ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, async_save=False)
    ckpt.restore(_abstract(_state(0)), data_iter=_data_iter())
    assert ckpt.restore_config() == {"seed": 0}
    ckpt.close()
    ckpt_lib.restore_params(ckdir, _abstract(_state(0)["params"]), key="params")
    ckpt_lib.saved_state_metadata(os.path.join(ckdir, "3"))
  assert _loud(caplog.records) == []
  assert not any("_CHECKPOINT_METADATA" in r.getMessage() for r in caplog.records)


def test_reading_is_quiet_in_a_fresh_process(ckdir):
  """The same in a new interpreter, as ``sample.py`` or a resume sees it: stderr stays clean."""
  code = textwrap.dedent(
    f"""
    import jax
    from imagen_jax import checkpoint as c
    from tests.test_checkpoint import _abstract, _data_iter, _state
    ckpt = c.Checkpointer({ckdir!r}, save_every=1, async_save=False)
    ckpt.restore(_abstract(_state(0)), data_iter=_data_iter())
    ckpt.close()
    c.restore_params({ckdir!r}, _abstract(_state(0)["ema_params"]))
    c.saved_state_metadata({ckdir!r} + "/3")
    print("done")
    """
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    env=subprocess_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
  loud = [ln for ln in proc.stderr.splitlines() if ln[:1] in "WE" or "WARNING" in ln]
  assert loud == [], proc.stderr[-3000:]


_WORKER = """
import os, sys
import jax
port, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import orbax.checkpoint as ocp
from imagen_jax import checkpoint as c
from tests.test_checkpoint import _abstract, _data_iter, _state

replicated = NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)), PartitionSpec())

def global_state(step):  # the same values on every process, as one replicated global array each
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: np.asarray(x)[i]),
    _state(step),
  )

it = _data_iter()
ckpt = c.Checkpointer(path, save_every=1, async_save=False)
for step in (1, 2, 3):
  next(it)
  ckpt.save(step, global_state(step), data_iter=it)
ckpt.close()
multihost_utils.sync_global_devices("saved")
if pid == 1:  # only process 1 fails: its data file of step 3, its read of step 2's state
  os.remove(os.path.join(path, "3", "data", "process_1-of-2.json"))
  read = ocp.StandardCheckpointHandler.restore

  def fail_step_2(self, directory, *args, **kwargs):
    if os.path.basename(os.path.dirname(str(directory))) == "2":
      raise OSError("simulated: process 1 cannot read its shards")
    return read(self, directory, *args, **kwargs)

  ocp.StandardCheckpointHandler.restore = fail_step_2
multihost_utils.sync_global_devices("damaged")
ckpt = c.Checkpointer(path, save_every=1, async_save=False)
it = _data_iter()
state = ckpt.restore(_abstract(global_state(0)), data_iter=it)
ckpt.close()
want = jax.tree.leaves(_state(1))
same = all(
  np.array_equal(np.asarray(a.addressable_data(0)), b) for a, b in zip(jax.tree.leaves(state), want)
)
print("RESULT", pid, same, ckpt.restored_step, [s for s, _ in ckpt.skipped_steps],
      next(it).tolist(), flush=True)
for s, reason in ckpt.skipped_steps:
  print("REASON", pid, s, reason, flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_processes_agree_on_the_fallback(tmp_path):
  """Only process 1 fails to read steps 3 (data) and 2 (state): both processes skip both steps
  in lockstep (no mismatched barriers), restore step 1, and process 0 moves 2 and 3 aside."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  path = str(tmp_path / "checkpoints")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, str(port), str(pid), path],
      env=subprocess_env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(2)
  ]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:  # never leave a process (or its port) behind
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, out) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, out[-4000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
    assert line == f"RESULT {pid} True 1 [3, 2] {BATCHES[1].tolist()}", out[-4000:]
  reasons = "\n".join(ln for out in logs for ln in out.splitlines() if ln.startswith("REASON"))
  assert "REASON 0 3 process 1 could not read its part of it" in reasons
  assert "REASON 1 3 restoring the 'data' item" in reasons
  assert "REASON 0 2 process 1 could not read" in reasons
  assert "REASON 1 2 restoring the 'state' item failed (OSError: simulated" in reasons
  names = sorted(os.listdir(path))
  assert names[0] == "1" and len(names) == 3, names
  assert [n.split(".damaged-")[0] for n in names[1:]] == ["2", "3"], names
