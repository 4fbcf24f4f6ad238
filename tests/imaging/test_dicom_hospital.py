"""DICOM as hospitals export it (issue 24), built from a REAL CT with pydicom and compared with the plain series.

Data (``../shared/realdata`` next to the repository, or ``$PANCREAS_SEG_REALDATA``; read-only;
without it these tests are skipped locally and FAIL under ``CI=true``): ``ct_abdomen_3mm.nii.gz``,
one real abdominal CT volume (122 x 101 x 112 voxels, 3 mm), the example CT from the
TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence).

The CT is written as a plain single-frame series (:func:`dicom_builders.writer_for`), then as each
kind of export (:mod:`tests.imaging.dicom_builders`): UIDs empty or missing (also as JPEG 2000, the
anonymised Siemens case), pixel padding (signed, declared US; unsigned with a range), one Enhanced
CT multi-frame file (shared or per-frame groups, frames shuffled; and highdicom's Legacy Converted
Enhanced CT), a ``.zip`` and a DICOMDIR file-set. Each must read to exactly the plain series'
volume and affine, and give exactly its mask with a deterministic model (a 1x1 convolution with set
weights: pancreas where the windowed CT is above 70 HU) through the project's ``Predictor``. The
real ``dcm2niix`` is the reference for grouping and multi-frame geometry. Gantry tilt is refused
(pinned here). Unsafe archives are refused before extraction. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pancreas_seg.imaging.dicom_io import (
    AIR_HU,
    FALLBACK_GROUP_KEYS,
    GANTRY_TILT,
    NO_UID_PREFIX,
    UNGROUPED_FILE,
    UNSUPPORTED_IMAGE,
    ArchiveLimits,
    DicomVolume,
    InvalidSeriesError,
    UnsafeArchiveError,
    check_archive,
    dcm2niix_layout,
    padding_range,
    read_dicom_archive,
    read_dicom_folder,
    read_dicom_input,
    scan_folder,
)
from pancreas_seg.imaging.dicom_series_writer import write_ct_series
from pancreas_seg.inference.model_card import CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.models.io import weights_sha256
from pancreas_seg.pipelines.inference.nodes import find_scans
from tests.imaging.dicom_builders import (
    CT_NAME,
    dicomdir_from_series,
    enhanced_from_series,
    fov_corners,
    make_gantry_tilt,
    only_series,
    pad_series,
    reorient,
    run_dcm2niix_all,
    shuffled_names,
    strip_uids,
    write_small,
    writer_for,
    zip_folder,
)

PATIENT_ID = "PAT-SECRET-4711"            # must never appear in a log line or an error
PATIENT_NAME = "Synthetic^Patient"        # what dicom_series_writer writes as PatientName
PREPROCESSING = {"image_size_px": 64, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}


@pytest.fixture(scope="module", autouse=True)
def realdata(require_realdata) -> Path:
    """Every test here needs the real CT: skipped locally without it, failing in CI."""
    return require_realdata(CT_NAME)


@pytest.fixture(scope="module")
def write(ct) -> Callable[..., list[Path]]:
    """``write(folder, **options)``: the real CT as an LPS series, with the test's patient id."""
    plain_writer = writer_for(ct)

    def write_series(folder: Path, **options) -> list[Path]:
        return plain_writer(folder, **{"patient_id": PATIENT_ID, **options})

    return write_series


@pytest.fixture(scope="module")
def plain(write, tmp_path_factory) -> dict:
    """The plain series (shuffled file names, reversed InstanceNumbers) and the volume read from it."""
    folder = tmp_path_factory.mktemp("plain") / "series"
    names = shuffled_names(112, seed=24)
    paths = write(folder, description="abdomen plain", series_number=2, file_name=lambda k: names[k],
                  instance_number=lambda k: 112 - k)
    return {"folder": folder, "paths": paths, "volume": only_series(folder)}


@pytest.fixture(scope="module")
def air_corners(ct, tmp_path_factory) -> dict:
    """The plain series of the CT whose out-of-field corners are air: what padded series must read as."""
    stored, affine = reorient(*ct, "LPS")
    expected = stored.copy()
    expected[fov_corners(stored.shape[1], stored.shape[0]).T] = AIR_HU       # (rows, columns) -> (X, Y)
    folder = tmp_path_factory.mktemp("air") / "series"
    write_ct_series(expected, affine, folder, description="abdomen, corners air", patient_id=PATIENT_ID)
    return {"folder": folder, "volume": only_series(folder)}


