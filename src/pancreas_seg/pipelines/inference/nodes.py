"""Inference nodes: CT scans (NIfTI files or DICOM series) -> label maps in each input's own geometry.

The pipeline is find -> load the predictor -> segment -> write: the masks (with
``inference.write_tumour_probability`` also the tumour probability maps), overlay PNGs and
DICOM-SEG objects are lazy partitions that the catalog saves one case at a time
(``inference_masks``, ``inference_overlays``, ``inference_dicom_seg`` in ``inference.output_dir``);
the report lists what was written and what was skipped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_seg import tracking
from pancreas_seg.core.labels import PANCREAS, TUMOUR
from pancreas_seg.imaging.dicom_io import (
    ArchiveLimits,
    DicomVolume,
    is_dicom_archive,
    is_dicom_file,
    is_dicomdir,
    read_dicom_input,
)
from pancreas_seg.evaluation.detection import patient_tumour_score
from pancreas_seg.imaging.nifti_io import PROBABILITY_SUFFIX, CasePrediction, NiftiVolume, load_nifti
from pancreas_seg.imaging.preprocess import axial_view
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.task07.layout import CaseFiles, case_id_from_path, list_nifti_files
from pancreas_seg.task07.validation import validate_case

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("nifti", "dicom_seg")
OVERLAY_SLICES = 3
"""Representative axial slices shown in each overlay PNG."""


@dataclass(frozen=True)
class Scan:
    """One input to segment: where it came from and how to read it.

    Attributes:
        source: the NIfTI file or the DICOM series folder.
        load: reads the volume (a :class:`NiftiVolume`, or a :class:`DicomVolume` with its headers).
        is_dicom: a DICOM series (else a NIfTI file).
        description: the DICOM series description.
    """

    source: str
    load: Callable[[], NiftiVolume]
    is_dicom: bool = False
    description: str | None = None


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


def is_dicom_folder(path: Path) -> bool:
    """A folder with no NIfTI file in it (DICOM series are looked for there, recursively)."""
    return path.is_dir() and not list_nifti_files(path)


def is_dicom_input(path: Path) -> bool:
    """DICOM input: a folder with no NIfTI file in it, a ``.zip`` of series, a DICOMDIR file, or one
    DICOM file (an enhanced multi-frame CT)."""
    return is_dicom_folder(path) or is_dicom_archive(path) or is_dicomdir(path) or is_dicom_file(path)


def _dicom_scans(source: Path, inference: Mapping[str, Any]) -> tuple[dict[str, Scan], list[dict[str, Any]]]:
    series, problems = read_dicom_input(source, on_invalid=inference.get("on_invalid", "fail"),
                                        limits=ArchiveLimits.from_params(inference.get("dicom_archive")))
    for problem in problems:
        logger.error("Invalid DICOM input %s", problem)
    if not series:
        raise ValueError(f"inference.input_path: {source} holds no valid CT series")
    scans = {uid: Scan(str(volume.folder), functools.partial(_identity, volume), True, volume.description)
             for uid, volume in series}
    return scans, [{"file": str(p.folder), "series": p.series_uid, "kind": p.kind, "reason": p.message}
                   for p in problems]


def _nifti_scans(input_path: Path, inference: Mapping[str, Any]) -> tuple[dict[str, Scan], list[dict[str, Any]]]:
    findings, scans = [], {}
    for path in collect_inputs(input_path):
        case_id = case_id_from_path(path)
        record, problems = validate_case(CaseFiles(case_id, path, None, "inference"))
        findings.extend(problems)
        if record is not None:
            scans[case_id] = Scan(str(path), functools.partial(load_nifti, path))
    for finding in findings:
        logger.error("Invalid input %s", finding)
    if findings and inference.get("on_invalid", "fail") == "fail":
        listing = "\n".join(f"  - {f}" for f in findings)
        raise ValueError(f"{len(findings)} invalid inference input(s):\n{listing}\n"
                         "Fix them or set inference.on_invalid: skip")
    return scans, [{"file": f.file, "reason": f.message} for f in findings]


def _identity(value: Any) -> Any:
    return value


def find_scans(inference: dict[str, Any]) -> tuple[dict[str, Scan], list[dict[str, Any]]]:
    """The valid inputs of ``inference.input_path`` by case id, and the skipped ones.

    A NIfTI file or folder (case id = file name), or DICOM (case id = SeriesInstanceUID, or a
    generated ``no-uid-...`` id for a series without one): a folder of series (searched
    recursively), a ``.zip`` of series (checked against ``inference.dicom_archive`` before it is
    extracted), a DICOMDIR file, or one DICOM file (an enhanced multi-frame CT). Invalid inputs
    follow ``inference.on_invalid``:
    ``fail`` lists all of them in one error, ``skip`` leaves them out and reports them.
    """
    output_format = inference.get("output_format", "nifti")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"inference.output_format {output_format!r}: use one of {list(OUTPUT_FORMATS)}")
    input_path = Path(inference["input_path"]).expanduser()
    if is_dicom_input(input_path):
        return _dicom_scans(input_path, inference)
    if output_format == "dicom_seg":
        raise ValueError(f"inference.output_format dicom_seg needs DICOM input, but {input_path} holds NIfTI; "
                         "use output_format: nifti or point input_path at DICOM series (a folder, a .zip or a DICOMDIR)")
    return _nifti_scans(input_path, inference)


def load_predictor(inference: dict[str, Any], scans: Mapping[str, Scan]) -> Predictor:
    """The predictor of ``inference.model``, refused when it was trained or validated on one of the
    scans' case ids (unless ``inference.allow_training_cases``)."""
    predictor = Predictor.from_reference(inference["model"], inference["models_dir"],
                                         PredictionSettings.from_params(inference))
    if not inference.get("allow_training_cases", False):
        predictor.check_disjoint(scans, "was asked to segment (set inference.allow_training_cases: true to "
                                        "allow it)")
    logger.info("Inference with %s (%s) on %d scan(s)", predictor.name,
                ", ".join(str(p) for p in predictor.model_files), len(scans))
    return predictor


