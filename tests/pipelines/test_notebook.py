"""``notebooks/model_comparison.ipynb`` runs headless (nbclient + ipykernel) against the smoke run.

The notebook loads the project with Kedro's IPython extension (``%reload_kedro``); the project
path and environment come from ``PANCREAS_SEG_PROJECT`` / ``PANCREAS_SEG_ENV``. It is copied into
``<smoke copy>/notebooks/`` and executed there, like a researcher opening it in that project.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "model_comparison.ipynb"
ARCHITECTURES = ("unet", "unet_small", "fcn", "vnet2d", "cascade")


def test_committed_notebook_has_no_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("%reload_kedro" in c.source for c in code)


@pytest.mark.slow
def test_notebook_executes_against_smoke_run(smoke_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415

    # ipykernel's own "python3" spec (shipped in <venv>/share/jupyter/kernels) is enough; jupyter
    # replaces its "python" with this interpreter, so the kernel runs in the project's venv
    assert "python3" in KernelSpecManager().find_kernel_specs(), "no python3 kernel spec"

    workdir = smoke_project / "notebooks"
    workdir.mkdir(exist_ok=True)
    target = workdir / NOTEBOOK.name
    shutil.copy(NOTEBOOK, target)
    monkeypatch.setenv("PANCREAS_SEG_PROJECT", str(smoke_project))
    monkeypatch.setenv("PANCREAS_SEG_ENV", "smoke")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(target, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    nbformat.write(notebook, target)  # executed copy, handy when debugging a failure

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     + str(o.get("data", {}).get("text/html", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for o in outputs)
    assert all(arch in text for arch in ARCHITECTURES), "comparison table not shown"
    assert "| unet_small |" in text  # the markdown table, rendered through IPython.display.Markdown
    assert "dice_mean" in text  # the model_comparison DataFrame
    assert "val_dice_pancreas" in text  # training_history_unet
    assert "optimizer_step" in text and "training_seconds" in text   # the budget table of the learning curves
    assert "Paired comparison of `dice` (pancreas" in text   # paired_comparison_markdown
    assert "Tumour detection on the held-out test cases" in text and "froc_cpm" in text   # the detection table
    assert "tumour in reference" in text                     # the per-case patient scores
    assert "No cross-validation yet" in text                 # the smoke project ran `train` only
    assert "No tuning yet" in text                           # nor `tune` (its section: tests/pipelines/test_tune.py)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # Dice box plots, test overlays, FROC, paired differences, learning and training curves
    # the notebook ran from the project root: kedro-mlflow's relative sqlite store is the project's
    assert not (workdir / "mlflow.db").exists()
