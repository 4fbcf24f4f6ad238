"""DICOM CT input and DICOM-SEG output, on DICOM series written from a REAL CT.

Data (``../shared/realdata`` next to the repository, or ``$PANCREAS_SEG_REALDATA``; read-only;
without it these tests are skipped locally and FAIL under ``CI=true``, see ``tests/conftest.py``):

* ``ct_abdomen_3mm.nii.gz``: one real abdominal CT volume, 122 x 101 x 112 voxels, 3.0 mm
  isotropic, RAS, int32 Hounsfield units. It is the example CT from the TotalSegmentator
  repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence).
* ``ct_abdomen_3mm_pancreas.nii.gz``: a binary pancreas mask on the same grid, derived from
  TotalSegmentator's own prediction for that CT (label 7 = pancreas). A model's output, not a
  radiologist's annotation: used here for geometry and plumbing only.

The CT is written as DICOM series with pydicom (:mod:`pancreas_seg.imaging.dicom_series_writer`,
which computes the DICOM geometry from the affine on its own) in several orientations and transfer
syntaxes, then read back with :mod:`pancreas_seg.imaging.dicom_io`. Where the ``dcm2niix`` wheel
is installed (the ``test`` extra), the real ``dcm2niix`` binary converts the same series and its
NIfTI is the geometry reference; without it those checks skip locally and FAIL under ``CI=true``.
Bad series are made by editing written files with pydicom. Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

from pancreas_seg import __version__
from pancreas_seg.imaging.dicom_io import (
    DUPLICATE_POSITIONS,
    GANTRY_TILT,
    LOCALIZER,
    MISALIGNED_SLICES,
    MISSING_ATTRIBUTE,
    MISSING_SLICES,
    MIXED_MATRIX,
    MIXED_ORIENTATION,
    MIXED_PIXEL_SPACING,
    NO_DECODER,
    NON_UNIFORM_SPACING,
    NOT_CT,
    TOO_FEW_SLICES,
    UNREADABLE_PIXELS,
    DicomVolume,
    InvalidSeriesError,
    dcm2niix_layout,
    find_series,
    read_dicom_folder,
    read_series,
    scan_folder,
)
from pancreas_seg.imaging.dicom_seg import (
    InvalidSegmentationInputError,
    SegmentationRefusedError,
    build_dicom_seg,
    labels_from_segments,
    prepare_seg_sources,
    read_seg_sidecar,
    seg_sidecar_path,
    write_dicom_seg,
)
from pancreas_seg.imaging.dicom_series_writer import write_ct_series
from pancreas_seg.imaging.geometry import axial_view
from pancreas_seg.imaging.nifti_io import NiftiVolume, load_nifti, save_nifti
from tests.imaging.dicom_builders import (
    ANONYMISED_UIDS,
    CT_NAME,
    MASK_NAME,
    N_SMALL,
    edit,
    make_gantry_tilt,
    only_series,
    reorient,
    rotated,
    run_dcm2niix,
    shuffled_names,
    strip_uids,
    write_small,
)

AFFINE_ATOL_MM = 1e-4
#: dcm2niix does its geometry in float32 and takes the slice spacing from two of the slices: on the
#: 112-slice oblique stack its affine is off by up to ~2e-3 mm (origin placed from the far end).
DCM2NIIX_ATOL_MM = 1e-2


@pytest.fixture(scope="module", autouse=True)
def realdata(require_realdata) -> Path:
    """The real-data folder. Every test here needs it: skipped locally without it, failing in CI."""
    return require_realdata(CT_NAME, MASK_NAME)


# The fixtures ct, mask and dcm2niix_bin are in tests/imaging/conftest.py; the helpers (reorient,
# rotated, shuffled_names, run_dcm2niix, only_series, edit, write_small) in dicom_builders.py.


# --------------------------------------------------------------------------------------------
# geometry: orientations, file order, compared with the NIfTI and with dcm2niix
# --------------------------------------------------------------------------------------------
#: name -> (how the NIfTI is re-stored before writing it as DICOM, and what the reader must return)
ORIENTATIONS = {
    "ras": "as the NIfTI is: row cosine (-1,0,0), column cosine (0,-1,0) in LPS",
    "lps": "the usual axial DICOM: IOP (1,0,0,0,1,0)",
    "reversed_slices": "RAI: slices stored head to feet (slice axis against the normal)",
    "coronal": "LIP: coronal slices, rows head to feet, slices going posterior",
    "sagittal": "PIR: sagittal slices",
    "oblique": "RAS rotated 20 degrees about x and 10 about z",
}


def variant(ct: tuple[np.ndarray, np.ndarray], name: str):
    """(array, affine) written as DICOM, and the (array, affine) the reader must return."""
    hu, affine = ct
    if name == "ras":
        return (hu, affine), (hu, affine)
    if name == "reversed_slices":
        # The same slices stored in the opposite order: the reader sorts along the normal, so it
        # returns the RAS original (as dcm2niix does).
        return reorient(hu, affine, "RAI"), (hu, affine)
    if name == "oblique":
        return (hu, rotated(affine, 20.0, 10.0)), (hu, rotated(affine, 20.0, 10.0))
    stored = reorient(hu, affine, {"lps": "LPS", "coronal": "LIP", "sagittal": "PIR"}[name])
    return stored, stored


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_series_reads_back_as_the_nifti_and_as_dcm2niix_converts_it(
        ct, name: str, tmp_path: Path, dcm2niix_bin: str) -> None:
    (stored, stored_affine), (expected, expected_affine) = variant(ct, name)
    n = stored.shape[2]
    names = shuffled_names(n, seed=len(name))
    folder = tmp_path / "series"
    # File names shuffled and InstanceNumber reversed: neither may influence the order.
    write_ct_series(stored, stored_affine, folder, description=f"real CT {name}",
                    file_name=lambda k: names[k], instance_number=lambda k: n - k)
    volume = only_series(folder)

    assert isinstance(volume, NiftiVolume) and volume.header is None
    assert volume.array.dtype == np.int16
    assert volume.array.shape == expected.shape
    assert np.array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.affine, expected_affine, rtol=0, atol=AFFINE_ATOL_MM)
    assert volume.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    # The same axial slices as the original RAS NIfTI gives, whatever the storage order (what
    # preprocessing sees; the oblique one is 20 degrees off, still closest to the same axes).
    assert np.array_equal(axial_view(volume.array, volume.affine), axial_view(*ct))
    # Headers sorted along the slice normal: z index k <-> datasets[k] <-> files[k].
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in volume.datasets])
    ras_origin_k = (volume.affine @ np.c_[np.zeros((n, 2)), np.arange(n), np.ones(n)].T).T[:, :3]
    np.testing.assert_allclose(positions * [-1, -1, 1], ras_origin_k, rtol=0, atol=AFFINE_ATOL_MM)
    assert [f.name for f in volume.files] == [Path(ds.filename).name for ds in volume.datasets]

    # The real dcm2niix on the same files: the same voxels, with its row flip (dcm2niix_layout).
    converted = run_dcm2niix(dcm2niix_bin, folder, tmp_path / "dcm2niix")
    reference = np.asanyarray(converted.dataobj)
    layout_array, layout_affine = dcm2niix_layout(volume.array, volume.affine)
    assert reference.shape == layout_array.shape
    assert np.array_equal(reference, layout_array)
    np.testing.assert_allclose(converted.affine, layout_affine, rtol=0, atol=DCM2NIIX_ATOL_MM)
    ours, theirs = (nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine)),
                    nib.as_closest_canonical(converted))
    assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine, rtol=0, atol=DCM2NIIX_ATOL_MM)


CODECS = {
    # name: (transfer syntax, rescale of slice k, dtype the reader returns)
    "uncompressed_per_slice_intercept": (pydicom.uid.ExplicitVRLittleEndian,
                                         lambda k: (1.0, -1024.0 if k % 2 else -1000.0), np.int16),
    "jpeg2000_lossless": (JPEG2000Lossless, lambda k: (1.0, -1024.0), np.int16),
    "jpegls_lossless_fractional_slope": (JPEGLSLossless, lambda k: (0.5, -1024.0), np.float32),
}


@pytest.mark.parametrize("codec", list(CODECS))
def test_transfer_syntaxes_and_rescale_give_the_exact_hu(ct, codec: str, tmp_path: Path,
                                                         dcm2niix_bin: str) -> None:
    transfer_syntax, rescale, dtype = CODECS[codec]
    stored, affine = reorient(*ct, "LPS")
    folder = tmp_path / "series"
    write_ct_series(stored, affine, folder, transfer_syntax=transfer_syntax, rescale=rescale)
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            for p in folder.iterdir()} == {transfer_syntax}
    volume = only_series(folder)
    assert volume.transfer_syntax == transfer_syntax
    assert volume.array.dtype == dtype
    assert np.array_equal(volume.array, stored)      # exact, through each slice's own rescale
    np.testing.assert_allclose(volume.affine, affine, rtol=0, atol=AFFINE_ATOL_MM)
    converted = run_dcm2niix(dcm2niix_bin, folder, tmp_path / "dcm2niix")
    assert np.array_equal(np.asanyarray(converted.dataobj), dcm2niix_layout(volume.array, volume.affine)[0])


def test_the_volume_feeds_the_nifti_code_path(ct, tmp_path: Path) -> None:
    """What inference does with a load: save a mask with the volume's affine, read it back."""
    stored, affine = reorient(*ct, "LPS")
    write_ct_series(stored, affine, tmp_path / "series")
    volume = only_series(tmp_path / "series")
    save_nifti(tmp_path / "mask.nii.gz", (volume.array > 0).astype(np.uint8), volume.affine, volume.header)
    again = load_nifti(tmp_path / "mask.nii.gz")
    assert again.array.shape == stored.shape and again.orientation == volume.orientation == "LPS"
    np.testing.assert_allclose(again.affine, affine, rtol=0, atol=AFFINE_ATOL_MM)