def segment_scans(predictor: Predictor, scans: Mapping[str, Scan],
                  inference: Mapping[str, Any] | None = None) -> dict[str, Callable[[], CasePrediction]]:
    """``{case_id: fn}``: each ``fn`` segments its scan; the catalog saves ``<case>.nii.gz`` with the
    input's shape, affine and header, one case at a time. With ``inference.write_tumour_probability``
    (and a model with a tumour output) also ``<case>_tumour_probability.nii.gz`` next to it: the
    tumour probability on the same grid, uint8 with ``scl_slope = 1/255`` (readers get [0, 1])."""
    with_probability = bool((inference or {}).get("write_tumour_probability", False))
    if with_probability and not predictor.has_tumour_output:
        logger.warning("inference.write_tumour_probability: %s has no tumour output (label mode %s); only the "
                       "label maps are written", predictor.name, predictor.label_mode)
        with_probability = False

    def segment(index: int, case_id: str) -> CasePrediction:
        scan = scans[case_id]
        logger.info("Segmenting %d/%d: %s%s", index, len(scans), case_id,
                    f" ({scan.description})" if scan.description else "")
        ct = scan.load()
        if not with_probability:
            return CasePrediction(NiftiVolume(predictor.segment(ct.array, ct.affine, case_id), ct.affine, ct.header))
        prediction = predictor.segment_with_probability(ct.array, ct.affine, case_id)
        logger.info("%s: patient tumour score %.3f", case_id, prediction.patient_tumour_score)
        return CasePrediction(NiftiVolume(prediction.labels, ct.affine, ct.header), prediction.tumour_probability)

    return {case_id: functools.partial(segment, i, case_id) for i, case_id in enumerate(scans, start=1)}


def overlay_figure(ct: NiftiVolume, labels: np.ndarray, window_hu: tuple[float, float], title: str,
                   name: str) -> Any:
    """A figure of representative axial slices (radiological view) with the predicted mask."""
    from pancreas_seg.evaluation.plots import pick_representative_slices, plot_overlays  # noqa: PLC0415

    label_slices = axial_view(labels, ct.affine)
    chosen = pick_representative_slices(np.moveaxis(label_slices, 0, -1), OVERLAY_SLICES)
    ct_slices = axial_view(ct.array, ct.affine)[chosen].astype(np.float32)   # only the shown slices
    return plot_overlays(ct_slices, None, {title: label_slices[chosen]}, window_hu,
                         [f"{name} slice {z}" for z in chosen])


