"""Kedro pipelines: thin nodes around the domain packages, and their wiring."""

MODEL_TRAINING_TAG = "model_training"
"""Tag of every node that trains models. ``conf/<env>/dask.yml`` (``resources_by_tag``) gives such a
node a Dask worker (or GPU) of its own under :class:`pancreas_seg.runners.DaskRunner`."""

NO_MLFLOW_RUN_TAG = "no_mlflow_run"
"""Tag of nodes that never log to MLflow (ingestion, preprocessing). Under
:class:`pancreas_seg.runners.DaskRunner` their tasks do not re-open the pipeline's MLflow run on
the worker, so a worker that runs only such nodes never imports MLflow nor opens its tracking store
(about 100 MiB per worker). A tagged node that does log to MLflow fails with an error naming it."""
