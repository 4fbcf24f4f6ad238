"""Per-case work: mapped over a Dask cluster when there is one, else run here, in order; and lazy
per-case partitions that a cluster can save case by case.

A Kedro node that loops over cases (planning geometries, reading headers) calls
:func:`map_over_cases`. Run by :class:`pancreas_seg.runners.DaskRunner`, the node executes inside a
Dask worker and the cases become tasks spread over the whole cluster; run by Kedro's
``SequentialRunner`` (or outside Kedro) they run one after another in this process. The results
and their order are the same either way, so the node does not care who runs it.

On a cluster the costliest cases go first (longest processing time first): given a cost per case
(its voxel count, its file size), :func:`map_over_cases` and :func:`group_lazy_case_parts` hand the
big scans out before the small ones, so the last task to finish is a small one and no worker sits
idle while another works through the largest scan at the end (the MSD-scale phantoms range from 40 to
150 slices per scan).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


def on_dask_worker() -> bool:
    """True inside a task that a ``dask.distributed`` worker is executing."""
    if "distributed" not in sys.modules:   # a worker process has imported it; this saves the import
        return False
    try:
        from distributed import get_worker  # noqa: PLC0415
    except ImportError:  # pragma: no cover - distributed is a project dependency
        return False
    try:
        get_worker()
    except ValueError:
        return False
    return True


def costliest_first(costs: Sequence[float]) -> list[int]:
    """Indices of ``costs`` from the largest to the smallest cost; equal costs keep their order."""
    return sorted(range(len(costs)), key=lambda index: -costs[index])


def map_over_cases(function: Callable[[T], R], items: Sequence[T], *, what: str,
                   names: Sequence[str] | None = None, costs: Sequence[float] | None = None) -> list[R]:
    """``[function(item) for item in items]``, on the cluster's workers when called from a Dask task.

    Args:
        function: a picklable (module-level) function of one item.
        items: the per-case arguments, e.g. ``(case_id, path)`` tuples.
        what: what is being done, for the progress log ("Planning geometry").
        names: a display name per item (case ids) for the progress log; default: the index.
        costs: a relative cost per item (voxels, bytes). On a cluster the items are handed out from
            the costliest to the cheapest; default: in the order of ``items``. Here, without a
            cluster, they always run in the order of ``items``.

    Returns:
        The results in the order of ``items``. The first failure is raised as it is (the project's
        readers name the file in their errors) and the remaining tasks are cancelled.
    """
    labels = list(names) if names is not None else [str(i) for i in range(len(items))]
    if costs is not None and len(costs) != len(items):
        raise ValueError(f"{what}: {len(costs)} cost(s) for {len(items)} item(s)")
    if not on_dask_worker() or len(items) < 2:
        results = []
        for index, (item, label) in enumerate(zip(items, labels, strict=True), start=1):
            logger.info("%s %d/%d: %s", what, index, len(items), label)
            results.append(function(item))
        return results

    from distributed import as_completed, worker_client  # noqa: PLC0415

    # the scheduler hands queued tasks out in the order they were submitted
    order = costliest_first(costs) if costs is not None else list(range(len(items)))
    with worker_client() as client:  # secedes: this task's thread does not hold a worker slot
        futures = client.map(function, [items[index] for index in order], pure=False)
        item_of = {future.key: index for index, future in zip(order, futures, strict=True)}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()  # raises the task's error here
                logger.info("%s %d/%d done on the cluster: %s", what, done, len(items),
                            labels[item_of[future.key]])
            results: list[Any] = [None] * len(items)
            for index, result in zip(order, client.gather(futures), strict=True):
                results[index] = result
            return results
        finally:
            client.cancel([f for f in futures if not f.done()])


class LazyCaseParts:
    """Lazy partitions of one case that share one computation: ``function(*args)`` runs on first use
    and returns ``{part: array}``; the result is dropped once every part was taken, so a
    PartitionedDataset saving many cases holds one case in memory at a time.

    ``partitions(case_id)`` gives ``{"<case_id>/<part>": callable}``. Picklable (module-level
    ``function`` and picklable ``args``), so :class:`pancreas_seg.runners.DaskRunner` can ship a
    case's callables to one worker, where they compute the case once. ``cost`` (e.g. the scan's
    voxel count) orders the cases on a cluster: the costliest first.
    """

    def __init__(self, function: Callable[..., dict[str, Any]], args: tuple[Any, ...], parts: Sequence[str],
                 description: str, cost: float = 1.0) -> None:
        self.function, self.args, self.parts, self.description = function, args, tuple(parts), description
        self.cost = float(cost)
        self._result: dict[str, Any] | None = None
        self._taken: set[str] = set()

    def partitions(self, case_id: str) -> dict[str, Callable[[], Any]]:
        """``{"<case_id>/<part>": callable}`` for a PartitionedDataset's lazy save."""
        return {f"{case_id}/{part}": functools.partial(self.take, part) for part in self.parts}

    def take(self, part: str) -> Any:
        """The ``part`` of the case's result (computed now if needed)."""
        if self._result is None:
            logger.info("%s", self.description)
            self._result = self.function(*self.args)
            self._taken = set()
        value = self._result[part]
        self._taken.add(part)
        if self._taken >= set(self.parts):
            self._result = None
        return value


def group_lazy_case_parts(partitions: Any) -> list[dict[str, Callable[[], Any]]] | None:
    """Split ``{key: callable}`` into one dict per :class:`LazyCaseParts` case, the costliest case
    first (cases of equal cost in key order), each dict in key order.

    Returns None unless every value is a partition made by :meth:`LazyCaseParts.partitions` (other
    lazy partitions, e.g. closures over a loaded model, are not meant to be shipped to workers).
    """
    if not isinstance(partitions, dict) or not partitions:
        return None
    groups: dict[int, dict[str, Callable[[], Any]]] = {}
    costs: dict[int, float] = {}
    for key in sorted(partitions):
        value = partitions[key]
        owner = getattr(getattr(value, "func", None), "__self__", None)
        if not isinstance(owner, LazyCaseParts):
            return None
        groups.setdefault(id(owner), {})[key] = value
        costs[id(owner)] = owner.cost
    owners = list(groups)
    return [groups[owners[index]] for index in costliest_first([costs[owner] for owner in owners])]
