"""A smoke ``train`` with the lab's settings (``kedro run --env team_smoke``: conf/smoke + conf/team)
records into a REAL ``mlflow server`` on a REAL PostgreSQL, and the registry's champion resolves
through that server.

Checked through the server (``MlflowClient`` on its HTTP URI): the parent run and one nested run
per model, FINISHED, with params, every epoch's metric steps and their artifacts; the artifacts sit
in the server's shared folder (proxied, ``mlflow-artifacts:/``) and nothing was written to a local
store in the project (no ``mlflow.db``, no ``mlruns/``); the study-independent rows are in
PostgreSQL itself. Then ``inference.model=models:/pancreas_seg@champion`` in a new process loads
the champion through the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from benchmarks.support.team_stack import TeamStack
from pancreas_seg.models.names import MODEL_NAMES

from tests.team.team_support import SMOKE_EXPERIMENT, TeamTrained, run_team_kedro, through

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess, pytest.mark.slow]


def _runs(client: MlflowClient, experiment_name: str, since_ms: int = 0) -> list:
    """The experiment's runs started at or after ``since_ms`` (the session's server also holds the
    runs of other tests)."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no experiment {experiment_name} on the server"
    return [run for run in client.search_runs([experiment.experiment_id], max_results=1000)
            if run.info.start_time >= since_ms]


def test_a_smoke_train_records_runs_params_metrics_and_artifacts_in_the_server(
        team: TeamStack, team_trained: TeamTrained) -> None:
    project = team_trained.project
    client = MlflowClient(tracking_uri=team.tracking_uri)
    runs = _runs(client, SMOKE_EXPERIMENT, team_trained.started_ms)
    [parent] = [r for r in runs if r.info.run_name == "train" and "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.epochs"] == "1" and parent.data.params["preprocessing.image_size_px"] == "64"
    nested = {r.data.tags["architecture"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(nested) == set(MODEL_NAMES)
    for name, run in nested.items():
        assert run.info.status == "FINISHED", name
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri   # proxied by the server
        assert 0.0 <= run.data.metrics["test_dice_pancreas_mean"] <= 1.0, (name, sorted(run.data.metrics))
        history = client.get_metric_history(run.info.run_id, "val_dice_pancreas")
        assert [m.step for m in history] == [1], (name, history)        # conf/smoke: 1 epoch, step = epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "model_card.json" in artifacts, (name, artifacts)
        card = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="model_card.json", tracking_uri=team.tracking_uri)).read_text())
        assert card["mlflow_run_id"] == run.info.run_id
        # the bytes are in the server's shared folder, under <experiment id>/<run id>/artifacts/
        stored = team.artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / "model_card.json"
        assert stored.is_file(), f"{stored} missing: artifacts did not go through the server"
        assert client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'"), name
    # nothing went to a local store in the project
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    # ... and the rows are in PostgreSQL
    with team.postgres.connect("mlflow") as connection:
        count = connection.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (parent.info.run_id,)).fetchone()[0]
        steps = connection.execute("SELECT count(*) FROM metrics WHERE key = 'val_dice_pancreas'").fetchone()[0]
    assert count == 1 and steps >= len(MODEL_NAMES)


def test_the_champion_resolves_through_the_server(
        team: TeamStack, team_trained: TeamTrained) -> None:
    project = team_trained.project
    client = MlflowClient(tracking_uri=team.tracking_uri, registry_uri=team.tracking_uri)
    champion = client.get_model_version_by_alias("pancreas_seg", "champion")
    runs = {r.info.run_id: r for r in _runs(client, SMOKE_EXPERIMENT, team_trained.started_ms)}
    assert champion.run_id in runs and champion.tags["selection_score"] == "validation_dice_pancreas_mean"
    with through(team.tracking_uri):
        model_dir = Path(mlflow.artifacts.download_artifacts("models:/pancreas_seg@champion"))
    assert (model_dir / "MLmodel").is_file()

    # a new process segments with the champion, resolved and downloaded through the server
    output = Path("data") / "07_model_output" / "inference_champion"
    run_team_kedro(project, team, "--pipelines=inference", "--params",
                   f"inference.model=models:/pancreas_seg@champion,inference.output_dir={output}")
    report = json.loads((project / "data" / "08_reporting" / "inference_report.json").read_text())
    registration = json.loads((project / "data" / "08_reporting" / "training" / "model_registration.json").read_text())
    assert report["architecture"] == registration["champion"] == runs[champion.run_id].data.tags["architecture"]
    assert list((project / output).glob("*.nii.gz"))
    inference_runs = _runs(client, f"{SMOKE_EXPERIMENT}_inference")   # the hook's own experiment, on the server too
    assert inference_runs and inference_runs[0].info.status == "FINISHED"


