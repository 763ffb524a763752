"""The notebooks ship with their outputs, so a researcher browsing them sees the figures: every code cell of
each notebook was executed (`make notebooks`), none ended in an error, and each shows figures. That they
run at all is tested where their code lives (test_outliers.py, test_train_toy.py)."""

import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["ToyDiT_visualization.ipynb", "TokenEmbeddingsViz.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_has_its_outputs_and_figures(name):
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), f"{name}: run `make notebooks` to save it executed"
    outputs = [out for cell in code for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"], f"{name} was saved with an error"
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 2, f"{name} shows {len(figures)} figures"
