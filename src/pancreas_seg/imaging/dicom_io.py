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
slices; missing geometry attributes; multi-frame or colour images; a transfer syntax with no
pixel decoder installed (named, with the package that decodes it); undecodable pixel data.

Compressed pixel data (JPEG 2000, JPEG-LS, JPEG lossless, RLE) is decoded by pydicom's pixel
handlers with the pylibjpeg plugins (pylibjpeg-openjpeg, pylibjpeg-libjpeg) or pyjpegls.

Headers are read with ``stop_before_pixels=True`` and ``force=False``: files without the DICOM
preamble (non-DICOM, or very old ACR-NEMA files) and macOS ``._*`` files are skipped and counted.
Pure pydicom + NumPy (no Kedro).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

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

PROBLEM_KINDS: tuple[str, ...] = (
    NOT_CT, LOCALIZER, MIXED_MATRIX, MIXED_ORIENTATION, MIXED_PIXEL_SPACING, DUPLICATE_POSITIONS,
    MISSING_SLICES, NON_UNIFORM_SPACING, MISALIGNED_SLICES, GANTRY_TILT, TOO_FEW_SLICES,
    MISSING_ATTRIBUTE, UNSUPPORTED_IMAGE, NO_DECODER, UNREADABLE_PIXELS)
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
    """The files of one SeriesInstanceUID found in a folder, with their headers (no pixel data).

    ``files`` and ``headers`` are in path order (not yet sorted in space: see :func:`read_series`).
    """

    series_uid: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...] = field(repr=False)

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
    n_without_series: int             # DICOM without SeriesInstanceUID (e.g. DICOMDIR)
    unreadable: tuple[tuple[str, str], ...] = ()   # (file, reason): DICOM preamble but corrupt header

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


