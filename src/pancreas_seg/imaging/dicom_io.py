"""DICOM CT input: find the series in a folder, validate them, read one as (HU array, RAS affine).

What a read gives
-----------------
:func:`read_series` returns a :class:`DicomVolume`, a :class:`~pancreas_seg.imaging.nifti_io.NiftiVolume`
(``array`` + ``affine``, ``header`` None) with the series' identity and its sorted DICOM headers
added, so everything that takes a NIfTI load takes it too.

Geometry convention (the one dcm2niix computes from the headers)
-----------------------------------------------------------------
DICOM gives, per slice, ``ImagePositionPatient`` P (the centre of the first transmitted pixel),
``ImageOrientationPatient`` = row cosine r (direction of increasing column index) and column
cosine c (direction of increasing row index), and ``PixelSpacing`` = (row spacing Δr = distance
between rows, column spacing Δc = distance between columns), all in the patient's LPS frame (mm).

* Slices are sorted by their position along the slice normal n = r × c (``P · n`` ascending),
  never by InstanceNumber, file name or SliceLocation; the spacing comes from the positions,
  never from SliceThickness (real series overlap: 3 mm thick slices 2 mm apart).
* The array is ``(X, Y, Z) = (Columns, Rows, slices)``: ``array[i, j, k]`` is column i, row j of
  the k-th slice along n (``pixel_array[j, i]`` of that slice), in HU after each slice's own
  RescaleSlope/RescaleIntercept.
* The affine maps voxel (i, j, k) to world (RAS, mm)::

      world_LPS = P_0 + i·Δc·r + j·Δr·c + k·s,      s = (P_last − P_0) / (n_slices − 1)
      world_RAS = diag(−1, −1, 1) · world_LPS

  so its columns are Δc·r, Δr·c and the slice step s (LPS → RAS: the first two rows negated), and
  its origin is the first sorted slice's ImagePositionPatient. Since slices go along +n, the
  affine is right-handed (positive determinant); a series stored in the opposite order gives the
  same volume.

dcm2niix computes this same voxel -> world mapping, then also reverses the row axis before
writing the NIfTI (its array is ``array[:, ::-1, :]``, with the affine adjusted to match): the
same image in world space (``nibabel.as_closest_canonical`` of both are identical).
:func:`dcm2niix_layout` converts a volume to that exact layout. The tests compare the reader with
the real ``dcm2niix`` binary where it is installed.

What is refused
---------------
A series that would give a wrong volume is refused with an :class:`InvalidSeriesError` whose
:class:`SeriesProblem` s name the series (SeriesInstanceUID, SeriesDescription, folder), the kind
of problem (:data:`PROBLEM_KINDS`) and the details: not CT; a localizer/scout (ImageType
LOCALIZER, a single slice, or one slice oriented unlike the rest); mixed matrix sizes, mixed
orientations or mixed pixel spacings; duplicate slice positions; missing slices (a step more than
:data:`MISSING_SLICE_FACTOR` times the median); non-uniform spacing or slices off the straight
stack (beyond :data:`SLICE_POSITION_TOLERANCE_MM`); gantry tilt; fewer than :data:`MIN_SLICES`
slices; missing geometry attributes; multi-frame images without per-frame functional groups, or
colour images; a transfer syntax with no pixel decoder installed (named, with the package that
decodes it); undecodable pixel data.

Gantry tilt is refused, not resampled: a tilted stack is a sheared grid, and resampling it (as
dcm2niix does, writing a ``_Tilt_1`` file) would give a volume whose slices are no longer the
DICOM slices, so masks and DICOM-SEG frames could not be mapped back to the source images. The
error says so and names dcm2niix for converting such a series first.

Hospital exports (what is read besides plain single-frame series)
-----------------------------------------------------------------
* **No usable UIDs.** De-identification tools may leave ``SeriesInstanceUID`` (and
  ``StudyInstanceUID``, ``SOPInstanceUID``) present but empty, or remove them. Such image files
  are grouped as dcm2niix groups them, by the keys in :data:`FALLBACK_GROUP_KEYS` (SeriesNumber,
  matrix, series date/time, ...) and by ImageOrientationPatient (within
  :data:`ORIENTATION_COSINE_TOLERANCE`); a WARNING names the keys used, and the series gets a
  generated id ``no-uid-<SeriesNumber>-<hash>`` (:attr:`DicomSeries.grouped_by` lists the keys).
  DICOM files that are neither in a series nor images (e.g. a structured report without a
  SeriesInstanceUID) are never dropped silently: :attr:`FolderScan.ungrouped` names each one with
  the reason, a WARNING names each, and ``on_invalid="skip"`` returns them as
  :data:`UNGROUPED_FILE` problems (a DICOMDIR, the index of the images beside it, is listed there
  too but only noted at INFO).
* **Pixel padding.** Stored values equal to ``PixelPaddingValue`` (or between it and
  ``PixelPaddingRangeLimit``), compared before rescale, in the signedness of
  ``PixelRepresentation``, are set to :data:`AIR_HU`, so padding never reads as tissue.
* **Enhanced multi-frame CT** (one file, per-frame functional groups; Enhanced CT and Legacy
  Converted Enhanced CT Image Storage): every frame becomes one slice, with its
  ImagePositionPatient, ImageOrientationPatient, PixelSpacing and rescale taken from the per-frame
  or shared functional groups; the same volume and affine as the equivalent single-frame series.
* **Archives and file-sets.** :func:`read_dicom_input` takes a folder, a ``.zip`` of series or a
  DICOMDIR; :func:`read_dicom_archive` reads the one CT series of a ``.zip``. A zip is checked
  from its central directory before anything is extracted (member count, total uncompressed
  size: :class:`ArchiveLimits`; absolute or ``..`` member names, links, encryption), then
  extracted to a temporary folder with the sizes enforced while copying; errors and volumes name
  members as ``<archive>/<member>``. A DICOMDIR is read from its directory records
  (ReferencedFileID); the files it references must lie under its folder. One DICOM file (an
  enhanced multi-frame CT) is an input too.

Compressed pixel data (JPEG 2000, JPEG-LS, JPEG lossless, RLE) is decoded by pydicom's pixel
handlers with the pylibjpeg plugins (pylibjpeg-openjpeg, pylibjpeg-libjpeg) or pyjpegls.

Headers are read with ``stop_before_pixels=True`` and ``force=False``: files without the DICOM
preamble (non-DICOM, or very old ACR-NEMA files) and macOS ``._*`` files are skipped and counted.
Pure pydicom + NumPy (no Kedro).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import tempfile
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, MediaStorageDirectoryStorage

from pancreas_seg.imaging.nifti_io import NiftiVolume

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Tolerances (units in the names)
# --------------------------------------------------------------------------------------------
#: A series needs at least this many slices to be a volume (a single slice is a localizer).
MIN_SLICES = 3
#: Slices whose direction cosines differ by more than this (per component) have different orientations.
ORIENTATION_COSINE_TOLERANCE = 1e-3
#: Slices whose PixelSpacing differs by more than this (mm) have different pixel spacings.
PIXEL_SPACING_TOLERANCE_MM = 1e-3
#: Two slices closer than this along the slice normal (mm) are at the same position (duplicates).
DUPLICATE_POSITION_TOLERANCE_MM = 1e-2
#: A step between neighbouring slices more than this times the median step means missing slice(s).
MISSING_SLICE_FACTOR = 1.5
#: How far (mm) any slice may be from where the affine puts it (uniform steps on a straight stack).
SLICE_POSITION_TOLERANCE_MM = 0.05
#: The slice step may deviate from the slice normal by this much (degrees) before it is gantry tilt.
GANTRY_TILT_TOLERANCE_DEG = 0.1
#: HU given to padding voxels (PixelPaddingValue): air, the lowest CT number the project uses.
AIR_HU = -1024
#: Series-level attributes that group image files without a SeriesInstanceUID (as dcm2niix does);
#: ImageOrientationPatient is compared within ORIENTATION_COSINE_TOLERANCE on top of these.
FALLBACK_GROUP_KEYS = ("StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "Modality", "SeriesNumber",
                       "SeriesDate", "SeriesTime", "SeriesDescription", "ImageType", "Rows", "Columns",
                       "BitsAllocated", "FrameOfReferenceUID")
#: Id prefix of a series grouped without a SeriesInstanceUID.
NO_UID_PREFIX = "no-uid"

# --------------------------------------------------------------------------------------------
# Problem kinds
# --------------------------------------------------------------------------------------------
NOT_CT = "not_ct"
LOCALIZER = "localizer"
MIXED_MATRIX = "mixed_matrix"
MIXED_ORIENTATION = "mixed_orientation"
MIXED_PIXEL_SPACING = "mixed_pixel_spacing"
DUPLICATE_POSITIONS = "duplicate_positions"
MISSING_SLICES = "missing_slices"
NON_UNIFORM_SPACING = "non_uniform_spacing"
MISALIGNED_SLICES = "misaligned_slices"
GANTRY_TILT = "gantry_tilt"
TOO_FEW_SLICES = "too_few_slices"
MISSING_ATTRIBUTE = "missing_attribute"
UNSUPPORTED_IMAGE = "unsupported_image"
NO_DECODER = "no_decoder"
UNREADABLE_PIXELS = "unreadable_pixels"
UNGROUPED_FILE = "ungrouped_file"

PROBLEM_KINDS: tuple[str, ...] = (
    NOT_CT, LOCALIZER, MIXED_MATRIX, MIXED_ORIENTATION, MIXED_PIXEL_SPACING, DUPLICATE_POSITIONS,
    MISSING_SLICES, NON_UNIFORM_SPACING, MISALIGNED_SLICES, GANTRY_TILT, TOO_FEW_SLICES,
    MISSING_ATTRIBUTE, UNSUPPORTED_IMAGE, NO_DECODER, UNREADABLE_PIXELS, UNGROUPED_FILE)
"""Every kind of :class:`SeriesProblem`."""

ON_INVALID = ("fail", "skip")

#: Attributes without which no geometry or pixel array can be built.
REQUIRED_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                       "Columns", "BitsAllocated", "PixelRepresentation")

#: Python packages that decode each compressed family (for the "no decoder" message).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
}

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
_INT16 = np.iinfo(np.int16)
_SHOWN_FILES = 3   # file names quoted per problem before "and N more"


# --------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesProblem:
    """One reason a series cannot be read as a CT volume."""

    series_uid: str
    description: str
    folder: str
    kind: str
    message: str

    def __str__(self) -> str:
        if not self.series_uid:       # a file that is in no series (UNGROUPED_FILE)
            return f"{self.folder}: {self.message}"
        return f"series {self.series_uid} ({self.description!r}) in {self.folder}: {self.message}"


class InvalidSeriesError(ValueError):
    """A DICOM series (or several) cannot be read as a CT volume; ``problems`` says why, each naming
    its series (SeriesInstanceUID, SeriesDescription, folder) and the problem."""

    def __init__(self, problems: Sequence[SeriesProblem], hint: str = "") -> None:
        self.problems = list(problems)
        n_series = len({p.series_uid for p in self.problems})
        listing = "\n".join(f"  - {p}" for p in self.problems)
        head = (f"DICOM series {self.problems[0].series_uid} is not a usable CT volume"
                if n_series == 1 else f"{n_series} DICOM series are not usable CT volumes")
        super().__init__(f"{head}:\n{listing}" + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """The images of one series found in a folder, with their headers (no pixel data).

    One entry per image (slice): ``files[i]``, ``headers[i]`` and ``frames[i]``, in path order (not
    yet sorted in space: see :func:`read_series`). A single-frame file is one image (frame
    ``None``); an enhanced multi-frame file is one image per frame (its path repeated, ``frames[i]``
    the 0-based frame index, ``headers[i]`` the frame's attributes from the functional groups).
    ``frames`` is empty when every image is single-frame. ``grouped_by`` names the attributes the
    images were grouped by when they have no SeriesInstanceUID (empty when grouped by UID).
    """

    series_uid: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    frames: tuple[int | None, ...] = ()
    grouped_by: tuple[str, ...] = ()

    def frame(self, index: int) -> int | None:
        """The frame of image ``index`` in its file (``None``: a single-frame file)."""
        return self.frames[index] if self.frames else None

    @property
    def labels(self) -> tuple[str, ...]:
        """How messages name each image: the file name, with ``frame <n>`` (1-based) for a frame."""
        return tuple(f.name if self.frame(i) is None else f"{f.name} frame {self.frame(i) + 1}"  # type: ignore[operator]
                     for i, f in enumerate(self.files))

    @property
    def description(self) -> str:
        return str(self.headers[0].get("SeriesDescription", "")) if self.headers else ""

    @property
    def folder(self) -> Path:
        """The deepest folder holding all of the series' files."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))

    @property
    def modality(self) -> str:
        return str(self.headers[0].get("Modality", "")) if self.headers else ""

    @property
    def series_number(self) -> int | None:
        value = self.headers[0].get("SeriesNumber") if self.headers else None
        return None if value in (None, "") else int(value)

    def __len__(self) -> int:
        return len(self.files)

    def problem(self, kind: str, message: str) -> SeriesProblem:
        return SeriesProblem(self.series_uid, self.description, str(self.folder), kind, message)


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_folder` found: the series, and counts of the files it skipped."""

    folder: Path
    series: list[DicomSeries]
    n_files: int                      # every file walked, skipped ones included
    n_resource_forks: int             # macOS ``._*`` files
    n_not_dicom: int                  # no DICOM preamble / not DICOM (read with force=False)
    n_without_series: int             # DICOM in no series and not an image (DICOMDIR, ...): ``ungrouped``
    unreadable: tuple[tuple[str, str], ...] = ()   # (file, reason): DICOM preamble but corrupt header
    ungrouped: tuple[tuple[str, str], ...] = ()    # (file, reason): the n_without_series files, named
    n_grouped_without_uid: int = 0    # images without a SeriesInstanceUID, grouped by FALLBACK_GROUP_KEYS

    @property
    def n_skipped(self) -> int:
        return self.n_resource_forks + self.n_not_dicom + self.n_without_series + len(self.unreadable)


@dataclass(frozen=True, eq=False)
class DicomVolume(NiftiVolume):
    """A CT series read like a NIfTI file: ``array`` (X, Y, Z) = (Columns, Rows, slices) in HU
    (int16 when every slice's rescale is integral and fits, else float32), ``affine`` voxel ->
    RAS mm (4, 4), ``header`` None; plus the series identity and its headers sorted along Z."""

    series_uid: str = ""
    description: str = ""
    folder: str = ""
    files: tuple[Path, ...] = ()
    datasets: tuple[Dataset, ...] = field(default=(), repr=False)
    transfer_syntax: str = ""
    frames: tuple[int | None, ...] = ()          # frame of each of ``files`` (empty: single-frame files)
    grouped_by: tuple[str, ...] = ()             # see DicomSeries.grouped_by (empty: by SeriesInstanceUID)
    n_padding_voxels: int = 0                    # voxels set to AIR_HU because they were pixel padding


# --------------------------------------------------------------------------------------------
# Finding series
# --------------------------------------------------------------------------------------------
def _walk_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


#: Top-level attributes not copied into a frame's header (pixels, the groups themselves).
_NOT_FRAME_ATTRIBUTES = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames",
                                   "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"})
_DICOMDIR_REASON = "a DICOMDIR (the index of a DICOM file-set; its images are read where they lie)"

#: One image found: (file, frame index or None, header).
_Image = tuple[Path, "int | None", Dataset]


def _macro_elements(group_item: Dataset) -> list[DataElement]:
    """The attributes inside a functional-group item's macros (each macro sequence's first item)."""
    elements = []
    for element in group_item:
        if element.VR == "SQ" and element.value:
            elements.extend(element.value[0])
    return elements


def _frame_headers(header: Dataset) -> list[Dataset]:
    """One header per frame of an enhanced multi-frame image (no pixel data).

    Each is the file's top-level attributes overridden by the shared functional groups, then by the
    frame's own (PlanePositionSequence -> ImagePositionPatient, PlaneOrientationSequence ->
    ImageOrientationPatient, PixelMeasuresSequence -> PixelSpacing, PixelValueTransformationSequence
    -> RescaleSlope/Intercept, ...); a frame's FrameType becomes its ImageType.

    Raises:
        ValueError: the per-frame groups do not match NumberOfFrames.
    """
    per_frame = header.PerFrameFunctionalGroupsSequence
    n_frames = int(header.get("NumberOfFrames") or 1)
    if len(per_frame) != n_frames:
        raise ValueError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} item(s) for NumberOfFrames "
                         f"{n_frames}")
    shared_groups = header.get("SharedFunctionalGroupsSequence")
    shared = _macro_elements(shared_groups[0]) if shared_groups else []
    top = [element for element in header if element.keyword not in _NOT_FRAME_ATTRIBUTES]
    frames = []
    for item in per_frame:
        frame = Dataset()
        for element in [*top, *shared, *_macro_elements(item)]:
            frame.add(element)
        if "FrameType" in frame:      # a new element: the top-level ImageType is shared, never changed
            frame.add(DataElement(0x00080008, "CS", frame.FrameType))
        frame.file_meta = header.file_meta
        frame.filename = header.filename
        frames.append(frame)
    return frames


def _is_dicomdir(header: Dataset) -> bool:
    meta_class = header.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return meta_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in header


def _key_value(header: Dataset, keyword: str) -> str:
    value = header.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _fallback_series(images: Sequence[_Image], used_ids: set[str]) -> list[DicomSeries]:
    """Images without a SeriesInstanceUID grouped by FALLBACK_GROUP_KEYS, then by orientation."""
    keyed: dict[tuple[str, ...], list[_Image]] = defaultdict(list)
    for image in images:
        keyed[tuple(_key_value(image[2], k) for k in FALLBACK_GROUP_KEYS)].append(image)
    series = []
    for key, members in keyed.items():
        orientations = [_floats(h.ImageOrientationPatient) if h.get("ImageOrientationPatient") else ()
                        for _, _, h in members]
        for indices in _group(orientations, ORIENTATION_COSINE_TOLERANCE):
            chosen = [members[i] for i in indices]
            orientation = orientations[indices[0]]
            grouped_by = tuple(k for k, v in zip(FALLBACK_GROUP_KEYS, key, strict=True) if v)
            grouped_by += ("ImageOrientationPatient",) if orientation else ()
            # The id hashes the key without PatientID (never written out, not even hashed).
            hashed = [v for k, v in zip(FALLBACK_GROUP_KEYS, key, strict=True) if k != "PatientID"]
            digest = hashlib.sha256("|".join([*hashed, _fmt(orientation, 3)]).encode()).hexdigest()[:8]
            number = "".join(c for c in key[FALLBACK_GROUP_KEYS.index("SeriesNumber")] if c.isalnum()) or "x"
            series_id = base = f"{NO_UID_PREFIX}-{number}-{digest}"
            suffix = 2
            while series_id in used_ids:
                series_id, suffix = f"{base}-{suffix}", suffix + 1
            used_ids.add(series_id)
            frames = tuple(f for _, f, _ in chosen)
            series.append(DicomSeries(series_id, tuple(p for p, _, _ in chosen), tuple(h for _, _, h in chosen),
                                      frames if any(f is not None for f in frames) else (), grouped_by))
    return series


def _same(text: str) -> str:
    return text


def _images(path: Path, header: Dataset) -> tuple[list[_Image], str, str]:
    """(the images of one file, its SeriesInstanceUID or "", why it is in no series or "").

    A multi-frame file with functional groups gives one image per frame (ValueError when the
    groups do not match NumberOfFrames); a DICOMDIR, or a file without SeriesInstanceUID and
    without an image matrix (Rows/Columns), is in no series.
    """
    if _is_dicomdir(header):
        return [], "", _DICOMDIR_REASON
    uid = _key_value(header, "SeriesInstanceUID")
    if not uid and (header.get("Rows") in (None, "") or header.get("Columns") in (None, "")):
        sop_class = _key_value(header, "SOPClassUID") or "not given"
        name = UID(sop_class).name if sop_class[0].isdigit() else sop_class
        return [], "", f"no SeriesInstanceUID and no image (Rows/Columns) to group it by: SOP class {name}"
    if "PerFrameFunctionalGroupsSequence" in header:
        return [(path, k, frame) for k, frame in enumerate(_frame_headers(header))], uid, ""
    return [(path, None, header)], uid, ""


def _scan_files(root: Path, paths: Iterable[Path], unreadable: Sequence[tuple[str, str]] = (),
                label: Callable[[str], str] = _same) -> FolderScan:
    """Read the headers of ``paths`` (no pixels) and group their images into series (see
    :func:`scan_folder`); ``unreadable`` are files already known to be unreadable; ``label``
    rewrites paths in the log (an archive's temporary folder -> the archive)."""
    by_uid: dict[str, list[_Image]] = defaultdict(list)
    without_uid: list[_Image] = []
    n_files = n_forks = n_not_dicom = 0
    unreadable_files: list[tuple[str, str]] = list(unreadable)
    ungrouped: list[tuple[str, str]] = []
    for path in paths:
        n_files += 1
        if path.name.startswith("._"):
            n_forks += 1
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            n_not_dicom += 1
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt headers
            unreadable_files.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        try:
            images, uid, not_grouped = _images(path, header)
        except Exception as exc:  # noqa: BLE001 - malformed functional groups
            unreadable_files.append((str(path), f"enhanced multi-frame image: {type(exc).__name__}: {exc}"))
            continue
        if not_grouped:
            ungrouped.append((str(path), not_grouped))
        elif uid:
            by_uid[uid].extend(images)
        else:
            without_uid.extend(images)
    series = []
    for uid, images in by_uid.items():
        frames = tuple(f for _, f, _ in images)
        series.append(DicomSeries(uid, tuple(p for p, _, _ in images), tuple(h for _, _, h in images),
                                  frames if any(f is not None for f in frames) else ()))
    fallback = _fallback_series(without_uid, set(by_uid))
    series += fallback
    series.sort(key=lambda s: (str(s.folder), s.series_number or 0, s.series_uid))
    scan = FolderScan(root, series, n_files, n_forks, n_not_dicom, len(ungrouped), tuple(unreadable_files),
                      tuple(ungrouped), len(without_uid))
    logger.info("%s: %d DICOM series in %d file(s); skipped %d (%d ._* files, %d not DICOM, "
                "%d in no series, %d unreadable)", label(str(root)), len(series), n_files, scan.n_skipped,
                n_forks, n_not_dicom, len(ungrouped), len(unreadable_files))
    for one in fallback:
        logger.warning("%s: %d image(s) in %s have no SeriesInstanceUID (missing or empty, as de-identification "
                       "tools leave it): grouped as dcm2niix groups them, by %s, as series %s", label(str(root)),
                       len(one), label(str(one.folder)), ", ".join(one.grouped_by) or "nothing (no grouping attribute is set)",
                       one.series_uid)
    for file, reason in ungrouped:
        logger.log(logging.INFO if reason == _DICOMDIR_REASON else logging.WARNING,
                   "Not read, in no DICOM series: %s (%s)", label(file), reason)
    for file, reason in unreadable_files:
        logger.warning("Skipped unreadable DICOM file %s (%s)", label(file), label(reason))
    return scan


def scan_folder(folder: str | os.PathLike[str]) -> FolderScan:
    """Walk ``folder`` recursively, read every DICOM header (no pixels) and group the images into series.

    Images are grouped by SeriesInstanceUID, or, where it is missing or empty, by
    :data:`FALLBACK_GROUP_KEYS` and orientation (a WARNING names the keys). An enhanced
    multi-frame file gives one image per frame. Non-DICOM files and ``._*`` files are counted;
    DICOM files in no series (a DICOMDIR, a non-image without SeriesInstanceUID) are counted and
    named in :attr:`FolderScan.ungrouped`; DICOM files whose header cannot be parsed are listed
    with the reason.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM input: {root} is not a folder")
    return _scan_files(root, _walk_files(root))


def find_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """The DICOM series under ``folder`` (recursive), headers only; see :func:`scan_folder`."""
    return scan_folder(folder).series


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _names(labels: Sequence[str]) -> str:
    """The first few image labels (:attr:`DicomSeries.labels`) and how many more."""
    shown = ", ".join(labels[:_SHOWN_FILES])
    return shown + (f" and {len(labels) - _SHOWN_FILES} more" if len(labels) > _SHOWN_FILES else "")


def _floats(value: object) -> tuple[float, ...]:
    return tuple(float(v) for v in value)  # type: ignore[attr-defined]


def _group(values: Sequence[tuple[float, ...]], tolerance: float) -> list[list[int]]:
    """Indices grouped by value (within ``tolerance`` per component), largest group first."""
    groups: list[tuple[np.ndarray, list[int]]] = []
    for index, value in enumerate(values):
        array = np.asarray(value, dtype=np.float64)
        for reference, members in groups:
            if reference.shape == array.shape and np.all(np.abs(reference - array) <= tolerance):
                members.append(index)
                break
        else:
            groups.append((array, [index]))
    return sorted((members for _, members in groups), key=len, reverse=True)


def _fmt(values: Iterable[float], digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _check_identity(series: DicomSeries) -> list[SeriesProblem]:
    problems = []
    modalities = Counter(str(h.get("Modality", "")) or "<none>" for h in series.headers)
    if set(modalities) != {"CT"}:
        found = ", ".join(f"{m} ({n} file(s))" for m, n in modalities.most_common())
        problems.append(series.problem(NOT_CT, f"Modality is {found}, not CT"))
    localizers = [f for f, h in zip(series.labels, series.headers, strict=True)
                  if "LOCALIZER" in [str(v).upper() for v in (h.get("ImageType") or [])]]
    if localizers:
        what = ("the series is a localizer/scout" if len(localizers) == len(series)
                else f"{len(localizers)} of {len(series)} images are localizer/scout images")
        problems.append(series.problem(LOCALIZER, f"{what} (ImageType contains LOCALIZER): "
                                                  f"{_names(localizers)}"))
    elif len(series) == 1:
        problems.append(series.problem(LOCALIZER, f"a single slice ({series.labels[0]}): a "
                                                  "localizer/scout or a 2D image, not a volume"))
    multi = [f for f, h in zip(series.labels, series.headers, strict=True)
             if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        problems.append(series.problem(UNSUPPORTED_IMAGE, "multi-frame images without per-frame "
                                                          "functional groups are not supported: "
                                                          f"{_names(multi)}"))
    colour = [f for f, h in zip(series.labels, series.headers, strict=True)
              if int(h.get("SamplesPerPixel", 1)) != 1
              or str(h.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2")]
    if colour:
        problems.append(series.problem(UNSUPPORTED_IMAGE, "not greyscale (SamplesPerPixel != 1 or "
                                                          f"PhotometricInterpretation): {_names(colour)}"))
    return problems


def _check_decoders(series: DicomSeries) -> list[SeriesProblem]:
    from pydicom.pixels import get_decoder  # noqa: PLC0415

    problems = []
    syntaxes = Counter(str(h.file_meta.get("TransferSyntaxUID", ""))
                       for _, h in {f: h for f, h in zip(series.files, series.headers, strict=True)}.items())
    for uid, count in syntaxes.items():
        name = f"{UID(uid).name} ({uid})" if uid else "<no TransferSyntaxUID>"
        try:
            decoder = get_decoder(uid)
        except (NotImplementedError, ValueError):
            problems.append(series.problem(NO_DECODER, f"transfer syntax {name} of {count} file(s) "
                                                       "has no pixel data decoder in pydicom"))
            continue
        if not decoder.is_available:
            package = _DECODER_PACKAGES.get(uid, "a pydicom pixel data plugin")
            others = "; ".join(decoder.missing_dependencies)
            problems.append(series.problem(NO_DECODER, f"transfer syntax {name} of {count} file(s) "
                                                       "cannot be decoded: no decoder for it is "
                                                       f"installed (install {package}"
                                                       + (f"; other pydicom plugins: {others})" if others else ")")))
    return problems


def _check_attributes(series: DicomSeries) -> list[SeriesProblem]:
    problems = []
    for attribute in REQUIRED_ATTRIBUTES:
        lacking = [f for f, h in zip(series.labels, series.headers, strict=True)
                   if h.get(attribute) in (None, "")]
        if lacking:
            problems.append(series.problem(MISSING_ATTRIBUTE, f"{len(lacking)} file(s) lack "
                                                              f"{attribute}: {_names(lacking)}"))
    return problems


def _check_consistency(series: DicomSeries) -> list[SeriesProblem]:
    problems = []
    files = series.labels
    matrices = [(int(h.Rows), int(h.Columns)) for h in series.headers]
    matrix_groups = _group(matrices, 0)
    if len(matrix_groups) > 1:
        found = "; ".join(f"{matrices[g[0]][0]}x{matrices[g[0]][1]} ({len(g)} slice(s): "
                          f"{_names([files[i] for i in g])})" for g in matrix_groups)
        problems.append(series.problem(MIXED_MATRIX, f"mixed matrix sizes (Rows x Columns): {found}"))
    orientations = [_floats(h.ImageOrientationPatient) for h in series.headers]
    orientation_groups = _group(orientations, ORIENTATION_COSINE_TOLERANCE)
    if len(orientation_groups) > 1:
        odd = [i for g in orientation_groups[1:] for i in g]
        if len(odd) == 1 and len(orientation_groups[0]) > 1:
            problems.append(series.problem(
                LOCALIZER, f"1 slice ({files[odd[0]]}) is oriented "
                           f"{_fmt(orientations[odd[0]], 3)} unlike the other "
                           f"{len(orientation_groups[0])} {_fmt(orientations[orientation_groups[0][0]], 3)}: "
                           "a localizer/scout in the series?"))
        else:
            found = "; ".join(f"{_fmt(orientations[g[0]], 3)} ({len(g)} slice(s): "
                              f"{_names([files[i] for i in g])})" for g in orientation_groups)
            problems.append(series.problem(MIXED_ORIENTATION,
                                           f"mixed orientations (ImageOrientationPatient): {found}"))
    spacings = [_floats(h.PixelSpacing) for h in series.headers]
    spacing_groups = _group(spacings, PIXEL_SPACING_TOLERANCE_MM)
    if len(spacing_groups) > 1:
        found = "; ".join(f"{_fmt(spacings[g[0]])} mm ({len(g)} slice(s): "
                          f"{_names([files[i] for i in g])})" for g in spacing_groups)
        problems.append(series.problem(MIXED_PIXEL_SPACING, f"mixed PixelSpacing: {found}"))
    return problems


def _orientation(header: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, slice normal), unit vectors in LPS."""
    cosines = np.asarray(_floats(header.ImageOrientationPatient), dtype=np.float64)
    row, column = cosines[:3], cosines[3:]
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    return row, column, normal / np.linalg.norm(normal)


def _check_positions(series: DicomSeries, min_slices: int) -> tuple[list[SeriesProblem], np.ndarray | None]:
    """Geometry along the stack; returns (problems, sort order along the normal)."""
    problems = []
    _, _, normal = _orientation(series.headers[0])
    positions = np.asarray([_floats(h.ImagePositionPatient) for h in series.headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    files = [series.labels[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)

    duplicates = np.flatnonzero(steps < DUPLICATE_POSITION_TOLERANCE_MM)
    if duplicates.size:
        listing = "; ".join(f"{along[i]:.3f} mm ({files[i]}, {files[i + 1]})"
                            for i in duplicates[:_SHOWN_FILES])
        more = f" and {duplicates.size - _SHOWN_FILES} more" if duplicates.size > _SHOWN_FILES else ""
        problems.append(series.problem(DUPLICATE_POSITIONS,
                                       f"{duplicates.size} duplicate slice position(s) along the slice "
                                       f"normal: {listing}{more}"))
    unique = np.ones(len(along), dtype=bool)
    unique[duplicates + 1] = False
    n_unique = int(unique.sum())
    if 1 < len(series) and n_unique < min_slices:
        problems.append(series.problem(TOO_FEW_SLICES, f"{n_unique} slice position(s), fewer than the "
                                                       f"{min_slices} a volume needs"))
    if problems or n_unique < 2:
        return problems, order

    u_positions, u_along, u_files = positions[unique], along[unique], [f for f, keep in zip(files, unique, strict=True) if keep]
    u_steps = np.diff(u_along)
    median = float(np.median(u_steps))
    gaps = np.flatnonzero(u_steps > MISSING_SLICE_FACTOR * median)
    for i in gaps:
        n_missing = max(1, round(u_steps[i] / median) - 1)
        problems.append(series.problem(
            MISSING_SLICES,
            f"missing slice(s) between positions {u_along[i]:.3f} and {u_along[i + 1]:.3f} mm along the "
            f"slice normal ({u_files[i]} at ImagePositionPatient {_fmt(u_positions[i], 6)}, "
            f"{u_files[i + 1]} at {_fmt(u_positions[i + 1], 6)}): a step of {u_steps[i]:.3f} mm "
            f"where the median is {median:.3f} mm, about {n_missing} slice(s) missing"))
    if gaps.size:
        return problems, order

    n = len(u_along)
    step = (u_positions[-1] - u_positions[0]) / (n - 1)
    residuals = u_positions - (u_positions[0] + np.arange(n)[:, None] * step[None, :])
    off_axis = float(np.max(np.abs(residuals @ normal)))
    if off_axis > SLICE_POSITION_TOLERANCE_MM:
        worst = int(np.argmax(np.abs(residuals @ normal)))
        problems.append(series.problem(
            NON_UNIFORM_SPACING,
            f"non-uniform slice spacing: steps from {u_steps.min():.3f} to {u_steps.max():.3f} mm "
            f"(median {median:.3f} mm); slice {u_files[worst]} is {off_axis:.3f} mm from a uniform "
            f"grid (tolerance {SLICE_POSITION_TOLERANCE_MM} mm)"))
    in_plane = residuals - np.outer(residuals @ normal, normal)
    off_line = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if off_line > SLICE_POSITION_TOLERANCE_MM:
        worst = int(np.argmax(np.linalg.norm(in_plane, axis=1)))
        problems.append(series.problem(
            MISALIGNED_SLICES,
            f"slices are not on one straight stack: {u_files[worst]} is shifted {off_line:.3f} mm "
            f"in-plane (tolerance {SLICE_POSITION_TOLERANCE_MM} mm)"))
    tilt_deg = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0.0, 1.0))))
    if tilt_deg > GANTRY_TILT_TOLERANCE_DEG:
        problems.append(series.problem(
            GANTRY_TILT,
            f"slices are stacked at {tilt_deg:.2f} degrees to the slice normal (gantry tilt, "
            f"GantryDetectorTilt {series.headers[0].get('GantryDetectorTilt', 'not given')}): a sheared "
            f"grid is not supported (tolerance {GANTRY_TILT_TOLERANCE_DEG} degrees); resample it "
            "first, e.g. with dcm2niix"))
    return problems, order


def check_series(series: DicomSeries, min_slices: int = MIN_SLICES) -> list[SeriesProblem]:
    """Every problem of ``series`` found from its headers alone (pixels are not decoded)."""
    return _validate(series, min_slices)[0]


def _validate(series: DicomSeries, min_slices: int) -> tuple[list[SeriesProblem], np.ndarray | None]:
    problems = _check_identity(series) + _check_decoders(series)
    attribute_problems = _check_attributes(series)
    problems += attribute_problems
    if attribute_problems:
        return problems, None
    consistency = _check_consistency(series)
    problems += consistency
    if consistency or len(series) < 2:
        return problems, None
    position_problems, order = _check_positions(series, min_slices)
    return problems + position_problems, order


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _rescale(header: Dataset) -> tuple[float, float]:
    slope = header.get("RescaleSlope")
    intercept = header.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


def _integral(rescales: Sequence[tuple[float, float]]) -> bool:
    """True when every slice's RescaleSlope and RescaleIntercept are integers (HU stay integers)."""
    return all(slope.is_integer() and intercept.is_integer() for slope, intercept in rescales)


def _affine(header: Dataset, first: np.ndarray, last: np.ndarray, n_slices: int) -> np.ndarray:
    row, column, normal = _orientation(header)
    row_spacing, column_spacing = _floats(header.PixelSpacing)[:2]
    step = (last - first) / (n_slices - 1) if n_slices > 1 else normal * float(header.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * column_spacing
    lps[:3, 1] = column * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = first
    affine = np.eye(4)
    affine[:3, :] = _RAS_FROM_LPS @ lps[:3, :]
    return affine


def _stored_int(value: object, signed: bool, bits: int) -> int:
    """A PixelPaddingValue-like value (US or SS) in the signedness of the stored pixels."""
    if isinstance(value, (bytes, bytearray)):          # VR left unresolved: raw little-endian bytes
        value = int.from_bytes(bytes(value)[:max(1, bits // 8)], "little", signed=signed)
    number = int(value)  # type: ignore[call-overload]
    if signed and number >= 2 ** (bits - 1):
        number -= 2 ** bits
    elif not signed and number < 0:
        number += 2 ** bits
    return number


def padding_range(header: Dataset) -> tuple[int, int] | None:
    """The stored-value range (inclusive, before rescale) that is pixel padding, or None.

    ``PixelPaddingValue`` alone pads that one value; with ``PixelPaddingRangeLimit`` every value
    between the two (either order). Values are read in the signedness of ``PixelRepresentation``
    (a US 63536 in a signed image is -2000).
    """
    value = header.get("PixelPaddingValue")
    if value in (None, "", b""):
        return None
    bits = int(header.get("BitsAllocated") or 16)
    signed = int(header.get("PixelRepresentation") or 0) == 1
    first = _stored_int(value, signed, bits)
    limit = header.get("PixelPaddingRangeLimit")
    if limit in (None, "", b""):
        return first, first
    second = _stored_int(limit, signed, bits)
    return min(first, second), max(first, second)


def _decoded_images(series: DicomSeries, order: Sequence[int]) -> Iterable[tuple[int, np.ndarray]]:
    """``(k, stored pixels (Rows, Columns))`` for every sorted image ``k``, each file decoded once
    (a multi-frame file frame by frame); raises InvalidSeriesError naming the file (and frame)."""
    by_file: dict[Path, list[tuple[int | None, int]]] = defaultdict(list)
    for k, i in enumerate(order):
        by_file[series.files[i]].append((series.frame(i), k))
    for path, wanted in by_file.items():
        current = wanted[0]
        try:
            if wanted[0][0] is None:
                yield wanted[0][1], pydicom.dcmread(path).pixel_array
                continue
            wanted.sort()
            frames = pydicom.pixels.iter_pixels(path, indices=[f for f, _ in wanted])
            for current, array in zip(wanted, frames, strict=True):
                yield current[1], array
        except InvalidSeriesError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            header = series.headers[order[current[1]]]
            syntax = header.file_meta.get("TransferSyntaxUID", "")
            label = path.name if current[0] is None else f"{path.name} frame {current[0] + 1}"
            raise InvalidSeriesError([series.problem(
                UNREADABLE_PIXELS, f"pixel data of {label} (transfer syntax "
                                   f"{UID(str(syntax)).name} ({syntax})) cannot be decoded: "
                                   f"{type(exc).__name__}: {exc}")]) from exc


def read_series(series: DicomSeries, min_slices: int = MIN_SLICES) -> DicomVolume:
    """Validate and read one series as a CT volume (see the module docstring for the convention).

    Pixel padding (:func:`padding_range`, in stored values) becomes :data:`AIR_HU`.

    Returns:
        A :class:`DicomVolume`: ``array`` (Columns, Rows, slices) HU, int16 when every slice's
        RescaleSlope/RescaleIntercept are integers and the result fits int16, else float32;
        ``affine`` (4, 4) voxel -> RAS mm; ``datasets``/``files``/``frames`` sorted along the slice
        normal (index k is slice ``array[:, :, k]``; headers only, no pixel data).

    Raises:
        InvalidSeriesError: every problem found (headers first; pixel decoding only if they pass).
    """
    problems, order = _validate(series, min_slices)
    if problems:
        raise InvalidSeriesError(problems)
    assert order is not None
    files = [series.files[i] for i in order]
    headers = [series.headers[i] for i in order]
    labels = [series.labels[i] for i in order]
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    rescales = [_rescale(h) for h in headers]
    integral = _integral(rescales)
    # (Z, rows, columns) in C order: each decoded slice is one contiguous block.
    slices = np.empty((len(files), rows, columns), dtype=np.int32 if integral else np.float32)
    n_padding, padding_in_tissue = 0, False
    for k, stored in _decoded_images(series, order):
        if stored.shape != (rows, columns):
            raise InvalidSeriesError([series.problem(
                UNREADABLE_PIXELS, f"pixel data of {labels[k]} has shape {stored.shape}, expected "
                                   f"(Rows, Columns) = ({rows}, {columns})")])
        slope, intercept = rescales[k]
        slices[k] = stored
        if slope != 1.0:
            slices[k] *= slices.dtype.type(slope)
        if intercept != 0.0:
            slices[k] += slices.dtype.type(intercept)
        padding = padding_range(headers[k])
        if padding is not None:
            wide = stored.astype(np.int32, copy=False)
            pad = (wide >= padding[0]) & (wide <= padding[1])
            n_padding += int(np.count_nonzero(pad))
            slices[k][pad] = AIR_HU
            padding_in_tissue |= max(v * slope + intercept for v in padding) > AIR_HU + 24 and bool(pad.any())
    if n_padding:
        logger.info("Series %s: %d padding voxel(s) (PixelPaddingValue) set to air, %d HU", series.series_uid,
                    n_padding, AIR_HU)
    if padding_in_tissue:
        logger.warning("Series %s: its PixelPaddingValue range is above air after rescale (CT numbers of "
                       "tissue); those voxels were set to %d HU as the standard says", series.series_uid, AIR_HU)
    if integral:
        fits = slices.size == 0 or (int(slices.min()) >= _INT16.min and int(slices.max()) <= _INT16.max)
        slices = slices.astype(np.int16 if fits else np.float32)
    positions = [np.asarray(_floats(h.ImagePositionPatient), dtype=np.float64) for h in headers]
    affine = _affine(headers[0], positions[0], positions[-1], len(headers))
    frames = tuple(series.frame(i) for i in order) if series.frames else ()
    return DicomVolume(array=slices.transpose(2, 1, 0), affine=affine, header=None,
                       series_uid=series.series_uid, description=series.description,
                       folder=str(series.folder), files=tuple(files), datasets=tuple(headers),
                       transfer_syntax=str(headers[0].file_meta.get("TransferSyntaxUID", "")),
                       frames=frames, grouped_by=series.grouped_by, n_padding_voxels=n_padding)


def dcm2niix_layout(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (array, affine) pair dcm2niix writes for the same series: the row axis (Y) reversed.

    Same voxels in world space; only the storage order and the affine's second column and origin
    change (``array[:, ::-1, :]``; origin moved to the last row).
    """
    array = np.asarray(array)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, array.shape[1] - 1
    return array[:, ::-1, ...], np.asarray(affine, dtype=np.float64) @ flip


def _relabelled_problem(problem: SeriesProblem, label: Callable[[str], str]) -> SeriesProblem:
    if label is _same:
        return problem
    return dataclasses.replace(problem, folder=label(problem.folder), message=label(problem.message))


def _no_series_error(scan: FolderScan, what: str, label: Callable[[str], str] = _same) -> FileNotFoundError:
    listing = "".join(f"\n  - {label(file)}: {label(reason)}"
                      for file, reason in [*scan.ungrouped, *scan.unreadable][:10])
    more = len(scan.ungrouped) + len(scan.unreadable) - 10
    return FileNotFoundError(f"DICOM input: no DICOM series in {what} ({scan.n_files} file(s): "
                             f"{scan.n_not_dicom} not DICOM, {scan.n_resource_forks} ._* files, "
                             f"{scan.n_without_series} without a series, {len(scan.unreadable)} unreadable)"
                             + listing + (f"\n  ... and {more} more" if more > 0 else ""))


def _read_scan(scan: FolderScan, on_invalid: str, min_slices: int, what: str | None = None,
               label: Callable[[str], str] = _same) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Check and read every series of ``scan`` (see :func:`read_dicom_folder`); ``label``
    rewrites the paths in problems (an archive's temporary folder -> the archive)."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    if not scan.series:
        raise _no_series_error(scan, what or str(scan.folder), label)
    hint = "Fix or remove these series, or set on_invalid to 'skip'."
    problems: list[SeriesProblem] = []
    valid = []
    for series in scan.series:
        found = [_relabelled_problem(p, label) for p in check_series(series, min_slices)]
        problems.extend(found)
        if not found:
            valid.append(series)
    if problems and on_invalid == "fail":
        raise InvalidSeriesError(problems, hint)
    volumes = []
    for series in valid:
        try:
            volumes.append((series.series_uid, read_series(series, min_slices)))
        except InvalidSeriesError as exc:
            problems.extend(_relabelled_problem(p, label) for p in exc.problems)
    if problems and on_invalid == "fail":
        raise InvalidSeriesError(problems, hint)
    if on_invalid == "skip":      # files in no series go into the report too (they are logged in any case)
        problems += [SeriesProblem("", "", label(str(Path(file).parent)), UNGROUPED_FILE,
                                   f"{Path(file).name} was not read: {reason}")
                     for file, reason in scan.ungrouped if reason != _DICOMDIR_REASON]
    for problem in problems:
        logger.error("Skipped DICOM input: %s", problem)
    return volumes, problems


def read_dicom_folder(folder: str | os.PathLike[str], on_invalid: str = "fail",
                      min_slices: int = MIN_SLICES) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Read every CT series under ``folder`` (recursive) for inference.

    Args:
        on_invalid: ``"fail"`` raises one :class:`InvalidSeriesError` listing every bad series;
            ``"skip"`` returns the good series and the problems of the bad ones, plus one
            :data:`UNGROUPED_FILE` problem per DICOM file that is in no series (not a DICOMDIR).

    Returns:
        ``([(series_uid, volume), ...], problems)``, in folder / SeriesNumber / UID order (a series
        without a SeriesInstanceUID has a generated ``no-uid-...`` id).

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no DICOM series.
        InvalidSeriesError: with ``on_invalid="fail"``, when any series is invalid. All series'
            headers are checked first; pixel-decoding problems are found (and listed) only when
            every header passed.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    return _read_scan(scan_folder(folder), on_invalid, min_slices)


# --------------------------------------------------------------------------------------------
# DICOMDIR and zip archives
# --------------------------------------------------------------------------------------------
def is_dicomdir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a DICOMDIR file (a DICOM file-set's index), by its header."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return _is_dicomdir(pydicom.dcmread(path, stop_before_pixels=True, force=False,
                                            specific_tags=["DirectoryRecordSequence"]))
    except Exception:  # noqa: BLE001 - not DICOM or corrupt: not a DICOMDIR
        return False


def scan_dicomdir(dicomdir: str | os.PathLike[str]) -> FolderScan:
    """The series of the files a DICOMDIR references (its directory records' ReferencedFileID).

    Only files under the DICOMDIR's folder are read: a reference with an absolute or ``..`` path,
    and a reference to a missing file, are listed in :attr:`FolderScan.unreadable` (and logged).

    Raises:
        FileNotFoundError: ``dicomdir`` is not a file.
        ValueError: it is not a readable DICOMDIR.
    """
    path = Path(dicomdir).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DICOM input: {path} is not a file")
    try:
        index = pydicom.dcmread(path, force=False)
        records = index.DirectoryRecordSequence
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad DICOMDIR
        raise ValueError(f"DICOM input: {path} is not a readable DICOMDIR ({type(exc).__name__}: {exc})") from exc
    root = path.parent.resolve()
    files: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    for record in records:
        file_id = record.get("ReferencedFileID")
        if file_id in (None, ""):
            continue
        parts = [str(file_id)] if isinstance(file_id, str) else [str(part) for part in file_id]
        shown = "/".join(parts)
        target = root.joinpath(*parts)
        if any(part in ("", ".", "..") or "/" in part or "\\" in part for part in parts) \
                or not target.resolve().is_relative_to(root):
            unreadable.append((f"{path} -> {shown}", "referenced outside the DICOMDIR's folder: not read"))
        elif not target.is_file():
            unreadable.append((str(target), f"referenced by {path.name} ({shown}) but missing"))
        else:
            files.append(target)
    return _scan_files(path.parent, sorted(set(files)), unreadable)


def read_dicomdir(dicomdir: str | os.PathLike[str], on_invalid: str = "fail", min_slices: int = MIN_SLICES
                  ) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Read every CT series a DICOMDIR references, as :func:`read_dicom_folder` reads a folder."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    return _read_scan(scan_dicomdir(dicomdir), on_invalid, min_slices, what=str(dicomdir))


@dataclass(frozen=True)
class ArchiveLimits:
    """What a ``.zip`` input may hold, checked from its central directory before extracting.

    The defaults fit a few 512 x 512 x 1000 CT series (about 0.5 GiB each uncompressed).
    """

    max_uncompressed_bytes: int = 4 * 1024 ** 3   # total uncompressed size of all members, bytes
    max_members: int = 50_000                     # entries in the archive (files and folders)

    @classmethod
    def from_params(cls, params: Mapping[str, object] | None) -> ArchiveLimits:
        """From ``{"max_uncompressed_mb": MiB, "max_members": n}`` (missing keys: the defaults)."""
        params = params or {}
        default = cls()
        mb = params.get("max_uncompressed_mb")
        members = params.get("max_members")
        return cls(int(float(mb) * 1024 ** 2) if mb is not None else default.max_uncompressed_bytes,  # type: ignore[arg-type]
                   int(members) if members is not None else default.max_members)  # type: ignore[call-overload]


class UnsafeArchiveError(ValueError):
    """A ``.zip`` input is refused (too big, too many members, unsafe names, unreadable).

    Attributes:
        reason: what is wrong, one of :data:`ARCHIVE_REFUSAL_REASONS` (for callers that must not
            repeat the message, which names the archive and its members).
        count: the member count or uncompressed bytes found, for ``too_many_members`` / ``too_large``.
    """

    def __init__(self, message: str, reason: str, count: int | None = None) -> None:
        super().__init__(message)
        if reason not in ARCHIVE_REFUSAL_REASONS:
            raise ValueError(f"unknown archive refusal reason {reason!r}")
        self.reason, self.count = reason, count


ARCHIVE_REFUSAL_REASONS = ("not_zip", "too_many_members", "too_large", "unsafe_path", "symbolic_link",
                           "encrypted", "inflates", "unreadable_member")
"""The values of :attr:`UnsafeArchiveError.reason`."""


_COPY_CHUNK = 1024 * 1024


def _member_path(name: str) -> PurePosixPath | None:
    """The safe relative path of a zip member name, or None when it is unsafe."""
    if "\x00" in name:
        return None
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]):
        return None
    return posix


def check_archive(archive: str | os.PathLike[str], limits: ArchiveLimits = ArchiveLimits()) -> list[zipfile.ZipInfo]:
    """The file members of a ``.zip``, once its central directory passes every check (nothing is
    extracted): at most ``limits.max_members`` entries, at most ``limits.max_uncompressed_bytes``
    declared in all, no absolute or ``..`` names, no links, no encryption.

    Raises:
        FileNotFoundError: ``archive`` is not a file.
        UnsafeArchiveError: not a zip, or a check failed (the message names the archive and why).
    """
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM input: {path} is not a file")
    try:
        with zipfile.ZipFile(path) as handle:
            infos = handle.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnsafeArchiveError(f"DICOM archive {path}: not a readable zip file ({exc})", "not_zip") from exc
    if len(infos) > limits.max_members:
        raise UnsafeArchiveError(f"DICOM archive {path}: {len(infos)} members, more than the limit of "
                                 f"{limits.max_members}; nothing was extracted", "too_many_members", len(infos))
    total = sum(info.file_size for info in infos)
    if total > limits.max_uncompressed_bytes:
        raise UnsafeArchiveError(f"DICOM archive {path}: {total} bytes uncompressed, more than the limit of "
                                 f"{limits.max_uncompressed_bytes} bytes; nothing was extracted", "too_large", total)
    for info in infos:
        if _member_path(info.filename) is None:
            raise UnsafeArchiveError(f"DICOM archive {path}: member {info.filename!r} has an absolute or "
                                     "'..' path (path traversal); nothing was extracted", "unsafe_path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"DICOM archive {path}: member {info.filename!r} is a symbolic link; "
                                     "nothing was extracted", "symbolic_link")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"DICOM archive {path}: member {info.filename!r} is encrypted", "encrypted")
    return [info for info in infos if not info.is_dir()]


def _extract(archive: Path, members: Sequence[zipfile.ZipInfo], into: Path, limits: ArchiveLimits) -> None:
    """Copy ``members`` under ``into``, enforcing each member's declared size and the total limit
    while copying (a member that inflates past what the directory declared is refused)."""
    written = 0
    with zipfile.ZipFile(archive) as handle:
        for info in members:
            relative = _member_path(info.filename)
            assert relative is not None        # check_archive refused unsafe names
            target = into.joinpath(*relative.parts)
            if not target.resolve().is_relative_to(into.resolve()):
                raise UnsafeArchiveError(f"DICOM archive {archive}: member {info.filename!r} leaves the "
                                         "extraction folder", "unsafe_path")
            size = 0
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with handle.open(info) as source, open(target, "xb") as sink:
                    while chunk := source.read(_COPY_CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > info.file_size or written > limits.max_uncompressed_bytes:
                            raise UnsafeArchiveError(f"DICOM archive {archive}: member {info.filename!r} "
                                                     "inflates past its declared size or the archive's limit",
                                                     "inflates")
                        sink.write(chunk)
            except (OSError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
                raise UnsafeArchiveError(f"DICOM archive {archive}: member {info.filename!r} cannot be extracted "
                                         f"({type(exc).__name__}: {exc})", "unreadable_member") from exc


def _relabelled_volume(volume: DicomVolume, temporary: Path, archive: Path) -> DicomVolume:
    """The volume with its files named inside the archive (``<archive>/<member>``), not the
    temporary folder they were read from."""
    files = tuple(archive / path.relative_to(temporary) for path in volume.files)
    for dataset, file in zip(volume.datasets, files, strict=True):
        dataset.filename = str(file)
    return dataclasses.replace(volume, folder=volume.folder.replace(str(temporary), str(archive)), files=files)


def read_dicom_zip(archive: str | os.PathLike[str], on_invalid: str = "fail", min_slices: int = MIN_SLICES,
                   limits: ArchiveLimits = ArchiveLimits()) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Read every CT series in a ``.zip`` (any folder layout inside), as :func:`read_dicom_folder`
    reads a folder. The archive is checked first (:func:`check_archive`), then extracted to a
    temporary folder that is removed before returning; the archive itself is never modified.

    Raises:
        UnsafeArchiveError: the archive fails a check (nothing is read).
        FileNotFoundError: it holds no DICOM series.
        InvalidSeriesError: as :func:`read_dicom_folder`, with members named ``<archive>/<member>``.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    path = Path(archive).expanduser()
    members = check_archive(path, limits)
    with tempfile.TemporaryDirectory(prefix="pancreas_seg_dicom_zip_") as folder:
        temporary = Path(folder)
        _extract(path, members, temporary, limits)

        def label(text: str) -> str:
            return text.replace(str(temporary), str(path))

        volumes, problems = _read_scan(_scan_files(temporary, _walk_files(temporary), label=label), on_invalid,
                                       min_slices, what=str(path), label=label)
        return [(uid, _relabelled_volume(volume, temporary, path)) for uid, volume in volumes], problems


def read_dicom_archive(archive: str | os.PathLike[str], *, on_invalid: str = "fail", min_slices: int = MIN_SLICES,
                       limits: ArchiveLimits = ArchiveLimits()) -> DicomVolume:
    """The one CT series of a ``.zip`` archive (e.g. an upload to the served model), as a volume.

    The archive is checked from its central directory before anything is extracted (member
    count and total uncompressed size within ``limits``; no absolute or ``..`` member names, no
    links, no encryption), extracted to a temporary folder with the sizes enforced again while
    copying, read like a folder (:func:`read_dicom_folder`: grouping without UIDs, enhanced
    multi-frame, padding to air), and the temporary folder removed. The archive is not modified.

    Args:
        archive: path of the ``.zip``.
        on_invalid: ``"fail"``: any unusable series (e.g. a localizer beside the CT) is an error;
            ``"skip"``: unusable series are left out (and logged).
        limits: the caps checked before extraction.

    Returns:
        A :class:`DicomVolume`: ``array`` (Columns, Rows, slices) HU (int16, or float32 for
        fractional rescale), ``affine`` voxel -> RAS mm; ``files`` named ``<archive>/<member>``
        (they do not exist on disk after the call); ``datasets`` the sorted headers.

    Raises:
        UnsafeArchiveError: the archive is refused (too big, too many members, unsafe names).
        FileNotFoundError: no DICOM series in it.
        InvalidSeriesError: a series is unusable (``on_invalid="fail"``).
        ValueError: no usable CT series, or more than one (each named by id and description).
    """
    volumes, _ = read_dicom_zip(archive, on_invalid, min_slices, limits)
    if len(volumes) != 1:
        found = "; ".join(f"{uid} ({volume.description!r}, {volume.array.shape[2]} slices)" for uid, volume in volumes)
        raise ValueError(f"DICOM archive {archive}: expected one CT series, found {len(volumes)}"
                         + (f": {found}" if found else ""))
    return volumes[0][1]


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is one DICOM image file (with the DICOM preamble; not a DICOMDIR), e.g.
    an enhanced multi-frame CT that holds a whole series."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("._"):
        return False
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=False,
                                 specific_tags=["DirectoryRecordSequence", "Rows"])
    except Exception:  # noqa: BLE001 - not DICOM or corrupt
        return False
    return not _is_dicomdir(header)


def is_dicom_archive(path: str | os.PathLike[str]) -> bool:
    """True for a ``.zip`` file (by name; its content is checked when it is read)."""
    return Path(path).suffix.lower() == ".zip" and Path(path).is_file()


def read_dicom_input(path: str | os.PathLike[str], on_invalid: str = "fail", min_slices: int = MIN_SLICES,
                     limits: ArchiveLimits = ArchiveLimits()) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Every CT series of a DICOM input: a folder (recursive), a ``.zip`` of series, a DICOMDIR, or
    one DICOM file (an enhanced multi-frame CT holds a whole series).

    Same arguments, results and errors as :func:`read_dicom_folder` (plus
    :class:`UnsafeArchiveError` for a refused zip); see :func:`read_dicom_zip`, :func:`read_dicomdir`.
    """
    source = Path(path).expanduser()
    if source.is_dir():
        return read_dicom_folder(source, on_invalid, min_slices)
    if is_dicom_archive(source):
        return read_dicom_zip(source, on_invalid, min_slices, limits)
    if is_dicomdir(source):
        return read_dicomdir(source, on_invalid, min_slices)
    if is_dicom_file(source):
        return _read_scan(_scan_files(source.parent, [source]), on_invalid, min_slices, what=str(source))
    if not source.exists():
        raise FileNotFoundError(f"DICOM input: {source} does not exist")
    raise ValueError(f"DICOM input: {source} is neither a folder, a .zip, a DICOMDIR nor a DICOM file")
