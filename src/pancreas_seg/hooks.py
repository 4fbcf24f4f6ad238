"""Project hooks: choose Keras' backend; join a multi-process training run; keep MLflow's training
comparison clean and its UI on the training view.

* :class:`KerasBackendHook`: applies ``runtime.keras_backend`` (``conf/base/parameters_runtime.yml``,
  ``--params`` included) to ``KERAS_BACKEND`` when the context is created, before any other hook
  and before any node imports Keras (see :mod:`pancreas_seg.core.backend`); logs the backend and
  its devices when the pipeline starts and tags the run's MLflow run with them.
* :class:`MultiProcessHook`: with ``KERAS_DISTRIBUTION_NUM_PROCESSES`` > 1 in the environment, the
  process joins the multi-process run before any node computes anything
  (:func:`pancreas_seg.learning.distribution.initialize_multi_process`).
* :class:`DaskConfigHook`: hands ``conf/<env>/dask.yml`` to :class:`pancreas_seg.runners.DaskRunner`.

* Every experiment the project writes to is tagged ``mlflow.experimentKind:
  custom_model_development``: MLflow 3.17's UI otherwise opens it in its GenAI view (traces).
* ``kedro run --pipelines=evaluation`` and ``--pipelines=inference`` log to their own experiments,
  ``<experiment>_evaluation`` and ``<experiment>_inference`` (``pancreas_seg_inference`` ...), not
  next to the training runs. ``conf/base/mlflow.yml`` turns kedro-mlflow's parent run off for those
  pipelines (``disable_tracking.pipelines``); this hook opens one there instead, and marks it FAILED
  when the pipeline fails. Evaluation still adds its test metrics to each model's training run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kedro.framework.hooks import hook_impl

from pancreas_seg.core.backend import AUTO, apply_backend, describe_devices_if_loaded

logger = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
USE_PIPELINES = ("evaluation", "inference")
"""Pipelines whose runs go to ``<experiment>_<pipeline>`` instead of the training experiment."""


def tag_experiment_kind(experiment_id: str) -> None:
    """Make MLflow's UI open ``experiment_id`` on its model-training view."""
    import mlflow  # noqa: PLC0415

    client = mlflow.MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _forget_stale_kedro_mlflow_run() -> None:
    """Clear kedro-mlflow's run id left from an earlier session in this process.

    kedro-mlflow 2.0.3 keeps its hook object (one per process) and, for a pipeline whose tracking
    is disabled, does not reset the run id of the previous session; its ``before_node_run`` would
    then reopen that old run in the middle of this one (seen with two sessions in one process: a
    notebook, or tests). A fresh process has nothing to clear.
    """
    try:
        from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook  # noqa: PLC0415
    except ImportError:
        return
    mlflow_hook.run_id = None


class MlflowExperimentsHook:
    """See the module docstring."""

    def __init__(self) -> None:
        self._experiment: str | None = None
        self._own_run = False

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        try:
            self._experiment = str(context.config_loader["mlflow"]["tracking"]["experiment"]["name"])
        except (KeyError, TypeError):   # no mlflow.yml: kedro-mlflow is not configured, nothing to do
            self._experiment = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        import mlflow  # noqa: PLC0415

        self._own_run = False
        if self._experiment is None:
            return
        training = mlflow.get_experiment_by_name(self._experiment)
        if training is not None:
            tag_experiment_kind(training.experiment_id)
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        names = [names] if isinstance(names, str) else list(names)
        if not names or not set(names) <= set(USE_PIPELINES) or mlflow.active_run() is not None:
            return
        _forget_stale_kedro_mlflow_run()
        experiment = mlflow.set_experiment(f"{self._experiment}_{names[0]}")
        tag_experiment_kind(experiment.experiment_id)
        mlflow.start_run(run_name="+".join(names), tags={"pipeline": "+".join(names)})
        self._own_run = True
        logger.info("MLflow: this %s run is logged to experiment %s", "+".join(names), experiment.name)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._end("FINISHED")

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._end("FAILED")

    def _end(self, status: str) -> None:
        if self._own_run:
            import mlflow  # noqa: PLC0415

            mlflow.end_run(status)
            self._own_run = False


class DaskConfigHook:
    """Hand the ``dask`` configuration (``conf/base/dask.yml`` + ``conf/<env>/dask.yml``) to
    :class:`pancreas_seg.runners.DaskRunner`, which Kedro builds before it knows the environment."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        from kedro.config import MissingConfigException  # noqa: PLC0415

        from pancreas_seg.runners.cluster import use_project_config  # noqa: PLC0415

        try:
            config = context.config_loader["dask"]
        except (KeyError, MissingConfigException):
            config = {}
        use_project_config((config or {}).get("dask"))


class MultiProcessHook:
    """Joins the multi-process training run that Keras' environment variables describe.

    ``jax.distributed`` must be initialised before the process's first JAX computation, so this
    happens when the context is created, before any node. Without ``KERAS_DISTRIBUTION_NUM_PROCESSES``
    (or with 1) it does nothing and imports nothing: Keras stays out of ``kedro --help`` and viz.
    """

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        if os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip() in {"", "1"}:
            return
        from pancreas_seg.learning.distribution import initialize_multi_process  # noqa: PLC0415

        initialize_multi_process()


#: MLflow tags of the backend and of its devices (training runs set them too: tracking/training_run.py).
BACKEND_TAG = "keras_backend"
DEVICES_TAG = "keras_devices"
MAX_TAG_CHARS = 5000


class KerasBackendHook:
    """Sets ``KERAS_BACKEND`` from ``runtime.keras_backend`` before Keras is imported.

    ``after_context_created`` runs (``tryfirst``, so before this project's other hooks and the
    plugins') when ``KedroSession.run`` / ``load_context`` builds the context: after the project's
    settings and hooks are imported, but before the pipeline registry is read and before any node
    or dataset imports Keras. Nothing on Kedro's start-up path imports Keras
    (tests/test_keras_backend.py runs ``kedro run`` asking for another backend than the
    environment's to prove it). ``before_pipeline_run`` (``trylast``: after kedro-mlflow opened its
    run) logs the backend and its devices and tags the active MLflow run. The devices of a
    TensorFlow backend that is not imported yet (a data-only run) are not listed, to spare its
    ~9 s import; each training run lists them when it starts (tag ``keras_devices``).
    """

    def __init__(self) -> None:
        self.backend: str | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        runtime = context.params.get("runtime") or {}
        setting = runtime.get("keras_backend", AUTO) if isinstance(runtime, dict) else AUTO
        self.backend = apply_backend(setting)
        logger.debug("Keras backend %s (runtime.keras_backend=%s)", self.backend, setting)

    @hook_impl(trylast=True)
    def before_pipeline_run(self) -> None:
        if self.backend is None:
            return
        devices = describe_devices_if_loaded(self.backend)
        listed = ", ".join(devices) if devices is not None else "listed when Keras first runs"
        logger.info("Keras backend: %s; devices: %s", self.backend, listed)
        import mlflow  # noqa: PLC0415

        if mlflow.active_run() is not None:
            tags = {BACKEND_TAG: self.backend}
            if devices is not None:
                tags[DEVICES_TAG] = ", ".join(devices)[:MAX_TAG_CHARS]
            mlflow.set_tags(tags)
