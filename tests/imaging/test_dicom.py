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

import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations as ornt_lib
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
    labels_from_segments,
    write_dicom_seg,
)
from pancreas_seg.imaging.dicom_series_writer import write_ct_series
from pancreas_seg.imaging.geometry import axial_view
from pancreas_seg.imaging.nifti_io import NiftiVolume, load_nifti, save_nifti

CT_NAME, MASK_NAME = "ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz"
AFFINE_ATOL_MM = 1e-4
#: dcm2niix does its geometry in float32 and takes the slice spacing from two of the slices: on the
#: 112-slice oblique stack its affine is off by up to ~2e-3 mm (origin placed from the far end).
DCM2NIIX_ATOL_MM = 1e-2


@pytest.fixture(scope="module", autouse=True)
def realdata(require_realdata) -> Path:
    """The real-data folder. Every test here needs it: skipped locally without it, failing in CI."""
    return require_realdata(CT_NAME, MASK_NAME)


@pytest.fixture(scope="module")
def ct(realdata: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 (X, Y, Z), affine) of the real CT, read by nibabel directly."""
    image = nib.load(str(realdata / CT_NAME))
    hu = np.asanyarray(image.dataobj)
    assert hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max
    return hu.astype(np.int16), image.affine


@pytest.fixture(scope="module")
def mask(realdata: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(realdata / MASK_NAME)).dataobj).astype(np.uint8)


@pytest.fixture(scope="module")
def dcm2niix_bin() -> str:
    """The real dcm2niix binary from the ``dcm2niix`` wheel (test extra): skip locally, fail in CI."""
    try:
        import dcm2niix  # noqa: PLC0415
    except ImportError:
        message = "dcm2niix is not installed (pip install dcm2niix, the test extra)"
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:   # as tests/conftest.py
            pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    return dcm2niix.bin


# --------------------------------------------------------------------------------------------
# helpers
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
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([binary, "-z", "n", "-b", "n", "-f", "converted", "-o", str(out),
                             str(series_folder)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(out.glob("*.nii"))
    assert len(files) == 1, (result.stdout, files)
    return nib.load(str(files[0]))


def only_series(folder: Path) -> DicomVolume:
    series = find_series(folder)
    assert len(series) == 1
    return read_series(series[0])


def edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)


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
    # Junk: a macOS resource file (real DICOM bytes), a text file, DICOM without a series, and a
    # file cut inside its header (pydicom reads what is there: no SeriesInstanceUID left).
    shutil.copy(first[0], root / "._a_0000.dcm")
    (root / "notes.txt").write_text("not DICOM\n")
    no_series = pydicom.dcmread(first[1])
    del no_series.SeriesInstanceUID
    no_series.save_as(root / "no_series.dcm")
    (root / "truncated.dcm").write_bytes(first[2].read_bytes()[:300])

    scan = scan_folder(root)
    assert [s.description for s in scan.series] == ["abdomen RAS", "abdomen crop LPS"]
    assert [len(s) for s in scan.series] == [112, 12]
    assert scan.series[1].folder == root / "sub" / "deeper"
    assert scan.n_files == 112 + 12 + 4
    assert scan.n_resource_forks == 1 and scan.n_not_dicom == 1 and scan.n_without_series == 2
    assert scan.unreadable == ()
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
N_SMALL = 10


def write_small(ct, folder: Path, description: str, **kwargs) -> list[Path]:
    """A 10-slice series from the real CT (z 50-59), usual axial DICOM orientation (LPS)."""
    hu, affine = ct
    crop = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 50], [0, 0, 0, 1]])
    stored, stored_affine = reorient(hu[:, :, 50:50 + N_SMALL], crop, "LPS")
    return write_ct_series(stored, stored_affine, folder, description=description, **kwargs)


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


def make_gantry_tilt(paths: list[Path]) -> None:
    # Each slice 0.5 mm further along y than the last: slices stacked at atan(0.5 / 3) = 9.46 degrees.
    for k, path in enumerate(paths):
        x, y, z = (float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient)
        edit(path, ImagePositionPatient=[x, y + 0.5 * k, z], GantryDetectorTilt=9.46)


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
