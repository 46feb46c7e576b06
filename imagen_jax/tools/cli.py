"""How the command-line programs report a user mistake: one ``error: ...`` line, exit code 2.

A bad flag or config value, a missing path, a corrupt input image or a damaged checkpoint is the
user's to fix, and the message (which names the flag or config field, and the fix) is all they
need: a traceback only hides it. A genuine bug keeps its traceback and Python's exit code. The
line between the two:

* the exception is a ``ValueError``, ``KeyError``, ``FileNotFoundError``, ``NotADirectoryError``,
  ``IsADirectoryError`` or one of the package's own error classes (``CheckpointDamagedError``,
  ``NonFiniteError``, ...), and
* it was raised by the package (``imagen_jax/``, the built-in configs) or by the entry script:
  the innermost frame of its traceback is there. A ``ValueError`` from inside JAX, XLA or Orbax is
  a bug (or needs its traceback to be understood) and is re-raised.

``IMAGEN_JAX_DEBUG=1`` or ``--debug`` re-raises every exception (full traceback).

The programs also share their persistent compilation cache setup
(:func:`enable_compilation_cache`, the ``--compilation_cache`` flag).

  if __name__ == "__main__":
    cli.run_tool(main)      # an argparse tool: main(argv) -> exit code
    cli.run_absl(main)      # an absl program: app.run(main)
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jax
from absl import app, flags

from imagen_jax import config as config_lib

DEBUG_ENV = "IMAGEN_JAX_DEBUG"
DEBUG_HELP = f"show the full traceback of every error (or set {DEBUG_ENV}=1)"
USAGE_EXIT_CODE = 2  # what argparse exits with on a bad argument; every tool does the same

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  """``--debug`` in ``argv`` (default ``sys.argv``) or ``IMAGEN_JAX_DEBUG`` set to a true value.

  Read from the raw arguments, not parsed flags: a flag-parsing error must honour it too.
  """
  if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    return True
  args = sys.argv[1:] if argv is None else argv
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in args)


def _innermost_file(tb: types.TracebackType | None) -> str | None:
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb.tb_frame.f_code.co_filename if tb is not None else None


def _user_facing_dirs() -> list[Path]:
  """Where a deliberate ``raise`` of a user-facing message can come from."""
  dirs = [_PACKAGE_DIR, config_lib.builtin_configs_dir().resolve()]
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  if main_file:  # the entry script (train.py, or a console script's wrapper) itself
    dirs.append(Path(main_file).resolve())
  return dirs


def _is_own_error_class(exc: BaseException) -> bool:
  """An exception class the package defines (``CheckpointDamagedError``, ``NonFiniteError``)."""
  return type(exc).__module__.split(".")[0] == "imagen_jax"


def is_user_error(exc: BaseException) -> bool:
  """Whether ``exc`` is a user mistake to report in one line (see the module docstring)."""
  if not isinstance(exc, Exception):
    return False
  if not (isinstance(exc, _USER_ERRORS) or _is_own_error_class(exc)):
    return False
  where = _innermost_file(exc.__traceback__)
  if where is None:
    return False
  path = Path(where).resolve()
  return any(path == d or d in path.parents for d in _user_facing_dirs())


def error_line(exc: BaseException) -> str:
  """``error: <message>``; a multi-line message keeps its lines (the first one is the summary)."""
  if isinstance(exc, KeyError) and len(exc.args) == 1:
    message = str(exc.args[0])  # str(KeyError("x")) is "'x'"
  else:
    message = str(exc)
  return f"error: {message or type(exc).__name__}"


def run_cli(fn: Callable[[], Any], *, debug: bool = False) -> int:
  """Calls ``fn()``; a user mistake is printed as one ``error: ...`` line and returns 2.

  Args:
    fn: the program; its int return value is the exit code (anything else counts as 0).
    debug: re-raise user mistakes too (their full traceback).

  Returns:
    The exit code.
  """
  try:
    result = fn()
  except Exception as e:
    if debug or not is_user_error(e):
      raise
    sys.stdout.flush()  # keep the error below whatever the program printed before it
    print(error_line(e), file=sys.stderr, flush=True)
    return USAGE_EXIT_CODE
  return result if isinstance(result, int) else 0


def run_tool(main: Callable[[list[str]], Any]) -> NoReturn:
  """The ``__main__`` of an argparse tool: ``main(sys.argv[1:])`` through :func:`run_cli`."""
  argv = sys.argv[1:]
  sys.exit(run_cli(lambda: main(argv), debug=debug_requested(argv)))


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """``app.run``'s flags parser: a flag-parsing error is a one-line user mistake (exit code 2).

  absl's own parser prints two lines and exits with 1.
  """
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    raise ValueError(f"{e} (see --helpshort)") from None


def reject_positional(argv: Sequence[str]) -> None:
  """absl passes stray words to ``main``; they are a mistake (``train.py shapes:ci``), not input."""
  if len(argv) > 1:
    raise ValueError(
      f"unexpected argument(s) {list(argv[1:])}: every option is a flag (e.g. --config=shapes:ci)"
    )


def _list_in_help(module_name: str) -> None:
  """absl's ``--help`` shows the main module's docstring and flags: show ``module_name``'s.

  The flags are defined in ``imagen_jax.tools.<name>``; the main module is ``train.py`` or a
  console script's wrapper (which has no docstring).
  """
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None and not main_module.__doc__:
    main_module.__doc__ = sys.modules[module_name].__doc__


def run_absl(
  main: Callable[[list[str]], Any],
  flags_parser: Callable[[list[str]], list[str]] = parse_absl_flags,
  argv: Sequence[str] | None = None,
  *,
  flags_module: str | None = None,
) -> NoReturn:
  """``absl.app.run(main, flags_parser=...)`` with user mistakes as one line and exit code 2.

  Args:
    main: the absl main (called with the arguments left after the flags).
    flags_parser: parses the flags (``argv`` in, those arguments out).
    argv: default ``sys.argv``.
    flags_module: the module defining the flags, for ``--help``.
  """
  argv = list(sys.argv if argv is None else argv)
  if flags_module:
    _list_in_help(flags_module)
  sys.exit(
    run_cli(lambda: app.run(main, argv, flags_parser=flags_parser), debug=debug_requested(argv[1:]))
  )


def load_config_flag(spec: str, flag: str = "--config", value: str | None = None) -> Any:
  """:func:`imagen_jax.config.load_config` of a flag's value; its mistakes name the flag.

  A ``ValueError`` raised while loading a config file (an unknown ``:arg``, say) is about the
  flag's value, wherever in the file it was raised.

  Args:
    spec: the config to load (``path.py[:arg]`` or ``name[:arg]``).
    flag: the flag it came from.
    value: the flag's value as the user typed it, if ``spec`` is a rewrite of it.
  """
  try:
    return config_lib.load_config(spec)
  except ValueError as e:
    message = str(e)
    if not message.startswith(flag):
      message = f"{flag}={spec if value is None else value}: {message}"
    raise ValueError(message) from None


COMPILATION_CACHE_HELP = (
  "Persistent XLA compilation cache directory (a second run loads its compiled programs instead "
  "of compiling them), or 'none' to turn it off. Default: $JAX_COMPILATION_CACHE_DIR if set, else "
  "$XDG_CACHE_HOME/imagen_jax/jax (~/.cache/imagen_jax/jax); <workdir>/.jax_cache with "
  "--multihost."
)
_CACHE_OFF = ("", "none")
# Cache every program, not only those over JAX's 1 s compile-time default: on CPU most of a small
# run's start-up is many sub-second compiles. A JAX_* environment variable still wins.
_CACHE_THRESHOLDS = {
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": -1,  # -1: no size floor (JAX's own quick start)
}


def default_compilation_cache_dir() -> str:
  """``$XDG_CACHE_HOME/imagen_jax/jax``, ``~/.cache/imagen_jax/jax`` without it.

  A per-user cache directory, not the run's workdir: the cache is keyed by program, JAX version
  and devices, not by run, so a new workdir, a resumed run and ``sample.py`` all reuse it, as
  Hugging Face users know from ``~/.cache/huggingface`` and MaxText users from its default
  ``jax_cache_dir: ~/jax_cache``. It is also private: JAX trusts its cache (a writable cache runs
  code), and a workdir is often shared storage.
  """
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "imagen_jax", "jax")


def enable_compilation_cache(path: str | None, *, shared_dir: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on (or off) for this process.

  Call it before the first compilation: JAX opens its cache once, at the first compile.

  Args:
    path: the ``--compilation_cache`` flag: a directory; ``"none"`` (or ``""``, as MaxText's
      ``jax_cache_dir=``) to turn the cache off; ``None`` for the default: JAX's own setting
      (``JAX_COMPILATION_CACHE_DIR``) if any, else ``shared_dir``, else
      :func:`default_compilation_cache_dir`.
    shared_dir: the default of a multi-process run: a directory every process reads, such as the
      workdir's ``.jax_cache``. Only process 0 writes the cache, so per-host directories would
      leave every other host compiling.

  Returns:
    The cache directory in use, or ``None`` when the cache is off.

  Raises:
    ValueError: ``path`` is given and cannot be created or written.
  """
  if path is not None and path.strip().lower() in _CACHE_OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  given = path is not None
  if not given:
    path = jax.config.jax_compilation_cache_dir or shared_dir or default_compilation_cache_dir()
  if "://" not in path:  # a local path (remote ones, gs://..., go to JAX as they are)
    path = os.path.abspath(os.path.expanduser(path))
    if not _writable(path):
      if given:
        raise ValueError(
          f"--compilation_cache={path}: cannot create or write that directory; pass another "
          "or --compilation_cache=none"
        )
      log.warning("No compilation cache: %s is not writable (set --compilation_cache=DIR)", path)
      jax.config.update("jax_enable_compilation_cache", False)
      return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  for name, value in _CACHE_THRESHOLDS.items():
    if name.upper() not in os.environ:
      jax.config.update(name, value)
  log.info("Compilation cache: %s", path)
  return path


def _writable(path: str) -> bool:
  """Whether ``path`` is a writable directory or could be made one (nothing is created)."""
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return False
    path = parent
  return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
