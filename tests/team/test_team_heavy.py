"""The lab's tracking under load and faults (slow: several ``kedro run`` processes each).

* Four concurrent ``kedro run --env team_smoke`` processes (two smoke trains with different
  ``--namespaces``, one ``cv_unet_small``, one ``tune_unet_small``, each in its own project copy,
  like four lab members): every run, param, metric step and artifact file each process logged
  (recorded in the process after the server answered, :mod:`benchmarks.support.mlflow_audit`) is
  on the server exactly once, and the server holds nothing else.
* ``train`` on the Dask runner (a 2-worker LocalCluster) records into the server the same way.
* PostgreSQL restarted in the middle of ``train``: the run carries on and finishes with every
  metric, or fails naming the server; it is never FINISHED with metrics missing.
* ``python -m pancreas_seg.tracking.migrate`` copies a project's ``mlflow.db`` (a smoke train)
  into the server: runs, params, full metric histories, artifacts, logged models, registered
  versions and the champion alias; a second call copies nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from benchmarks.support import mlflow_audit
from benchmarks.support.project_copy import subprocess_env
from benchmarks.support.team_stack import TeamStack
from pancreas_seg.models.names import MODEL_NAMES
from tests.team.team_support import SMOKE_EXPERIMENT, TEAM_SMOKE_ENV, make_team_project, run_team_kedro, through

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess, pytest.mark.slow]

CONCURRENT = {   # name -> kedro run arguments
    "train_unet": ("--pipelines=train", "--namespaces=unet"),
    "train_fcn": ("--pipelines=train", "--namespaces=fcn"),
    "cv_unet_small": ("--pipelines=cv_unet_small",),
    "tune_unet_small": ("--pipelines=tune_unet_small",),
}


def _audited_env(stack: TeamStack, audit: Path, site: Path) -> dict[str, str]:
    audit.mkdir(parents=True, exist_ok=True)
    env = stack.environment(COLUMNS="240", **{mlflow_audit.AUDIT_ENV: str(audit)})
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def _start(project: Path, env: dict[str, str], args: tuple[str, ...], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kedro", "run", "--env", TEAM_SMOKE_ENV, *args], cwd=project,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _all_runs(client: MlflowClient) -> dict[str, object]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r for r in client.search_runs(experiments, max_results=5000)}


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def check_server_matches_audit(stack: TeamStack, client: MlflowClient, audit: dict, runs_on_server: dict) -> dict:
    """Every audited run/param/metric step/artifact is on the server exactly once; returns counts."""
    counts = {"runs": 0, "params": 0, "metric_steps": 0, "artifacts": 0}
    for run_id in audit["runs"]:
        assert run_id in runs_on_server, f"run {run_id} was created but is not on the server"
        run = client.get_run(run_id)
        assert run.data.params == audit["params"].get(run_id, {}), run_id
        logged = audit["metrics"].get(run_id, {})
        assert set(run.data.metrics) == set(logged), (run_id, set(run.data.metrics) ^ set(logged))
        for key, steps in logged.items():
            history = client.get_metric_history(run_id, key)
            on_server = [(m.step, m.timestamp, None if m.value != m.value else m.value) for m in history]
            assert len(on_server) == len(set(on_server)) == len(steps), (run_id, key, len(on_server), len(steps))
            assert set(on_server) == steps, (run_id, key)
            counts["metric_steps"] += len(steps)
        counts["runs"] += 1
        counts["params"] += len(run.data.params)
    marker = "/mlflow-artifacts/artifacts/"
    for uri, paths in audit["artifacts"].items():
        folder = stack.artifacts / uri.split(marker, 1)[1]
        assert _files_under(folder) == paths, (uri, _files_under(folder) ^ paths)
        counts["artifacts"] += len(paths)
    return counts


@pytest.fixture(scope="module")
def audit_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlflow_audit.install_as_sitecustomize(tmp_path_factory.mktemp("audit_site"))


def test_four_concurrent_runs_lose_and_duplicate_nothing(team: TeamStack, tmp_path: Path, audit_site: Path) -> None:
    base = make_team_project(tmp_path / "base" / "pancreas_seg")
    run_team_kedro(base, team, "--pipelines=data")   # the data once; the experiment exists from here on
    client = MlflowClient(tracking_uri=team.tracking_uri)
    before = set(_all_runs(client))
    processes, audits = {}, {}
    start = time.monotonic()
    for name, args in CONCURRENT.items():
        project = tmp_path / name / "pancreas_seg"
        shutil.copytree(base, project)
        audits[name] = tmp_path / "audit" / name
        processes[name] = _start(project, _audited_env(team, audits[name], audit_site), args, tmp_path / f"{name}.log")
    codes = {name: process.wait(timeout=3000) for name, process in processes.items()}
    seconds = time.monotonic() - start
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in CONCURRENT}
    assert all(code == 0 for code in codes.values()), {n: (c, logs[n][-3000:]) for n, c in codes.items() if c}

    runs_on_server = _all_runs(client)
    new = set(runs_on_server) - before
    summary = {}
    for name, folder in audits.items():
        audit = mlflow_audit.read(folder)
        assert audit["runs"], f"{name} logged no run"
        summary[name] = check_server_matches_audit(team, client, audit, runs_on_server)
        new -= set(audit["runs"])
    assert not new, f"runs on the server that no process created: {sorted(new)}"
    assert all(r.info.status == "FINISHED" for r in runs_on_server.values() if r.info.run_id not in before
               and r.data.tags.get("trial_state") not in {"PRUNED", "FAIL"}), "a run did not finish"
    print(f"\nCONCURRENT {seconds:.0f} s: {json.dumps(summary)}")  # noqa: T201


def test_the_dask_runner_records_into_the_server(team: TeamStack, tmp_path: Path, audit_site: Path) -> None:
    project = make_team_project(tmp_path / "pancreas_seg")
    env = _audited_env(team, tmp_path / "audit", audit_site)
    result = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", TEAM_SMOKE_ENV, "--pipelines=train",
                             "--runner=pancreas_seg.runners.DaskRunner", "--runner-params", "n_workers=2"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=3000, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    client = MlflowClient(tracking_uri=team.tracking_uri)
    audit = mlflow_audit.read(tmp_path / "audit")
    assert audit["processes"] >= 2, "the Dask workers logged nothing of their own"
    counts = check_server_matches_audit(team, client, audit, _all_runs(client))
    runs = [client.get_run(run_id) for run_id in audit["runs"]]
    [parent] = [r for r in runs if r.info.run_name == "train" and "mlflow.parentRunId" not in r.data.tags]
    nested = {r.data.tags.get("architecture"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(nested) == set(MODEL_NAMES) and all(r.info.status == "FINISHED" for r in nested.values())
    assert all("test_dice_pancreas_mean" in r.data.metrics for r in nested.values())
    print(f"\nDASK {json.dumps(counts)}")  # noqa: T201


def test_a_database_restart_mid_train_never_leaves_a_finished_run_short(fresh_team_stack, tmp_path: Path) -> None:
    with fresh_team_stack() as stack:
        project = make_team_project(tmp_path / "pancreas_seg")
        run_team_kedro(project, stack, "--pipelines=data")
        client = MlflowClient(tracking_uri=stack.tracking_uri)
        log = tmp_path / "train.log"
        process = _start(project, stack.environment(COLUMNS="240"), ("--pipelines=train",), log)
        deadline = time.monotonic() + 900
        while not [r for r in _all_runs(client).values() if r.data.tags.get("architecture")]:
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(2)
        restart_at = time.monotonic()
        stack.postgres.restart(mode="fast", down_s=15)   # every server connection dropped; 15 s without a database
        code = process.wait(timeout=3000)
        output = log.read_text()
        runs = [r for r in _all_runs(client).values() if r.info.run_name != "data"]
        outcome = {"exit_code": code, "seconds_after_restart": round(time.monotonic() - restart_at),
                   "runs": {r.info.run_name: r.info.status for r in runs}}
        print(f"\nRESTART {json.dumps(outcome)}")  # noqa: T201
        if code == 0:
            [parent] = [r for r in runs if r.info.run_name == "train"]
            nested = {r.data.tags["architecture"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")
                      == parent.info.run_id}
            assert parent.info.status == "FINISHED" and set(nested) == set(MODEL_NAMES)
            for name, run in nested.items():
                assert run.info.status == "FINISHED", name
                for key in ("val_dice_pancreas", "final_val_dice_pancreas", "test_dice_pancreas_mean"):
                    assert key in run.data.metrics, (name, key)
        else:
            assert stack.tracking_uri in output or "127.0.0.1" in output, output[-4000:]
            for run in runs:   # what finished must be complete
                if run.info.status == "FINISHED" and run.data.tags.get("architecture"):
                    assert "val_dice_pancreas" in run.data.metrics, run.info.run_name
        # re-running (the database is back) resumes from the checkpoints, as without a server
        checkpointed = sorted(p.parent.name for p in (project / "data" / "06_models" / "checkpoints").glob("*/state.json"))
        rerun = run_team_kedro(project, stack, "--pipelines=train", timeout=3000)
        rerun_log = rerun.stdout + rerun.stderr
        continued = rerun_log.count(": resuming from") + rerun_log.count("epochs already completed in")
        assert continued >= len(checkpointed), (checkpointed, rerun_log[-4000:])   # each committed epoch is kept
        print(f"RESUMED {json.dumps(checkpointed)}")  # noqa: T201
        latest = {}
        for run in sorted(_all_runs(client).values(), key=lambda r: r.info.start_time):
            if run.data.tags.get("architecture"):
                latest[run.data.tags["architecture"]] = run
        assert set(latest) == set(MODEL_NAMES)
        for name, run in latest.items():
            assert run.info.status == "FINISHED" and "test_dice_pancreas_mean" in run.data.metrics, name


def test_migrating_a_projects_mlflow_db_copies_everything(fresh_team_stack, tmp_path: Path) -> None:
    with fresh_team_stack() as team:   # a new lab server: its champion is the migrated one
        _migrate_and_check(team, tmp_path)


def _migrate_and_check(team: TeamStack, tmp_path: Path) -> None:
    project = make_team_project(tmp_path / "pancreas_seg")
    local = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "smoke", "--pipelines=train"], cwd=project,
                           env=subprocess_env(COLUMNS="240"), capture_output=True, text=True, timeout=3000, check=False)
    assert local.returncode == 0, local.stdout[-4000:] + local.stderr[-4000:]
    source_uri = f"sqlite:///{project / 'mlflow.db'}"
    command = [sys.executable, "-m", "pancreas_seg.tracking.migrate", "--source", source_uri,
               "--destination", team.tracking_uri, "--experiment", SMOKE_EXPERIMENT]
    first = subprocess.run(command, cwd=project, env=team.environment(), capture_output=True, text=True,
                           timeout=1800, check=False)
    assert first.returncode == 0, first.stderr[-4000:]
    print(f"\nMIGRATE {first.stdout.strip()}")  # noqa: T201

    source = MlflowClient(tracking_uri=source_uri, registry_uri=source_uri)
    target = MlflowClient(tracking_uri=team.tracking_uri, registry_uri=team.tracking_uri)
    old_runs = source.search_runs([source.get_experiment_by_name(SMOKE_EXPERIMENT).experiment_id], max_results=1000)
    copies = {r.data.tags["migrated_from"]: r for r in target.search_runs(
        [target.get_experiment_by_name(SMOKE_EXPERIMENT).experiment_id], max_results=5000)
        if "migrated_from" in r.data.tags}
    assert set(copies) == {r.info.run_id for r in old_runs}
    new_ids = {old: copy.info.run_id for old, copy in copies.items()}
    for old in old_runs:
        copy = copies[old.info.run_id]
        assert (copy.info.run_name, copy.info.status, copy.info.start_time, copy.info.end_time) == \
            (old.info.run_name, old.info.status, old.info.start_time, old.info.end_time)
        assert copy.data.params == old.data.params
        if "mlflow.parentRunId" in old.data.tags:
            assert copy.data.tags["mlflow.parentRunId"] == new_ids[old.data.tags["mlflow.parentRunId"]]
        for key in old.data.metrics:
            history = lambda client, run_id, key=key: sorted(   # noqa: E731
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
            assert history(target, copy.info.run_id) == history(source, old.info.run_id), (old.info.run_name, key)
        old_files = _files_under(Path(mlflow.artifacts.download_artifacts(
            run_id=old.info.run_id, artifact_path="", dst_path=str(tmp_path / "old" / old.info.run_id),
            tracking_uri=source_uri)))
        new_files = _files_under(team.artifacts / copy.info.experiment_id / copy.info.run_id / "artifacts")
        assert new_files == old_files, (old.info.run_name, old_files ^ new_files)
    old_champion = source.get_model_version_by_alias("pancreas_seg", "champion")
    champion = target.get_model_version_by_alias("pancreas_seg", "champion")
    assert champion.run_id == new_ids[old_champion.run_id]
    assert len(target.search_model_versions("name = 'pancreas_seg'")) == \
        len(source.search_model_versions("name = 'pancreas_seg'"))
    with through(team.tracking_uri):
        model_dir = Path(mlflow.artifacts.download_artifacts("models:/pancreas_seg@champion"))
    assert (model_dir / "MLmodel").is_file()

    again = subprocess.run(command, cwd=project, env=team.environment(), capture_output=True, text=True,
                           timeout=1800, check=False)
    assert again.returncode == 0 and " 0 run(s) copied" in again.stdout and " 0 model version(s)" in again.stdout \
        and " 0 kept" in again.stdout, \
        again.stdout + again.stderr[-3000:]