# --------------------------------------------------------------------------------------------
# Finding series
# --------------------------------------------------------------------------------------------
def _walk_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def scan_folder(folder: str | os.PathLike[str]) -> FolderScan:
    """Walk ``folder`` recursively, read every DICOM header (no pixels) and group by SeriesInstanceUID.

    Non-DICOM files, ``._*`` files and DICOM files without a SeriesInstanceUID are skipped and
    counted; DICOM files whose header cannot be parsed are skipped and listed with the reason.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM input: {root} is not a folder")
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    n_files = n_forks = n_not_dicom = n_without_series = 0
    unreadable: list[tuple[str, str]] = []
    for path in _walk_files(root):
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
            unreadable.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        uid = header.get("SeriesInstanceUID")
        if not uid:
            n_without_series += 1
            continue
        groups[str(uid)].append((path, header))
    series = [DicomSeries(uid, tuple(p for p, _ in items), tuple(h for _, h in items))
              for uid, items in groups.items()]
    series.sort(key=lambda s: (str(s.folder), s.series_number or 0, s.series_uid))
    scan = FolderScan(root, series, n_files, n_forks, n_not_dicom, n_without_series, tuple(unreadable))
    logger.info("%s: %d DICOM series in %d file(s); skipped %d (%d ._* files, %d not DICOM, "
                "%d without a series, %d unreadable)", root, len(series), n_files, scan.n_skipped,
                n_forks, n_not_dicom, n_without_series, len(unreadable))
    for file, reason in unreadable:
        logger.warning("Skipped unreadable DICOM file %s (%s)", file, reason)
    return scan


def find_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """The DICOM series under ``folder`` (recursive), headers only; see :func:`scan_folder`."""
    return scan_folder(folder).series


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _names(files: Sequence[Path]) -> str:
    shown = ", ".join(f.name for f in files[:_SHOWN_FILES])
    return shown + (f" and {len(files) - _SHOWN_FILES} more" if len(files) > _SHOWN_FILES else "")


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
    localizers = [f for f, h in zip(series.files, series.headers, strict=True)
                  if "LOCALIZER" in [str(v).upper() for v in (h.get("ImageType") or [])]]
    if localizers:
        what = ("the series is a localizer/scout" if len(localizers) == len(series)
                else f"{len(localizers)} of {len(series)} images are localizer/scout images")
        problems.append(series.problem(LOCALIZER, f"{what} (ImageType contains LOCALIZER): "
                                                  f"{_names(localizers)}"))
    elif len(series) == 1:
        problems.append(series.problem(LOCALIZER, f"a single slice ({series.files[0].name}): a "
                                                  "localizer/scout or a 2D image, not a volume"))
    multi = [f for f, h in zip(series.files, series.headers, strict=True)
             if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        problems.append(series.problem(UNSUPPORTED_IMAGE, "multi-frame (enhanced) images are not "
                                                          f"supported: {_names(multi)}"))
    colour = [f for f, h in zip(series.files, series.headers, strict=True)
              if int(h.get("SamplesPerPixel", 1)) != 1
              or str(h.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2")]
    if colour:
        problems.append(series.problem(UNSUPPORTED_IMAGE, "not greyscale (SamplesPerPixel != 1 or "
                                                          f"PhotometricInterpretation): {_names(colour)}"))
    return problems


def _check_decoders(series: DicomSeries) -> list[SeriesProblem]:
    from pydicom.pixels import get_decoder  # noqa: PLC0415

    problems = []
    syntaxes = Counter(str(h.file_meta.get("TransferSyntaxUID", "")) for h in series.headers)
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
        lacking = [f for f, h in zip(series.files, series.headers, strict=True)
                   if h.get(attribute) in (None, "")]
        if lacking:
            problems.append(series.problem(MISSING_ATTRIBUTE, f"{len(lacking)} file(s) lack "
                                                              f"{attribute}: {_names(lacking)}"))
    return problems


def _check_consistency(series: DicomSeries) -> list[SeriesProblem]:
    problems = []
    files = series.files
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
                LOCALIZER, f"1 slice ({files[odd[0]].name}) is oriented "
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
    files = [series.files[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)

    duplicates = np.flatnonzero(steps < DUPLICATE_POSITION_TOLERANCE_MM)
    if duplicates.size:
        listing = "; ".join(f"{along[i]:.3f} mm ({files[i].name}, {files[i + 1].name})"
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
            f"slice normal ({u_files[i].name} at ImagePositionPatient {_fmt(u_positions[i], 6)}, "
            f"{u_files[i + 1].name} at {_fmt(u_positions[i + 1], 6)}): a step of {u_steps[i]:.3f} mm "
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
            f"(median {median:.3f} mm); slice {u_files[worst].name} is {off_axis:.3f} mm from a uniform "
            f"grid (tolerance {SLICE_POSITION_TOLERANCE_MM} mm)"))
    in_plane = residuals - np.outer(residuals @ normal, normal)
    off_line = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if off_line > SLICE_POSITION_TOLERANCE_MM:
        worst = int(np.argmax(np.linalg.norm(in_plane, axis=1)))
        problems.append(series.problem(
            MISALIGNED_SLICES,
            f"slices are not on one straight stack: {u_files[worst].name} is shifted {off_line:.3f} mm "
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


def read_series(series: DicomSeries, min_slices: int = MIN_SLICES) -> DicomVolume:
    """Validate and read one series as a CT volume (see the module docstring for the convention).

    Returns:
        A :class:`DicomVolume`: ``array`` (Columns, Rows, slices) HU, int16 when every slice's
        RescaleSlope/RescaleIntercept are integers and the result fits int16, else float32;
        ``affine`` (4, 4) voxel -> RAS mm; ``datasets``/``files`` sorted along the slice normal
        (index k is slice ``array[:, :, k]``; headers only, no pixel data).

    Raises:
        InvalidSeriesError: every problem found (headers first; pixel decoding only if they pass).
    """
    problems, order = _validate(series, min_slices)
    if problems:
        raise InvalidSeriesError(problems)
    assert order is not None
    files = [series.files[i] for i in order]
    headers = [series.headers[i] for i in order]
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    rescales = [_rescale(h) for h in headers]
    integral = _integral(rescales)
    # (Z, rows, columns) in C order: each decoded slice is one contiguous block.
    slices = np.empty((len(files), rows, columns), dtype=np.int32 if integral else np.float32)
    for k, path in enumerate(files):
        try:
            stored = pydicom.dcmread(path).pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            syntax = headers[k].file_meta.get("TransferSyntaxUID", "")
            raise InvalidSeriesError([series.problem(
                UNREADABLE_PIXELS, f"pixel data of {path.name} (transfer syntax "
                                   f"{UID(str(syntax)).name} ({syntax})) cannot be decoded: "
                                   f"{type(exc).__name__}: {exc}")]) from exc
        if stored.shape != (rows, columns):
            raise InvalidSeriesError([series.problem(
                UNREADABLE_PIXELS, f"pixel data of {path.name} has shape {stored.shape}, expected "
                                   f"(Rows, Columns) = ({rows}, {columns})")])
        slope, intercept = rescales[k]
        slices[k] = stored
        if slope != 1.0:
            slices[k] *= slices.dtype.type(slope)
        if intercept != 0.0:
            slices[k] += slices.dtype.type(intercept)
    if integral:
        fits = slices.size == 0 or (int(slices.min()) >= _INT16.min and int(slices.max()) <= _INT16.max)
        slices = slices.astype(np.int16 if fits else np.float32)
    positions = [np.asarray(_floats(h.ImagePositionPatient), dtype=np.float64) for h in headers]
    affine = _affine(headers[0], positions[0], positions[-1], len(headers))
    return DicomVolume(array=slices.transpose(2, 1, 0), affine=affine, header=None,
                       series_uid=series.series_uid, description=series.description,
                       folder=str(series.folder), files=tuple(files), datasets=tuple(headers),
                       transfer_syntax=str(headers[0].file_meta.get("TransferSyntaxUID", "")))


def dcm2niix_layout(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (array, affine) pair dcm2niix writes for the same series: the row axis (Y) reversed.

    Same voxels in world space; only the storage order and the affine's second column and origin
    change (``array[:, ::-1, :]``; origin moved to the last row).
    """
    array = np.asarray(array)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, array.shape[1] - 1
    return array[:, ::-1, ...], np.asarray(affine, dtype=np.float64) @ flip


