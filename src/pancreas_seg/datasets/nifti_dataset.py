"""``NiftiDataset``: one NIfTI file <-> :class:`~pancreas_seg.imaging.nifti_io.NiftiVolume`;
``PredictionDataset``: a predicted label map and, next to it, its tumour probability map."""

from __future__ import annotations

import gzip
from typing import Any

import nibabel as nib
import numpy as np

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset
from pancreas_seg.core.atomic import atomic_write_bytes
from pancreas_seg.imaging.nifti_io import (
    PROBABILITY_SUFFIX,
    CasePrediction,
    NiftiVolume,
    load_nifti,
    nifti_bytes,
    probability_nifti_bytes,
    probability_path,
)


class NiftiDataset(FsspecFileDataset):
    """Load a ``.nii``/``.nii.gz`` file as a NiftiVolume (array, affine, header); save one back.

    ``save`` accepts a NiftiVolume or an ``(array, affine)`` tuple and writes the array with
    exactly that affine (gzip when the path ends in ``.gz``). Example catalog entry::

        predictions:
          type: partitions.PartitionedDataset
          path: data/07_model_output/unet
          dataset: pancreas_seg.datasets.NiftiDataset
          filename_suffix: .nii.gz
    """

    def load(self) -> NiftiVolume:
        return self._load_volume(self._load_path(), self._load_args.get("dtype"))

    def _load_volume(self, path: str, dtype: Any = None) -> NiftiVolume:
        """The file at ``path`` (local or remote, gzip or not) as a NiftiVolume, cast to ``dtype``
        (float dtypes through the header's scaling)."""
        if self._is_local:
            return load_nifti(path, dtype=dtype)
        payload = self._read_bytes()
        if payload[:2] == b"\x1f\x8b":
            payload = gzip.decompress(payload)
        image = nib.Nifti1Image.from_bytes(payload)
        if dtype is None:
            array = np.asanyarray(image.dataobj)
        elif np.dtype(dtype).kind == "f":
            array = image.get_fdata(dtype=np.dtype(dtype))
        else:
            array = np.asanyarray(image.dataobj).astype(dtype, copy=False)
        return NiftiVolume(np.asarray(array), np.asarray(image.affine, dtype=np.float64),
                           image.header)

    def save(self, data: NiftiVolume | tuple[np.ndarray, np.ndarray]) -> None:
        volume = data if isinstance(data, NiftiVolume) else NiftiVolume(*data)
        compress = str(self._filepath).endswith(".gz")
        self._write_bytes(nifti_bytes(volume.array, volume.affine, volume.header, compress=compress))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "nifti"}


class PredictionDataset(NiftiDataset):
    """A predicted label map (``<case>.nii.gz``) and, when there is one, its tumour probability map
    (``<case>_tumour_probability.nii.gz``, uint8 with ``scl_slope = 1/255``, next to it).

    ``save`` takes a :class:`~pancreas_seg.imaging.nifti_io.CasePrediction` (or a plain NiftiVolume:
    labels only) and writes both files atomically, labels first; a probability map an earlier run
    left next to the labels is removed when this prediction has none. ``load`` returns the labels as
    :class:`NiftiDataset` does, or, for a ``*_tumour_probability.nii.gz`` path (a partitioned folder
    lists both files), the probability as float32 in [0, 1]. Example catalog entry::

        test_predictions:
          type: partitions.PartitionedDataset
          path: data/07_model_output/unet
          dataset: pancreas_seg.datasets.PredictionDataset
          filename_suffix: .nii.gz
    """

    def load(self) -> NiftiVolume:
        path = self._load_path()
        if not path.endswith((PROBABILITY_SUFFIX + ".nii.gz", PROBABILITY_SUFFIX + ".nii")):
            return super().load()
        return self._load_volume(path, np.float32)

    def save(self, data: CasePrediction | NiftiVolume | tuple[np.ndarray, np.ndarray]) -> None:
        prediction = data if isinstance(data, CasePrediction) else CasePrediction(
            data if isinstance(data, NiftiVolume) else NiftiVolume(*data))
        super().save(prediction.labels)
        target = probability_path(self._save_path())
        if prediction.tumour_probability is None:
            if self._fs.exists(target):
                self._fs.rm(target)
            return
        labels = prediction.labels
        payload = probability_nifti_bytes(prediction.tumour_probability, labels.affine, labels.header,
                                          compress=target.endswith(".gz"))
        if self._is_local:
            atomic_write_bytes(target, payload)
        else:
            with self._fs.open(target, "wb") as handle:
                handle.write(payload)
        self._fs.invalidate_cache(target)
