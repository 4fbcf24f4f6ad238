"""Write a NIfTI-convention volume as a DICOM CT series (for tests, benchmarks and demos).

This is NOT a clinical export: the patient and study attributes are placeholders. It writes a
complete enough CT Image Storage instance per slice that pydicom, highdicom and dcm2niix accept it,
from a volume in the NIfTI convention (array ``(X, Y, Z)``, ``affine`` voxel -> RAS mm):

* slice ``k`` is ``array[:, :, k]``; its DICOM pixel rows run along the array's Y axis and its
  columns along X (``Rows = Y``, ``Columns = X``);
* ``ImageOrientationPatient`` = the directions of the affine's X and Y columns, ``PixelSpacing`` =
  their lengths (row spacing = |Y column|, column spacing = |X column|) and
  ``ImagePositionPatient`` of slice ``k`` = ``affine @ (0, 0, k, 1)``, all converted RAS -> LPS
  (the first two world coordinates negated);
* stored values are int16 with ``RescaleSlope``/``RescaleIntercept`` chosen per slice (so the
  HU values are exactly ``stored * slope + intercept``).

The geometry is computed here directly from the affine, independently of
:mod:`pancreas_seg.imaging.dicom_io` (the reader), so tests compare two separate implementations.
Deliberately pure pydicom + NumPy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

#: Rescale of one slice: (slope, intercept), HU = stored * slope + intercept.
Rescale = tuple[float, float]

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
#: SOP class written for each modality (other modalities get CT Image Storage).
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def _ds_number(value: float) -> str:
    """A DS (decimal string, at most 16 characters) as exact as 16 characters allow."""
    value = float(value)
    if value == 0.0:
        return "0"
    for precision in range(16, 0, -1):
        text = f"{value:.{precision}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value!r} as a DICOM decimal string")


def series_geometry(affine: np.ndarray, n_slices: int) -> dict[str, object]:
    """The DICOM geometry of a (X, Y, Z) volume with ``affine`` (RAS mm), in LPS.

    Returns ``{"orientation": [6 floats], "pixel_spacing": [row, column] mm,
    "positions": (n_slices, 3) LPS mm}``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    lps = _LPS_FROM_RAS @ affine[:3, :]
    column_step, row_step = lps[:, 0], lps[:, 1]          # +1 column (array X), +1 row (array Y)
    column_spacing, row_spacing = float(np.linalg.norm(column_step)), float(np.linalg.norm(row_step))
    row_cosine, column_cosine = column_step / column_spacing, row_step / row_spacing
    if abs(float(row_cosine @ column_cosine)) > 1e-6:
        raise ValueError("the affine's X and Y axes are not orthogonal: no ImageOrientationPatient fits")
    positions = lps[:, 3][None, :] + np.arange(n_slices)[:, None] * lps[:, 2][None, :]
    return {"orientation": [*row_cosine.tolist(), *column_cosine.tolist()],
            "pixel_spacing": [row_spacing, column_spacing], "positions": positions}


def _stored_values(hu: np.ndarray, slope: float, intercept: float, where: str) -> np.ndarray:
    stored = (np.asarray(hu, dtype=np.float64) - intercept) / slope
    rounded = np.rint(stored)
    if not np.array_equal(stored, rounded):
        raise ValueError(f"{where}: HU values are not exactly representable with slope {slope} "
                         f"and intercept {intercept}")
    if rounded.min() < np.iinfo(np.int16).min or rounded.max() > np.iinfo(np.int16).max:
        raise ValueError(f"{where}: stored values {rounded.min()}..{rounded.max()} do not fit int16 "
                         f"(slope {slope}, intercept {intercept})")
    return rounded.astype(np.int16)


def write_ct_series(array: np.ndarray, affine: np.ndarray, folder: str | os.PathLike[str], *,
                    series_uid: str | None = None, study_uid: str | None = None,
                    frame_of_reference_uid: str | None = None,
                    description: str = "synthetic CT series", series_number: int = 1,
                    modality: str = "CT", transfer_syntax: str = ExplicitVRLittleEndian,
                    rescale: Rescale | Callable[[int], Rescale] = (1.0, -1024.0),
                    file_name: Callable[[int], str] | None = None,
                    instance_number: Callable[[int], int] | None = None,
                    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                    patient_id: str = "SYNTHETIC-001") -> list[Path]:
    """Write ``array`` (X, Y, Z) HU with ``affine`` (RAS mm) as one CT series, one file per slice.

    Args:
        array: integer HU (or any values exactly representable as int16 after ``rescale``).
        affine: voxel -> RAS mm; its X and Y columns must be orthogonal.
        folder: created if needed; files are ``slice_0000.dcm`` ... unless ``file_name(k)``.
        transfer_syntax: ``ExplicitVRLittleEndian`` (uncompressed) or a lossless compressed one
            pydicom can encode (``JPEG2000Lossless`` with pylibjpeg-openjpeg, ``JPEGLSLossless``
            with pyjpegls, ``RLELossless``).
        rescale: ``(slope, intercept)`` for every slice, or a function of the slice index.
        instance_number: InstanceNumber of slice ``k`` (default ``k + 1``).

    Returns:
        The written paths, slice 0 first.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {array.shape}")
    n_columns, n_rows, n_slices = array.shape
    geometry = series_geometry(affine, n_slices)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    rescale_of = rescale if callable(rescale) else (lambda _k: rescale)
    paths = []
    for k in range(n_slices):
        slope, intercept = (float(v) for v in rescale_of(k))
        frame = _stored_values(array[:, :, k].T, slope, intercept, f"slice {k}")   # (rows, columns)
        ds = _ct_slice_dataset(
            geometry, k, n_rows=n_rows, n_columns=n_columns, slope=slope, intercept=intercept,
            series_uid=series_uid, study_uid=study_uid, frame_of_reference_uid=frame_of_reference_uid,
            description=description, series_number=series_number, modality=modality,
            image_type=image_type, patient_id=patient_id,
            instance_number=instance_number(k) if instance_number else k + 1)
        ds.PixelData = np.ascontiguousarray(frame).tobytes()
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, frame, generate_instance_uid=False)
        path = folder / (file_name(k) if file_name else f"slice_{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice_dataset(geometry: dict, k: int, *, n_rows: int, n_columns: int, slope: float,
                      intercept: float, series_uid: str, study_uid: str, frame_of_reference_uid: str,
                      description: str, series_number: int, modality: str,
                      image_type: Sequence[str], patient_id: str, instance_number: int) -> Dataset:
    """The header of slice ``k`` (everything but the pixel data)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    sop_class = _SOP_CLASS.get(modality, CTImageStorage)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "pancreas_seg synthetic writer"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic abdominal CT"
    ds.SeriesDescription = description
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.SliceThickness = _ds_number(float(np.linalg.norm(geometry["positions"][1] - geometry["positions"][0]))
                                   if len(geometry["positions"]) > 1 else 1.0)
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds_number(v) for v in geometry["positions"][k]]
    ds.ImageOrientationPatient = [_ds_number(v) for v in geometry["orientation"]]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n_rows
    ds.Columns = n_columns
    ds.PixelSpacing = [_ds_number(v) for v in geometry["pixel_spacing"]]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _ds_number(intercept)
    ds.RescaleSlope = _ds_number(slope)
    ds.RescaleType = "HU"
    return ds
