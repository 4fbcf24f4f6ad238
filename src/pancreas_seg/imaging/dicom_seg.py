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

Source series without usable UIDs (anonymised exports)
-----------------------------------------------------
De-identification tools may leave ``StudyInstanceUID``, ``SeriesInstanceUID`` and
``SOPInstanceUID`` (and ``FrameOfReferenceUID``) present but EMPTY, or delete them. A SEG must
reference its source by these UIDs, so :func:`prepare_seg_sources` (called by
:func:`build_dicom_seg`) works on in-memory COPIES of the source headers (never the caller's
datasets, never the files) and gives each unusable UID (missing, empty, not a valid UID, or a
SOP Instance UID repeated) a generated one:

* one StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID for the whole series (if some
  images carry a usable value and others none, the usable value is used for all);
* one SOPInstanceUID per image that lacks a usable, unique one.

The UIDs are generated with ``pydicom.uid.generate_uid`` from the content: with ``source_array``
(the pixel values), the same series gives the same UIDs in every run and different series
different ones; without it they are random (unique, but new on every call). What was generated and
why is a :class:`GeneratedUids`: :func:`write_dicom_seg` records it in a JSON sidecar next to the
SEG (:func:`seg_sidecar_path`: ``<name>.json``; study, series, frame of reference and the SOP
Instance UID of every source image by index, file and InstanceNumber) and logs a WARNING naming
the attributes and the reason (no patient identifiers, no paths). Type 2 Patient/Study attributes
that highdicom copies from the source (:data:`TYPE2_SOURCE_ATTRIBUTES`) are added EMPTY to the
copies when absent.

What cannot be repaired is refused with a :class:`SegmentationRefusedError` that says why
(:func:`seg_refusal`): images without a usable SOP Class UID, without geometry (position,
orientation, pixel spacing, matrix), multi-frame images, source images naming several studies,
series or frames of reference, or headers that do not map one per slice. The inference pipeline
then writes the NIfTI mask only, and reports the refusal.

The file is written atomically (temporary file in the target folder, then rename).
Pure highdicom + pydicom + NumPy (no Kedro).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, TM

from pancreas_seg import __version__
from pancreas_seg.core.atomic import atomic_path, atomic_write_text
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


class SegmentationRefusedError(InvalidSegmentationInputError):
    """No valid DICOM-SEG can reference this source series; the message says why (no paths, no
    patient identifiers). The inference pipeline writes the NIfTI mask only."""


# --------------------------------------------------------------------------------------------
# Source series without usable UIDs
# --------------------------------------------------------------------------------------------
#: UIDs shared by every image of a series, which the SEG copies or references.
SERIES_UID_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
#: Type 2 Patient / General Study attributes highdicom reads from the first source image; added
#: EMPTY (allowed for Type 2) to the in-memory copies when absent.
TYPE2_SOURCE_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Per-image attributes a SEG frame needs from its source image (besides the UIDs).
SOURCE_GEOMETRY_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
#: Enhanced (multi-frame) CT SOP classes: a SEG of one would reference frames, which is not done here.
MULTI_FRAME_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
                                     "1.2.840.10008.5.1.4.1.1.2.2"})   # Legacy Converted Enhanced CT
#: Mixed into every generated UID's entropy, so that they cannot collide with another tool's
#: content-derived UIDs of the same data.
_UID_NAMESPACE = "pancreas_seg.dicom_seg.source_uid.v1"


def _uid_state(ds: Dataset, keyword: str) -> str:
    """``"ok"``, ``"missing"`` (no element), ``"empty"`` or ``"invalid"`` (not a valid DICOM UID)."""
    if keyword not in ds:
        return "missing"
    text = str(ds.get(keyword) or "").strip()
    if not text:
        return "empty"
    return "ok" if UID(text).is_valid else "invalid"


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword) or "").strip()


def _count_states(states: Sequence[str], keyword: str) -> str:
    """``"SOPInstanceUID empty in 112 of 112 image(s)"`` (every kind of problem found)."""
    parts = [f"{kind} in {states.count(kind)}" for kind in ("missing", "empty", "invalid", "duplicated")
             if states.count(kind)]
    return f"{keyword} {', '.join(parts)} of {len(states)} image(s)"


