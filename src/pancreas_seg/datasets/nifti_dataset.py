"""``NiftiDataset``: one NIfTI file <-> :class:`~pancreas_seg.imaging.nifti_io.NiftiVolume`."""

from __future__ import annotations

import gzip
from typing import Any

import nibabel as nib
import numpy as np

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset
from pancreas_seg.imaging.nifti_io import NiftiVolume, load_nifti, nifti_bytes


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
        path = self._load_path()
        if self._is_local:
            return load_nifti(path, **self._load_args)
        payload = self._read_bytes()
        if payload[:2] == b"\x1f\x8b":
            payload = gzip.decompress(payload)
        image = nib.Nifti1Image.from_bytes(payload)
        dtype = self._load_args.get("dtype")
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
