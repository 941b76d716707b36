"""The analysis notebook runs headless from top to bottom and draws its figures; it is committed without outputs."""

from __future__ import annotations

import glob
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "forgetting_curves.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_notebook_executes_and_draws_every_figure(tmp_path):
    before = set(glob.glob(f"{tempfile.gettempdir()}/cil-notebook-*"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # seen accuracy, matrices, forgetting bars, old vs new
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("avg_incremental_acc" in o["data"]["text/html"] for o in tables)  # the summary table
    summary = next(o["data"]["text/html"] for o in tables if "avg_incremental_acc" in o["data"]["text/html"])
    assert "cil-notebook-" not in summary  # rows labelled by run name and timestamp, not temporary paths
    assert set(glob.glob(f"{tempfile.gettempdir()}/cil-notebook-*")) <= before  # its temporary folder is removed