def _image_refusals(source_datasets: Sequence[Dataset], grid_shape: Sequence[int] | None) -> Iterator[str]:
    """What keeps the images themselves from being SEG sources (frames, slices, SOP class, geometry)."""
    n = len(source_datasets)
    multi = sum(str(ds.get("NumberOfFrames") or "1").strip() not in ("", "1")
                or _uid(ds, "SOPClassUID") in MULTI_FRAME_SOP_CLASSES for ds in source_datasets)
    if multi:
        yield (f"{multi} of {n} source image(s) are (frames of) multi-frame images: DICOM-SEG output needs "
               "one single-frame image per slice")
    if grid_shape is not None and len(grid_shape) == 3 and int(grid_shape[2]) != n:
        yield f"{n} source image header(s) for {int(grid_shape[2])} slices: DICOM-SEG output needs one per slice"
    sop_class = [_uid_state(ds, "SOPClassUID") for ds in source_datasets]
    if any(state != "ok" for state in sop_class):
        yield (f"{_count_states(sop_class, 'SOPClassUID')}: a DICOM-SEG references each source image by its "
               "SOP Class UID, which cannot be generated")
    for keyword in SOURCE_GEOMETRY_ATTRIBUTES:
        lacking = sum(ds.get(keyword) in (None, "") for ds in source_datasets)
        if lacking:
            yield f"{lacking} of {n} source image(s) lack {keyword}, which every DICOM-SEG frame needs"


def seg_refusal(source_datasets: Sequence[Dataset], grid_shape: Sequence[int] | None = None) -> str | None:
    """Why no DICOM-SEG can reference ``source_datasets`` (None: one can, UIDs repaired if needed).

    Checked from the headers alone: every image single-frame with a usable SOP Class UID and its
    geometry, one header per slice of ``grid_shape`` (X, Y, Z) when given, and at most one usable
    value of each of :data:`SERIES_UID_ATTRIBUTES` across the images. The reason names attributes
    and counts only (no file names, paths or patient identifiers).
    """
    if not source_datasets:
        return "there are no source images: a DICOM-SEG must reference the CT series it segments"
    refusal = next(_image_refusals(source_datasets, grid_shape), None)
    if refusal is not None:
        return refusal
    for keyword in SERIES_UID_ATTRIBUTES:
        values = {_uid(ds, keyword) for ds in source_datasets if _uid_state(ds, keyword) == "ok"}
        if len(values) > 1:
            return (f"the source images name {len(values)} different {keyword}s: a DICOM-SEG references one "
                    "series of one study in one frame of reference")
    return None


@dataclass(frozen=True)
class SourceInstance:
    """One source image as the SEG references it (``index`` = slice k of the label map)."""

    index: int
    file: str | None              # relative to the series' folder (never an absolute path)
    instance_number: int | None
    sop_instance_uid: str
    generated: bool


@dataclass(frozen=True)
class GeneratedUids:
    """The UIDs a SEG references for a source series that lacked usable ones, and why.

    ``generated`` names the attributes that got new UIDs (``SOPInstanceUID`` when at least one
    image did); the three series-level UIDs are those of the copies, generated or not.
    """

    reason: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    generated: tuple[str, ...]
    instances: tuple[SourceInstance, ...]
    filled_empty: tuple[str, ...] = ()

    @property
    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID referenced for each slice, slice 0 first."""
        return [item.sop_instance_uid for item in self.instances]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the sidecar's and the inference report's)."""
        return {"uids_generated": True, "reason": self.reason,
                "study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid, "generated": list(self.generated),
                "filled_empty": list(self.filled_empty),
                "instances": [{"index": i.index, "file": i.file, "instance_number": i.instance_number,
                               "sop_instance_uid": i.sop_instance_uid, "generated": i.generated}
                              for i in self.instances]}


@dataclass(frozen=True)
class SegSources:
    """The source headers a SEG is built from: the caller's own datasets when they are usable as
    they are, else in-memory copies with generated UIDs (``generated``) and/or empty Type 2
    attributes added (``filled_empty``)."""

    datasets: tuple[Dataset, ...] = field(repr=False)
    generated: GeneratedUids | None = None
    filled_empty: tuple[str, ...] = ()


