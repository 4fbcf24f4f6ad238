"""MLflow helpers (no Kedro imports): nested runs per architecture, epoch metrics, artifacts.

kedro-mlflow opens one parent run per ``kedro run``; each architecture gets a nested run here,
identified afterwards by its run id so later nodes (evaluation) can add to it.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

logger = logging.getLogger(__name__)


def git_commit() -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=5).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings, <= 6000 chars)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


@contextmanager
def architecture_run(architecture: str, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or re-open, with ``run_id``) the nested run of one architecture.

    Nested under the active run (kedro-mlflow's parent run) when there is one.
    """
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else architecture, nested=nested) as run:
        yield run


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tag the active MLflow run (values as strings)."""
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


def log_params(params: Mapping[str, Any]) -> None:
    """Log nested ``params`` to the active MLflow run, flattened to dotted names (see :func:`flatten`)."""
    mlflow.log_params(flatten(params))


def log_to_active_run(tags: Mapping[str, Any], params: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Tags, params (flattened) and metrics on the active MLflow run; False (nothing logged) without one."""
    if mlflow.active_run() is None:
        return False
    set_tags(tags)
    log_params(params)
    mlflow.log_metrics(dict(metrics))
    return True


def log_epoch_metrics(run_id: str, logs: Mapping[str, float], epoch: int) -> None:
    """Log one epoch's metrics (step = 1-based epoch); NaN/inf are skipped."""
    client = mlflow.MlflowClient()
    for key, value in logs.items():
        value = float(value)
        if math.isfinite(value):
            client.log_metric(run_id, key, value, step=epoch)


def log_final_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log end-of-training/evaluation metrics (finite values only) into ``run_id``."""
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(run_id, key, float(value))


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as a PNG artifact of ``run_id``."""
    mlflow.MlflowClient().log_figure(run_id, figure, artifact_file)


def log_figure_to_active_run(figure: Any, artifact_file: str) -> bool:
    """Save a matplotlib figure as a PNG artifact of the active run (kedro-mlflow's parent run of a
    ``kedro run``); False (nothing logged) without one."""
    run = mlflow.active_run()
    if run is None:
        return False
    log_figure(run.info.run_id, figure, artifact_file)
    return True


def log_artifact_file(run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)


def log_json(run_id: str, data: Any, artifact_file: str) -> None:
    mlflow.MlflowClient().log_dict(run_id, data, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    mlflow.MlflowClient().log_text(run_id, text, artifact_file)


def logged_model_of_run(run_id: str, model_name: str) -> mlflow.entities.LoggedModel | None:
    """The newest MLflow 3 logged model ``model_name`` (e.g. ``segmenter``) of run ``run_id``, or None.

    MLflow 3 stores a model logged with ``log_model(name=...)`` as a *logged model* with its own id
    (``models:/m-...``), not under the run's artifact path ``<name>``. A run that logged the name
    twice (a node re-run into the same run) gives the later one."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{model_name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    return found[0] if found else None


def register_model(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register a logged model (``runs:/<run_id>/segmenter``, ``models:/m-...``) as a new version of
    ``name`` with ``tags``; returns the version. Creates the registered model when needed.

    ``runs:/<run_id>/<model name>`` is first resolved to that run's logged model,
    ``models:/<model_id>``, which is what MLflow 3 registers for it anyway (the version's source
    run is the same). Passing the ``runs:/`` URI itself makes ``mlflow.register_model`` look for
    the model under the run's artifact path, find nothing there (MLflow 3 keeps logged models
    outside it) and warn "Run with id ... has no artifacts at artifact path 'segmenter',
    registering model based on models:/m-... instead" (``_register_model``,
    mlflow/tracking/_model_registry/fluent.py:226, mlflow 3.17.2)."""
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=registered_model_description(name))
    if model_uri.startswith("runs:/"):
        run_id, _, model_name = model_uri.removeprefix("runs:/").strip("/").partition("/")
        logged = logged_model_of_run(run_id, model_name) if model_name else None
        if logged is not None:
            model_uri = f"models:/{logged.model_id}"
    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    return str(version.version)


def registered_model_description(name: str) -> str:
    """The registered model's description (markdown in the MLflow UI: no ``<...>`` placeholders,
    which the UI would take for HTML tags and drop)."""
    return (f"pancreas_seg segmentation models: MLflow pyfunc models (CT NIfTI in, label map out). "
            f"Load one with `inference.model=models:/{name}@champion` (or another alias), or "
            f"`models:/{name}/VERSION` for a version number.")


def log_paired_comparison(table: Any, markdown: str, figure: Any) -> None:
    """Log a paired comparison (table, markdown, forest plot) to the active MLflow run, if any."""
    run = mlflow.active_run()
    if run is None:
        return
    log_text(run.info.run_id, markdown, "statistics/paired_comparison.md")
    log_figure(run.info.run_id, figure, "statistics/paired_comparison.png")
    log_json(run.info.run_id, table.to_dict(orient="records"), "statistics/paired_comparison.json")


def set_registered_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` (e.g. ``champion``) of registered model ``name`` at ``version``."""
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def absolute_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI (default: the current one) with a relative ``sqlite:///`` path made absolute,
    so another process (a tuning worker) finds the same store whatever its working directory."""
    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri
