"""``NumpyDataset``: one ``.npy`` array file; local files can be loaded memory-mapped."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset


class NumpyDataset(FsspecFileDataset):
    """Load/save a NumPy array as ``.npy`` (dtype and shape preserved).

    ``load_args: {mmap_mode: r}`` returns a read-only memory map for local files, so a loader can
    hold many cases open without reading them into RAM. Remote files are read fully.
    """

    def load(self) -> np.ndarray:
        if self._is_local:
            return np.load(self._load_path(), allow_pickle=False, **self._load_args)
        return np.load(io.BytesIO(self._read_bytes()), allow_pickle=False)

    def save(self, data: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(data), allow_pickle=False)
        self._write_bytes(buffer.getvalue())

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "npy"}