def _instance_digest(ds: Dataset, pixels: np.ndarray | None) -> str:
    """A fingerprint of one image: every header element (file meta excluded), and its pixels if given."""
    digest = hashlib.sha256()
    for element in ds.iterall():
        value = "" if element.VR == "SQ" else repr(element.value)   # iterall visits sequence items itself
        digest.update(f"{element.tag}|{element.VR}|{value}\n".encode("utf-8", "backslashreplace"))
    if pixels is not None:
        digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _relative_names(files: Sequence[str | os.PathLike[str]] | None, n: int) -> list[str | None]:
    if files is None or len(files) != n:
        return [None] * n
    paths = [Path(f) for f in files]
    root = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    return [os.path.relpath(p, root) if root else p.name for p in paths]


def _instance_number(ds: Dataset) -> int | None:
    value = ds.get("InstanceNumber")
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _sop_states(source_datasets: Sequence[Dataset]) -> list[str]:
    """:func:`_uid_state` of each image's SOPInstanceUID, ``"duplicated"`` for a usable one seen before."""
    states, seen = [], set()
    for ds in source_datasets:
        state = _uid_state(ds, "SOPInstanceUID")
        if state == "ok" and _uid(ds, "SOPInstanceUID") in seen:
            state = "duplicated"
        seen.add(_uid(ds, "SOPInstanceUID"))
        states.append(state)
    return states


#: The date and time attributes the SEG copies from its source, with the pydicom type that parses them.
_SOURCE_DATES = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


def _blank_type2(source_datasets: Sequence[Dataset]) -> tuple[str, ...]:
    """The Type 2 attributes the SEG copies that must be empty in its sources: absent ones, and dates
    or times no reader can parse (highdicom refuses them; e.g. ``PatientBirthDate`` 19700231)."""
    first = source_datasets[0]
    blank = [k for k in TYPE2_SOURCE_ATTRIBUTES if k not in first]
    for keyword, parse in _SOURCE_DATES.items():
        value = first.get(keyword)
        if keyword in first and value not in (None, ""):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # pydicom warns with the value
                    parse(str(value))
            except (ValueError, TypeError):
                blank.append(keyword)
    return tuple(blank)


def _with_type2(source_datasets: Sequence[Dataset], blank: Sequence[str], label: str | None) -> SegSources:
    """Copies of usable sources with the Type 2 attributes ``blank`` set empty (absent or unparseable)."""
    copies = tuple(copy.deepcopy(ds) for ds in source_datasets)
    for ds in copies:
        for keyword in blank:
            setattr(ds, keyword, "")
    logger.warning("DICOM-SEG source%s: %s absent or unreadable in the source headers, set empty (Type 2) in "
                   "in-memory copies; the files are unchanged", f" {label}" if label else "", ", ".join(blank))
    return SegSources(copies, None, tuple(blank))