# --------------------------------------------------------------------------------------------
# finding series
# --------------------------------------------------------------------------------------------
def test_two_series_in_one_folder_are_grouped_apart_and_junk_is_skipped(ct, tmp_path: Path) -> None:
    hu, affine = ct
    root = tmp_path / "patient"
    first = write_ct_series(hu, affine, root, description="abdomen RAS", series_number=2,
                            file_name=lambda k: f"a_{k:04d}.dcm")
    small, small_affine = reorient(hu[:, :, 40:52], affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 40], [0, 0, 0, 1]]), "LPS")
    write_ct_series(small, small_affine, root / "sub" / "deeper", description="abdomen crop LPS",
                    series_number=3, file_name=lambda k: f"b_{k:04d}.dcm")
    # Junk: a macOS resource file (real DICOM bytes), a text file, DICOM in no series and without
    # an image, and a file cut inside its header (pydicom reads what is there: no SeriesInstanceUID
    # left). An IMAGE without a SeriesInstanceUID is grouped by other keys: test_dicom_hospital.py.
    shutil.copy(first[0], root / "._a_0000.dcm")
    (root / "notes.txt").write_text("not DICOM\n")
    no_series = pydicom.dcmread(first[1])
    for keyword in ("SeriesInstanceUID", "PixelData", "Rows", "Columns"):
        delattr(no_series, keyword)
    no_series.save_as(root / "no_series.dcm")
    (root / "truncated.dcm").write_bytes(first[2].read_bytes()[:300])

    scan = scan_folder(root)
    assert [s.description for s in scan.series] == ["abdomen RAS", "abdomen crop LPS"]
    assert [len(s) for s in scan.series] == [112, 12]
    assert scan.series[1].folder == root / "sub" / "deeper"
    assert scan.n_files == 112 + 12 + 4
    assert scan.n_resource_forks == 1 and scan.n_not_dicom == 1 and scan.n_without_series == 2
    assert scan.unreadable == ()
    assert [Path(file).name for file, _ in scan.ungrouped] == ["no_series.dcm", "truncated.dcm"]   # named
    assert scan.n_skipped == 4

    volumes, problems = read_dicom_folder(root)
    assert problems == []
    assert [uid for uid, _ in volumes] == [s.series_uid for s in scan.series]
    assert np.array_equal(volumes[0][1].array, hu)
    assert np.array_equal(volumes[1][1].array, small)
    np.testing.assert_allclose(volumes[1][1].affine, small_affine, rtol=0, atol=AFFINE_ATOL_MM)


