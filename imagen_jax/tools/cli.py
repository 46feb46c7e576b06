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

  if __name__ == "__main__":
    cli.run_tool(main)      # an argparse tool: main(argv) -> exit code
    cli.run_absl(main)      # an absl program: app.run(main)
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from imagen_jax import config as config_lib

DEBUG_ENV = "IMAGEN_JAX_DEBUG"
DEBUG_HELP = f"show the full traceback of every error (or set {DEBUG_ENV}=1)"
USAGE_EXIT_CODE = 2  # what argparse exits with on a bad argument; every tool does the same

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
