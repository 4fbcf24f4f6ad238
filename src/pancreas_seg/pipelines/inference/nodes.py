"""Inference node: CT NIfTI file(s) -> label maps in each input's own geometry, plus overlays."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_seg import tracking
from pancreas_seg.core.atomic import atomic_write_bytes
from pancreas_seg.imaging.dicom_io import DicomVolume, read_dicom_folder
from pancreas_seg.imaging.nifti_io import NiftiVolume, load_nifti, save_nifti
from pancreas_seg.imaging.preprocess import axial_view
from pancreas_seg.core.labels import PANCREAS, TUMOUR
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.task07.layout import CaseFiles, case_id_from_path, list_nifti_files
from pancreas_seg.task07.validation import validate_case

logger = logging.getLogger(__name__)


def collect_inputs(input_path: str | Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (``._*`` files skipped)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = list_nifti_files(path)
        if not files:
            raise FileNotFoundError(f"inference.input_path: {path} contains no .nii/.nii.gz files")
        return files
    raise FileNotFoundError(f"inference.input_path: {path} does not exist")


def save_overlay(ct: NiftiVolume, labels: np.ndarray, path: Path,
                 window_hu: tuple[float, float], title: str) -> None:
    """PNG of representative axial slices (radiological view) with the predicted mask."""
    from pancreas_seg.evaluation.plots import pick_representative_slices, plot_overlays  # noqa: PLC0415

    label_slices = axial_view(labels, ct.affine)
    chosen = pick_representative_slices(np.moveaxis(label_slices, 0, -1), 3)
    ct_slices = axial_view(ct.array, ct.affine)[chosen].astype(np.float32)   # only the shown slices
    figure = plot_overlays(ct_slices, None, {title: label_slices[chosen]}, window_hu,
                           [f"{path.stem} slice {z}" for z in chosen])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def segment_case(predictor: Predictor, path: Path, output_dir: Path, inference: dict[str, Any]) -> dict[str, Any]:
    """Segment one validated CT file: write ``<case>.nii.gz`` in its geometry and ``<case>_overlay.png``.

    Returns the case's report row (paths, shape, predicted voxel counts).
    """
    return segment_volume_to_files(predictor, case_id_from_path(path), str(path), load_nifti(path), output_dir,
                                   inference)


def segment_volume_to_files(predictor: Predictor, case_id: str, source: str, ct: NiftiVolume, output_dir: Path,
                            inference: dict[str, Any]) -> dict[str, Any]:
    """Segment one validated CT volume (from a NIfTI file or a DICOM series) and write its outputs.

    ``<case>.nii.gz`` (the volume's grid and affine) and ``<case>_overlay.png`` always; for a DICOM
    series (a :class:`~pancreas_seg.imaging.dicom_io.DicomVolume`) with ``inference.output_format:
    dicom_seg`` also ``<case>_seg.dcm``, a DICOM-SEG that references the source series.
    """
    architecture = predictor.name
    labels = predictor.segment(ct.array, ct.affine, case_id)
    mask_path = output_dir / f"{case_id}.nii.gz"
    save_nifti(mask_path, labels, ct.affine, ct.header)
    overlay_path = output_dir / f"{case_id}_overlay.png"
    save_overlay(ct, labels, overlay_path, tuple(inference["overlay_window_hu"]), architecture)
    row = {"case_id": case_id, "input": source, "mask": str(mask_path),
           "overlay": str(overlay_path), "shape": list(labels.shape),
           "voxels_pancreas": int(np.count_nonzero(labels == PANCREAS)),
           "voxels_tumour": int(np.count_nonzero(labels == TUMOUR))}
    if isinstance(ct, DicomVolume) and inference.get("output_format", "nifti") == "dicom_seg":
        from pancreas_seg.imaging.dicom_seg import write_dicom_seg  # noqa: PLC0415 - highdicom for DICOM-SEG only

        seg_path = output_dir / f"{case_id}_seg.dcm"
        write_dicom_seg(labels, ct.datasets, seg_path, model=architecture)
        row["dicom_seg"] = str(seg_path)
    return row


def log_inference_run(inference: dict[str, Any], name: str, n_segmented: int, n_invalid: int) -> None:
    """Log the settings and counts to the active MLflow run (the inference experiment's), if any."""
    tracking.log_to_active_run({"model_reference": inference["model"], "model": name},
                               {"inference": {k: str(v)[:500] for k, v in inference.items()}},
                               {"scans_segmented": n_segmented, "inputs_invalid": n_invalid})


OUTPUT_FORMATS = ("nifti", "dicom_seg")


def is_dicom_folder(path: Path) -> bool:
    """A folder with no NIfTI file in it (DICOM series are looked for there, recursively)."""
    return path.is_dir() and not list_nifti_files(path)


def load_predictor(inference: dict[str, Any], case_ids: list[str]) -> Predictor:
    """The predictor of ``inference.model``, refused when it was trained or validated on one of
    ``case_ids`` (unless ``inference.allow_training_cases``)."""
    predictor = Predictor.from_reference(inference["model"], inference["models_dir"],
                                         PredictionSettings.from_params(inference))
    if not inference.get("allow_training_cases", False):
        predictor.check_disjoint(case_ids, "was asked to segment (set inference.allow_training_cases: true to "
                                           "allow it)")
    return predictor


def _report(inference: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    model_files = [str(path) for path in predictor.model_files]
    return {"model": str(inference["model"]), "model_file": model_files[0] if len(model_files) == 1 else model_files,
            "architecture": predictor.name, "trained_on": predictor.card.data_source}


def run_dicom_inference(inference: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Segment every valid CT series in ``folder`` (see :func:`run_inference`); case id = SeriesInstanceUID.

    Series are read with :func:`~pancreas_seg.imaging.dicom_io.read_dicom_folder`: bad series
    (non-CT, localizers, mixed matrix sizes, gaps, non-uniform spacing ...) fail with one error
    naming each, or are skipped with ``inference.on_invalid: skip``.
    """
    series, problems = read_dicom_folder(folder, on_invalid=inference.get("on_invalid", "fail"))
    for problem in problems:
        logger.error("Invalid DICOM series %s", problem)
    if not series:
        raise ValueError(f"inference.input_path: {folder} holds no valid CT series")
    predictor = load_predictor(inference, [uid for uid, _ in series])
    output_dir = Path(inference["output_dir"])
    logger.info("Inference with %s on %d DICOM series -> %s", predictor.name, len(series), output_dir)
    outputs = []
    for index, (uid, volume) in enumerate(series, start=1):
        logger.info("Segmenting series %d/%d: %s (%s, %d slices)", index, len(series), uid, volume.description,
                    volume.array.shape[2])
        outputs.append(segment_volume_to_files(predictor, uid, str(volume.folder), volume, output_dir, inference)
                       | {"series_description": volume.description})
    log_inference_run(inference, predictor.name, len(outputs), len(problems))
    return {**_report(inference, predictor), "input_kind": "dicom", "outputs": outputs, "skipped": [{"file": str(p.folder), "series": p.series_uid, "reason": p.message}
                                            for p in problems]}


def run_inference(inference: dict[str, Any]) -> dict[str, Any]:
    """Segment every input CT; write ``<case>.nii.gz`` (same shape, affine, orientation) + overlay PNG.

    The model is refused when its card does not match its weights or its own settings, or when it
    was trained on one of the inputs (unless ``inference.allow_training_cases``). Invalid inputs
    follow ``inference.on_invalid`` (``fail`` lists all of them, ``skip`` continues).
    Returns a report of what was written.
    """
    output_format = inference.get("output_format", "nifti")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"inference.output_format {output_format!r}: use one of {list(OUTPUT_FORMATS)}")
    input_path = Path(inference["input_path"]).expanduser()
    if is_dicom_folder(input_path):
        return run_dicom_inference(inference, input_path)
    if output_format == "dicom_seg":
        raise ValueError(f"inference.output_format dicom_seg needs DICOM input, but {input_path} holds NIfTI; "
                         "use output_format: nifti or point input_path at a folder of DICOM series")
    inputs = collect_inputs(input_path)
    predictor = load_predictor(inference, [case_id_from_path(p) for p in inputs])
    output_dir = Path(inference["output_dir"])
    findings, valid = [], []
    for path in inputs:
        record, problems = validate_case(CaseFiles(case_id_from_path(path), path, None, "inference"))
        findings.extend(problems)
        if record is not None:
            valid.append(path)
    for finding in findings:
        logger.error("Invalid input %s", finding)
    if findings and inference.get("on_invalid", "fail") == "fail":
        listing = "\n".join(f"  - {f}" for f in findings)
        raise ValueError(f"{len(findings)} invalid inference input(s):\n{listing}\n"
                         "Fix them or set inference.on_invalid: skip")
    logger.info("Inference with %s (%s) on %d scan(s) -> %s", predictor.name,
                ", ".join(str(p) for p in predictor.model_files), len(valid), output_dir)
    outputs = []
    for index, path in enumerate(valid, start=1):
        logger.info("Segmenting %d/%d: %s", index, len(valid), path.name)
        outputs.append(segment_case(predictor, path, output_dir, inference))
    log_inference_run(inference, predictor.name, len(outputs), len(findings))
    return {**_report(inference, predictor), "outputs": outputs, "skipped": [{"file": f.file, "reason": f.message} for f in findings]}