def test_an_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no DICOM series in .*empty \(1 file\(s\): 1 not DICOM"):
        read_dicom_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_dicom_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="on_invalid must be one of"):
        read_dicom_folder(tmp_path / "empty", on_invalid="ignore")


# --------------------------------------------------------------------------------------------
# bad series
# --------------------------------------------------------------------------------------------
def make_mixed_matrix(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[4])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64, :80]).tobytes()
    ds.Rows, ds.Columns = 64, 80
    ds.save_as(paths[4])


def make_missing_slice(paths: list[Path]) -> None:
    paths[6].unlink()


def make_non_uniform(paths: list[Path]) -> None:
    position = [float(v) for v in pydicom.dcmread(paths[3], stop_before_pixels=True).ImagePositionPatient]
    edit(paths[3], ImagePositionPatient=[position[0], position[1], position[2] + 0.6])  # 3.6 / 2.4 mm steps


def make_localizer_inside(paths: list[Path]) -> None:
    edit(paths[0], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])


def make_scout_orientation(paths: list[Path]) -> None:
    # A coronal scout image that shares the series UID, no LOCALIZER in ImageType.
    edit(paths[9], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])


def make_mixed_orientation(paths: list[Path]) -> None:
    for path in paths[5:]:
        edit(path, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])


def make_duplicate(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(paths[2].with_name("copy_of_slice_0002.dcm"))


def make_too_few(paths: list[Path]) -> None:
    for path in paths[2:]:
        path.unlink()


def make_single_slice(paths: list[Path]) -> None:
    for path in paths[1:]:
        path.unlink()


def make_misaligned(paths: list[Path]) -> None:
    x, y, z = (float(v) for v in pydicom.dcmread(paths[4], stop_before_pixels=True).ImagePositionPatient)
    edit(paths[4], ImagePositionPatient=[x + 1.0, y, z])


def make_mixed_pixel_spacing(paths: list[Path]) -> None:
    edit(paths[7], PixelSpacing=[3.0, 2.5])


def make_missing_position(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[3])
    del ds.ImagePositionPatient
    ds.save_as(paths[3])


def make_undecodable_syntax(paths: list[Path]) -> None:
    # Declared MPEG2 (a video transfer syntax pydicom cannot decode): found from the headers alone.
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds.save_as(path, enforce_file_format=True)


#: kind of bad series -> (edit, problem kind, words the message must contain, writer options)
BAD_SERIES = {
    "mixed_matrix": (make_mixed_matrix, MIXED_MATRIX, ["mixed matrix sizes", "64x80 (1 slice(s): slice_0004.dcm)"], {}),
    "missing_slice": (make_missing_slice, MISSING_SLICES, ["missing slice(s) between positions",
                                                           "a step of 6.000 mm where the median is 3.000 mm",
                                                           "about 1 slice(s) missing"], {}),
    "non_uniform": (make_non_uniform, NON_UNIFORM_SPACING, ["non-uniform slice spacing",
                                                            "steps from 2.400 to 3.600 mm"], {}),
    "localizer_image_type": (make_localizer_inside, LOCALIZER, ["1 of 10 images are localizer/scout",
                                                                "LOCALIZER", "slice_0000.dcm"], {}),
    "whole_series_localizer": (lambda paths: None, LOCALIZER, ["the series is a localizer/scout"],
                               {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}),
    "scout_orientation": (make_scout_orientation, LOCALIZER, ["1 slice (slice_0009.dcm) is oriented",
                                                              "unlike the other 9", "localizer/scout"], {}),
    "single_slice": (make_single_slice, LOCALIZER, ["a single slice (slice_0000.dcm)"], {}),
    "mixed_orientation": (make_mixed_orientation, MIXED_ORIENTATION, ["mixed orientations",
                                                                      "(5 slice(s): slice_0000.dcm"], {}),
    "not_ct": (lambda paths: None, NOT_CT, ["Modality is MR (10 file(s)), not CT"], {"modality": "MR"}),
    "duplicate_positions": (make_duplicate, DUPLICATE_POSITIONS, ["1 duplicate slice position(s)",
                                                                  "copy_of_slice_0002.dcm"], {}),
    "too_few_slices": (make_too_few, TOO_FEW_SLICES, ["2 slice position(s), fewer than the 3"], {}),
    "gantry_tilt": (make_gantry_tilt, GANTRY_TILT, ["stacked at 9.46 degrees to the slice normal",
                                                    "GantryDetectorTilt 9.46"], {}),
    "misaligned": (make_misaligned, MISALIGNED_SLICES, ["not on one straight stack",
                                                        "slice_0004.dcm is shifted 1.000 mm in-plane"], {}),
    "mixed_pixel_spacing": (make_mixed_pixel_spacing, MIXED_PIXEL_SPACING, ["mixed PixelSpacing",
                                                                            "(3, 2.5) mm (1 slice(s): slice_0007.dcm)"], {}),
    "missing_position": (make_missing_position, MISSING_ATTRIBUTE, ["1 file(s) lack ImagePositionPatient: "
                                                                    "slice_0003.dcm"], {}),
    "no_decoder": (make_undecodable_syntax, NO_DECODER, ["transfer syntax MPEG2 Main Profile / Main Level",
                                                         "1.2.840.10008.1.2.4.100", "no pixel data decoder"], {}),
}


@pytest.mark.parametrize("bad", list(BAD_SERIES))
def test_each_bad_series_raises_a_specific_error_naming_series_and_problem(ct, bad: str,
                                                                          tmp_path: Path) -> None:
    make_bad, kind, words, options = BAD_SERIES[bad]
    folder = tmp_path / f"bad_{bad}"
    paths = write_small(ct, folder, f"bad {bad}", **options)
    make_bad(paths)
    series = find_series(folder)
    assert len(series) == 1
    with pytest.raises(InvalidSeriesError) as caught:
        read_series(series[0])
    problems = caught.value.problems
    assert [p.kind for p in problems] == [kind], problems
    message = str(caught.value)
    for expected in [series[0].series_uid, f"'bad {bad}'", str(folder), *words]:
        assert expected in message, (expected, message)


@pytest.mark.subprocess
def test_a_missing_decoder_plugin_is_named_with_the_transfer_syntax(ct, tmp_path: Path) -> None:
    """A JPEG 2000 series read where no JPEG 2000 decoder is available (pydicom's plugins for it
    removed in a fresh interpreter): refused from the headers, naming the syntax and the package."""
    write_small(ct, tmp_path / "series", "jpeg 2000", transfer_syntax=JPEG2000Lossless)
    code = textwrap.dedent(f"""
        from pydicom.pixels import get_decoder
        from pydicom.uid import JPEG2000Lossless
        decoder = get_decoder(JPEG2000Lossless)
        for plugin in decoder.available_plugins:
            decoder.remove_plugin(plugin)
        from pancreas_seg.imaging.dicom_io import read_dicom_folder
        volumes, problems = read_dicom_folder({str(tmp_path)!r}, on_invalid="skip")
        assert volumes == []
        print("\\n".join(f"{{p.kind}}: {{p}}" for p in problems))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{NO_DECODER}: series "), lines
    for expected in ["'jpeg 2000'", "JPEG 2000 Image Compression (Lossless Only)",
                     "(1.2.840.10008.1.2.4.90) of 10 file(s) cannot be decoded",
                     "install pylibjpeg-openjpeg"]:
        assert expected in lines[0], (expected, lines[0])


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_truncated_pixel_data_names_the_file_and_transfer_syntax(ct, tmp_path: Path) -> None:
    paths = write_small(ct, tmp_path / "series", "cut short", transfer_syntax=JPEG2000Lossless)
    paths[5].write_bytes(paths[5].read_bytes()[:-2000])
    with pytest.raises(InvalidSeriesError) as caught:
        only_series(tmp_path / "series")
    assert [p.kind for p in caught.value.problems] == [UNREADABLE_PIXELS]
    message = str(caught.value)
    for expected in ["pixel data of slice_0005.dcm", "JPEG 2000 Image Compression (Lossless Only)",
                     "1.2.840.10008.1.2.4.90", "'cut short'", str(tmp_path / "series")]:
        assert expected in message, (expected, message)


def test_fail_lists_every_bad_series_and_skip_keeps_the_good_one(ct, tmp_path: Path) -> None:
    root = tmp_path / "mixed_folder"
    good = write_small(ct, root / "good", "the good one")
    bad_uids = {}
    for bad in ("missing_slice", "non_uniform", "not_ct", "mixed_matrix", "duplicate_positions",
                "localizer_image_type"):
        make_bad, kind, _, options = BAD_SERIES[bad]
        paths = write_small(ct, root / bad, f"bad {bad}", **options)
        make_bad(paths)
        bad_uids[pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID] = kind

    with pytest.raises(InvalidSeriesError) as caught:
        read_dicom_folder(root, on_invalid="fail")
    message = str(caught.value)
    assert message.startswith("6 DICOM series are not usable CT volumes:")
    for uid in bad_uids:
        assert uid in message
    assert "set on_invalid to 'skip'" in message
    assert {p.series_uid: p.kind for p in caught.value.problems} == bad_uids

    volumes, problems = read_dicom_folder(root, on_invalid="skip")
    good_uid = pydicom.dcmread(good[0], stop_before_pixels=True).SeriesInstanceUID
    assert [uid for uid, _ in volumes] == [good_uid]
    assert volumes[0][1].description == "the good one" and volumes[0][1].array.shape[2] == N_SMALL
    assert {p.series_uid: p.kind for p in problems} == bad_uids
    assert all(str(root) in p.folder for p in problems)


# --------------------------------------------------------------------------------------------
# DICOM-SEG
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_case(ct, mask, tmp_path_factory):
    """The real CT as an LPS series in shuffled file order, its mask on the read grid with a
    tumour label added (label 2 on the left half of the pancreas: plumbing, not anatomy), the SEG."""
    hu, affine = ct
    stored, stored_affine = reorient(hu, affine, "LPS")
    stored_mask, _ = reorient(mask, affine, "LPS")
    labels = stored_mask.copy()
    x = np.nonzero(stored_mask)[0]
    labels[(stored_mask == 1) & (np.arange(labels.shape[0])[:, None, None] > np.median(x))] = 2
    folder = tmp_path_factory.mktemp("seg") / "series"
    n = stored.shape[2]
    names = shuffled_names(n, seed=7)
    write_ct_series(stored, stored_affine, folder, description="real CT for SEG",
                    file_name=lambda k: names[k], instance_number=lambda k: n - k)
    volume = only_series(folder)
    assert np.array_equal(volume.array, stored)
    out = folder.parent / "out" / "segmentation.dcm"
    written = write_dicom_seg(labels, volume.datasets, out, model="unet")
    return {"volume": volume, "labels": labels, "path": written}


def test_dicom_seg_reads_back_with_highdicom_with_codes_and_references(seg_case) -> None:
    volume, path = seg_case["volume"], seg_case["path"]
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["segmentation.dcm"]  # no temp left
    seg = hd.seg.segread(path)
    source = volume.datasets[0]
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence
    assert len(referenced) == 1 and referenced[0].SeriesInstanceUID == volume.series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced[0].ReferencedInstanceSequence} <= {
        ds.SOPInstanceUID for ds in volume.datasets}

    segments = {s.SegmentNumber: s for s in seg.SegmentSequence}
    assert sorted(segments) == [1, 2]
    pancreas, tumour = segments[1], segments[2]
    assert pancreas.SegmentLabel == "Pancreas" and tumour.SegmentLabel == "Tumour"
    assert pancreas.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"   # Anatomical Structure
    assert pancreas.SegmentedPropertyTypeCodeSequence[0].CodeValue == "15776009"       # Pancreas
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"     # Morph. abnormal structure
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"        # Neoplasm
    assert tumour.AnatomicRegionSequence[0].CodeValue == "15776009"
    for segment in (pancreas, tumour):
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "pancreas_seg" and algorithm.AlgorithmVersion == __version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"     # Artificial Intelligence
    described = seg.get_segment_description(1)
    assert described.segmented_property_type == hd.sr.CodedConcept("15776009", "SCT", "Pancreas")


def test_dicom_seg_frames_map_to_the_right_source_slices(seg_case) -> None:
    volume, labels, path = seg_case["volume"], seg_case["labels"], seg_case["path"]
    sop_uids = [ds.SOPInstanceUID for ds in volume.datasets]
    seg = hd.seg.segread(path)
    # highdicom's own reconstruction, by source SOP instance, in the series' sorted order.
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    assert np.array_equal(labels_from_segments(pixels), labels)

    # And frame by frame with plain pydicom: reference, position and content of every frame.
    raw = pydicom.dcmread(path)
    index_of = {uid: k for k, uid in enumerate(sop_uids)}
    rebuilt = np.zeros((len(sop_uids), *labels.shape[1::-1], 2), dtype=bool)
    frames = raw.pixel_array.reshape(int(raw.NumberOfFrames), int(raw.Rows), int(raw.Columns))
    for frame, group in zip(frames, raw.PerFrameFunctionalGroupsSequence, strict=True):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index_of[uid]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in volume.datasets[k].ImagePositionPatient],
                                   rtol=0, atol=1e-4)
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        rebuilt[k, :, :, segment - 1] = frame.astype(bool)
    assert np.array_equal(labels_from_segments(rebuilt), labels)
    z_with_pancreas = np.flatnonzero(labels.any(axis=(0, 1)))
    assert int(raw.NumberOfFrames) == len(z_with_pancreas) + len(np.flatnonzero((labels == 2).any(axis=(0, 1))))


def test_dicom_seg_refuses_a_label_map_off_the_grid(seg_case, tmp_path: Path) -> None:
    volume, labels = seg_case["volume"], seg_case["labels"]
    with pytest.raises(InvalidSegmentationInputError, match=r"expected \(Columns, Rows, slices\) = \(122, 101, 112\)"):
        write_dicom_seg(labels[:, :, :-1], volume.datasets, tmp_path / "x.dcm")
    bad = labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(InvalidSegmentationInputError, match=r"holds values \[7\]"):
        write_dicom_seg(bad, volume.datasets, tmp_path / "x.dcm")
    assert not list(tmp_path.iterdir())


def test_empty_prediction_still_writes_a_valid_seg(seg_case, tmp_path: Path) -> None:
    volume = seg_case["volume"]
    empty = np.zeros(volume.array.shape, dtype=np.uint8)
    path = write_dicom_seg(empty, volume.datasets, tmp_path / "empty.dcm")
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets], segment_numbers=[1, 2])
    assert not pixels.any()


# --------------------------------------------------------------------------------------------
# DICOM-SEG of an anonymised series: UIDs empty or missing -> generated, recorded; or refused
# --------------------------------------------------------------------------------------------
#: The UIDs each anonymisation leaves unusable: :func:`strip_uids` empties (``"empty"``) or removes
#: (``"missing"``) ANONYMISED_UIDS; ``"missing"`` also removes the FrameOfReferenceUID.
ANONYMISED = {"empty": ANONYMISED_UIDS, "missing": (*ANONYMISED_UIDS, "FrameOfReferenceUID")}


def anonymise(paths: list[Path], how: str) -> None:
    """In place: the UIDs of :data:`ANONYMISED` ``[how]`` emptied or removed, as exports hold them."""
    strip_uids(paths, how)
    for path in paths if how == "missing" else ():
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)


def file_digests(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module", params=list(ANONYMISED))
def anonymised_case(request, ct, mask, tmp_path_factory):
    """The real CT (LPS, shuffled file names, reversed InstanceNumbers, as :func:`seg_case`) with
    its UIDs empty or missing on disk; its SEG written from that; the files' digests before and
    after; the log records of the write."""
    how = request.param
    hu, affine = ct
    stored, stored_affine = reorient(hu, affine, "LPS")
    stored_mask, _ = reorient(mask, affine, "LPS")
    labels = stored_mask.copy()
    labels[(stored_mask == 1) & (np.arange(labels.shape[0])[:, None, None] > np.median(np.nonzero(stored_mask)[0]))] = 2
    folder = tmp_path_factory.mktemp(f"anonymised_{how}") / "series"
    n = stored.shape[2]
    names = shuffled_names(n, seed=11)
    write_ct_series(stored, stored_affine, folder, description="real CT, anonymised",
                    file_name=lambda k: names[k], instance_number=lambda k: n - k)
    plain = only_series(folder)
    original_for = plain.datasets[0].FrameOfReferenceUID
    anonymise(list(plain.files), how)
    volume = only_series(folder)   # the reader groups the UID-less files as dcm2niix does
    np.testing.assert_array_equal(volume.array, plain.array)
    before = file_digests(volume.files)
    out = folder.parent / "out" / "case_seg.dcm"
    handler = _Records()
    logging.getLogger("pancreas_seg").addHandler(handler)
    try:
        written = write_dicom_seg(labels, volume.datasets, out, model="unet", source_files=volume.files,
                                  source_array=volume.array, label="case")
    finally:
        logging.getLogger("pancreas_seg").removeHandler(handler)
    return {"how": how, "volume": volume, "labels": labels, "path": written, "before": before,
            "after": file_digests(volume.files), "records": handler.records, "original_for": original_for,
            "root": folder.parent}


class _Records(logging.Handler):
    """Keeps every record (a module-scoped fixture cannot use ``caplog``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_seg_of_a_series_without_uids_references_the_generated_uids_it_records(anonymised_case) -> None:
    case = anonymised_case
    volume, labels, path = case["volume"], case["labels"], case["path"]
    blanked = ANONYMISED[case["how"]]
    assert all(not ds.get(keyword) for ds in volume.datasets for keyword in blanked)   # really anonymised
    sidecar = read_seg_sidecar(path)
    assert sidecar is not None and seg_sidecar_path(path) == path.with_name("case_seg.json")
    assert sidecar["status"] == "written" and sidecar["dicom_seg"] == "case_seg.dcm"
    assert sidecar["generated"] == [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                                                "SOPInstanceUID") if k in blanked]
    assert ("empty in 112 of 112" if case["how"] == "empty" else "missing in 112 of 112") in sidecar["reason"]
    instances = sidecar["instances"]
    sop_uids = [item["sop_instance_uid"] for item in instances]
    uids = [sidecar["study_instance_uid"], sidecar["series_instance_uid"], sidecar["frame_of_reference_uid"], *sop_uids]
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids) and len(set(uids)) == len(uids) == 3 + 112
    # The mapping names every source image by its index (slice), file and InstanceNumber.
    assert [item["index"] for item in instances] == list(range(112)) and all(item["generated"] for item in instances)
    assert [item["file"] for item in instances] == [p.name for p in volume.files]
    assert [item["instance_number"] for item in instances] == [int(ds.InstanceNumber) for ds in volume.datasets]
    if case["how"] == "empty":   # a usable FrameOfReferenceUID is kept
        assert sidecar["frame_of_reference_uid"] == case["original_for"]

    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == sidecar["study_instance_uid"]
    assert seg.FrameOfReferenceUID == sidecar["frame_of_reference_uid"]
    assert seg.SeriesInstanceUID not in uids and seg.SOPInstanceUID not in uids   # the SEG's own
    referenced = seg.ReferencedSeriesSequence
    assert len(referenced) == 1 and referenced[0].SeriesInstanceUID == sidecar["series_instance_uid"]
    assert {item.ReferencedSOPInstanceUID for item in referenced[0].ReferencedInstanceSequence} <= set(sop_uids)
    # Frame k references the generated UID recorded for slice k: the label map comes back exactly.
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    assert np.array_equal(labels_from_segments(pixels), labels)


def test_the_source_files_and_headers_are_left_as_they_were(anonymised_case) -> None:
    case = anonymised_case
    assert case["after"] == case["before"]        # byte for byte
    for ds in case["volume"].datasets:            # the caller's in-memory headers too
        for keyword in ANONYMISED[case["how"]]:
            assert (keyword in ds) == (case["how"] == "empty") and not ds.get(keyword)
    assert sorted(p.name for p in (case["root"] / "out").iterdir()) == ["case_seg.dcm", "case_seg.json"]


def test_generating_uids_is_logged_as_a_warning_without_identifiers_or_paths(anonymised_case) -> None:
    case = anonymised_case
    warnings = [r.getMessage() for r in case["records"] if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "lacks usable UIDs" in warnings[0] and "generated UIDs" in warnings[0]
    assert all(keyword in warnings[0] for keyword in ANONYMISED[case["how"]])
    header = case["volume"].datasets[0]
    for message in (r.getMessage() for r in case["records"] if r.name.startswith("pancreas_seg")):
        assert str(header.PatientName) not in message and str(header.PatientID) not in message
        assert str(case["root"]) not in message and "/" not in message, message


def test_seg_with_generated_uids_passes_dciodvfy(anonymised_case) -> None:
    """dciodvfy (dicom3tools: ``apt-get install dicom3tools``) checks the SEG against the IOD rules."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    result = subprocess.run([binary, str(anonymised_case["path"])], capture_output=True, text=True, timeout=120,
                            check=False)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert result.returncode == 0 and not errors and "Segmentation" in output, output


def test_generated_uids_depend_on_the_content_only(anonymised_case) -> None:
    volume = anonymised_case["volume"]
    sidecar = read_seg_sidecar(anonymised_case["path"])
    again = prepare_seg_sources(volume.datasets, source_files=volume.files, source_array=volume.array).generated
    assert again is not None and again.to_dict() == {k: v for k, v in sidecar.items() if k not in ("dicom_seg", "status")}
    other = volume.array.copy()
    other[0, 0, 0] += 1          # one voxel of slice 0 differs: another series, other UIDs
    changed = prepare_seg_sources(volume.datasets, source_array=other).generated
    assert changed.study_instance_uid != again.study_instance_uid
    assert changed.sop_instance_uids[0] != again.sop_instance_uids[0]
    assert changed.sop_instance_uids[1:] == again.sop_instance_uids[1:]
    without_pixels = [prepare_seg_sources(volume.datasets).generated for _ in range(2)]   # random
    assert without_pixels[0].series_instance_uid != without_pixels[1].series_instance_uid


def test_a_series_with_usable_uids_is_referenced_as_it_is(seg_case) -> None:
    sources = prepare_seg_sources(seg_case["volume"].datasets, source_array=seg_case["volume"].array)
    assert sources.generated is None and all(a is b for a, b in zip(sources.datasets, seg_case["volume"].datasets,
                                                                    strict=True))
    assert not seg_sidecar_path(seg_case["path"]).exists()


#: name -> (how the in-memory headers are broken beyond repair, words the refusal must contain)
UNREFERENCEABLE = {
    "no_sop_class": (lambda k, ds: delattr(ds, "SOPClassUID"), "SOPClassUID missing in 112 of 112"),
    "two_studies": (lambda k, ds: setattr(ds, "StudyInstanceUID", "1.2.826.0.1.3680043.8.498.7") if k % 2 else None,
                    "2 different StudyInstanceUIDs"),
    "enhanced_ct": (lambda k, ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2.1"), "multi-frame"),
}


@pytest.mark.parametrize("name", list(UNREFERENCEABLE))
def test_a_series_no_seg_can_reference_is_refused_with_the_reason(seg_case, name: str, tmp_path: Path) -> None:
    volume = seg_case["volume"]
    breaks, reason = UNREFERENCEABLE[name]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in volume.files]
    for k, ds in enumerate(headers):
        ds.SOPInstanceUID = ""    # UIDs that could be generated do not hide the refusal
        breaks(k, ds)
    with pytest.raises(SegmentationRefusedError, match=reason) as refused:
        write_dicom_seg(seg_case["labels"], headers, tmp_path / "case_seg.dcm", source_array=volume.array)
    assert str(tmp_path) not in str(refused.value) and "/" not in str(refused.value)
    assert not list(tmp_path.iterdir())


def test_inference_nodes_write_the_nifti_and_report_generated_uids_or_the_refusal(anonymised_case, seg_case,
                                                                                  tmp_path: Path) -> None:
    """make_dicom_segs -> the catalog's partitioned datasets -> report_inference, as a run does:
    the anonymised series gets a SEG with generated UIDs (in the report and the sidecar), the
    series with no SOP Class UID gets its NIfTI mask and a refusal, and nothing raises."""
    from pancreas_seg.datasets import DicomDataset, NiftiDataset, OptionalPartitionedDataset  # noqa: PLC0415
    from pancreas_seg.pipelines.inference.nodes import Scan, make_dicom_segs, report_inference  # noqa: PLC0415

    refused_volume = dataclasses.replace(seg_case["volume"], datasets=tuple(
        pydicom.dcmread(p, stop_before_pixels=True) for p in seg_case["volume"].files))
    for ds in refused_volume.datasets:
        del ds.SOPClassUID
    volumes = {"anonymised": anonymised_case["volume"], "refused": refused_volume}
    labels = {"anonymised": anonymised_case["labels"], "refused": seg_case["labels"]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "refused_seg.dcm").write_bytes(seg_case["path"].read_bytes())     # an earlier run's SEG
    scans = {case: Scan(volume.folder, lambda v=volume: v, True, volume.description) for case, volume in volumes.items()}
    inference = {"output_format": "dicom_seg", "output_dir": str(out), "model": "unet"}
    # A stand-in for the loaded model: the nodes read only its name, files and card's data source.
    predictor = SimpleNamespace(name="unet", model_files=[], card=SimpleNamespace(data_source="test"))

    mask_store = OptionalPartitionedDataset(path=str(out), dataset=NiftiDataset, filename_suffix=".nii.gz")
    mask_store.save({case: (lambda case=case: NiftiVolume(labels[case], volumes[case].affine, None)) for case in volumes})
    masks = mask_store.load()
    segs = make_dicom_segs(masks, scans, predictor, inference)
    assert sorted(segs) == ["anonymised"]               # the refused case is left out, before anything is built
    assert not (out / "refused_seg.dcm").exists()       # and an earlier run's SEG of it is gone
    seg_store = OptionalPartitionedDataset(path=str(out), dataset=DicomDataset, filename_suffix="_seg.dcm")
    seg_store.save(segs)
    report = report_inference(masks, {}, seg_store.load(), scans, [], predictor, inference)

    rows = {row["case_id"]: row for row in report["outputs"]}
    for case in volumes:                                 # the NIfTI of both cases
        assert np.array_equal(load_nifti(rows[case]["mask"]).array, labels[case])
    refused = rows["refused"]
    assert refused["dicom_seg"] is None and "SOPClassUID missing in 112 of 112" in refused["dicom_seg_refused"]
    assert read_seg_sidecar(out / "refused_seg.dcm")["status"] == "refused"
    written = rows["anonymised"]
    generated = written["dicom_seg_generated_uids"]
    assert generated == {k: v for k, v in read_seg_sidecar(written["dicom_seg"]).items()
                         if k not in ("dicom_seg", "status")}
    seg = hd.seg.segread(written["dicom_seg"])
    assert seg.StudyInstanceUID == generated["study_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == generated["series_instance_uid"]
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= {
        item["sop_instance_uid"] for item in generated["instances"]}
    assert sorted(p.name for p in out.iterdir()) == ["anonymised.nii.gz", "anonymised_seg.dcm", "anonymised_seg.json",
                                                     "refused.nii.gz", "refused_seg.json"]


def test_a_seg_of_a_series_with_an_impossible_birth_date_leaves_it_empty(tmp_path: Path) -> None:
    """Real exports carry dates no reader parses; highdicom refuses to copy them, so the SEG's
    sources get them empty (Type 2), in memory only."""
    folder = tmp_path / "series"
    hu = np.full((32, 32, 6), -50, np.int16)
    files = write_ct_series(hu, np.diag([0.8, 0.8, 2.0, 1.0]), folder)
    for path in files:
        edit(path, PatientBirthDate="19700231", StudyTime="25:99:00")
    before = file_digests(files)
    volume = only_series(folder)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[8:20, 8:20, 1:4] = 1
    sources = prepare_seg_sources(volume.datasets, source_files=volume.files, source_array=volume.array)
    assert sources.filled_empty == ("PatientBirthDate", "StudyTime")
    seg = build_dicom_seg(labels, sources.datasets, model="unet")
    assert seg.PatientBirthDate == "" and seg.StudyTime == "" and seg.StudyDate == volume.datasets[0].StudyDate
    assert file_digests(files) == before and volume.datasets[0].PatientBirthDate == "19700231"
