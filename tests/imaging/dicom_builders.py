"""Builders of DICOM test inputs from the real CT, shared by ``test_dicom.py`` and ``test_dicom_hospital.py``.

The real CT (``../shared/realdata/ct_abdomen_3mm.nii.gz``) is the example CT of the
TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence),
used read-only (see the folder's NOTICE.md). Series are written with
:func:`pancreas_seg.imaging.dicom_series_writer.write_ct_series`, then changed here with pydicom the
way hospital exports differ from it: UIDs emptied or removed, pixel padding, one enhanced
multi-frame file, a ``.zip``, a DICOMDIR file-set, gantry tilt. Every builder writes new files
(the written series is changed in place only where the name says so); nothing is mocked.
"""

from __future__ import annotations

import random
import subprocess
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations as ornt_lib
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pancreas_seg.imaging.dicom_io import DicomVolume, find_series, read_series
from pancreas_seg.imaging.dicom_series_writer import write_ct_series

CT_NAME, MASK_NAME = "ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz"
N_SMALL = 10


# --------------------------------------------------------------------------------------------
# geometry and plain series
# --------------------------------------------------------------------------------------------
def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another axis order (exact: permutes and flips only)."""
    transform = ornt_lib.ornt_transform(ornt_lib.io_orientation(affine), ornt_lib.axcodes2ornt(tuple(axcodes)))
    return (ornt_lib.apply_orientation(array, transform),
            affine @ ornt_lib.inv_ornt_aff(transform, array.shape))


def rotated(affine: np.ndarray, about_x_deg: float, about_z_deg: float) -> np.ndarray:
    """``affine`` rotated in world space (an oblique acquisition of the same voxels)."""
    x, z = np.radians(about_x_deg), np.radians(about_z_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rotation = np.eye(4)
    rotation[:3, :3] = rz @ rx
    return rotation @ affine


def shuffled_names(n: int, seed: int) -> list[str]:
    """File names in an order unrelated to the slice order (and not sortable into it)."""
    names = [f"IM{random.Random(seed + k).getrandbits(40):012x}.dcm" for k in range(n)]
    random.Random(seed).shuffle(names)
    return names


def run_dcm2niix(binary: str, series_folder: Path, out: Path) -> nib.Nifti1Image:
    """The one NIfTI the real dcm2niix writes for ``series_folder``."""
    images = run_dcm2niix_all(binary, series_folder, out)
    assert len(images) == 1, images
    return images[0]


def run_dcm2niix_all(binary: str, series_folder: Path, out: Path) -> list[nib.Nifti1Image]:
    """Every NIfTI the real dcm2niix writes for ``series_folder`` (one per series it finds), by name."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([binary, "-z", "n", "-b", "n", "-f", "converted_%s", "-o", str(out),
                             str(series_folder)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [nib.load(str(path)) for path in sorted(out.glob("*.nii"))]


def only_series(folder: Path) -> DicomVolume:
    """The one series under ``folder``, read."""
    series = find_series(folder)
    assert len(series) == 1
    return read_series(series[0])


def edit(path: Path, **attributes) -> None:
    """Set attributes of one DICOM file in place."""
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)


def write_small(ct, folder: Path, description: str, **kwargs) -> list[Path]:
    """A 10-slice series from the real CT (z 50-59), usual axial DICOM orientation (LPS)."""
    hu, affine = ct
    crop = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 50], [0, 0, 0, 1]])
    stored, stored_affine = reorient(hu[:, :, 50:50 + N_SMALL], crop, "LPS")
    return write_ct_series(stored, stored_affine, folder, description=description, **kwargs)


def make_gantry_tilt(paths: list[Path], shift_mm: float = 0.5, tilt_deg: float = 9.46) -> None:
    """In place: each slice ``shift_mm`` further along y than the last, as a tilted gantry stacks
    them (0.5 mm on 3 mm slices: atan(0.5 / 3) = 9.46 degrees)."""
    for k, path in enumerate(paths):
        x, y, z = (float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient)
        edit(path, ImagePositionPatient=[x, y + shift_mm * k, z], GantryDetectorTilt=tilt_deg)


