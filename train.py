"""Train an Imagen cascade (any stages, CPU to TPU pod).

  python train.py                                   # the shapes demo (configs/shapes.py)
  python train.py --config=configs/base64.py        # the paper's 2B base model
  python train.py --config=configs/sr256.py:tiny --workdir=runs/sr256_tiny
  python train.py --config.stages.base.total_steps=100 --config.text.encoder=/path/to/t5-v1_1-xxl
  python train.py --config=configs/base64.py --config.mesh.data=1 --config.mesh.fsdp=-1  # FSDP
  python train.py --multihost ...                   # every host of a TPU pod / SLURM job

Every run resumes from the latest checkpoint in --workdir. See README.md.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes.py")

_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Training config file (path.py or path.py:arg).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/shapes", "Directory for checkpoints and logs.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() (multi-process GPU / TPU pod runs). On TPU VMs, SLURM and "
  "Open MPI the cluster is auto-detected; elsewhere pass the three flags below.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  # Orbax and Grain log every file operation at INFO: keep absl at WARNING, ours at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("imagen_jax").setLevel(logging.INFO)
  import jax

  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.getLogger("imagen_jax").info(
    "JAX %s: process %d/%d, %d local / %d global devices (%s)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  from imagen_jax.train import train_and_evaluate

  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
