"""The package as it ships: metadata, the packages and configs in the wheel, the public names.

Cheap checks only (no wheel is built here): ``.ci/wheel_smoke.sh`` builds and installs the wheel
and runs its console scripts from outside the checkout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

import pytest

import imagen_jax
from imagen_jax import config as config_lib
from tests.train_utils import ROOT, subprocess_env

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
BUILTIN = ["base64", "if_stage1", "if_stage2", "shapes", "sr1024", "sr256"]


def _requirement_names(reqs: list[str]) -> list[str]:
  return [r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0] for r in reqs]


def test_license_is_spdx_with_the_full_text():
  assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
  # setuptools>=77 rejects a license classifier next to an SPDX expression.
  assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
  assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]


def test_urls_and_python_versions():
  assert set(PROJECT["urls"]) == {"Homepage", "Repository", "Documentation", "Issues"}
  home = "https://github.com/imagen-jax/imagen-jax"
  assert all(url.startswith(home) for url in PROJECT["urls"].values())
  for version in ("3.11", "3.12"):
    assert f"Programming Language :: Python :: {version}" in PROJECT["classifiers"]


def test_extras():
  extras = PROJECT["optional-dependencies"]
  assert "tensorflow-datasets" not in _requirement_names(PROJECT["dependencies"])
  assert _requirement_names(extras["tfds"]) == ["tensorflow-datasets"]
  assert "tensorflow-datasets" in _requirement_names(extras["test"])
  assert set(_requirement_names(extras["notebooks"])) == {
    "matplotlib",
    "ipykernel",
    "nbclient",
    "nbformat",
  }
  # The published extra takes any recent torch; CI's exact pin is .ci/constraints.txt.
  torch = [r for r in extras["test"] if _requirement_names([r]) == ["torch"]]
  assert torch == ["torch>=2.4"], torch
  # The metric oracles (test only, never runtime).
  assert {"torchmetrics", "pytorch-fid"} <= set(_requirement_names(extras["test"]))
  assert not {"torch", "torchmetrics", "pytorch-fid"} & set(
    _requirement_names(PROJECT["dependencies"])
  )
  assert "torch==" in (ROOT / ".ci" / "constraints.txt").read_text()


def test_ci_applies_the_constraints_to_the_readme_command():
  run = (ROOT / ".ci" / "run").read_text()
  readme = (ROOT / "README.md").read_text()
  command = 'pip install -e ".[test]" && python -m pytest'
  assert command in readme and command in run
  assert run.index("export PIP_CONSTRAINT=") < run.index(command)
  assert "bash .ci/wheel_smoke.sh" in run and (ROOT / ".ci" / "wheel_smoke.sh").is_file()


@pytest.mark.parametrize("script", ["imagen-jax-train", "imagen-jax-sample"])
def test_console_scripts_name_a_run_function(script):
  module, _, func = PROJECT["scripts"][script].partition(":")
  path = ROOT / (module.replace(".", "/") + ".py")
  # Parsed, not imported: the two absl programs define the same flags (one per process).
  tree = ast.parse(path.read_text())
  assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_packages_list_every_package_and_maps_the_configs():
  setuptools = PYPROJECT["tool"]["setuptools"]
  on_disk = {
    ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "imagen_jax").rglob("__init__.py")
  }
  assert set(setuptools["packages"]) == on_disk | {"imagen_jax.configs"}
  assert setuptools["package-dir"] == {"imagen_jax.configs": "configs"}
  assert (ROOT / "configs" / "__init__.py").is_file()


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_configs_resolve_by_name(name):
  path, _, arg = config_lib.resolve_config(f"{name}:tiny").partition(":")
  assert path.endswith(f"{name}.py") and arg == "tiny"
  assert config_lib.resolve_config(name) == str(config_lib.builtin_configs_dir() / f"{name}.py")


def test_builtin_config_names_and_loading():
  assert config_lib.builtin_config_names() == BUILTIN
  assert config_lib.load_config("shapes:ci").stage_order == ("base", "sr")
  with pytest.raises(ValueError, match="one of \\['base64', 'if_stage1', 'if_stage2'"):
    config_lib.resolve_config("no_such_config")


def test_public_names():
  from imagen_jax import Cascade, T5Encoder, load_config, to_pil, train_and_evaluate
  from imagen_jax.sample.cascade import Cascade as cascade_cls
  from imagen_jax.text import T5Encoder as encoder_cls

  assert Cascade is cascade_cls and T5Encoder is encoder_cls
  assert load_config is config_lib.load_config
  assert callable(to_pil) and callable(train_and_evaluate)
  from imagen_jax.edit.prompt_to_prompt import prompt_to_prompt as p2p_fn

  assert imagen_jax.prompt_to_prompt is p2p_fn and imagen_jax.PromptToPrompt(mode="refine")
  assert set(imagen_jax.__all__) == {
    "Cascade",
    "PromptToPrompt",
    "prompt_to_prompt",
    "T5Encoder",
    "load_config",
    "to_pil",
    "train_and_evaluate",
  }
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    imagen_jax.nope  # noqa: B018


def test_importing_the_package_imports_nothing_heavy():
  code = (
    "import sys, imagen_jax\n"
    "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'grain', 'transformers', 'torch', "
    "'imagen_jax.sample', 'imagen_jax.train', 'imagen_jax.text') if m in sys.modules)\n"
    "assert not heavy, heavy\n"
    "print(imagen_jax.__version__)\n"
  )
  r = subprocess.run(
    [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == PROJECT["version"]
