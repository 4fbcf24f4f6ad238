"""Write a predicted label map as a DICOM Segmentation (SEG) of the CT series it was predicted on.

Segments (from :mod:`pancreas_seg.core.labels`, the one place label meanings live)
------------------------------------------------------------------------------
The project evaluates two classes, ``pancreas`` = label 1 ∪ 2 (the whole organ, its mass included)
and ``tumour`` = label 2, and the SEG carries exactly those as two BINARY segments:

=====  ===========  ==================================  ===================  ==============
 No.   label        property category (SCT)             property type (SCT)  label values
=====  ===========  ==================================  ===================  ==============
  1    Pancreas     91723000 Anatomical Structure        15776009 Pancreas    1 ∪ 2
  2    Tumour       49755003 Morphologically Abnormal    108369006 Neoplasm   2
                    Structure                            (anatomic region: Pancreas)
=====  ===========  ==================================  ===================  ==============

So the "Pancreas" segment is the organ a radiologist would outline (tumour inside it), and the two
segments overlap where there is tumour, as BINARY segmentations may. The label map comes back
exactly: 2 where segment 2 is set, else 1 where segment 1 is set, else 0
(:func:`labels_from_segments`).

Geometry
--------
``labels`` is on the series grid as :func:`pancreas_seg.imaging.dicom_io.read_series` returns it:
``(X, Y, Z) = (Columns, Rows, slices)``, with ``source_datasets[k]`` the header of slice ``k``.
Frame ``k`` of the SEG is ``labels[:, :, k].T`` (Rows x Columns) and references
``source_datasets[k]`` (its SOP Instance UID, in each frame's DerivationImageSequence, and its
ImagePositionPatient, in each frame's PlanePositionSequence). Frames that are empty in every
segment are omitted (highdicom's default), unless every frame is empty.

The file is written atomically (temporary file in the target folder, then rename).
Pure highdicom + pydicom + NumPy (no Kedro).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pancreas_seg import __version__
from pancreas_seg.core.atomic import atomic_path
from pancreas_seg.core.labels import CLASS_LABELS, LABEL_VALUES

logger = logging.getLogger(__name__)

ALGORITHM_NAME = "pancreas_seg"
#: Series number of the SEG when none is given (a high number keeps it after the source series).
DEFAULT_SERIES_NUMBER = 9901

#: Segment number -> (label, evaluated class in labels.CLASS_LABELS, category, type, anatomic region).
SEGMENTS: dict[int, tuple[str, str, hd.sr.CodedConcept, hd.sr.CodedConcept, hd.sr.CodedConcept | None]] = {
    1: ("Pancreas", "pancreas", hd.sr.CodedConcept.from_code(codes.SCT.AnatomicalStructure),
        hd.sr.CodedConcept.from_code(codes.SCT.Pancreas), None),
    2: ("Tumour", "tumour", hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
        hd.sr.CodedConcept.from_code(codes.SCT.Neoplasm), hd.sr.CodedConcept.from_code(codes.SCT.Pancreas)),
}


class InvalidSegmentationInputError(ValueError):
    """The label map does not fit the source series (shape, values, or missing headers)."""


def algorithm_identification(model: str | None = None) -> hd.AlgorithmIdentificationSequence:
    """The project (name, version) as an AI algorithm; ``model`` (e.g. ``"unet"``) as a parameter."""
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=__version__,
        parameters={"model": model} if model else None)


def segment_descriptions(model: str | None = None) -> list[hd.seg.SegmentDescription]:
    """The two segments of :data:`SEGMENTS`, produced AUTOMATICally by this project."""
    algorithm = algorithm_identification(model)
    return [hd.seg.SegmentDescription(
                segment_number=number, segment_label=label, segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=[region] if region is not None else None)
            for number, (label, _, category, property_type, region) in SEGMENTS.items()]


def segments_from_labels(labels: np.ndarray) -> np.ndarray:
    """(X, Y, Z) MSD labels -> (Z, Rows, Columns, n_segments) bool frames, one per source slice."""
    frames = np.moveaxis(np.asarray(labels), (0, 1, 2), (2, 1, 0))   # (Z, Y, X) = (Z, Rows, Columns)
    return np.stack([np.isin(frames, CLASS_LABELS[SEGMENTS[n][1]]) for n in sorted(SEGMENTS)], axis=-1)


def labels_from_segments(segments: np.ndarray) -> np.ndarray:
    """Inverse of :func:`segments_from_labels`: (Z, Rows, Columns, 2) -> (X, Y, Z) uint8 MSD labels."""
    segments = np.asarray(segments, dtype=bool)
    frames = np.where(segments[..., 1], np.uint8(2), np.where(segments[..., 0], np.uint8(1), np.uint8(0)))
    return np.ascontiguousarray(np.moveaxis(frames, (0, 1, 2), (2, 1, 0)))


def _check_inputs(labels: np.ndarray, source_datasets: Sequence[Dataset]) -> None:
    if not source_datasets:
        raise InvalidSegmentationInputError("no source datasets: the SEG must reference the CT series")
    first = source_datasets[0]
    series = f"series {first.get('SeriesInstanceUID', '?')} ({first.get('SeriesDescription', '')!r})"
    expected = (int(first.Columns), int(first.Rows), len(source_datasets))
    if labels.ndim != 3 or tuple(labels.shape) != expected:
        raise InvalidSegmentationInputError(
            f"label map of shape {tuple(labels.shape)} is not on the grid of {series}: expected "
            f"(Columns, Rows, slices) = {expected}")
    if len({str(ds.SeriesInstanceUID) for ds in source_datasets}) != 1:
        raise InvalidSegmentationInputError("source datasets come from more than one series")
    values = np.unique(labels)
    unknown = sorted(set(values.tolist()) - set(LABEL_VALUES))
    if unknown:
        raise InvalidSegmentationInputError(f"label map for {series} holds values {unknown}; "
                                            f"expected a subset of {list(LABEL_VALUES)}")


def build_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset], *, model: str | None = None,
                    series_number: int = DEFAULT_SERIES_NUMBER, series_description: str = "pancreas_seg segmentation",
                    series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
                    content_label: str = "PANCREAS") -> hd.seg.Segmentation:
    """``labels`` as a BINARY DICOM SEG (a highdicom ``Segmentation``) referencing the source series.

    Args:
        labels: (X, Y, Z) = (Columns, Rows, slices) MSD label values {0, 1, 2} on the series grid.
        source_datasets: the series' headers sorted as read_series sorted them
            (``DicomVolume.datasets``: slice k of ``labels`` is ``source_datasets[k]``). Headers
            without pixel data are enough.
        model: the model that made the prediction, recorded in the algorithm identification.

    Raises:
        InvalidSegmentationInputError: the label map does not fit the series.
    """
    labels = np.asarray(labels)
    _check_inputs(labels, source_datasets)
    segmentation = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=segments_from_labels(labels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(model),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=model or ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="0",
        content_label=content_label,
        content_description="pancreas (label 1 and 2) and pancreatic tumour (label 2)",
        omit_empty_frames=bool(labels.any()),   # an empty map keeps all frames (highdicom needs one)
    )
    segmentation.SeriesDescription = series_description
    return segmentation


def write_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset], path: str | os.PathLike[str],
                    **options: Any) -> Path:
    """:func:`build_dicom_seg` written to ``path`` (atomically); returns ``path``. ``options`` as there."""
    segmentation = build_dicom_seg(labels, source_datasets, **options)
    target = Path(path)
    with atomic_path(target) as tmp:
        segmentation.save_as(tmp)
    logger.info("Wrote DICOM SEG %s (%d frames) for series %s", target, int(segmentation.NumberOfFrames),
                source_datasets[0].SeriesInstanceUID)
    return target