def _threshold_model() -> keras.Model:
    """(B, H, W, 1) windowed CT in [0, 1] -> softmax (background, pancreas, tumour): pancreas iff
    x > 0.5, i.e. above 70 HU in the [-100, 240] window. Set weights: deterministic."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 1, activation="softmax")])
    model.layers[-1].set_weights([np.array([[[[-40.0, 40.0, 0.0]]]], dtype=np.float32),
                                  np.array([20.0, -20.0, -50.0], dtype=np.float32)])
    return model


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    model = _threshold_model()
    card = ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("case_001",), ("case_002",)), weights_sha256(model))
    return Predictor.from_models([model], [card], PredictionSettings(batch_size=16, flip_tta=False, xla=False))


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(plain: dict, folder: Path) -> list[Path]:
    shutil.copytree(plain["folder"], folder)
    return sorted(folder.iterdir())


# --------------------------------------------------------------------------------------------
# every export reads as the plain series, and gives its mask
# --------------------------------------------------------------------------------------------
def build_empty_uids(plain, write, tmp: Path) -> Path:
    strip_uids(_copy(plain, tmp / "export"), "empty")
    return tmp / "export"


def build_missing_uids(plain, write, tmp: Path) -> Path:
    strip_uids(_copy(plain, tmp / "export"), "missing")
    return tmp / "export"


def build_empty_uids_jpeg2000(plain, write, tmp: Path) -> Path:
    """The anonymised Siemens export of the issue: JPEG 2000 lossless, UIDs present but empty."""
    strip_uids(write(tmp / "export", description="abdomen plain", series_number=2,
                     transfer_syntax=JPEG2000Lossless), "empty")
    return tmp / "export"


def build_padding_signed_declared_us(plain, write, tmp: Path) -> Path:
    """Signed pixels; corners stored as -2000 (-3024 HU); PixelPaddingValue written as US 63536."""
    pad_series(_copy(plain, tmp / "export"), -2000, "US")
    return tmp / "export"


def build_padding_range_unsigned(plain, write, tmp: Path) -> Path:
    """Unsigned pixels (intercept -2048); corners stored 63536..63546 (above 61000 HU if read as
    tissue), declared by PixelPaddingValue + PixelPaddingRangeLimit."""
    pad_series(_copy(plain, tmp / "export"), 63536, "US", limit=63546, unsigned_intercept=-2048)
    return tmp / "export"


def build_enhanced_shared_groups(plain, write, tmp: Path) -> Path:
    order = np.random.default_rng(5).permutation(len(plain["paths"]))
    by_position = sorted(plain["paths"], key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    return enhanced_from_series(by_position, tmp / "export" / "enhanced_ct.dcm", frame_order=order)


def build_enhanced_per_frame_jpeg2000(plain, write, tmp: Path) -> Path:
    """Orientation and rescale in every frame's groups (intercepts differ per frame), JPEG 2000."""
    folder = tmp / "source"
    paths = write(folder, description="abdomen plain", series_number=2,
                  rescale=lambda k: (1.0, -1024.0 if k % 2 else -1000.0))
    order = np.random.default_rng(6).permutation(len(paths))
    return enhanced_from_series(paths, tmp / "export" / "enhanced_ct.dcm", orientation_per_frame=True,
                                rescale_per_frame=True, frame_order=order, transfer_syntax=JPEG2000Lossless)


def build_legacy_enhanced_highdicom(plain, write, tmp: Path) -> Path:
    """highdicom's own Legacy Converted Enhanced CT of the plain series (another implementation)."""
    import highdicom as hd  # noqa: PLC0415

    image = hd.legacy.LegacyConvertedEnhancedCTImage([pydicom.dcmread(p) for p in plain["paths"]],
                                                     generate_uid(), 2, generate_uid(), 1)
    (tmp / "export").mkdir()
    image.save_as(tmp / "export" / "legacy_enhanced.dcm")
    return tmp / "export" / "legacy_enhanced.dcm"


def build_zip(plain, write, tmp: Path) -> Path:
    """The series under ``export/CT/`` with macOS junk beside it, deflated."""
    return zip_folder(plain["folder"], tmp / "series.zip", prefix="export/CT/",
                      extra={"__MACOSX/export/CT/._x.dcm": b"\x00\x05\x16\x07", "export/README.txt": b"export\n"})


