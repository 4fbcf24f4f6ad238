"""Kedro runners of this project: :class:`DaskRunner` runs a pipeline on a ``dask.distributed``
cluster (``kedro run --runner=pancreas_seg.runners.DaskRunner``); see docs/dask.md."""

from pancreas_seg.runners.dask_runner import DaskRunner

__all__ = ["DaskRunner"]
