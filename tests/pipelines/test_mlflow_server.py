"""A real ``mlflow server`` on the smoke run's sqlite store, queried through its REST API.

This is what a researcher opens after ``kedro run``: the tracking server must see the train
parent run, one nested run per model (the four architectures and the cascade) and their per-epoch, validation and test metrics.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.support.local_server import LocalServer, ServerError, free_port
from pancreas_seg.models.names import MODEL_NAMES

pytestmark = pytest.mark.slow

ARCHITECTURES = MODEL_NAMES
EXPERIMENT = "pancreas_seg_smoke"
STARTUP_TIMEOUT_S = 90


def _get(base: str, endpoint: str, **query: str) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(query)}" if query else f"{base}{endpoint}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{endpoint}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(smoke_project: Path, tmp_path_factory: pytest.TempPathFactory,
                  subprocess_env) -> Iterator[str]:
    """Base URL of ``mlflow server`` on 127.0.0.1 (free port); always terminated afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{smoke_project / 'mlflow.db'}",
               # the runs' artifact URIs are absolute paths under <copy>/mlruns (kedro-mlflow's
               # sqlite store in the project root); new experiments would go there too
               "--default-artifact-root", str(smoke_project / "mlruns"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    base = f"http://127.0.0.1:{port}"
    with LocalServer(command, f"{base}/health", log_path, smoke_project, subprocess_env()) as server:
        try:
            server.wait_ready(STARTUP_TIMEOUT_S)
        except ServerError as error:
            pytest.fail(str(error))
        yield base


def test_rest_api_lists_runs_and_metrics(configured_learning_rates: dict[str, float], mlflow_server: str) -> None:
    base = mlflow_server
    # get-by-name is a GET endpoint (a POST answers 405 Method Not Allowed)
    experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert experiment["name"] == EXPERIMENT and experiment["lifecycle_stage"] == "active"

    runs = _post(base, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    tags = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]
               and r["info"]["run_name"] == "train"]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    parent_id = parents[0]["info"]["run_id"]
    nested = {tags[r["info"]["run_id"]]["architecture"]: r for r in runs
              if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id}
    assert set(nested) == set(ARCHITECTURES)

    for arch, run in nested.items():
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        for key in ("val_dice_pancreas", "final_val_dice_pancreas", "test_dice_pancreas_mean"):
            assert key in metrics and 0.0 <= metrics[key] <= 1.0, (arch, key, sorted(metrics))
        assert float(params["training.learning_rate"]) == pytest.approx(configured_learning_rates[arch])
        history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                       metric_key="val_dice_pancreas")["metrics"]
        assert [m["step"] for m in sorted(history, key=lambda m: m["step"])] == \
            list(range(1, len(history) + 1)) and history, (arch, history)
        assert history[-1]["value"] == pytest.approx(metrics["val_dice_pancreas"])
        # the run's model is an MLflow logged model (the UI's Models column): the pyfunc "segmenter"
        outputs = run.get("outputs", {}).get("model_outputs", [])
        assert len(outputs) == 1, (arch, run.get("outputs"))
        logged = _get(base, f"/api/2.0/mlflow/logged-models/{outputs[0]['model_id']}")["model"]
        assert logged["info"]["name"] == "segmenter" and logged["info"]["source_run_id"] == run_id, logged
    # after train, every model is a registered version and the alias champion points at one of them
    champion = _get(base, "/api/2.0/mlflow/registered-models/alias", name="pancreas_seg", alias="champion")
    assert champion["model_version"]["tags"] and champion["model_version"]["run_id"] in {
        r["info"]["run_id"] for r in nested.values()}
    # ... chosen on the 3D validation Dice, which its tags name with the cases it was computed on
    champion_tags = {t["key"]: t["value"] for t in champion["model_version"]["tags"]}
    assert champion_tags["selection_score"] == "validation_dice_pancreas_mean" and champion_tags["selection_cases"]
