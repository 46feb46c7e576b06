"""Test-session setup: a persistent XLA compilation cache, and under ``CI=true`` no silent skips.

Many tests build the same tiny models; with the cache an identical program compiles once.

Skips under CI: a test that skips because a dependency or file is missing looks green while it
tests nothing, so with ``CI`` set to a true value (``true``/``1``/``yes``, as CI services set it)
every skip fails the run, except tests marked ``@pytest.mark.online`` (they need the network,
e.g. the Hugging Face Hub, and may skip where it cannot be reached) and the node ids in
``ALLOWED_SKIPS``. The check is a plugin registered at configure time when ``CI`` is true; how it
also holds under pytest-xdist (``-n 2`` in pyproject's addopts):

* a skipped test (a ``skip``/``skipif`` marker, ``pytest.skip`` or ``pytest.importorskip`` in the
  test or one of its fixtures) has its report rewritten into a failure by the
  ``pytest_runtest_makereport`` wrapper below. The report is made where the test runs (an xdist
  worker) and is sent to the controller already failed, so the run fails like for any failure;
* a whole module skipped at import (a module-level ``importorskip`` or
  ``skip(allow_module_level=True)``) makes no test reports: its skipped collection report is
  recorded by ``pytest_collectreport`` (xdist forwards workers' skipped collection reports to the
  controller's hook) and ``pytest_sessionfinish`` turns the exit status into "tests failed",
  listing the modules in the terminal summary. (A collection *error* would abort the whole run.)

``xfail`` is not a skip and is left alone. ``tests/test_ci_skips.py`` tests all of this.
"""

from __future__ import annotations

import os
import tempfile

import jax
import pytest

_CACHE = os.environ.get("IMAGEN_JAX_TEST_CACHE") or tempfile.mkdtemp(prefix="imagen_jax_xla_")
os.environ["IMAGEN_JAX_TEST_CACHE"] = _CACHE  # subprocesses started by tests reuse it
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Node ids (``tests/test_x.py::test_y[param]``; a module's id for a whole skipped module) that may
# skip under CI=true, each with a comment saying why. Prefer ``@pytest.mark.online`` for tests that
# need the network. Nothing in the suite skips for a good reason today: the Hub tests fake the Hub
# locally, torch and nbformat/nbclient/ipykernel come with the [test] extra CI installs, and
# grain, orbax and tensorflow-datasets are runtime dependencies.
ALLOWED_SKIPS: frozenset[str] = frozenset()

ONLINE_MARKER = "online"


def ci_enabled() -> bool:
  """Whether ``CI`` is set to a true value, as CI services set it."""
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(longrepr) -> str:
  """``path:line: reason`` of a skip report (its longrepr is ``(path, lineno, reason)``)."""
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    path, lineno, reason = longrepr
    return f"{path}:{lineno}: {reason}"
  return str(longrepr)


def _allowed(nodeid: str, keywords) -> bool:
  return nodeid in ALLOWED_SKIPS or ONLINE_MARKER in keywords


class _NoSkipsUnderCI:
  """The hooks of the CI=true check; one instance per pytest config (pytester runs get theirs)."""

  def __init__(self):
    self.skipped_modules: dict[str, str] = {}  # collector node id -> skip reason

  @pytest.hookimpl(wrapper=True)
  def pytest_runtest_makereport(self, item, call):
    report = yield
    # report.wasxfail marks an xfail, which is reported as "skipped" but is not a skip.
    if (
      report.skipped
      and not hasattr(report, "wasxfail")
      and not _allowed(item.nodeid, item.keywords)
    ):
      report.outcome = "failed"
      report.longrepr = (
        f"skipped under CI=true, which fails the run: {_skip_reason(report.longrepr)}\n"
        "(install what the test needs; a test that can only run online may be marked "
        f"@pytest.mark.{ONLINE_MARKER} or added to ALLOWED_SKIPS in tests/conftest.py)"
      )
    return report

  def pytest_collectreport(self, report):
    # Under xdist: on each worker and, as xdist forwards skipped collection reports, on the
    # controller, whose exit status is the run's.
    if report.skipped and not _allowed(report.nodeid, ()):
      self.skipped_modules.setdefault(report.nodeid, _skip_reason(report.longrepr))

  def pytest_terminal_summary(self, terminalreporter):
    if self.skipped_modules:
      terminalreporter.section("skipped under CI=true (this fails the run)", red=True)
      for nodeid, reason in sorted(self.skipped_modules.items()):
        terminalreporter.line(f"{nodeid}: {reason}")

  @pytest.hookimpl(trylast=True)
  def pytest_sessionfinish(self, session):
    if self.skipped_modules and session.exitstatus == pytest.ExitCode.OK:
      session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    f"{ONLINE_MARKER}: needs the network (e.g. the Hugging Face Hub); besides tests/conftest.py's "
    "ALLOWED_SKIPS, the only tests allowed to skip under CI=true",
  )
  if ci_enabled():
    config.pluginmanager.register(_NoSkipsUnderCI(), "imagen_jax_no_skips_under_ci")
