"""The MLflow side of a study (no Kedro): the study run's bookkeeping and one nested run per trial.

* A trial's run is nested under the study's run (``mlflow.start_run(parent_run_id=...)`` in the
  worker process), named ``<architecture> trial <n>``, with the sampled values as params (dotted
  names), every effective training setting as ``training.*`` params, per-epoch metrics (step =
  1-based epoch) and tags ``trial_number``, ``trial_state`` (RUNNING, then COMPLETE / PRUNED / FAIL),
  ``retried_from_trial``.
* An interrupted trial's run is marked KILLED when the trial is found stale.
* A study run left RUNNING by a killed ``kedro run`` (same host, its process gone) is marked KILLED
  when the study is run again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Trial user attribute holding the trial's MLflow run id.
MLFLOW_RUN_ATTR = "mlflow_run_id"


@dataclass(frozen=True)
class MlflowTarget:
    """Where a worker logs its trials: the study's run (parent) in its experiment and store."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def start_trial_run(context: Any, trial: Any, values: Mapping[str, Any],
                    settings: Mapping[str, Any], retried: int | None) -> str | None:
    """Start the nested MLflow run of one trial under the study's run (None without MLflow)."""
    if context.mlflow is None:
        return None
    import mlflow  # noqa: PLC0415

    from pancreas_seg import tracking  # noqa: PLC0415

    tags = {"architecture": context.architecture, "optuna_study": context.study_name,
            "trial_number": str(trial.number), "trial_state": "RUNNING", "worker_pid": str(os.getpid())}
    if retried is not None:
        tags["retried_from_trial"] = str(retried)
    run = mlflow.start_run(experiment_id=context.mlflow.experiment_id, parent_run_id=context.mlflow.parent_run_id,
                           run_name=f"{context.architecture} trial {trial.number}", tags=tags)
    mlflow.log_params({**{name: str(value) for name, value in values.items()},
                       **tracking.flatten({"training": settings})})
    return run.info.run_id


def end_trial_run(run_id: str | None, state: str, metrics: Mapping[str, float]) -> None:
    """Log the final metrics and the trial state; end the run (FAILED for a failed trial)."""
    if run_id is None:
        return
    import mlflow  # noqa: PLC0415

    from pancreas_seg import tracking  # noqa: PLC0415

    tracking.log_final_metrics(run_id, metrics)
    mlflow.set_tag("trial_state", state)
    mlflow.end_run(status="FAILED" if state == "FAIL" else "FINISHED")


def mark_trial_run_killed(trial: Any) -> None:
    """Mark the MLflow run of an interrupted (stale) trial KILLED, with trial_state FAIL."""
    run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
    if not run_id:
        return
    try:
        import mlflow  # noqa: PLC0415

        client = mlflow.MlflowClient()
        client.set_tag(run_id, "trial_state", "FAIL")
        client.set_tag(run_id, "fail_reason", "interrupted: its worker died or stopped sending heartbeats; "
                                              "queued again as a new trial")
        client.set_terminated(run_id, status="KILLED")
    except Exception as exc:  # noqa: BLE001 - the retry matters more than the MLflow status
        logger.warning("could not mark MLflow run %s of trial %d as KILLED: %s", run_id, trial.number, exc)


def study_run_tags(architecture: str) -> dict[str, str]:
    """Tags of a study run that let a later run find it interrupted (host and process)."""
    return {"architecture": architecture, "kind": "optuna_study", "optuna_study": architecture,
            "host": socket.gethostname(), "pid": str(os.getpid())}


def close_interrupted_study_runs(experiment_id: str, study_name: str, current_run_id: str) -> list[str]:
    """Mark KILLED the study's runs still RUNNING whose process (on this host) is gone."""
    import mlflow  # noqa: PLC0415

    from pancreas_seg.tuning.storage import process_alive  # noqa: PLC0415

    client = mlflow.MlflowClient()
    closed = []
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.kind = 'optuna_study' AND tags.optuna_study = '{study_name}' AND attributes.status = 'RUNNING'"))
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get("host") != socket.gethostname():
            continue
        if not process_alive(int(tags.get("pid", "-1"))):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            logger.info("%s: MLflow study run %s of an interrupted run marked KILLED", study_name, run.info.run_id)
    return closed


#: Where :func:`log_importances` puts its artifacts in the study run.
IMPORTANCES_ARTIFACT = "tuning/importances.json"
IMPORTANCE_PLOT_ARTIFACT = "plots/param_importances.png"
PARALLEL_COORDINATE_ARTIFACT = "plots/parallel_coordinate.png"


def log_importances(run_id: str, result: Mapping[str, Any], importance_figure: Any, parallel_figure: Any) -> None:
    """Log a study's importances and best configuration (``importance.study_importances``) to its run.

    Artifacts ``tuning/importances.json`` (the whole result), ``plots/param_importances.png`` and
    ``plots/parallel_coordinate.png``; metrics ``importance.<param>`` (dotted parameter names;
    none when not computed); tags ``importance.evaluator``, ``importance.status`` and
    ``importance.reason`` (tags, so a re-run with another evaluator can replace them); params
    ``best.<param>`` and ``best.trial_number``. MLflow params cannot change within a run: if the run
    already holds other ``best.*`` values they are kept, with a warning.
    """
    import mlflow  # noqa: PLC0415
    from mlflow.entities import Param  # noqa: PLC0415

    from pancreas_seg import tracking  # noqa: PLC0415

    client = mlflow.MlflowClient()
    tracking.log_json(run_id, dict(result), IMPORTANCES_ARTIFACT)
    tracking.log_figure(run_id, importance_figure, IMPORTANCE_PLOT_ARTIFACT)
    tracking.log_figure(run_id, parallel_figure, PARALLEL_COORDINATE_ARTIFACT)
    tracking.log_final_metrics(run_id, {f"importance.{name}": value for name, value in result["importances"].items()})
    for key in ("evaluator", "status", "reason"):
        client.set_tag(run_id, f"importance.{key}", str(result.get(key) or "")[:5000])
    best = result.get("best")
    if best is not None:
        params = {"best.trial_number": best["number"],
                  **{f"best.{name}": value for name, value in best["params"].items()}}
        try:
            client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
        except mlflow.exceptions.MlflowException as exc:
            logger.warning("%s: best.* params not logged to MLflow run %s (it holds other values): %s",
                           result.get("study_name"), run_id, str(exc).splitlines()[0])
