"""``KerasModelDataset``: a Keras 3 ``.keras`` file via ``keras.saving`` (any backend, no TensorFlow).

Loading goes through :func:`pancreas_seg.models.io.load_model`, the project's one model loader, so
``catalog.load("model_unet")`` works in a fresh process.
"""

from __future__ import annotations

from typing import Any

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset


class KerasModelDataset(FsspecFileDataset):
    """Save/load a compiled Keras model as a single ``.keras`` file (versionable).

    ``load_args: {compile: false}`` skips restoring the optimizer (faster, enough to predict).
    """

    DEFAULT_LOAD_ARGS = {"compile": True}

    def load(self) -> Any:
        # lazy: keeps `kedro viz` and catalog loading free of TensorFlow
        from pancreas_seg.models.io import load_model, load_model_bytes  # noqa: PLC0415

        compile_model = bool(self._load_args.get("compile", True))
        if self._is_local:
            return load_model(self._load_path(), compile=compile_model)
        return load_model_bytes(self._read_bytes(), compile=compile_model)

    def save(self, model: Any) -> None:
        from pancreas_seg.models.io import model_bytes  # noqa: PLC0415

        self._write_bytes(model_bytes(model))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "keras"}
