"""docs/tutorial.ipynb runs top to bottom (offline, on a kernel of this interpreter), and says what it shows."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pfnet import zoo

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
KERNEL = "pfcam-test-python"


@pytest.fixture
def this_interpreters_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that runs this interpreter (never a Jupyter installation's own python3), on the checkout."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pfcam tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


def test_the_tutorial_runs_top_to_bottom(this_interpreters_kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "the notebook is committed without outputs"
    NotebookClient(notebook, kernel_name=this_interpreters_kernel, timeout=600, allow_errors=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs if output.output_type == "stream")
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)
    assert "truth:" in text and "predicted:" in text and "top3:" in text
    assert "layer4: pointing game" in text and "layer4__gradcam__top1-" in text
    if "effnet_lite0" in zoo.ids():  # the ImageNet cell ran, or said why not
        assert text.count("top1:") == 2
    else:
        assert "no effnet_lite0 zoo entry; skipping" in text
    assert images >= 6  # the scene, the photo and its classes, three models, the methods