def test_tune_keeps_its_study_in_postgres_and_its_runs_on_the_server(
        team: TeamStack, team_trained: TeamTrained) -> None:
    import optuna  # noqa: PLC0415

    from pancreas_seg.tuning.storage import load_storage  # noqa: PLC0415

    project = team_trained.project
    # fcn: the heavy tests tune unet_small into the same database (one study per architecture)
    tune_started_ms = int(time.time() * 1000)
    run_team_kedro(project, team, "--pipelines=tune_fcn")
    assert not list((project / "data" / "06_models" / "tuning").glob("*.optuna.log")), "a journal file was written"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.postgres.environment().items():
            patch.setenv(key, value)
        study = optuna.load_study(study_name="fcn", storage=load_storage(team.optuna_url))
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3, states      # conf/smoke: 3 trials
    client = MlflowClient(tracking_uri=team.tracking_uri)
    runs = _runs(client, SMOKE_EXPERIMENT, tune_started_ms)
    [study_run] = [r for r in runs if r.data.tags.get("kind") == "optuna_study"]
    assert study_run.data.tags["optuna_storage"] == team.optuna_url            # no password in the URL
    assert study_run.data.params["tuning.n_trials"] == "3"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert sorted(int(r.data.tags["trial_number"]) for r in trials) == list(range(len(states)))
    assert {a.path for a in client.list_artifacts(study_run.info.run_id, "tuning")} >= {
        "tuning/best_trial.json", "tuning/trials.csv", "tuning/importances.json"}
    importances = json.loads((project / "data" / "08_reporting" / "tuning" / "fcn_importances.json").read_text())
    assert importances["n_trials"] == len(states)


def test_mlflow_models_serve_loads_the_champion_from_the_server(
        team: TeamStack, team_trained: TeamTrained, tmp_path: Path) -> None:
    """``mlflow models serve -m models:/pancreas_seg@champion`` in a new process, with only
    ``MLFLOW_TRACKING_URI`` pointing at the lab's server: it resolves the alias and downloads the
    bundle through the server, and segments a scan sent over HTTP (an HTTP client we did not write:
    urllib, a NIfTI read back with nibabel)."""
    import base64
    import gzip
    import os
    import sys
    import urllib.request

    import nibabel as nib

    from benchmarks.support.local_server import LocalServer, free_port

    project = team_trained.project
    scan = sorted((project / "data" / "01_raw" / "Task07_Pancreas_smoke").glob("images*/*.nii.gz"))[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pancreas_seg@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with LocalServer(command, f"{base}/ping", tmp_path / "serve.log", tmp_path,
                     team.environment(MLFLOW_REGISTRY_URI=team.tracking_uri,   # uvicorn: the venv's bin
                                      PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))) as server:
        server.wait_ready(300, interval_s=1)
        body = json.dumps({"dataframe_split": {"columns": ["nifti_base64"],
                                               "data": [[base64.b64encode(scan.read_bytes()).decode()]]}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
            answer = json.loads(response.read())
    predictions = answer["predictions"]
    row = predictions[0] if isinstance(predictions, list) else {k: v[0] for k, v in predictions.items()}
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(row["mask_nifti_base64"])))
    assert mask.shape == nib.load(scan).shape
    assert set(map(int, set(mask.get_fdata().astype(int).ravel()))) <= {0, 1, 2}
