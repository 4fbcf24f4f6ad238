"""``OptionalPartitionedDataset``: a folder of partitions that may not exist yet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kedro_datasets.partitions import PartitionedDataset


class OptionalPartitionedDataset(PartitionedDataset):
    """A ``partitions.PartitionedDataset`` that loads as ``{}`` while its folder has no partition.

    For state that earlier runs leave behind (the persisted splits): the first run finds nothing
    and starts from scratch instead of failing with "No partitions found".
    """

    def load(self) -> dict[str, Callable[[], Any]]:
        if not self._list_partitions():
            return {}
        return super().load()
