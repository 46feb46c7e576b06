"""The training command line (``train.py``, ``imagen-jax-train``): flags → ``train_and_evaluate``.

  imagen-jax-train --config=shapes:ci --workdir=runs/ci      # a built-in config, by name
  imagen-jax-train --config=path/to/my_config.py:arg --config.stages.base.total_steps=100

``--config`` takes a config file (``path.py[:arg]``) or a built-in config's name (``shapes``,
``base64``, ``sr256``, ``sr1024``; :func:`imagen_jax.config.resolve_config`), and any field can be
overridden with ``--config.a.b=value``. The config is loaded, its overrides checked against its
fields, and it is validated before any device, model or compilation: a mistake is reported at
once, as one ``error: ...`` line (:mod:`imagen_jax.tools.cli`).

Compiled programs go to a persistent cache (``--compilation_cache``, default
``~/.cache/imagen_jax/jax``; :func:`imagen_jax.tools.cli.enable_compilation_cache`), so a second
run, a resume or a new workdir with the same config starts without recompiling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from imagen_jax import config as config_lib
from imagen_jax.tools import cli
from imagen_jax.train import train_and_evaluate

log = logging.getLogger("imagen_jax")

_DEFAULT_CONFIG = config_lib.resolve_config("shapes")
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  _DEFAULT_CONFIG,
  "Training config: path/to/config.py[:arg], or a built-in config by name[:arg] "
  f"({', '.join(config_lib.builtin_config_names())}), e.g. --config=shapes:ci.",
  lock_config=True,
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
_CACHE = flags.DEFINE_string("compilation_cache", None, cli.COMPILATION_CACHE_HELP)
flags.DEFINE_bool("debug", False, cli.DEBUG_HELP)

_CONFIG_FLAG = "--config"


def _config_arg(argv: Sequence[str]) -> tuple[int, int] | None:
  """``(index, 1)`` of the last ``--config=V`` in ``argv``, ``(index, 2)`` of ``--config V``."""
  found = None
  for i, arg in enumerate(argv):
    name, eq, _ = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == "config":
      found = (i, 1) if eq else (i, 2)
  return found


def resolve_config_arg(argv: Sequence[str]) -> tuple[list[str], str, str]:
  """``argv`` with its ``--config`` value resolved to a file (a built-in name → its path).

  Returns:
    The rewritten ``argv``, the resolved config spec and the value as given (both the default's
    without ``--config``).

  Raises:
    ValueError: neither a config file nor a built-in name (the message lists the names).
  """
  argv = list(argv)
  where = _config_arg(argv)
  if where is None:
    return argv, _DEFAULT_CONFIG, _DEFAULT_CONFIG
  i, width = where
  if width == 2 and i + 1 >= len(argv):
    raise ValueError(f"{_CONFIG_FLAG} needs a value, e.g. --config=shapes:ci")
  value = argv[i].partition("=")[2] if width == 1 else argv[i + 1]
  spec = config_lib.resolve_config(value)
  argv[i : i + width] = [f"{_CONFIG_FLAG}={spec}"]
  return argv, spec, value


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """Every ``--config.a.b=...`` names a field of ``config`` (the message lists the choices).

  ml_collections would fail on an unknown field with a traceback from inside its flag parser.
  """
  for arg in argv:
    if not arg.startswith(("--config.", "-config.")):
      continue
    path = arg.lstrip("-").partition("=")[0].split(".")[1:]
    node: Any = config
    for depth, key in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if key not in node:
        where = ".".join(["config", *path[:depth]])
        raise ValueError(
          f"--{'.'.join(['config', *path])}: {where} has no field {key!r}; its fields are "
          f"{sorted(node.keys())}"
        )
      node = node[key]


def check_paths(config: ml_collections.ConfigDict) -> None:
  """The local paths the config names exist, before any model is built."""
  d = config.data
  if d.source in ("folder", "manifest") and d.path and not os.path.exists(d.path):
    kind = "directory of images" if d.source == "folder" else "manifest file"
    raise FileNotFoundError(
      f"config.data.path={d.path!r}: no such {kind} (config.data.source={d.source!r}); set "
      "--config.data.path to an existing one"
    )
  encoder = config.text.encoder
  looks_local = encoder.startswith(("/", ".", "~"))  # hub ids (org/name) never start so
  if looks_local and not os.path.isdir(os.path.expanduser(encoder)):
    raise FileNotFoundError(
      f"config.text.encoder={encoder!r}: no such checkpoint directory; set --config.text.encoder "
      "to 'shapes_demo', a T5 checkpoint directory or a Hub id (e.g. google/t5-v1_1-xxl)"
    )
  cache = config.text.embedding_cache
  if cache and not os.path.isdir(cache):
    raise FileNotFoundError(
      f"config.text.embedding_cache={cache!r}: no such directory; write it with "
      "`python -m imagen_jax.tools.encode_texts` or unset it"
    )


def parse_flags(argv: Sequence[str]) -> list[str]:
  """``app.run``'s flags parser: resolves ``--config`` and checks the config before absl parses.

  The config file is loaded here once so that its mistakes (an unknown ``:arg``, an unknown
  override field) are one-line errors naming the flag; absl then loads it again and applies the
  overrides.
  """
  argv, spec, value = resolve_config_arg(argv)
  check_overrides(cli.load_config_flag(spec, _CONFIG_FLAG, value), argv)
  return cli.parse_absl_flags(argv)


def main(argv: list[str]) -> None:
  """Trains ``--config`` in ``--workdir`` (absl main: flags are parsed)."""
  cli.reject_positional(argv)
  config = _CONFIG.value
  config_lib.validate(config)
  check_paths(config)
  # Orbax and Grain log every file operation at INFO: keep absl at WARNING, ours at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  multihost = bool(_MULTIHOST.value or _COORDINATOR.value)
  if multihost:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # Before anything compiles: JAX opens its cache at the first compilation.
  shared = os.path.join(_WORKDIR.value, ".jax_cache") if multihost else None
  cli.enable_compilation_cache(_CACHE.value, shared_dir=shared)
  log.info(
    "JAX %s: process %d/%d, %d local / %d global devices (%s)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  train_and_evaluate(config, _WORKDIR.value)


def run(argv: Sequence[str] | None = None) -> NoReturn:
  """The ``imagen-jax-train`` / ``python train.py`` entry point: parse, train, exit."""
  cli.run_absl(main, parse_flags, argv, flags_module=__name__)
