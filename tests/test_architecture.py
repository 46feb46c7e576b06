"""The package's imports flow one way (docs/architecture.md): a test, so that it stays true.

Parses every module of ``imagen_jax/`` (and ``bench/``) with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagen_jax"

# Layer of each top-level unit of the package, lowest first (docs/architecture.md). A module may
# import its own unit and units of a strictly lower layer; units of one layer never import each
# other (so there are no cycles between them).
LAYERS: dict[str, int] = {
  "sharding": 0,
  "kernels": 0,
  "metrics": 0,
  "diffusion": 1,
  "models": 1,
  "text": 2,
  "clip": 2,
  "data": 3,
  "checkpoint_integrity": 3,
  "config": 4,
  "checkpoint": 4,
  "stage": 5,
  "sample": 6,
  "edit": 7,
  "evaluators": 8,
  "train": 9,
  "tools": 10,
  "configs": 10,  # the built-in configs (the repository's configs/, shipped in the wheel)
}
# Function-local imports are for optional heavy dependencies only.
LAZY_OK = {"torch", "tensorflow_datasets"}


def _unit(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "imagen_jax" and len(parts) > 1 else None


def _module_name(path: Path, root: Path = ROOT) -> str:
  rel = path.relative_to(root).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, bool]]:
  """``(line, absolute module, at module level)`` of every import in ``path``."""
  tree = ast.parse(path.read_text(), filename=str(path))
  module = _module_name(path, root)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  top_level = {id(node) for node in tree.body}
  for node in tree.body:  # imports under a module-level `if`/`try` are still module level
    if isinstance(node, ast.If | ast.Try):
      top_level.update(id(n) for n in ast.walk(node))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        prefix = ".".join(base)
        names = [f"{prefix}.{node.module}" if node.module else prefix]
      else:
        names = [node.module]
        if node.module == "imagen_jax":  # from imagen_jax import sharding, metrics
          names = [f"imagen_jax.{a.name}" for a in node.names]
    else:
      continue
    out += [(node.lineno, n, id(node) in top_level) for n in names]
  return out


def _package_modules() -> list[Path]:
  return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
  units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _package_modules()}
  units.discard("__init__")
  assert units <= set(LAYERS), f"give these a layer in LAYERS and docs: {units - set(LAYERS)}"


def test_imports_flow_down():
  upward = []
  for path in _package_modules():
    src = _unit(_module_name(path))
    if src is None:  # imagen_jax/__init__.py: the public API, exported lazily by name
      continue
    for line, target, _ in _imports(path):
      dst = _unit(target)
      if dst is None or dst == src:
        continue
      if LAYERS[dst] >= LAYERS[src]:
        upward.append(
          f"{path.relative_to(ROOT)}:{line} imports {target} "
          f"({src}, layer {LAYERS[src]} -> {dst}, layer {LAYERS[dst]})"
        )
  assert not upward, "imports must flow down (docs/architecture.md):\n" + "\n".join(upward)


def test_package_never_imports_tools_tests_or_bench():
  bad = []
  for path in _package_modules():
    in_tools = _unit(_module_name(path)) == "tools"
    for line, target, _ in _imports(path):
      root = target.split(".")[0]
      if root in ("tests", "bench") or (target.startswith("imagen_jax.tools") and not in_tools):
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
  assert not bad, "\n".join(bad)


def test_function_local_imports_only_for_optional_heavy_dependencies():
  lazy = []
  for path in _package_modules():
    for line, target, top in _imports(path):
      if not top and target.split(".")[0] not in LAZY_OK:
        lazy.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
  assert not lazy, "move these imports to the top of their module:\n" + "\n".join(lazy)


# Hidden folders are virtual environments (bench/peer/.venv-peer), not bench code.
BENCH_FILES = sorted(
  p
  for p in (ROOT / "bench").rglob("*.py")
  if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
)


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_imports_only_the_package(path):
  bad = [
    f"{path.relative_to(ROOT)}:{line} imports {target}"
    for line, target, _ in _imports(path)
    if target.split(".")[0] == "tests"
  ]
  assert not bad, "\n".join(bad)


def test_checker_sees_upward_relative_and_local_imports(tmp_path):
  """The checker itself: absolute, relative and function-local imports are all seen."""
  fake = tmp_path / "imagen_jax" / "models" / "bad.py"
  fake.parent.mkdir(parents=True)
  fake.write_text(
    "from imagen_jax.train import trainer\n"
    "from ..sample import cascade\n"
    "\n\ndef f():\n  import grain\n"
  )
  imports = _imports(fake, tmp_path)
  assert imports == [
    (1, "imagen_jax.train", True),
    (2, "imagen_jax.sample", True),
    (6, "grain", False),
  ]
  src = _unit(_module_name(fake, tmp_path))
  assert src == "models" and LAYERS["train"] > LAYERS[src] and LAYERS["sample"] > LAYERS[src]
