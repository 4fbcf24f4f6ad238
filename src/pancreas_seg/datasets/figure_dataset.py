"""``FigureDataset``: a matplotlib figure saved as one image file, written atomically."""

from __future__ import annotations

import base64
import io
from pathlib import PurePosixPath
from typing import Any, NoReturn

from kedro.io.core import DatasetError, Version
from kedro_datasets._typing import ImagePreview

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset


class FigureDataset(FsspecFileDataset):
    """Save a ``matplotlib.figure.Figure`` as an image file (PNG, SVG, PDF ...: the file's suffix).

    Save-only, like Kedro's ``matplotlib.MatplotlibDataset``, but a local file is written to a
    temporary file and renamed into place, so nobody ever reads half a PNG, and matplotlib is not
    imported until a figure is saved (kedro-mlflow builds every catalog entry when a run starts).
    ``save_args`` go to ``Figure.savefig`` (e.g. ``dpi``, ``bbox_inches``); versioning and fsspec
    paths work as for the project's other datasets. ``preview()`` hands kedro-viz the saved image.
    """

    def __init__(self, *, filepath: str, save_args: dict[str, Any] | None = None, version: Version | None = None,
                 credentials: dict[str, Any] | None = None, fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=version, credentials=credentials, fs_args=fs_args,
                         metadata=metadata)
        suffix = PurePosixPath(filepath).suffix.lstrip(".").lower()
        self._save_args = {"format": suffix or "png", **(save_args or {})}

    def load(self) -> NoReturn:
        raise DatasetError(f"{self._filepath}: FigureDataset only saves figures; it does not read them back")

    def save(self, data: Any) -> None:
        """Write ``data`` (a matplotlib Figure) with ``Figure.savefig(**save_args)``."""
        if not callable(getattr(data, "savefig", None)):
            raise DatasetError(f"{self._filepath}: expected a matplotlib Figure to save, got {type(data).__name__}")
        buffer = io.BytesIO()
        data.savefig(buffer, **self._save_args)
        self._write_bytes(buffer.getvalue())

    def preview(self) -> ImagePreview:
        """The saved image, base64-encoded (kedro-viz shows it in the dataset's panel)."""
        return ImagePreview(base64.b64encode(self._read_bytes()).decode("ascii"))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "save_args": self._save_args}