def build_zip_of_anonymised_jpeg2000(plain, write, tmp: Path) -> Path:
    return zip_folder(build_empty_uids_jpeg2000(plain, write, tmp), tmp / "anonymised.zip")


def build_dicomdir(plain, write, tmp: Path) -> Path:
    return dicomdir_from_series(plain["paths"], tmp / "fileset")


#: name -> (builder, compared with: "plain" or "air_corners", what the variant must also show)
VARIANTS = {
    "empty_uids": (build_empty_uids, "plain", "no_uid"),
    "missing_uids": (build_missing_uids, "plain", "no_uid"),
    "empty_uids_jpeg2000": (build_empty_uids_jpeg2000, "plain", "no_uid"),
    "padding_signed_declared_us": (build_padding_signed_declared_us, "air_corners", "padding"),
    "padding_range_unsigned": (build_padding_range_unsigned, "air_corners", "padding"),
    "enhanced_shared_groups": (build_enhanced_shared_groups, "plain", "frames"),
    "enhanced_per_frame_jpeg2000": (build_enhanced_per_frame_jpeg2000, "plain", "frames"),
    "legacy_enhanced_highdicom": (build_legacy_enhanced_highdicom, "plain", "frames"),
    "zip": (build_zip, "plain", "zip"),
    "zip_of_anonymised_jpeg2000": (build_zip_of_anonymised_jpeg2000, "plain", "no_uid"),
    "dicomdir": (build_dicomdir, "plain", "dicomdir"),
}