def plot_overlays(masks: Mapping[str, Callable[[], NiftiVolume]], scans: Mapping[str, Scan], predictor: Predictor,
                  inference: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """``{case_id: fn -> figure}`` of every scan of this run with its saved mask (``<case>_overlay.png``)."""
    window_hu = tuple(inference["overlay_window_hu"])

    def plot(case_id: str) -> Any:
        return overlay_figure(scans[case_id].load(), masks[case_id]().array, window_hu, predictor.name,
                              f"{case_id}_overlay")

    return {case_id: functools.partial(plot, case_id) for case_id in scans}


def make_dicom_segs(masks: Mapping[str, Callable[[], NiftiVolume]], scans: Mapping[str, Scan],
                    predictor: Predictor, inference: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """``{case_id: fn -> DICOM-SEG}`` referencing each source series (``<case>_seg.dcm``), for DICOM
    input with ``inference.output_format: dicom_seg``; empty otherwise.

    A series without usable Study/Series/SOP Instance UIDs (an anonymised export) gets a SEG that
    references generated UIDs (on in-memory copies of its headers; the files are never changed),
    recorded in ``<case>_seg.json`` next to it. A series no valid SEG can reference
    (:func:`~pancreas_seg.imaging.dicom_seg.seg_refusal`) is refused here, before anything is
    written: a WARNING says why, ``<case>_seg.json`` records the refusal, an earlier run's
    ``<case>_seg.dcm`` is removed, and the run goes on (its NIfTI mask is already written).
    """
    if inference.get("output_format", "nifti") != "dicom_seg":
        return {}
    from pancreas_seg.imaging.dicom_seg import (  # noqa: PLC0415 - highdicom for DICOM-SEG only
        build_dicom_seg,
        prepare_seg_sources,
        seg_refusal,
        seg_sidecar_path,
        write_seg_sidecar,
    )

    output_dir = Path(inference["output_dir"])

    def source(case_id: str) -> DicomVolume:
        volume = scans[case_id].load()
        if not isinstance(volume, DicomVolume):
            raise TypeError(f"case {case_id}: a DICOM-SEG needs a DICOM series")
        return volume

    def build(case_id: str) -> Any:
        volume = source(case_id)
        sources = prepare_seg_sources(volume.datasets, source_files=volume.files, source_array=volume.array,
                                      label=f"of case {case_id}")
        segmentation = build_dicom_seg(masks[case_id]().array, sources.datasets, model=predictor.name)
        seg_path = output_dir / f"{case_id}_seg.dcm"
        if sources.generated is not None:
            write_seg_sidecar(seg_path, sources.generated)    # before the catalog saves the SEG itself
        else:
            seg_sidecar_path(seg_path).unlink(missing_ok=True)   # an earlier run's record of this case
        return segmentation

    builders = {}
    for case_id, scan in scans.items():
        if not scan.is_dicom:
            continue
        volume = source(case_id)
        reason = seg_refusal(volume.datasets, volume.array.shape)
        if reason is None:
            builders[case_id] = functools.partial(build, case_id)
            continue
        seg_path = output_dir / f"{case_id}_seg.dcm"
        logger.warning("No DICOM-SEG for case %s: %s. Its NIfTI mask is written; the refusal is recorded in "
                       "%s", case_id, reason, seg_sidecar_path(seg_path).name)
        write_seg_sidecar(seg_path, refused=reason)
        if seg_path.is_file():
            seg_path.unlink()
            logger.info("Removed the DICOM-SEG an earlier run wrote for case %s", case_id)
    return builders


def _dicom_seg_row(seg_path: Path) -> dict[str, Any]:
    """The report's DICOM-SEG columns of one case: the SEG's path, or why it was refused; and the
    UIDs generated for its source series (from the sidecar this run's make_dicom_segs wrote)."""
    from pancreas_seg.imaging.dicom_seg import read_seg_sidecar, seg_sidecar_path  # noqa: PLC0415

    sidecar = read_seg_sidecar(seg_path)
    if sidecar is None:
        return {"dicom_seg": str(seg_path)}
    if sidecar.get("status") == "refused":
        return {"dicom_seg": None, "dicom_seg_refused": sidecar.get("reason"),
                "dicom_seg_record": str(seg_sidecar_path(seg_path))}
    return {"dicom_seg": str(seg_path), "dicom_seg_record": str(seg_sidecar_path(seg_path)),
            "dicom_seg_generated_uids": {k: v for k, v in sidecar.items() if k not in ("dicom_seg", "status")}}


def report_inference(masks: Mapping[str, Callable[[], NiftiVolume]], overlays: Mapping[str, Any],
                     dicom_segs: Mapping[str, Any], scans: Mapping[str, Scan], skipped: list[dict[str, Any]],
                     predictor: Predictor, inference: dict[str, Any]) -> dict[str, Any]:
    """What was written for every scan (paths, shape, predicted voxel counts) and what was skipped;
    the settings and counts also go to the active MLflow run (the inference experiment's).

    ``overlays`` and ``dicom_segs`` are taken so that the report comes after them; the report
    lists only this run's scans, whatever else lies in ``inference.output_dir``. With
    ``output_format: dicom_seg`` a DICOM case's row also says why its SEG was refused
    (``dicom_seg_refused``, ``dicom_seg`` None), or which UIDs were generated for its source series
    (``dicom_seg_generated_uids``: study, series, frame of reference, and the SOP Instance UID of
    every source image by index, file and InstanceNumber), as recorded in ``dicom_seg_record``.
    With ``write_tumour_probability`` a row also names its ``tumour_probability`` map and gives the
    ``patient_tumour_score`` (the map's maximum, to its 1/255 steps); both are None otherwise.
    """
    output_dir = Path(inference["output_dir"])
    dicom_seg = inference.get("output_format", "nifti") == "dicom_seg"
    with_probability = bool(inference.get("write_tumour_probability", False)) and predictor.has_tumour_output
    outputs = []
    for case_id, scan in scans.items():
        labels = masks[case_id]().array
        row = {"case_id": case_id, "input": scan.source, "mask": str(output_dir / f"{case_id}.nii.gz"),
               "overlay": str(output_dir / f"{case_id}_overlay.png"), "shape": list(labels.shape),
               "voxels_pancreas": int(np.count_nonzero(labels == PANCREAS)),
               "voxels_tumour": int(np.count_nonzero(labels == TUMOUR)),
               "tumour_probability": None, "patient_tumour_score": None}
        probability = masks.get(f"{case_id}{PROBABILITY_SUFFIX}") if with_probability else None
        if probability is not None:   # this run's map (an earlier run's is removed when this one writes none)
            row["tumour_probability"] = str(output_dir / f"{case_id}{PROBABILITY_SUFFIX}.nii.gz")
            row["patient_tumour_score"] = patient_tumour_score(probability().array)
        if scan.is_dicom and dicom_seg:
            row |= _dicom_seg_row(output_dir / f"{case_id}_seg.dcm")
        if scan.is_dicom:
            row["series_description"] = scan.description
        outputs.append(row)
    counts = {"scans_segmented": len(outputs), "inputs_invalid": len(skipped)}
    if dicom_seg:
        counts |= {"dicom_segs_refused": sum("dicom_seg_refused" in row for row in outputs),
                   "dicom_segs_with_generated_uids": sum("dicom_seg_generated_uids" in row for row in outputs)}
    tracking.log_to_active_run({"model_reference": inference["model"], "model": predictor.name},
                               {"inference": {k: str(v)[:500] for k, v in inference.items()}}, counts)
    model_files = [str(path) for path in predictor.model_files]
    report = {"model": str(inference["model"]), "model_file": model_files[0] if len(model_files) == 1 else model_files,
              "architecture": predictor.name, "trained_on": predictor.card.data_source}
    if any(scan.is_dicom for scan in scans.values()):
        report["input_kind"] = "dicom"
    return report | {"outputs": outputs, "skipped": skipped}
