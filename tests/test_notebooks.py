"""The notebooks in notebooks/ run top to bottom (in IMAGEN_JAX_FAST mode) and are committed clean.

Each notebook is executed with nbclient in a fresh ``python3`` kernel of this interpreter, from
``notebooks/``, with ``IMAGEN_JAX_FAST=1`` (tiny step counts), a temporary work dir, the Hugging
Face hub offline (the real-T5 cells then skip with a message) and the session's persistent XLA
compilation cache, so programs the other tests also compile are built once.
"""

from __future__ import annotations

import pytest

from tests.train_utils import ROOT, subprocess_env, two_stage_run

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
  assert [p.name for p in NOTEBOOKS] == [
    "01_quickstart.ipynb",
    "02_train_on_your_images.ipynb",
    "03_real_t5_and_scale.ipynb",
    "04_prompt_to_prompt.ipynb",
    "05_inpaint_and_invert.ipynb",
  ]
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i}: outputs"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'find_spec("imagen_jax")' in first.source, f"{path.name}: no install cell first"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  env = subprocess_env()
  env.update(
    IMAGEN_JAX_FAST="1",
    IMAGEN_JAX_WORKDIR=str(tmp_path),
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PYDEVD_DISABLE_FILE_VALIDATION="1",
  )
  if path.stem in ("04_prompt_to_prompt", "05_inpaint_and_invert"):
    env["IMAGEN_JAX_RUN"] = str(two_stage_run())  # the shared 2-step run: no training here
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    kernel_name="python3",  # jupyter_client runs it with this interpreter (sys.executable)
    timeout=600,
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  try:
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on any cell error
  finally:
    nbformat.write(nb, tmp_path / path.name)  # the executed notebook, outputs included
