"""MLflow bookkeeping of a study with a real sqlite store: a study run left RUNNING by a process that
is gone is marked KILLED when the study runs again; one whose process is alive is left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pancreas_seg.tuning.mlflow_runs import close_interrupted_study_runs, study_run_tags


@pytest.fixture
def store(tmp_path: Path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        yield mlflow.MlflowClient()
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.subprocess
def test_interrupted_study_runs_are_closed(store: mlflow.MlflowClient) -> None:
    experiment = store.create_experiment("tuning")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = gone.stdout.strip()                       # a process that has exited (and was reaped)
    interrupted = store.create_run(experiment, tags={**study_run_tags("unet"), "pid": dead_pid},
                                   run_name="unet study")
    alive = store.create_run(experiment, tags=study_run_tags("unet"), run_name="unet study")   # this process
    other_study = store.create_run(experiment, tags={**study_run_tags("fcn"), "pid": dead_pid})
    elsewhere = store.create_run(experiment, tags={**study_run_tags("unet"), "pid": dead_pid, "host": "elsewhere"})
    current = store.create_run(experiment, tags=study_run_tags("unet"), run_name="unet study")

    closed = close_interrupted_study_runs(experiment, "unet", current.info.run_id)

    assert closed == [interrupted.info.run_id]
    assert store.get_run(interrupted.info.run_id).info.status == "KILLED"
    for run in (alive, other_study, elsewhere, current):
        assert store.get_run(run.info.run_id).info.status == "RUNNING"
