"""Validate every case of a Task07 folder before any processing.

Checks (each failure becomes a :class:`Finding` naming the file and the reason):
  * every ``dataset.json`` entry exists, and every NIfTI file in the folders is listed;
  * each file is readable NIfTI and 3D; voxels are finite;
  * image and label have the same shape and the same affine (within ``affine_atol_mm``);
  * label values are a subset of {0, 1, 2}.
macOS ``._*`` resource files are skipped silently. Raw files are only ever read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_seg.core.labels import LABEL_VALUES, PANCREAS, TUMOUR
from pancreas_seg.imaging.nifti_io import (
    InvalidNiftiError,
    NiftiVolume,
    load_nifti,
    orientation_code,
)
from pancreas_seg.task07.layout import (
    CaseFiles,
    case_id_from_path,
    list_nifti_files,
    read_dataset_json,
    resolve_entry,
)

ALLOWED_LABELS = frozenset(LABEL_VALUES)
ON_INVALID = ("fail", "skip")


@dataclass(frozen=True)
class Finding:
    """One validation problem."""

    case_id: str
    file: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class CaseRecord:
    """Facts about a valid case, as written to the case manifest."""

    case_id: str
    subset: str
    image_path: str
    label_path: str | None
    shape_x: int
    shape_y: int
    shape_z: int
    spacing_x_mm: float
    spacing_y_mm: float
    spacing_z_mm: float
    orientation: str
    hu_min: float
    hu_max: float
    voxels_pancreas: int  # label == 1
    voxels_tumour: int    # label == 2


@dataclass
class ValidationResult:
    """Valid cases plus every finding; ``bad_cases`` are excluded from ``cases``."""

    cases: list[CaseRecord] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def bad_cases(self) -> list[str]:
        return sorted({f.case_id for f in self.findings})

    def report(self, root: Path, on_invalid: str, synthetic: bool) -> dict[str, Any]:
        """JSON-serialisable validation report."""
        return {
            "dataset_root": str(root),
            "synthetic_data": synthetic,
            "on_invalid": on_invalid,
            "n_valid_cases": len(self.cases),
            "n_bad_cases": len(self.bad_cases),
            "bad_cases": self.bad_cases,
            "findings": [asdict(f) for f in self.findings],
        }


class InvalidDatasetError(ValueError):
    """Raised with ``on_invalid='fail'``; the message lists every bad case and why."""


def collect_case_files(root: Path, dataset_json: dict[str, Any]) -> tuple[list[CaseFiles], list[Finding]]:
    """Match dataset.json entries with files on disk, in both directions."""
    findings: list[Finding] = []
    cases: list[CaseFiles] = []
    listed: set[Path] = set()
    for entry in dataset_json["training"]:
        image = resolve_entry(root, entry["image"])
        label = resolve_entry(root, entry["label"])
        case_id = case_id_from_path(image)
        listed.update({image, label})
        missing = [(p, kind) for p, kind in ((image, "image"), (label, "label")) if not p.is_file()]
        for path, kind in missing:
            findings.append(Finding(case_id, str(path), "listed_file_exists",
                                    f"dataset.json lists this {kind} but the file does not exist"))
        if not missing:
            cases.append(CaseFiles(case_id, image, label, "training"))
    for entry in dataset_json["test"]:
        image = resolve_entry(root, entry if isinstance(entry, str) else entry["image"])
        case_id = case_id_from_path(image)
        listed.add(image)
        if not image.is_file():
            findings.append(Finding(case_id, str(image), "listed_file_exists",
                                    "dataset.json lists this test image but the file does not exist"))
        else:
            cases.append(CaseFiles(case_id, image, None, "test"))
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        for path in list_nifti_files(root / folder):
            if path.resolve() not in listed:
                case_id = case_id_from_path(path)
                reason = ("image has no label listed in dataset.json (missing label)"
                          if folder == "imagesTr" else "file is not listed in dataset.json")
                findings.append(Finding(case_id, str(path), "file_listed", reason))
    return cases, findings


def _check_volume(path: Path, case_id: str, kind: str, findings: list[Finding]):
    try:
        volume = load_nifti(path)
    except InvalidNiftiError as exc:
        findings.append(Finding(case_id, str(path), "readable_nifti", str(exc).split(": ", 1)[-1]))
        return None
    if volume.array.ndim != 3:
        findings.append(Finding(case_id, str(path), "is_3d",
                                f"{kind} must be 3D, got {volume.array.ndim}D with shape {volume.array.shape}"))
        return None
    if volume.array.dtype.kind == "f":
        n_bad = int(np.size(volume.array) - np.count_nonzero(np.isfinite(volume.array)))
        if n_bad:
            findings.append(Finding(case_id, str(path), "finite_voxels",
                                    f"{kind} has {n_bad} non-finite voxels (NaN or inf)"))
            return None
    return volume


def check_image(path: Path, case_id: str) -> tuple[NiftiVolume | None, list[Finding]]:
    """The image checks of :func:`validate_case` (readable NIfTI, 3D, finite voxels) on one file.

    Returns the volume it read (None when a check failed) and the findings, so that a caller that
    segments the image next (the MLflow pyfunc model) reads it once.
    """
    findings: list[Finding] = []
    return _check_volume(path, case_id, "image", findings), findings


def validate_case(case: CaseFiles, affine_atol_mm: float = 1e-3) -> tuple[CaseRecord | None, list[Finding]]:
    """Validate one case (reads its files fully, one case in memory at a time)."""
    findings: list[Finding] = []
    image = _check_volume(case.image, case.case_id, "image", findings)
    label = _check_volume(case.label, case.case_id, "label", findings) if case.label else None
    if image is None or (case.label is not None and label is None):
        return None, findings
    counts = (0, 0)
    if label is not None:
        if label.array.shape != image.array.shape:
            findings.append(Finding(case.case_id, str(case.label), "same_shape",
                                    f"label shape {label.array.shape} != image shape {image.array.shape} ({case.image.name})"))
        if not np.allclose(label.affine, image.affine, atol=affine_atol_mm):
            diff = float(np.max(np.abs(label.affine - image.affine)))
            findings.append(Finding(case.case_id, str(case.label), "same_affine",
                                    f"label affine differs from the image affine by up to {diff:.4g} mm "
                                    f"(tolerance {affine_atol_mm} mm)"))
        values = np.unique(label.array)
        extra = sorted(set(values.tolist()) - ALLOWED_LABELS)
        if extra:
            findings.append(Finding(case.case_id, str(case.label), "label_values",
                                    f"label values {extra} are not in {{0, 1, 2}}"))
        if findings:
            return None, findings
        counts = (int(np.count_nonzero(label.array == PANCREAS)), int(np.count_nonzero(label.array == TUMOUR)))
    spacing = image.spacing_mm
    record = CaseRecord(
        case_id=case.case_id, subset=case.subset, image_path=str(case.image),
        label_path=str(case.label) if case.label else None,
        shape_x=image.array.shape[0], shape_y=image.array.shape[1], shape_z=image.array.shape[2],
        spacing_x_mm=spacing[0], spacing_y_mm=spacing[1], spacing_z_mm=spacing[2],
        orientation=orientation_code(image.affine),
        hu_min=float(image.array.min()), hu_max=float(image.array.max()),
        voxels_pancreas=counts[0], voxels_tumour=counts[1],
    )
    return record, findings


def validate_task07(root: str | Path, affine_atol_mm: float = 1e-3,
                    progress: Callable[[int, int, str], None] | None = None,
                    map_cases: Callable[..., list[Any]] | None = None) -> ValidationResult:
    """Validate a whole Task07 folder. Never modifies anything under ``root``.

    ``map_cases(function, cases, names=case_ids, costs=bytes_on_disk)`` may run the per-case checks
    elsewhere (e.g. :func:`pancreas_seg.runners.parallel.map_over_cases`, on a Dask cluster, the largest
    files first); it must return the results in order. Without it the cases are checked here, one
    by one, reporting to ``progress``.
    """
    root = Path(root).resolve()
    dataset_json = read_dataset_json(root)
    cases, findings = collect_case_files(root, dataset_json)
    result = ValidationResult(findings=findings)
    unlisted_or_missing = {f.case_id for f in findings}
    check = functools.partial(validate_case, affine_atol_mm=affine_atol_mm)
    if map_cases is not None:
        outcomes = map_cases(check, cases, names=[case.case_id for case in cases],
                             costs=[case.stored_bytes() for case in cases])
    else:
        outcomes = []
        for index, case in enumerate(cases, start=1):
            if progress:
                progress(index, len(cases), case.case_id)
            outcomes.append(check(case))
    for case, (record, case_findings) in zip(cases, outcomes, strict=True):
        result.findings.extend(case_findings)
        if record is not None and case.case_id not in unlisted_or_missing:
            result.cases.append(record)
    return result


def enforce_policy(report: dict[str, Any]) -> None:
    """With ``on_invalid == "fail"``, raise one error listing every bad case; with ``skip``, return."""
    on_invalid = report["on_invalid"]
    if on_invalid not in ON_INVALID:
        raise ValueError(f"ingestion.on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    if on_invalid == "fail" and report["findings"]:
        lines = "\n".join(f"  - {f['file']}: {f['message']}" for f in report["findings"])
        raise InvalidDatasetError(
            f"{report['n_bad_cases']} invalid case(s) in {report['dataset_root']}: "
            f"{', '.join(report['bad_cases'])}\n{lines}\n"
            "Fix or remove them, or set ingestion.on_invalid: skip to continue with the valid cases. "
            "All findings: data/08_reporting/validation_report.json"
        )