# --------------------------------------------------------------------------------------------
# hospital exports
# --------------------------------------------------------------------------------------------
#: The UIDs de-identification tools leave empty (or remove).
ANONYMISED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def strip_uids(paths: Sequence[Path], how: str = "empty") -> None:
    """In place: :data:`ANONYMISED_UIDS` (and the file meta's MediaStorageSOPInstanceUID) set
    EMPTY (``how="empty"``, what a real anonymised export holds) or removed (``"missing"``)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ANONYMISED_UIDS:
            if how == "empty":
                setattr(ds, keyword, "")
            else:
                delattr(ds, keyword)
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path)


def fov_corners(rows: int, columns: int) -> np.ndarray:
    """(rows, columns) bool: the pixels outside the inscribed circle, where scanners pad."""
    r, c = np.mgrid[:rows, :columns]
    radius = min(rows, columns) / 2
    return (r - (rows - 1) / 2) ** 2 + (c - (columns - 1) / 2) ** 2 > radius ** 2


def pad_series(paths: Sequence[Path], value: int, vr: str, *, limit: int | None = None,
               unsigned_intercept: float | None = None, seed: int = 0) -> None:
    """In place: the pixels outside the field of view become padding, stored as ``value`` (or any
    value from ``value`` to ``limit``), declared by PixelPaddingValue (and PixelPaddingRangeLimit)
    written with ``vr`` ("US" or "SS": a signed image may declare it US, as some scanners do).

    With ``unsigned_intercept`` the stored pixels are re-encoded as UNSIGNED (PixelRepresentation 0)
    with that RescaleIntercept (the same HU elsewhere).
    """
    rng = np.random.default_rng(seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.int64)
        if unsigned_intercept is not None:
            stored = stored * int(float(ds.RescaleSlope)) + int(float(ds.RescaleIntercept)) - int(unsigned_intercept)
            assert stored.min() >= 0
            ds.PixelRepresentation, ds.RescaleIntercept = 0, str(int(unsigned_intercept))
        corners = fov_corners(int(ds.Rows), int(ds.Columns))
        high = value if limit is None else limit
        stored[corners] = rng.integers(min(value, high), max(value, high) + 1, size=int(corners.sum()))
        ds.PixelData = stored.astype(np.uint16 if unsigned_intercept is not None else np.int16).tobytes()
        ds.add(DataElement(0x00280120, vr, _vr_value(value, vr)))
        if limit is not None:
            ds.add(DataElement(0x00280121, vr, _vr_value(limit, vr)))
        ds.save_as(path)


def _vr_value(value: int, vr: str) -> int:
    """``value`` as the VR holds it: a negative number written as US wraps to 65536 + value."""
    return value % 65536 if vr == "US" else value


def enhanced_from_series(paths: Sequence[Path], out: Path, *, orientation_per_frame: bool = False,
                         rescale_per_frame: bool = False, frame_order: Sequence[int] | None = None,
                         transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """One Enhanced CT Image Storage file (1.2.840.10008.5.1.4.1.1.2.1) with the slices of a
    single-frame series as frames, in ``frame_order``: PixelMeasuresSequence shared,
    PlanePositionSequence per frame, PlaneOrientationSequence and PixelValueTransformationSequence
    shared or per frame. Every geometry string is copied from the slice it comes from."""
    slices = [pydicom.dcmread(path) for path in paths]
    order = list(frame_order) if frame_order is not None else list(range(len(slices)))
    first = slices[0]
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    for keyword in ("SpecificCharacterSet", "StudyDate", "StudyTime", "ContentDate", "ContentTime",
                    "AccessionNumber", "Modality", "Manufacturer", "ReferringPhysicianName", "StudyDescription",
                    "SeriesDescription", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyID", "SeriesNumber", "FrameOfReferenceUID",
                    "PositionReferenceIndicator", "Rows", "Columns", "SamplesPerPixel",
                    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.AcquisitionDateTime = f"{first.StudyDate}{first.StudyTime}"
    ds.NumberOfFrames = len(order)

    def item(**attributes) -> Dataset:
        one = Dataset()
        for keyword, value in attributes.items():
            setattr(one, keyword, value)
        return one

    def rescale(ds_slice: Dataset) -> Dataset:
        return item(RescaleIntercept=ds_slice.RescaleIntercept, RescaleSlope=ds_slice.RescaleSlope, RescaleType="HU")

    shared = item(PixelMeasuresSequence=[item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)],
                  CTImageFrameTypeSequence=[item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])])
    if not orientation_per_frame:
        shared.PlaneOrientationSequence = [item(ImageOrientationPatient=first.ImageOrientationPatient)]
    if not rescale_per_frame:
        shared.PixelValueTransformationSequence = [rescale(first)]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        frame = item(FrameContentSequence=[item(StackID="1", InStackPositionNumber=int(k) + 1)],
                     PlanePositionSequence=[item(ImagePositionPatient=slices[k].ImagePositionPatient)])
        if orientation_per_frame:
            frame.PlaneOrientationSequence = [item(ImageOrientationPatient=slices[k].ImageOrientationPatient)]
        if rescale_per_frame:
            frame.PixelValueTransformationSequence = [rescale(slices[k])]
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    frames = np.stack([slices[k].pixel_array for k in order])
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, frames, generate_instance_uid=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def zip_folder(folder: Path, archive: Path, prefix: str = "export/", extra: dict[str, bytes] | None = None,
               compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """``folder`` zipped under ``prefix`` (as a hospital's export tool does), plus ``extra`` members."""
    with zipfile.ZipFile(archive, "w", compression) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, prefix + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            handle.writestr(name, data)
    return archive


def dicomdir_from_series(paths: Sequence[Path], out: Path) -> Path:
    """A real DICOM file-set (pydicom's FileSet: a DICOMDIR and the files copied under
    ``PT000000/ST000000/SE000000/``) in ``out``; returns the DICOMDIR's path."""
    from pydicom.fileset import FileSet  # noqa: PLC0415

    file_set = FileSet()
    for path in paths:
        file_set.add(path)
    file_set.write(out)
    return out / "DICOMDIR"


def writer_for(ct: tuple[np.ndarray, np.ndarray]) -> Callable[..., list[Path]]:
    """``write(folder, **options)``: the real CT as an LPS series (the usual axial DICOM)."""
    stored, affine = reorient(*ct, "LPS")

    def write(folder: Path, **options) -> list[Path]:
        return write_ct_series(stored, affine, folder, **options)

    return write
