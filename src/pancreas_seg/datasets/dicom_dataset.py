"""``DicomDataset``: one DICOM file <-> a pydicom ``Dataset`` (e.g. a DICOM-SEG made by highdicom)."""

from __future__ import annotations

import io
from typing import Any

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset


class DicomDataset(FsspecFileDataset):
    """Save a pydicom ``Dataset`` (a highdicom ``Segmentation`` is one) as a ``.dcm`` file; load it back.

    Local files are written to a temporary file and renamed into place. Example catalog entry::

        inference_dicom_seg:
          type: partitions.PartitionedDataset
          path: data/07_model_output/inference
          dataset: pancreas_seg.datasets.DicomDataset
          filename_suffix: _seg.dcm
    """

    def load(self) -> Any:
        import pydicom  # noqa: PLC0415 - only when DICOM is read

        return pydicom.dcmread(io.BytesIO(self._read_bytes()))

    def save(self, data: Any) -> None:
        if not callable(getattr(data, "save_as", None)):
            raise TypeError(f"{self._filepath}: expected a pydicom Dataset to save, got {type(data).__name__}")
        buffer = io.BytesIO()
        data.save_as(buffer)
        self._write_bytes(buffer.getvalue())

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "dicom"}
