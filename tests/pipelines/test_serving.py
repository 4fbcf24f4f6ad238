"""The registered champion served by ``mlflow models serve`` over HTTP on 127.0.0.1, against the
inference pipeline in a new process; and where evaluation and inference runs are logged.

Real data: ``../shared/realdata/ct_abdomen_3mm.nii.gz``, TotalSegmentator's example CT (Apache-2.0),
used read-only. The smoke models are untrained noise: the checks are about identical output,
geometry and error handling, not accuracy.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from benchmarks.support.local_server import LocalServer, ServerError, free_port

pytestmark = pytest.mark.slow

CT_NAME = "ct_abdomen_3mm.nii.gz"
EXPERIMENT = "pancreas_seg_smoke"
STARTUP_TIMEOUT_S = 180


def _post(base: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _request(*encoded: str) -> dict:
    return {"dataframe_split": {"columns": ["nifti_base64"], "data": [[e] for e in encoded]}}


def _encode(image: nib.Nifti1Image) -> str:
    return base64.b64encode(image.to_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def project(smoke_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("serving") / "pancreas_seg"
    shutil.copytree(smoke_project, copy, ignore=shutil.ignore_patterns("notebooks"))
    return copy


@pytest.fixture(scope="module")
def server(project: Path, subprocess_env) -> Iterator[str]:
    """``mlflow models serve -m models:/pancreas_seg@champion --env-manager local`` on a free port."""
    port = free_port()
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
                         PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pancreas_seg@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    base = f"http://127.0.0.1:{port}"
    with LocalServer(command, f"{base}/ping", project / "serve.log", project, env) as server:
        try:
            server.wait_ready(STARTUP_TIMEOUT_S, interval_s=1)
        except ServerError as error:
            pytest.fail(str(error))
        yield base


def test_served_mask_is_the_inference_pipelines_mask(server: str, project: Path, require_realdata,
                                                     kedro_cli_runner) -> None:
    real_ct = require_realdata(CT_NAME) / CT_NAME
    status, body = _post(server, _request(base64.b64encode(real_ct.read_bytes()).decode("ascii")))
    assert status == 200, body
    served = nib.Nifti1Image.from_bytes(gzip.decompress(
        base64.b64decode(body["predictions"][0]["mask_nifti_base64"])))
    ct = nib.load(real_ct)
    assert served.shape == ct.shape and np.allclose(served.affine, ct.affine)
    assert served.get_data_dtype() == np.uint8

    output = project / "data" / "07_model_output" / "inference_champion"
    kedro_cli_runner(project, "--pipelines=inference", "--params",
                     f"inference.input_path={real_ct},inference.model=models:/pancreas_seg@champion,"
                     f"inference.output_dir={output.relative_to(project)}")
    pipeline = nib.load(output / CT_NAME)
    assert np.array_equal(np.asarray(served.dataobj), np.asarray(pipeline.dataobj))
    assert np.array_equal(served.affine, pipeline.affine)
    registration = json.loads((project / "data" / "08_reporting" / "training" / "model_registration.json").read_text())
    report = json.loads((project / "data" / "08_reporting" / "inference_report.json").read_text())
    assert report["architecture"] == registration["champion"]


def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server: str) -> None:
    volume = np.zeros((16, 16, 8), np.float32)
    with_nan = volume.copy()
    with_nan[3, 4, 5] = np.nan
    cases = {
        "not NIfTI": (_request(base64.b64encode(b"certainly not a NIfTI file").decode()), "not readable as NIfTI"),
        "2D": (_request(_encode(nib.Nifti1Image(volume[..., 0], np.eye(4)))), "must be 3D"),
        "NaN": (_request(_encode(nib.Nifti1Image(with_nan, np.eye(4)))), "1 non-finite voxels"),
        "not base64": (_request("%%% not base64 %%%"), "not valid base64"),
        "no column": ({"dataframe_split": {"columns": ["scan"], "data": [["x"]]}}, "neither"),
    }
    for name, (payload, expected) in cases.items():
        status, body = _post(server, payload)
        assert status == 400, (name, body)
        assert expected in body["message"], (name, body["message"])
        assert "stack_trace" not in body and "Traceback" not in body["message"], (name, body)
    good = nib.Nifti1Image((np.arange(24 * 20 * 6, dtype=np.int16).reshape(24, 20, 6) % 400) - 100,
                           np.diag([1.5, 1.5, 3.0, 1.0]))
    status, body = _post(server, _request(_encode(good)))
    assert status == 200, body
    assert len(body["predictions"]) == 1                      # still serving after the bad requests


def _run_ids(client: mlflow.MlflowClient, experiment_name: str) -> set[str]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return set()
    return {r.info.run_id for r in client.search_runs([experiment.experiment_id], max_results=1000)}


def test_evaluation_and_inference_runs_go_to_their_own_experiments(project: Path, kedro_cli_runner) -> None:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    # the copied project may hold runs of earlier tests: only the runs made here are checked
    before = {name: _run_ids(client, name) for name in (EXPERIMENT, f"{EXPERIMENT}_evaluation", f"{EXPERIMENT}_inference")}
    kedro_cli_runner(project, "--pipelines=evaluation")
    kedro_cli_runner(project, "--pipelines=inference")
    failed = kedro_cli_runner(project, "--pipelines=inference", "--params",
                              "inference.input_path=data/01_raw/no_such_folder", check=False)
    assert failed.returncode != 0
    names = {e.name: e for e in client.search_experiments()}
    for name in before:
        assert names[name].tags.get("mlflow.experimentKind") == "custom_model_development", name
    new_training = _run_ids(client, EXPERIMENT) - before[EXPERIMENT]
    assert not new_training, "evaluation or inference logged to the training experiment"
    new_inference = [client.get_run(r) for r in _run_ids(client, f"{EXPERIMENT}_inference") - before[f"{EXPERIMENT}_inference"]]
    assert sorted(r.info.status for r in new_inference) == ["FAILED", "FINISHED"]
    finished = next(r for r in new_inference if r.info.status == "FINISHED")
    assert finished.data.params["inference.model"] == "unet" and finished.data.metrics["scans_segmented"] >= 1
    new_evaluation = [client.get_run(r) for r in _run_ids(client, f"{EXPERIMENT}_evaluation") - before[f"{EXPERIMENT}_evaluation"]]
    assert [r.info.status for r in new_evaluation] == ["FINISHED"]
    assert "statistics/paired_comparison.md" in {a.path for a in client.list_artifacts(new_evaluation[0].info.run_id, "statistics")}
