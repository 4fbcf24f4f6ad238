"""``KerasModelDataset``: a Keras 3 ``.keras`` file via ``keras.saving`` (any backend, no TensorFlow).

Loading uses ``safe_mode=True``; the project's custom layers, losses and metrics are registered
as serialisable when :mod:`pancreas_seg.learning` is imported, which ``load`` does first.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset


class KerasModelDataset(FsspecFileDataset):
    """Save/load a compiled Keras model as a single ``.keras`` file (versionable)."""

    DEFAULT_LOAD_ARGS = {"safe_mode": True, "compile": True}

    def load(self) -> Any:
        import keras  # noqa: PLC0415 - lazy: keeps `kedro viz` and catalog loading fast

        import pancreas_seg.learning  # noqa: F401, PLC0415 - registers custom objects
        import pancreas_seg.models  # noqa: F401, PLC0415

        if self._is_local:
            return keras.saving.load_model(self._load_path(), **self._load_args)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.keras")
            self._fs.get(self._load_path(), local)
            return keras.saving.load_model(local, **self._load_args)

    def save(self, model: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.keras")
            model.save(local)
            with open(local, "rb") as handle:
                self._write_bytes(handle.read())

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "keras"}
