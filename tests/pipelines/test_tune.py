"""``kedro run --pipelines=tune_unet --env smoke`` in a NEW PROCESS on a project copy, then the same
study continued with ``tuning.n_workers=2`` in another one.

Checks the outputs (best trial inside the search space, trials table, figure; parameter importances,
their plots and the best configuration, also in the study's MLflow run), the MLflow store
(the study run nested under kedro-mlflow's run, one nested run per trial with its parameters,
per-epoch curves and state), the Optuna journal read by ``optuna.load_study`` in yet another
process, and ``optuna-dashboard`` serving it. The tests run in file order on one project copy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader

from pancreas_seg.settings import CONFIG_LOADER_ARGS
from pancreas_seg.tuning.config import TuningConfig

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[2] / "conf"
REPORTS = Path("data") / "08_reporting" / "tuning"
JOURNAL = Path("data") / "06_models" / "tuning" / "unet.optuna.log"
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "model_comparison.ipynb"
RUN_LOG = "tune_unet_run.log"   # the first run's output, kept for the tests below

LOAD_STUDY = r"""
import json, sys
import optuna
study = optuna.load_study(study_name="unet", storage=optuna.storages.JournalStorage(
    optuna.storages.journal.JournalFileBackend(sys.argv[1])))
print("STUDY " + json.dumps([{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                              "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
                              "pid": t.user_attrs.get("worker_pid"),
                              "start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp()}
                             for t in study.get_trials()]))
"""


def _smoke_tuning() -> TuningConfig:
    params = OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "smoke"})["parameters"]
    return TuningConfig.from_params(params["tuning"], "unet")


def _load_study_elsewhere(project: Path, subprocess_env) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", LOAD_STUDY, str(project / JOURNAL)], cwd=project,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("STUDY ")]
    return json.loads(line.removeprefix("STUDY "))


@pytest.fixture(scope="module")
def tuned_project(tmp_path_factory: pytest.TempPathFactory, project_copier, kedro_cli_runner) -> Path:
    project = project_copier(tmp_path_factory.mktemp("tune") / "pancreas_seg")
    result = kedro_cli_runner(project, "--pipelines=tune_unet", timeout=600)
    (project / RUN_LOG).write_text(result.stdout + result.stderr)
    return project


def test_tune_unet_writes_the_best_trial_table_and_plot(tuned_project: Path) -> None:
    config = _smoke_tuning()
    best = json.loads((tuned_project / REPORTS / "unet_best_trial.json").read_text())
    trials = pd.read_csv(tuned_project / REPORTS / "unet_trials.csv")
    assert (tuned_project / REPORTS / "unet_tuning.png").stat().st_size > 10_000

    assert len(trials) == config.n_trials and set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert list(trials["number"]) == list(range(config.n_trials))
    assert (trials["duration_s"] > 0).all()
    assert {f"params_{name}" for name in config.search_space.names} <= set(trials.columns)

    assert best["best"] is not None and best["study_name"] == "unet"
    assert config.search_space.contains(best["best"]["params"]), best["best"]["params"]
    complete = trials[trials["state"] == "COMPLETE"]
    assert best["best"]["value"] == pytest.approx(complete["value"].max())
    assert best["best"]["overrides"]["model"]["dropout"] == best["best"]["params"]["model.dropout"]
    assert sum(best["trial_states"].values()) == config.n_trials


def _study_run(project: Path, client: mlflow.MlflowClient) -> mlflow.entities.Run:
    experiment = client.get_experiment_by_name("pancreas_seg_smoke")   # conf/smoke/mlflow.yml
    [study_run] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "unet study"]
    return study_run


def test_tune_unet_reports_the_parameter_importances_and_the_best_configuration(tuned_project: Path) -> None:
    config = _smoke_tuning()
    report = json.loads((tuned_project / REPORTS / "unet_importances.json").read_text())
    best = json.loads((tuned_project / REPORTS / "unet_best_trial.json").read_text())
    trials = pd.read_csv(tuned_project / REPORTS / "unet_trials.csv")
    n_complete = int((trials["state"] == "COMPLETE").sum())
    for plot in ("unet_param_importances.png", "unet_parallel_coordinate.png"):
        assert (tuned_project / REPORTS / plot).stat().st_size > 5_000, plot

    assert report["evaluator"] == config.importance_evaluator and report["objective"] == "val_dice_pancreas"
    assert report["n_complete_trials"] == n_complete and report["n_trials"] == config.n_trials
    assert best["best"] is not None and report["best"]["number"] == best["best"]["number"]
    assert report["best"]["value"] == pytest.approx(best["best"]["value"])
    assert report["best"]["params"] == best["best"]["params"]
    assert report["best"]["overrides"] == best["best"]["overrides"]
    log = " ".join((tuned_project / RUN_LOG).read_text().split())
    if n_complete >= 2:   # 3 smoke trials, some may be pruned
        assert report["status"] in {"computed", "single_parameter"}
        assert set(report["importances"]) == set(config.search_space.names)
        assert sum(report["importances"].values()) == pytest.approx(1.0)
        assert f"unet: importances ({config.importance_evaluator}, {n_complete} complete trials" in log
    else:
        assert report["status"] == "not_computed" and report["importances"] == {}
        assert "unet: parameter importances not computed" in log

    client = mlflow.MlflowClient(f"sqlite:///{tuned_project / 'mlflow.db'}")
    study_run = _study_run(tuned_project, client)
    assert best["mlflow_study_run_id"] == study_run.info.run_id
    assert study_run.info.status == "FINISHED"
    artifacts = {a.path for folder in ("tuning", "plots") for a in client.list_artifacts(study_run.info.run_id, folder)}
    assert {"tuning/importances.json", "plots/param_importances.png", "plots/parallel_coordinate.png"} <= artifacts
    assert study_run.data.tags["importance.status"] == report["status"]
    assert study_run.data.tags["importance.evaluator"] == config.importance_evaluator
    assert {k.removeprefix("importance."): v for k, v in study_run.data.metrics.items()
            if k.startswith("importance.")} == pytest.approx(report["importances"])
    assert study_run.data.params["best.trial_number"] == str(best["best"]["number"])
    assert {f"best.{name}" for name in config.search_space.names} <= set(study_run.data.params)


def test_the_notebook_shows_the_importances_from_the_catalog(tuned_project: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook's set-up cells and its tuning section (cells tagged ``tuning``), run headless
    against the tuned project (the rest of the notebook needs a ``train`` run: tests/pipelines/test_notebook.py)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    setup = [c for c in notebook.cells if c.cell_type == "code"
             and ("PROJECT_PATH = Path(" in c.source or "%reload_kedro" in c.source)]
    tuning = [c for c in notebook.cells if "tuning" in c.metadata.get("tags", [])]
    assert len(setup) == 2 and [c.cell_type for c in tuning] == ["markdown", "code"]
    notebook.cells = setup + tuning
    workdir = tuned_project / "notebooks"
    workdir.mkdir(exist_ok=True)
    for name, value in {"PANCREAS_SEG_PROJECT": str(tuned_project), "PANCREAS_SEG_ENV": "smoke",
                        "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    report = json.loads((tuned_project / REPORTS / "unet_importances.json").read_text())
    assert f"### unet: {report['n_complete_trials']} complete of {report['n_trials']} trials" in text
    assert f"Best configuration: trial {report['best']['number']}" in text and "No tuning yet" not in text
    assert all(f"| `{name}` |" in text for name in report["importances"])
    assert "unet_small" not in text                                   # only what was tuned
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2


def test_mlflow_has_the_study_run_with_nested_trial_runs(tuned_project: Path) -> None:
    config = _smoke_tuning()
    client = mlflow.MlflowClient(f"sqlite:///{tuned_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pancreas_seg_smoke")   # conf/smoke/mlflow.yml
    runs = client.search_runs([experiment.experiment_id])
    [kedro_run] = [r for r in runs if r.info.run_name == "tune_unet"]          # kedro-mlflow's run
    [study_run] = [r for r in runs if r.info.run_name == "unet study"]
    assert study_run.data.tags["mlflow.parentRunId"] == kedro_run.info.run_id
    assert study_run.data.tags["kind"] == "optuna_study" and study_run.info.status == "FINISHED"
    assert study_run.data.params["tuning.n_trials"] == str(config.n_trials)
    assert {"tuning/best_trial.json", "tuning/trials.csv"} <= {
        a.path for a in client.list_artifacts(study_run.info.run_id, "tuning")}
    assert "plots/tuning.png" in {a.path for a in client.list_artifacts(study_run.info.run_id, "plots")}

    trial_runs = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id),
                        key=lambda r: int(r.data.tags["trial_number"]))
    assert [int(r.data.tags["trial_number"]) for r in trial_runs] == list(range(config.n_trials))
    trials = pd.read_csv(tuned_project / REPORTS / "unet_trials.csv").set_index("number")
    for run in trial_runs:
        number = int(run.data.tags["trial_number"])
        assert run.data.tags["trial_state"] == trials.loc[number, "state"]
        assert run.info.status == "FINISHED" and run.info.run_id == trials.loc[number, "mlflow_run_id"]
        assert config.search_space.contains({name: _typed(run.data.params[name], trials.loc[number, f"params_{name}"])
                                             for name in config.search_space.names})
        assert float(run.data.params["learning_rate"]) == pytest.approx(trials.loc[number, "params_learning_rate"])
        history = client.get_metric_history(run.info.run_id, "val_dice_pancreas")
        assert [m.step for m in history] == list(range(1, int(trials.loc[number, "epochs_completed"]) + 1))
        assert "loss" in run.data.metrics


def _typed(text: str, like: object) -> object:
    """An MLflow param (a string) back in the type of the trials table's value."""
    if isinstance(like, str):
        return text
    return int(text) if float(text).is_integer() and "." not in text and "e" not in text else float(text)


def test_the_journal_opens_in_another_process_and_in_optuna_dashboard(tuned_project: Path, subprocess_env) -> None:
    trials = _load_study_elsewhere(tuned_project, subprocess_env)
    table = pd.read_csv(tuned_project / REPORTS / "unet_trials.csv")
    assert [t["number"] for t in trials] == list(table["number"])
    assert [t["state"] for t in trials] == list(table["state"])
    assert all(t["intermediate"] for t in trials)            # per-epoch reports for the pruner

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen([str(dashboard), str(tuned_project / JOURNAL), "--host", "127.0.0.1", "--port",
                               str(port), "--server", "wsgiref", "--quiet"], cwd=tuned_project,
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["unet"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_study_continues_with_two_worker_processes(tuned_project: Path, kedro_cli_runner, subprocess_env) -> None:
    n_before = _smoke_tuning().n_trials
    result = kedro_cli_runner(tuned_project, "--pipelines=tuning", "--namespaces=unet",
                              f"--params=tuning.n_workers=2,tuning.n_trials={n_before + 2}", timeout=600)
    assert "starting 2 worker process(es) with 1 thread(s) each" in " ".join((result.stdout + result.stderr).split())
    trials = _load_study_elsewhere(tuned_project, subprocess_env)
    assert len(trials) == n_before + 2, "exactly n_trials trials, none extra"
    assert {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}
    new = trials[n_before:]
    assert len({t["pid"] for t in new}) == 2, "each of the two workers ran a trial"
    assert max(t["start"] for t in new) < min(t["end"] for t in new), "the two trials ran at the same time"
    table = pd.read_csv(tuned_project / REPORTS / "unet_trials.csv")
    assert len(table) == n_before + 2
    report = json.loads((tuned_project / REPORTS / "unet_importances.json").read_text())
    assert report["n_trials"] == n_before + 2                       # the importances follow the continued study
    assert report["n_complete_trials"] == int((table["state"] == "COMPLETE").sum())
