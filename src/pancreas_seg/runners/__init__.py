"""Kedro runners of this project: :class:`DaskRunner` runs a pipeline on a ``dask.distributed``
cluster (``kedro run --runner=pancreas_seg.runners.DaskRunner``); see docs/dask.md.

``DaskRunner`` is imported on first use (PEP 562), so the project hook that reads ``dask.yml``
(:mod:`pancreas_seg.runners.cluster`) does not load ``distributed`` into every ``kedro run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pancreas_seg.runners.dask_runner import DaskRunner

__all__ = ["DaskRunner"]


def __getattr__(name: str) -> Any:
    if name == "DaskRunner":
        from pancreas_seg.runners.dask_runner import DaskRunner  # noqa: PLC0415

        return DaskRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