def _series_uids(source_datasets: Sequence[Dataset], new_uid: Callable[..., str],
                 series_digest: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(value of each of SERIES_UID_ATTRIBUTES for the copies, those generated, reasons)."""
    values, generated, reasons = {}, [], []
    for keyword in SERIES_UID_ATTRIBUTES:
        states = [_uid_state(ds, keyword) for ds in source_datasets]
        usable = {_uid(ds, keyword) for ds, s in zip(source_datasets, states, strict=True) if s == "ok"}
        if len(usable) == 1:
            values[keyword] = usable.pop()
            if any(s != "ok" for s in states):
                reasons.append(f"{_count_states(states, keyword)} (the other images' value used)")
        else:
            values[keyword] = new_uid(keyword, series_digest)
            generated.append(keyword)
            reasons.append(_count_states(states, keyword))
    return values, generated, reasons


def prepare_seg_sources(source_datasets: Sequence[Dataset], *,
                        source_files: Sequence[str | os.PathLike[str]] | None = None,
                        source_array: np.ndarray | None = None, label: str | None = None) -> SegSources:
    """The source headers a valid SEG can reference: ``source_datasets`` themselves, or copies with
    generated UIDs where theirs are missing, empty, invalid or (SOP Instance UIDs) repeated.

    Args:
        source_datasets: the series' headers, slice k = ``source_datasets[k]`` (never modified).
        source_files: the file of each header (recorded by name relative to the series' folder).
        source_array: the (X, Y, Z) pixel values of the series (``DicomVolume.array``): with it the
            generated UIDs depend only on the series' content (the same in every run); without it
            they are random.
        label: what the warning log calls the series (e.g. ``"of case <id>"``).

    Raises:
        SegmentationRefusedError: :func:`seg_refusal` found something no generated UID repairs.
    """
    refusal = seg_refusal(source_datasets, None if source_array is None else np.shape(source_array))
    if refusal is not None:
        raise SegmentationRefusedError(f"no DICOM-SEG can be made: {refusal}")
    n = len(source_datasets)
    missing_type2 = _blank_type2(source_datasets)
    sop_states = _sop_states(source_datasets)
    if all(_uid_state(ds, k) == "ok" for ds in source_datasets for k in SERIES_UID_ATTRIBUTES) and all(
            s == "ok" for s in sop_states):
        return _with_type2(source_datasets, missing_type2, label) if missing_type2 else SegSources(tuple(source_datasets))

    pixels = None if source_array is None else np.asarray(source_array)
    digests = [_instance_digest(ds, None if pixels is None else pixels[:, :, k])
               for k, ds in enumerate(source_datasets)]
    series_digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    salt = "" if pixels is not None else os.urandom(16).hex()   # no pixels: not unique enough, so random

    def new_uid(*parts: str) -> str:
        return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, salt, *parts]))

    values, generated, reasons = _series_uids(source_datasets, new_uid, series_digest)
    if any(s != "ok" for s in sop_states):
        generated.append("SOPInstanceUID")
        reasons.append(_count_states(sop_states, "SOPInstanceUID"))
    names = _relative_names(source_files, n)
    copies, instances = [], []
    for k, (ds, state) in enumerate(zip(source_datasets, sop_states, strict=True)):
        item = copy.deepcopy(ds)
        sop = _uid(ds, "SOPInstanceUID") if state == "ok" else new_uid("SOPInstanceUID", digests[k], str(k))
        for keyword, value in [*values.items(), ("SOPInstanceUID", sop), *((t, "") for t in missing_type2)]:
            setattr(item, keyword, value)
        if getattr(item, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in item.file_meta:
            item.file_meta.MediaStorageSOPInstanceUID = sop
        copies.append(item)
        instances.append(SourceInstance(k, names[k], _instance_number(ds), sop, state != "ok"))
    record = GeneratedUids(reason="; ".join(reasons), study_instance_uid=values["StudyInstanceUID"],
                           series_instance_uid=values["SeriesInstanceUID"],
                           frame_of_reference_uid=values["FrameOfReferenceUID"], generated=tuple(generated),
                           instances=tuple(instances), filled_empty=missing_type2)
    logger.warning("DICOM-SEG source%s lacks usable UIDs (%s): the SEG references generated UIDs instead "
                   "(%s; %d of %d SOP Instance UIDs), applied to in-memory copies only (the files are "
                   "unchanged) and recorded with the SEG", f" {label}" if label else "", record.reason,
                   ", ".join(f"{k} {values[k]}" for k in SERIES_UID_ATTRIBUTES if k in generated) or "series UIDs kept",
                   sum(item.generated for item in instances), n)
    return SegSources(tuple(copies), record, missing_type2)


def seg_sidecar_path(seg_path: str | os.PathLike[str]) -> Path:
    """Where the JSON record of a SEG's generated UIDs (or of its refusal) lies: ``<name>.json``."""
    return Path(seg_path).with_suffix(".json")


def write_seg_sidecar(seg_path: str | os.PathLike[str], generated: GeneratedUids | None = None, *,
                      refused: str | None = None) -> Path:
    """Write the sidecar of ``seg_path`` atomically: the generated UIDs of a written SEG
    (``status: written``), or why no SEG was made (``refused``, ``status: refused``)."""
    if (generated is None) == (refused is None):
        raise ValueError("write_seg_sidecar needs either the generated UIDs or a refusal reason")
    if refused is not None:
        payload: dict[str, Any] = {"dicom_seg": None, "status": "refused", "reason": refused}
    else:
        payload = {"dicom_seg": Path(seg_path).name, "status": "written", **generated.to_dict()}
    target = seg_sidecar_path(seg_path)
    atomic_write_text(target, json.dumps(payload, indent=2) + "\n")
    return target


def read_seg_sidecar(seg_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``seg_path`` (see :func:`write_seg_sidecar`), or None when there is none."""
    path = seg_sidecar_path(seg_path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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
    """Refuse a source :func:`seg_refusal` refuses, then a label map off its grid or with unknown values."""
    refusal = seg_refusal(source_datasets)
    if refusal is not None:
        raise SegmentationRefusedError(f"no DICOM-SEG can be made: {refusal}")
    first = source_datasets[0]
    series = f"series {first.get('SeriesInstanceUID') or '?'} ({first.get('SeriesDescription', '')!r})"
    expected = (int(first.Columns), int(first.Rows), len(source_datasets))
    if labels.ndim != 3 or tuple(labels.shape) != expected:
        raise InvalidSegmentationInputError(
            f"label map of shape {tuple(labels.shape)} is not on the grid of {series}: expected "
            f"(Columns, Rows, slices) = {expected}")
    values = np.unique(labels)
    unknown = sorted(set(values.tolist()) - set(LABEL_VALUES))
    if unknown:
        raise InvalidSegmentationInputError(f"label map for {series} holds values {unknown}; "
                                            f"expected a subset of {list(LABEL_VALUES)}")


def build_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset], *, model: str | None = None,
                    series_number: int = DEFAULT_SERIES_NUMBER, series_description: str = "pancreas_seg segmentation",
                    series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
                    content_label: str = "PANCREAS",
                    source_files: Sequence[str | os.PathLike[str]] | None = None,
                    source_array: np.ndarray | None = None, label: str | None = None) -> hd.seg.Segmentation:
    """``labels`` as a BINARY DICOM SEG (a highdicom ``Segmentation``) referencing the source series.

    Source headers without usable UIDs are repaired on in-memory copies first
    (:func:`prepare_seg_sources`; call it yourself, and pass its ``datasets`` here, to keep the
    :class:`GeneratedUids` record, as :func:`write_dicom_seg` does).

    Args:
        labels: (X, Y, Z) = (Columns, Rows, slices) MSD label values {0, 1, 2} on the series grid.
        source_datasets: the series' headers sorted as read_series sorted them
            (``DicomVolume.datasets``: slice k of ``labels`` is ``source_datasets[k]``). Headers
            without pixel data are enough. They are never modified.
        model: the model that made the prediction, recorded in the algorithm identification.
        source_files, source_array, label: as in :func:`prepare_seg_sources` (used only when UIDs
            must be generated).

    Raises:
        SegmentationRefusedError: no valid SEG can reference this series (the message says why).
        InvalidSegmentationInputError: the label map does not fit the series.
    """
    labels = np.asarray(labels)
    _check_inputs(labels, source_datasets)
    sources = prepare_seg_sources(source_datasets, source_files=source_files, source_array=source_array,
                                  label=label)
    segmentation = hd.seg.Segmentation(
        source_images=list(sources.datasets),
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


def write_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset], path: str | os.PathLike[str], *,
                    source_files: Sequence[str | os.PathLike[str]] | None = None,
                    source_array: np.ndarray | None = None, label: str | None = None, **options: Any) -> Path:
    """:func:`build_dicom_seg` written to ``path`` (atomically); returns ``path``. ``options`` as there.

    When UIDs were generated for the source (see :func:`prepare_seg_sources`), they are also
    written, atomically, to the JSON sidecar :func:`seg_sidecar_path` (after the SEG).

    Raises:
        SegmentationRefusedError: no valid SEG can reference this series; nothing is written.
    """
    labels = np.asarray(labels)
    _check_inputs(labels, source_datasets)
    sources = prepare_seg_sources(source_datasets, source_files=source_files, source_array=source_array,
                                  label=label)
    segmentation = build_dicom_seg(labels, sources.datasets, **options)
    target = Path(path)
    with atomic_path(target) as tmp:
        segmentation.save_as(tmp)
    if sources.generated is not None:
        write_seg_sidecar(target, sources.generated)
    logger.info("Wrote DICOM SEG %s (%d frames) for series %s%s", target.name, int(segmentation.NumberOfFrames),
                sources.datasets[0].SeriesInstanceUID,
                f" (generated source UIDs in {seg_sidecar_path(target).name})" if sources.generated else "")
    return target
