"""``kedro run --pipelines=train --runner=pancreas_seg.runners.DaskRunner`` on a 2-worker LocalCluster
(a NEW process, ``--env smoke``) gives the sequential runner's outputs: the same weights, metrics and
MLflow runs.

The sequential run is the session's ``smoke_project``. Both runs seed every training the same way;
the Dask workers run the four architectures' training nodes two at a time (``conf/base/dask.yml``:
one ``accelerator`` per worker, one per ``model_training`` node).

The last test uses the models the Dask run wrote where a user would next: ``--pipelines=evaluation``
and ``--pipelines=inference``, each in a NEW process on the sequential runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.models.names import MODEL_NAMES

pytestmark = pytest.mark.slow

EXPERIMENT = "pancreas_seg_smoke"  # conf/smoke/mlflow.yml
DATASET = "Task07_Pancreas_smoke"  # conf/smoke: ingestion.synthetic.path
INFERENCE_MODEL = "vnet2d"         # not the default (unet): the runtime parameter must be honoured


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


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_evaluation_and_inference_in_new_processes_after_the_dask_train(
        dask_project: tuple[Path, str], smoke_project: Path, kedro_cli_runner, evaluation_rerunner, model_card_reader,
        tmp_path: Path) -> None:
    """Evaluation re-run in its own process from the Dask-trained models gives the sequential
    project's per-case metrics and predicted label maps; inference on one held-out scan with a
    non-default model writes a mask on the scan's grid equal to that model's evaluation prediction.

    Runs last in this module: it deletes and rewrites the Dask project's evaluation outputs (which
    come back the same, so the tests above would still hold)."""
    project, _ = dask_project
    evaluation = project / "data" / "08_reporting" / "evaluation"
    predictions = project / "data" / "07_model_output"
    evaluation_rerunner(project)  # the Dask run wrote them: this new process must write them again

    manifest = pd.read_csv(project / "data" / "03_primary" / "case_manifest.csv")
    test_ids = sorted(manifest.loc[manifest["split"] == "test", "case_id"])
    assert test_ids
    sequential_evaluation = smoke_project / "data" / "08_reporting" / "evaluation"
    for table in ("metrics_per_case.csv", "model_comparison.csv",
                  *(f"{name}/metrics_per_case.csv" for name in MODEL_NAMES)):
        fresh, sequential = pd.read_csv(evaluation / table), pd.read_csv(sequential_evaluation / table)
        pd.testing.assert_frame_equal(fresh, sequential, check_exact=False, rtol=1e-9, atol=0, obj=table)
    per_case = pd.read_csv(evaluation / "metrics_per_case.csv")
    assert set(per_case["architecture"]) == set(MODEL_NAMES) and sorted(set(per_case["case_id"])) == test_ids
    assert per_case["dice"].notna().any()
    for name in MODEL_NAMES:
        check = json.loads((evaluation / name / "model_check.json").read_text())
        assert check["weights_sha256"] == model_card_reader(smoke_project, name)["weights_sha256"], name
        assert check["test_cases"] == test_ids, name
        for case_id in test_ids:
            fresh = _labels(predictions / name / f"{case_id}.nii.gz")
            sequential = _labels(smoke_project / "data" / "07_model_output" / name / f"{case_id}.nii.gz")
            assert np.array_equal(fresh, sequential), (name, case_id)

    case_id = test_ids[0]
    scan = project / "data" / "01_raw" / DATASET / "imagesTr" / f"{case_id}.nii.gz"
    output_dir = tmp_path / "masks"
    kedro_cli_runner(project, "--pipelines=inference",
                     f"--params=inference.input_path={scan},inference.output_dir={output_dir},"
                     f"inference.model={INFERENCE_MODEL}")

    report = json.loads((project / "data" / "08_reporting" / "inference_report.json").read_text())
    assert report["architecture"] == INFERENCE_MODEL and report["skipped"] == []
    assert [row["case_id"] for row in report["outputs"]] == [case_id]
    ct, mask = nib.load(scan), nib.load(output_dir / f"{case_id}.nii.gz")
    assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine)
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert np.array_equal(labels, _labels(predictions / INFERENCE_MODEL / f"{case_id}.nii.gz"))

    # the inference pipeline on the Dask runner: the loaded predictor travels between workers
    dask_dir = tmp_path / "masks_dask"
    kedro_cli_runner(project, "--pipelines=inference", "--runner=pancreas_seg.runners.DaskRunner",
                     f"--params=inference.input_path={scan},inference.output_dir={dask_dir},"
                     f"inference.model={INFERENCE_MODEL}")
    assert np.array_equal(_labels(dask_dir / f"{case_id}.nii.gz"), labels)
