"""examples/quickstart.ipynb runs from top to bottom, and is committed with outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
# What the notebook draws and writes into its WORKDIR, in order.
PICTURES = [
    "feature_drift.png",
    "recall_curve.png",
    "grid.png",
    "grid_hardest.png",
    "search_results.png",
]


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def _text(nb):
    return "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream")


def _pngs(nb):
    return [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


@pytest.mark.slow
def test_notebook_runs_with_a_few_steps(tmp_path, monkeypatch):
    # The notebook's parameter cell reads these (the kernel inherits them).
    monkeypatch.setenv("XBM_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("XBM_NOTEBOOK_IMAGES_PER_CLASS", "40")
    monkeypatch.setenv("XBM_NOTEBOOK_WORKDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError, with the cell, on any error
    text = _text(nb)
    assert "quickstart/train: 400 images, 10 classes" in text
    assert "Retrieval on the unseen test classes" in text
    assert "Epoch 3/3" in text and "first correct result at rank" in text
    assert len(_pngs(nb)) == len(PICTURES)
    for name in PICTURES:
        assert (tmp_path / name).stat().st_size > 1000, name
    assert (tmp_path / "search" / "saved_model.pb").exists()


def test_committed_notebook_has_its_outputs():
    # So that it reads on GitHub: run in full once, in order, without errors.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for o in _outputs(nb) if o.output_type == "error"]
    assert len(_pngs(nb)) == len(PICTURES)
    text = _text(nb)
    assert "quickstart/train: 7500 images, 10 classes" in text  # the full data
    assert "Epoch 3/3\n300/300" in text  # the quickstart's 900 steps
