"""Under ``CI=true`` skipped tests fail the run unless allow-listed (``tests/conftest.py``).

Each test runs a tiny inner pytest session (``pytester``) that loads ``tests/conftest.py`` as a
plugin (``-p tests.conftest``), in-process, and once in a subprocess under pytest-xdist.
"""

from __future__ import annotations

import os

import pytest

from tests import conftest as suite_conftest
from tests.train_utils import ROOT

pytest_plugins = ["pytester"]

TEST_SKIPS = """
import pytest

def test_passes():
  pass

@pytest.mark.skip(reason="marker skip")
def test_marker_skip():
  pass

def test_importorskip_in_body():
  pytest.importorskip("imagen_jax_no_such_module")

@pytest.fixture
def needs_missing():
  pytest.skip("fixture skip")

def test_fixture_skip(needs_missing):
  pass

@pytest.mark.xfail(reason="an xfail is not a skip")
def test_xfail():
  assert False
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("imagen_jax_no_such_module")

def test_never_collected():
  pass
"""

ONLINE = """
import pytest

@pytest.mark.online
def test_needs_the_hub():
  pytest.skip("offline")
"""

PLUGIN = ("-p", "tests.conftest")


def _run(pytester, monkeypatch, ci: str | None, *args: str):
  """Runs the inner session in-process with ``CI`` set to ``ci`` (unset for None)."""
  if ci is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", ci)
  return pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider", "-rA", *args)


def test_skips_pass_without_ci(pytester, monkeypatch):
  pytester.makepyfile(test_skips=TEST_SKIPS, test_module_skip=MODULE_SKIP)
  result = _run(pytester, monkeypatch, None)
  assert result.ret == 0, result.stdout.str()
  result.assert_outcomes(passed=1, skipped=4, xfailed=1)
  monkeypatch.setenv("CI", "false")
  assert pytester.runpytest(*PLUGIN).ret == 0


@pytest.mark.parametrize("ci", ["true", "1"])
def test_every_kind_of_skip_fails_under_ci(pytester, monkeypatch, ci):
  pytester.makepyfile(test_skips=TEST_SKIPS)
  result = _run(pytester, monkeypatch, ci)
  assert result.ret == pytest.ExitCode.TESTS_FAILED
  # Marker and fixture skips happen at setup (errors), importorskip in the body at call (a failure).
  result.assert_outcomes(passed=1, failed=1, errors=2, xfailed=1)
  out = result.stdout.str()
  for name, reason in [
    ("test_marker_skip", "marker skip"),
    ("test_importorskip_in_body", "could not import 'imagen_jax_no_such_module'"),
    ("test_fixture_skip", "fixture skip"),
  ]:
    assert f"test_skips.py::{name}" in out
    assert reason in out
  assert "skipped under CI=true, which fails the run" in out


def test_module_level_skip_fails_under_ci_and_other_tests_still_run(pytester, monkeypatch):
  pytester.makepyfile(test_module_skip=MODULE_SKIP, test_ok="def test_ok():\n  pass\n")
  result = _run(pytester, monkeypatch, "true")
  assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
  result.assert_outcomes(passed=1, skipped=1)  # the run is not aborted by the skipped module
  result.stdout.fnmatch_lines(
    [
      "*skipped under CI=true (this fails the run)*",
      "test_module_skip.py: *could not import 'imagen_jax_no_such_module'*",
    ]
  )


def test_allow_listed_skips_pass_under_ci(pytester, monkeypatch):
  pytester.makepyfile(test_online=ONLINE, test_module_skip=MODULE_SKIP, test_skips=TEST_SKIPS)
  allowed = {
    "test_module_skip.py",
    "test_skips.py::test_marker_skip",
    "test_skips.py::test_importorskip_in_body",
    "test_skips.py::test_fixture_skip",
  }
  monkeypatch.setattr(suite_conftest, "ALLOWED_SKIPS", frozenset(allowed))
  result = _run(pytester, monkeypatch, "true")
  assert result.ret == 0, result.stdout.str()
  result.assert_outcomes(passed=1, skipped=5, xfailed=1)
  # The allow-list is by exact node id: one entry fewer and that test fails again.
  monkeypatch.setattr(suite_conftest, "ALLOWED_SKIPS", frozenset(allowed - {"test_module_skip.py"}))
  assert _run(pytester, monkeypatch, "true").ret == pytest.ExitCode.TESTS_FAILED


def test_suite_allow_list_is_short():
  """Every allow-list entry is a reviewed exception; grow it only with a comment saying why."""
  assert len(suite_conftest.ALLOWED_SKIPS) <= 5


@pytest.mark.slow  # ~30 s: the controller and both workers import jax (with tests.conftest)
def test_under_xdist(pytester, monkeypatch):
  """Skips happen on the xdist workers; the controller's exit status must still fail."""
  pytester.makepyfile(test_skips=TEST_SKIPS, test_module_skip=MODULE_SKIP, test_online=ONLINE)
  monkeypatch.setenv("CI", "true")
  # The subprocess (and its workers) import tests.conftest from the repository.
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  result = pytester.runpytest_subprocess(
    *PLUGIN, "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider", "-rA"
  )
  out = result.stdout.str()
  assert result.ret == pytest.ExitCode.TESTS_FAILED, out
  # The online test and the module skip stay skips; the module's is listed and fails the run.
  result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1)
  assert "test_module_skip.py: " in out and "fixture skip" in out and "marker skip" in out
