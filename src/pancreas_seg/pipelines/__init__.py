"""Kedro pipelines: thin nodes around the domain packages, and their wiring."""

MODEL_TRAINING_TAG = "model_training"
"""Tag of every node that trains models. ``conf/<env>/dask.yml`` (``resources_by_tag``) gives such a
node a Dask worker (or GPU) of its own under :class:`pancreas_seg.runners.DaskRunner`."""