@pytest.fixture(scope="module")
def plain_masks(plain, air_corners, predictor) -> dict[str, np.ndarray]:
    masks = {name: predictor.segment(case["volume"].array, case["volume"].affine, name)
             for name, case in (("plain", plain), ("air_corners", air_corners))}
    for labels in masks.values():
        assert 0 < np.count_nonzero(labels) < labels.size // 4      # a real, partial mask: comparable
    return masks


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_export_reads_as_the_plain_series_and_gives_the_same_mask(
        name: str, plain, air_corners, write, predictor, plain_masks, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    build, reference_name, kind = VARIANTS[name]
    reference: DicomVolume = {"plain": plain, "air_corners": air_corners}[reference_name]["volume"]
    source = build(plain, write, tmp_path)
    before = _digests(tmp_path)
    with caplog.at_level(logging.INFO, logger="pancreas_seg"):
        volumes, problems = read_dicom_input(source)
    assert problems == [] and len(volumes) == 1, problems
    uid, volume = volumes[0]

    assert volume.array.dtype == reference.array.dtype == np.int16
    assert np.array_equal(volume.array, reference.array)
    assert np.array_equal(volume.affine, reference.affine)           # the same DS strings: exact
    labels = predictor.segment(volume.array, volume.affine, name)
    assert np.array_equal(labels, plain_masks[reference_name])
    assert _digests(tmp_path) == before                              # the input is never modified

    text = caplog.text
    assert PATIENT_ID not in text and PATIENT_NAME not in text
    if kind == "no_uid":
        assert uid.startswith(f"{NO_UID_PREFIX}-2-") and uid == volume.series_uid
        assert {"SeriesNumber", "Rows", "Columns", "ImageOrientationPatient"} <= set(volume.grouped_by)
        assert "StudyInstanceUID" not in volume.grouped_by                   # empty: not a key used
        assert "have no SeriesInstanceUID" in text and "SeriesNumber" in text
    else:
        assert volume.grouped_by == () and "have no SeriesInstanceUID" not in text
    if kind == "padding":
        n_corners = int(fov_corners(*reference.array.shape[1::-1]).sum()) * reference.array.shape[2]
        assert volume.n_padding_voxels == n_corners
    if kind == "frames":
        assert len(set(volume.files)) == 1 and sorted(volume.frames) == list(range(112))
    if kind == "zip":
        assert all(str(f).startswith(str(source / "export" / "CT")) for f in volume.files)
        assert volume.folder == str(source / "export" / "CT")
        assert read_dicom_archive(source).array.tobytes() == reference.array.tobytes()
    if kind == "dicomdir":
        assert all(str(f).startswith(str(source.parent / "PT000000")) for f in volume.files)


# --------------------------------------------------------------------------------------------
# grouping without UIDs
# --------------------------------------------------------------------------------------------
def _non_image_without_series(path: Path) -> Path:
    """A structured-report-like DICOM file without SeriesInstanceUID and without an image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.save_as(path, enforce_file_format=True)
    return path


def test_anonymised_series_beside_a_conformant_one_are_grouped_as_dcm2niix_groups_them(
        ct, write, plain, tmp_path: Path, dcm2niix_bin: str, caplog: pytest.LogCaptureFixture) -> None:
    """The issue's case: 20 anonymised JPEG 2000 files beside a conformant series were dropped with
    a count. Now: the conformant series, two anonymised ones (SeriesNumber 3 and 4, the second a
    crop), each read; a non-image DICOM without series is named in the log and the skip report."""
    root = tmp_path / "export"
    shutil.copytree(plain["folder"], root / "conformant")
    stored, affine = reorient(*ct, "LPS")
    twenty = write(root / "anon", description="abdomen j2k", series_number=3, transfer_syntax=JPEG2000Lossless,
                   file_name=lambda k: f"IMG{k:05d}")[40:60]
    for path in sorted((root / "anon").iterdir()):
        if path not in twenty:
            path.unlink()
    crop = write_ct_series(stored[10:90, 5:95, 20:50], affine @ np.array(
        [[1, 0, 0, 10], [0, 1, 0, 5], [0, 0, 1, 20], [0, 0, 0, 1]]), root / "anon",
        description="abdomen crop", series_number=4, file_name=lambda k: f"CROP{k:05d}", patient_id=PATIENT_ID)
    strip_uids([*twenty, *crop], "empty")
    _non_image_without_series(root / "anon" / "REPORT0001")

    scan = scan_folder(root)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pancreas_seg"):
        volumes, problems = read_dicom_folder(root, on_invalid="fail")     # the report file does not fail it
    assert [(len(s), s.series_uid.startswith(NO_UID_PREFIX)) for s in scan.series] == [
        (20, True), (30, True), (112, False)]
    assert scan.n_grouped_without_uid == 50 and scan.n_without_series == 1
    assert [Path(f).name for f, _ in scan.ungrouped] == ["REPORT0001"]
    assert problems == [] and [v.array.shape for _, v in volumes] == [(122, 101, 20), (80, 90, 30), (122, 101, 112)]
    assert np.array_equal(volumes[0][1].array, plain["volume"].array[:, :, 40:60])
    assert np.array_equal(volumes[1][1].array, stored[10:90, 5:95, 20:50])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    grouped = [w for w in warnings if "have no SeriesInstanceUID" in w]
    assert len(grouped) == 2 and all("SeriesNumber" in w and "ImageOrientationPatient" in w for w in grouped)
    assert any("REPORT0001" in w and "no SeriesInstanceUID and no image" in w for w in warnings)
    assert PATIENT_ID not in caplog.text and PATIENT_NAME not in caplog.text

    _, skipped = read_dicom_folder(root, on_invalid="skip")
    assert [(p.kind, p.series_uid) for p in skipped] == [(UNGROUPED_FILE, "")]
    assert "REPORT0001 was not read" in str(skipped[0]) and str(root / "anon") in str(skipped[0])

    # dcm2niix groups the same folder into the same three series, with the same voxels.
    converted = run_dcm2niix_all(dcm2niix_bin, root, tmp_path / "dcm2niix")
    theirs = sorted((np.asanyarray(image.dataobj) for image in converted), key=lambda a: a.shape[2])
    ours = sorted((dcm2niix_layout(v.array, v.affine)[0] for _, v in volumes), key=lambda a: a.shape[2])
    assert len(theirs) == 3
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.array_equal(mine, reference)


def test_series_without_uids_are_split_by_orientation_and_ids_are_stable(plain, tmp_path: Path) -> None:
    first = _copy(plain, tmp_path / "a")
    strip_uids(first, "missing")
    for path in first[:5]:       # five files re-labelled as another orientation: another group
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(path)
    series = scan_folder(tmp_path / "a").series
    assert sorted(len(s) for s in series) == [5, 107]
    assert len({s.series_uid for s in series}) == 2
    assert [s.series_uid for s in scan_folder(tmp_path / "a").series] == [s.series_uid for s in series]


# --------------------------------------------------------------------------------------------
# padding, multi-frame details
# --------------------------------------------------------------------------------------------
def test_padding_range_reads_the_value_in_the_pixels_signedness() -> None:
    def header(**attributes) -> Dataset:
        ds = Dataset()
        ds.BitsAllocated = 16
        for key, value in attributes.items():
            setattr(ds, key, value)
        return ds

    assert padding_range(header(PixelRepresentation=1)) is None
    assert padding_range(header(PixelRepresentation=1, PixelPaddingValue=63536)) == (-2000, -2000)   # US in signed
    assert padding_range(header(PixelRepresentation=0, PixelPaddingValue=-2000)) == (63536, 63536)   # SS in unsigned
    assert padding_range(header(PixelRepresentation=1, PixelPaddingValue=-2000,
                                PixelPaddingRangeLimit=-3000)) == (-3000, -2000)
    assert padding_range(header(PixelRepresentation=1, PixelPaddingValue=b"\x30\xf8")) == (-2000, -2000)


def test_enhanced_ct_in_frame_order_matches_dcm2niix(plain, tmp_path: Path, dcm2niix_bin: str) -> None:
    by_position = sorted(plain["paths"], key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    enhanced = enhanced_from_series(by_position, tmp_path / "export" / "ct.dcm")
    volume = only_series(tmp_path / "export")
    converted = run_dcm2niix_all(dcm2niix_bin, tmp_path / "export", tmp_path / "dcm2niix")
    assert len(converted) == 1 and enhanced.is_file()
    array, affine = dcm2niix_layout(volume.array, volume.affine)
    assert np.array_equal(np.asanyarray(converted[0].dataobj), array)
    np.testing.assert_allclose(converted[0].affine, affine, rtol=0, atol=1e-2)


def test_bad_multi_frame_files_are_named_with_the_problem(plain, tmp_path: Path) -> None:
    bad = enhanced_from_series(plain["paths"][:10], tmp_path / "export" / "short_groups.dcm")
    ds = pydicom.dcmread(bad)
    del ds.PerFrameFunctionalGroupsSequence[9]
    ds.save_as(bad)
    scan = scan_folder(tmp_path / "export")
    assert scan.series == [] and len(scan.unreadable) == 1
    file, reason = scan.unreadable[0]
    assert file == str(bad) and "9 item(s) for NumberOfFrames 10" in reason
    with pytest.raises(FileNotFoundError, match=r"short_groups\.dcm: enhanced multi-frame image"):
        read_dicom_input(tmp_path / "export")

    # Multi-frame without functional groups (no per-frame geometry): refused, naming the file.
    no_groups = pydicom.dcmread(plain["paths"][0])
    no_groups.NumberOfFrames = 2
    no_groups.PixelData = no_groups.PixelData * 2
    (tmp_path / "other").mkdir()
    no_groups.save_as(tmp_path / "other" / "two_frames.dcm")
    with pytest.raises(InvalidSeriesError) as caught:
        read_dicom_input(tmp_path / "other")
    assert [p.kind for p in caught.value.problems][-1] == UNSUPPORTED_IMAGE
    assert "without per-frame functional groups are not supported: two_frames.dcm" in str(caught.value)


# --------------------------------------------------------------------------------------------
# archives and DICOMDIR: what is refused
# --------------------------------------------------------------------------------------------
def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return path


def _lying_zip(path: Path, plain) -> Path:
    """A zip whose central directory declares 100 bytes for a member that inflates to a full slice."""
    data = plain["paths"][0].read_bytes()
    _zip(path, {"slice.dcm": data})
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 100)     # uncompressed size in the central directory
    path.write_bytes(bytes(raw))
    assert zipfile.ZipFile(path).infolist()[0].file_size == 100
    return path


def _symlink_zip(path: Path) -> Path:
    info = zipfile.ZipInfo("export/link.dcm")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr(info, "/etc/passwd")
    return path


UNSAFE_ARCHIVES = {
    # name: (build(tmp, plain) -> archive, limits, words of the error)
    "path_traversal": (lambda tmp, plain: _zip(tmp / "a.zip", {"export/../../evil.dcm": b"x"}), ArchiveLimits(),
                       ["'export/../../evil.dcm'", "path traversal", "nothing was extracted"]),
    "absolute_path": (lambda tmp, plain: _zip(tmp / "a.zip", {"/tmp/evil.dcm": b"x"}), ArchiveLimits(),
                      ["'/tmp/evil.dcm'", "absolute or '..' path"]),
    "too_many_members": (lambda tmp, plain: _zip(tmp / "a.zip", {f"f{k}": b"" for k in range(30)}),
                         ArchiveLimits(max_members=20), ["30 members, more than the limit of 20"]),
    "too_big_declared": (lambda tmp, plain: zip_folder(plain["folder"], tmp / "a.zip"),
                         ArchiveLimits(max_uncompressed_bytes=1_000_000),
                         ["bytes uncompressed, more than the limit of 1000000 bytes", "nothing was extracted"]),
    "inflates_past_declared_size": (lambda tmp, plain: _lying_zip(tmp / "a.zip", plain), ArchiveLimits(),
                                    ["'slice.dcm' cannot be extracted"]),
    "symbolic_link": (lambda tmp, plain: _symlink_zip(tmp / "a.zip"), ArchiveLimits(), ["is a symbolic link"]),
    "not_a_zip": (lambda tmp, plain: (tmp / "a.zip").write_bytes(b"PK\x03\x04 not really") and tmp / "a.zip",
                  ArchiveLimits(), ["not a readable zip file"]),
}


@pytest.mark.parametrize("name", list(UNSAFE_ARCHIVES))
def test_unsafe_archives_are_refused_naming_the_archive(name: str, plain, tmp_path: Path) -> None:
    build, limits, words = UNSAFE_ARCHIVES[name]
    (tmp_path / "in").mkdir()
    archive = build(tmp_path / "in", plain)
    before = _digests(tmp_path)
    with pytest.raises(UnsafeArchiveError) as caught:
        read_dicom_archive(archive, limits=limits)
    message = str(caught.value)
    for expected in [str(archive), *words]:
        assert expected in message, (expected, message)
    assert _digests(tmp_path) == before                    # nothing extracted next to it, archive intact
    assert not Path("/tmp/evil.dcm").exists()


def test_a_zip_bomb_is_refused_from_its_directory_before_inflating(tmp_path: Path) -> None:
    """64 MiB of zeros deflate to ~64 KiB: refused from the central directory, without inflating."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        with handle.open("zeros.dcm", "w", force_zip64=True) as member:
            for _ in range(64):
                member.write(bytes(1024 * 1024))
    assert archive.stat().st_size < 1024 * 1024
    with pytest.raises(UnsafeArchiveError, match="67108864 bytes uncompressed, more than the limit of 33554432"):
        check_archive(archive, ArchiveLimits(max_uncompressed_bytes=32 * 1024 * 1024))


def test_an_archive_must_hold_exactly_one_series(ct, plain, write, tmp_path: Path) -> None:
    write(tmp_path / "two" / "second", description="abdomen again", series_number=5)
    shutil.copytree(plain["folder"], tmp_path / "two" / "first")
    archive = zip_folder(tmp_path / "two", tmp_path / "two.zip")
    with pytest.raises(ValueError, match=r"two\.zip: expected one CT series, found 2: .*'abdomen plain'.*'abdomen again'"):
        read_dicom_archive(archive)
    volumes, _ = read_dicom_input(archive)
    assert len(volumes) == 2
    empty = _zip(tmp_path / "empty.zip", {"notes.txt": b"hello"})
    with pytest.raises(FileNotFoundError, match=r"no DICOM series in .*empty\.zip \(1 file\(s\): 1 not DICOM"):
        read_dicom_archive(empty)
    # A bad series in a zip is named by its member folder in the archive, not the temporary folder.
    write_small(ct, tmp_path / "mixed" / "mr", "not CT", modality="MR")
    write_small(ct, tmp_path / "mixed" / "ct", "the CT")
    mixed = zip_folder(tmp_path / "mixed", tmp_path / "mixed.zip")
    with pytest.raises(InvalidSeriesError) as caught:
        read_dicom_archive(mixed)
    assert f"in {mixed}/export/mr: Modality is MR" in str(caught.value)
    assert "pancreas_seg_dicom_zip_" not in str(caught.value)
    assert read_dicom_archive(mixed, on_invalid="skip").description == "the CT"


def test_dicomdir_with_a_missing_file_and_a_folder_holding_a_dicomdir(plain, tmp_path: Path) -> None:
    dicomdir = dicomdir_from_series(plain["paths"], tmp_path / "fileset")
    folder_volumes, folder_problems = read_dicom_input(tmp_path / "fileset", on_invalid="skip")
    assert [v.array.shape for _, v in folder_volumes] == [(122, 101, 112)] and folder_problems == []
    assert [Path(f).name for f, _ in scan_folder(tmp_path / "fileset").ungrouped] == ["DICOMDIR"]

    missing = sorted((tmp_path / "fileset").rglob("IM*"))[50]
    missing.unlink()
    with pytest.raises(InvalidSeriesError, match="missing slice"):
        read_dicom_input(dicomdir)
    from pancreas_seg.imaging.dicom_io import scan_dicomdir  # noqa: PLC0415

    scan = scan_dicomdir(dicomdir)
    assert [(file, "referenced by DICOMDIR" in reason and "but missing" in reason)
            for file, reason in scan.unreadable] == [(str(missing.resolve()), True)]


# --------------------------------------------------------------------------------------------
# gantry tilt: refused (pinned), with a message that says what to do
# --------------------------------------------------------------------------------------------
def test_gantry_tilt_is_refused_not_resampled(plain, tmp_path: Path, dcm2niix_bin: str) -> None:
    paths = _copy(plain, tmp_path / "tilted")
    make_gantry_tilt(sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])),
                     shift_mm=3.0 * np.tan(np.radians(15.0)), tilt_deg=15.0)
    with pytest.raises(InvalidSeriesError) as caught:
        read_dicom_input(tmp_path / "tilted")
    assert [p.kind for p in caught.value.problems] == [GANTRY_TILT]
    for expected in ["stacked at 15.00 degrees to the slice normal", "GantryDetectorTilt 15",
                     "a sheared grid is not supported", "resample it first, e.g. with dcm2niix"]:
        assert expected in str(caught.value), expected
    volumes, problems = read_dicom_input(tmp_path / "tilted", on_invalid="skip")
    assert volumes == [] and [p.kind for p in problems] == [GANTRY_TILT]
    # What the message points to: dcm2niix writes a tilt-corrected copy (..._Tilt_1.nii).
    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run([dcm2niix_bin, "-z", "n", "-b", "n", "-f", "tilted", "-o", str(out), str(tmp_path / "tilted")],
                   capture_output=True, text=True, timeout=120, check=True)
    assert sorted(p.name for p in out.glob("*.nii")) == ["tilted.nii", "tilted_Tilt_1.nii"]
    assert nib.load(out / "tilted_Tilt_1.nii").shape[2] == 112