def read_dicom_folder(folder: str | os.PathLike[str], on_invalid: str = "fail",
                      min_slices: int = MIN_SLICES) -> tuple[list[tuple[str, DicomVolume]], list[SeriesProblem]]:
    """Read every CT series under ``folder`` (recursive) for inference.

    Args:
        on_invalid: ``"fail"`` raises one :class:`InvalidSeriesError` listing every bad series;
            ``"skip"`` returns the good series and the problems of the bad ones.

    Returns:
        ``([(series_uid, volume), ...], problems)``, in folder / SeriesNumber / UID order.

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no DICOM series.
        InvalidSeriesError: with ``on_invalid="fail"``, when any series is invalid. All series'
            headers are checked first; pixel-decoding problems are found (and listed) only when
            every header passed.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    scan = scan_folder(folder)
    if not scan.series:
        raise FileNotFoundError(f"DICOM input: no DICOM series in {scan.folder} ({scan.n_files} file(s): "
                                f"{scan.n_not_dicom} not DICOM, {scan.n_resource_forks} ._* files, "
                                f"{scan.n_without_series} without a series, {len(scan.unreadable)} "
                                "unreadable)")
    hint = "Fix or remove these series, or set on_invalid to 'skip'."
    problems: list[SeriesProblem] = []
    valid = []
    for series in scan.series:
        found = check_series(series, min_slices)
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
            problems.extend(exc.problems)
    if problems and on_invalid == "fail":
        raise InvalidSeriesError(problems, hint)
    for problem in problems:
        logger.error("Skipped DICOM series: %s", problem)
    return volumes, problems
