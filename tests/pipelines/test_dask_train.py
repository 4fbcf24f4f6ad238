"""``kedro run --pipelines=train --runner=pancreas_seg.runners.DaskRunner`` on a 2-worker LocalCluster
(a NEW process, ``--env smoke``) gives the sequential runner's outputs: the same weights, metrics and
MLflow runs.

The sequential run is the session's ``smoke_project``. Both runs seed every training the same way;
the Dask workers run the four architectures' training nodes two at a time (``conf/base/dask.yml``:
one ``accelerator`` per worker, one per ``model_training`` node).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pancreas_seg.models.names import MODEL_NAMES

pytestmark = pytest.mark.slow

EXPERIMENT = "pancreas_seg_smoke"  # conf/smoke/mlflow.yml


@pytest.fixture(scope="module")
def dask_project(tmp_path_factory: pytest.TempPathFactory, project_copier, kedro_cli_runner) -> tuple[Path, str]:
    project = project_copier(tmp_path_factory.mktemp("dask_train") / "pancreas_seg")
    result = kedro_cli_runner(project, "--pipelines=train", "--runner=pancreas_seg.runners.DaskRunner")
    return project, result.stdout + result.stderr


def _training_runs(project: Path) -> dict[tuple[str, str | None], dict[str, Any]]:
    """``(run name, parent run name) -> params, metrics, status`` of the smoke training experiment."""
    import mlflow  # noqa: PLC0415

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = {run.info.run_id: run.info.run_name for run in runs}
    out = {}
    for run in runs:
        key = (run.info.run_name, names.get(run.data.tags.get("mlflow.parentRunId")))
        assert key not in out, f"two runs {key} in {project}"
        history = {name: [m.value for m in client.get_metric_history(run.info.run_id, name)]
                   for name in run.data.metrics if name.startswith("val_")}
        out[key] = {"params": run.data.params, "metrics": run.data.metrics, "history": history,
                    "status": run.info.status}
    return out


def test_dask_train_ran_on_the_cluster(dask_project: tuple[Path, str]) -> None:
    _, output = dask_project
    flat = " ".join(output.split())
    assert "starting a LocalCluster of 2 worker process(es)" in flat
    assert "Completed node unet.train_model" in flat and "on the cluster" in flat


def test_dask_train_gives_the_sequential_weights_and_metrics(dask_project: tuple[Path, str], smoke_project: Path,
                                                             model_card_reader) -> None:
    project, _ = dask_project
    for name in MODEL_NAMES:
        sequential, dask = model_card_reader(smoke_project, name), model_card_reader(project, name)
        assert dask["weights_sha256"] == sequential["weights_sha256"], name
        assert dask["cases"] == sequential["cases"], name
    for table in ("model_comparison.csv", "metrics_per_case.csv"):
        sequential = pd.read_csv(smoke_project / "data" / "08_reporting" / "evaluation" / table)
        dask = pd.read_csv(project / "data" / "08_reporting" / "evaluation" / table)
        pd.testing.assert_frame_equal(dask, sequential, check_exact=False, rtol=1e-9, atol=0)


def test_dask_train_logs_the_sequential_mlflow_runs(dask_project: tuple[Path, str], smoke_project: Path) -> None:
    project, _ = dask_project
    sequential, dask = _training_runs(smoke_project), _training_runs(project)
    assert set(dask) == set(sequential)
    assert {parent for _, parent in dask} == {None, "train"}   # one parent run, every model nested in it
    assert {name for name, parent in dask if parent == "train"} >= set(MODEL_NAMES)
    for key, run in dask.items():
        assert run["status"] == "FINISHED", key
        assert run["params"] == sequential[key]["params"], key
        assert run["history"] == sequential[key]["history"], key
        timing = {m for m in run["metrics"] if "seconds" in m}  # wall times differ by nature
        assert {k: v for k, v in run["metrics"].items() if k not in timing} == \
            {k: v for k, v in sequential[key]["metrics"].items() if k not in timing}, key