# --------------------------------------------------------------------------------------------
# the inference pipeline finds these inputs
# --------------------------------------------------------------------------------------------
def test_inference_finds_zip_dicomdir_and_anonymised_inputs(plain, write, tmp_path: Path) -> None:
    base = {"on_invalid": "skip", "output_format": "nifti"}
    archive = build_zip(plain, write, tmp_path)
    dicomdir = build_dicomdir(plain, write, tmp_path)
    anonymised = build_empty_uids(plain, write, tmp_path)
    _non_image_without_series(anonymised / "REPORT0001")
    for source in (archive, dicomdir, anonymised):
        scans, skipped = find_scans({**base, "input_path": str(source),
                                     "dicom_archive": {"max_uncompressed_mb": 64, "max_members": 200}})
        assert len(scans) == 1, source
        (case_id, scan), = scans.items()
        assert scan.is_dicom and scan.description == "abdomen plain"
        assert np.array_equal(scan.load().array, plain["volume"].array)
        if source == anonymised:
            assert case_id.startswith(f"{NO_UID_PREFIX}-2-")
            assert [(row["kind"], "REPORT0001" in row["reason"]) for row in skipped] == [(UNGROUPED_FILE, True)]
        else:
            assert case_id == plain["volume"].series_uid and skipped == []
    with pytest.raises(UnsafeArchiveError, match="more than the limit of 1048576 bytes"):
        find_scans({**base, "input_path": str(archive), "dicom_archive": {"max_uncompressed_mb": 1}})


def test_fallback_keys_are_series_level_attributes() -> None:
    """The grouping keys are constant within a series (never per-slice ones such as
    InstanceNumber, AcquisitionTime or ImagePositionPatient, which would split a series)."""
    assert "SeriesNumber" in FALLBACK_GROUP_KEYS and "SeriesInstanceUID" not in FALLBACK_GROUP_KEYS
    assert not {"InstanceNumber", "AcquisitionTime", "AcquisitionNumber", "ImagePositionPatient",
                "SOPInstanceUID", "ContentTime"} & set(FALLBACK_GROUP_KEYS)
