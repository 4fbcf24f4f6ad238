"""The served model takes a zipped DICOM series (``dicom_zip_base64``) and, when asked, answers a DICOM-SEG
(issue 24).

In-process: :class:`~pancreas_seg.inference.serving.SegmentationModel` with a tiny real Keras model
(fixed 1x1 convolution weights, so that the mask holds background, pancreas and tumour labels) and a
real model card, on zips built with pydicom from the real CT in ``../shared/realdata`` (the example
CT of the TotalSegmentator repository, Apache-2.0; see that folder's NOTICE.md): 10 axial slices
written by :func:`tests.imaging.dicom_builders.write_small`, with a patient's name and id in the
headers and in the zip's folder name, so that every test can check they leak nowhere. Over HTTP
(``subprocess`` + ``slow``): the real ``mlflow models serve`` of ``test_serving_safety.py``
(its module-scoped ``served`` fixture, imported here, starts one server for this module).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.imaging.dicom_io import DicomVolume
from pancreas_seg.imaging.dicom_seg import labels_from_segments
from pancreas_seg.inference.serving import (
    INPUT_DICOM,
    OUTPUT_SEG,
    OUTPUT_SEG_RECORD,
    OUTPUT_SEG_REFUSED,
    SegmentationModel,
    ServingError,
    decode_mask,
    signature,
)
from pancreas_seg.inference.serving_settings import ServingSettings
from tests.imaging.dicom_builders import CT_NAME, edit, only_series, strip_uids, write_small, zip_folder
from tests.inference.test_serving_safety import Served, _b64, _nifti, _post, served  # noqa: F401 - fixture

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-SECRET-42"
FOLDER = "Doe_Jane_PID-SECRET-42/"
"""The zip's folder: a member name that holds the patient's name, as exports often do."""
SECRETS = ("Doe", "Jane", "SECRET", "IM0")
PREPROCESSING = {"image_size_px": 64, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}


# --------------------------------------------------------------------------------------------
# The model and the series
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor() -> Any:
    """A real (tiny) Keras model with a real card: windowed HU below 0.3 -> background, up to 0.9 ->
    pancreas, above -> tumour (soft tissue is 1, bone and contrast 2: all three labels occur)."""
    import keras

    from pancreas_seg.inference.model_card import CaseSplit, ModelCard
    from pancreas_seg.inference.predictor import PredictionSettings, Predictor
    from pancreas_seg.models.io import weights_sha256

    inputs = keras.Input((None, None, 1), name="image")
    outputs = keras.layers.Conv2D(3, 1, activation="softmax", name="classes")(inputs)
    model = keras.Model(inputs, outputs, name="probe")
    model.get_layer("classes").set_weights([np.array([[[[0.0, 10.0, 20.0]]]], np.float32),
                                            np.array([0.0, -3.0, -12.0], np.float32)])
    card = ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("pancreas_001",), ("pancreas_002",)), weights_sha256(model))
    return Predictor.from_models([model], [card], PredictionSettings(batch_size=4, flip_tta=False))


def _serving(predictor: Any, **settings: Any) -> SegmentationModel:
    model = SegmentationModel()
    model.predictor = predictor
    model.configure(ServingSettings(**settings))
    return model


@pytest.fixture(scope="module")
def ct(require_realdata: Callable[..., Path]) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(require_realdata(CT_NAME) / CT_NAME))
    return np.asanyarray(image.dataobj).astype(np.int16), image.affine


def _series(ct: tuple[np.ndarray, np.ndarray], folder: Path, **headers: Any) -> list[Path]:
    """10 real CT slices as a DICOM series with a patient's identifiers, file names IM0000.dcm ..."""
    paths = write_small(ct, folder, "abdomen", file_name=lambda k: f"IM{k:04d}.dcm")
    for path in paths:
        edit(path, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, **headers)
    return paths


def _zip(folder: Path, archive: Path, **options: Any) -> str:
    return _b64(zip_folder(folder, archive, prefix=FOLDER, **options).read_bytes())


@pytest.fixture(scope="module")
def plain(ct, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The series (with its UIDs), read from its folder, and its zip as a request value."""
    root = tmp_path_factory.mktemp("dicom_plain")
    _series(ct, root / "series")
    return {"volume": only_series(root / "series"), "zip": _zip(root / "series", root / "series.zip")}


@pytest.fixture(scope="module")
def anonymised(ct, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same slices with Study/Series/SOP Instance UIDs EMPTY, as de-identification tools leave them."""
    root = tmp_path_factory.mktemp("dicom_anonymised")
    strip_uids(_series(ct, root / "series"), "empty")
    return {"volume": only_series(root / "series"), "zip": _zip(root / "series", root / "series.zip")}


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Python's temporary folder for this test only, to see what the model leaves in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _frame(value: str, column: str = INPUT_DICOM) -> pd.DataFrame:
    return pd.DataFrame({column: [value]})


def _refusal(model: SegmentationModel, frame: pd.DataFrame, params: dict | None = None) -> ServingError:
    with pytest.raises(ServingError) as refused:
        model.predict(None, frame, params)
    return refused.value


def _seg_labels(encoded: str, sop_uids: list[str]) -> tuple[Any, np.ndarray]:
    """The SEG read back by highdicom, and its frames as an (X, Y, Z) label map in the given slice order."""
    seg = hd.seg.segread(io.BytesIO(base64.b64decode(encoded)))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    return seg, labels_from_segments(pixels)


def _no_secrets(text: str, *extra: str) -> None:
    for secret in (*SECRETS, *extra):
        assert secret not in text, secret


# --------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------
def test_a_zipped_series_gets_the_predictors_mask_on_the_series_grid(predictor, plain, private_tmp: Path,
                                                                    caplog) -> None:
    caplog.set_level(logging.DEBUG)
    volume: DicomVolume = plain["volume"]
    answer = _serving(predictor).predict(None, _frame(plain["zip"]))
    assert list(answer.columns) == ["case_id", "mask_nifti_base64", "patient_tumour_score"] and answer["case_id"][0] == "row0"
    mask = decode_mask(answer["mask_nifti_base64"][0])
    expected = predictor.segment(volume.array, volume.affine, "reference")
    assert set(np.unique(expected)) == {0, 1, 2}             # the check below can see every label
    assert mask.shape == volume.array.shape == (122, 101, 10) and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), expected)
    # the patient tumour score (issue 26): the maximum of the predictor's own tumour probability map
    exact = predictor.segment_with_probability(volume.array, volume.affine, "reference").patient_tumour_score
    assert answer["patient_tumour_score"][0] == pytest.approx(exact) and 0.0 < exact <= 1.0
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-5)   # the reader's grid, as the pipeline writes
    assert list(private_tmp.iterdir()) == []                            # the zip and its extraction are gone
    _no_secrets(caplog.text, str(private_tmp))


def test_the_dicom_seg_is_answered_when_asked_and_holds_the_mask(predictor, plain, private_tmp: Path) -> None:
    volume: DicomVolume = plain["volume"]
    answer = _serving(predictor).predict(None, _frame(plain["zip"]), {"return_dicom_seg": True})
    assert list(answer.columns) == ["case_id", "mask_nifti_base64", "patient_tumour_score", OUTPUT_SEG, OUTPUT_SEG_RECORD,
                                    OUTPUT_SEG_REFUSED]
    row = answer.iloc[0]
    assert row[OUTPUT_SEG_RECORD] is None and row[OUTPUT_SEG_REFUSED] is None   # the series had its UIDs
    mask = np.asanyarray(decode_mask(row["mask_nifti_base64"]).dataobj)
    seg, labels = _seg_labels(row[OUTPUT_SEG], [ds.SOPInstanceUID for ds in volume.datasets])
    np.testing.assert_array_equal(labels, mask)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.datasets[0].SeriesInstanceUID
    assert list(private_tmp.iterdir()) == []


def test_an_anonymised_series_gets_a_seg_with_generated_uids_and_their_record(predictor, plain, anonymised,
                                                                             private_tmp: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    answer = _serving(predictor).predict(None, _frame(anonymised["zip"]), {"return_dicom_seg": True})
    row = answer.iloc[0]
    assert row[OUTPUT_SEG_REFUSED] is None
    record = json.loads(row[OUTPUT_SEG_RECORD])
    assert record["uids_generated"] and {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(
        record["generated"])
    sop_uids = [item["sop_instance_uid"] for item in record["instances"]]
    assert [item["index"] for item in record["instances"]] == list(range(10)) and len(set(sop_uids)) == 10
    assert [item["file"] for item in record["instances"]] == [f"IM{k:04d}.dcm" for k in range(10)]   # no server path
    seg, labels = _seg_labels(row[OUTPUT_SEG], sop_uids)
    assert seg.StudyInstanceUID == record["study_instance_uid"]
    assert seg.FrameOfReferenceUID == record["frame_of_reference_uid"]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == record["series_instance_uid"]
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} <= set(sop_uids)
    mask = np.asanyarray(decode_mask(row["mask_nifti_base64"]).dataobj)
    np.testing.assert_array_equal(labels, mask)
    # the same pixels as the series with its UIDs: the same mask
    plain_answer = _serving(predictor).predict(None, _frame(plain["zip"]))
    np.testing.assert_array_equal(np.asanyarray(decode_mask(plain_answer["mask_nifti_base64"][0]).dataobj), mask)
    assert "grouped as dcm2niix groups them" in caplog.text        # the reader's warning, kept ...
    _no_secrets(caplog.text, str(private_tmp))                     # ... without the archive's names
    assert list(private_tmp.iterdir()) == []


def test_a_seg_that_cannot_be_made_is_a_reason_beside_the_mask_not_an_error(predictor, ct, tmp_path: Path) -> None:
    paths = _series(ct, tmp_path / "series")
    for path in paths:
        edit(path, SOPClassUID="")          # a SEG references each image by its SOP Class UID: not repairable
    answer = _serving(predictor).predict(None, _frame(_zip(tmp_path / "series", tmp_path / "series.zip")),
                                         {"return_dicom_seg": True})
    row = answer.iloc[0]
    assert row[OUTPUT_SEG] is None and row[OUTPUT_SEG_RECORD] is None
    assert "SOPClassUID empty in 10 of 10 image(s)" in row[OUTPUT_SEG_REFUSED]
    assert decode_mask(row["mask_nifti_base64"]).shape == (122, 101, 10)


def _zip_bytes(members: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return _b64(buffer.getvalue())


@pytest.fixture(scope="module")
def slices(plain, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The 10 slice files' bytes."""
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(plain["zip"]))) as handle:
        return [handle.read(info) for info in handle.infolist() if not info.is_dir()]


@pytest.mark.parametrize(("build", "status", "expected"), [
    pytest.param(lambda s: _zip_bytes({f"{FOLDER}IM0000.dcm": s[0], f"../../{FOLDER}evil.dcm": s[1]}), 400,
                 "path traversal", id="zip-slip"),
    pytest.param(lambda s: _zip_bytes({f"/{FOLDER}IM0000.dcm": s[0]}), 400, "path traversal", id="absolute"),
    pytest.param(lambda s: _zip_bytes({f"{FOLDER}IM{k:04d}.dcm": s[k % 10] for k in range(13)}), 413,
                 "has 13 members, more than the limit of 12", id="too many members"),
    pytest.param(lambda s: _b64(b"PK\x03\x04 certainly not a zip " + s[0][:200]), 400, "not a readable zip",
                 id="not a zip"),
    pytest.param(lambda s: _zip_bytes({f"{FOLDER}notes.txt": b"Doe^Jane"}), 400, "holds no DICOM series",
                 id="no series"),
    pytest.param(lambda s: _zip_bytes({f"{FOLDER}IM0000.dcm": s[0]}), 400, "1 DICOM series in the archive is not "
                 "usable as a CT volume (a localizer or scout", id="one slice"),
])
def test_a_bad_archive_is_a_400_or_413_naming_no_member_and_no_path(predictor, slices, build, status: int,
                                                                   expected: str, private_tmp: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    refused = _refusal(_serving(predictor, dicom_max_members=12), _frame(build(slices)))
    assert refused.status == status and expected in refused.message, refused.message
    assert refused.message.startswith(f"row 0: '{INPUT_DICOM}': the archive") or "DICOM series" in refused.message
    _no_secrets(refused.message + caplog.text, str(private_tmp), "evil", "pancreas_seg_")
    assert list(private_tmp.iterdir()) == []                 # nothing left behind, nothing extracted outside


def test_two_series_in_one_zip_are_refused(predictor, ct, tmp_path: Path) -> None:
    write_small(ct, tmp_path / "two" / "a", "first", series_number=1)
    write_small(ct, tmp_path / "two" / "b", "second", series_number=2)
    refused = _refusal(_serving(predictor), _frame(_zip(tmp_path / "two", tmp_path / "two.zip")))
    assert refused.status == 400 and "the archive holds 2 CT series; send one series per row" in refused.message


def test_limits_apply_to_dicom_uploads_before_anything_is_decoded(predictor, plain) -> None:
    # the request's base64 text, the zip's uncompressed size, the images' dimensions and slice count
    assert "base64 input" in _refusal(_serving(predictor, max_request_mib=0.01), _frame(plain["zip"])).message
    refused = _refusal(_serving(predictor, dicom_max_uncompressed_mib=0.1), _frame(plain["zip"]))
    assert refused.status == 413 and "more than the limit of 0.1 MiB" in refused.message
    refused = _refusal(_serving(predictor, max_dim=100), _frame(plain["zip"]))
    assert refused.status == 413 and "a DICOM image of the archive is 101 x 122 pixels" in refused.message
    refused = _refusal(_serving(predictor, max_voxels=122 * 101 * 9), _frame(plain["zip"]))
    assert refused.status == 413 and "more than 110898 voxels" in refused.message
    refused = _refusal(_serving(predictor, max_spacing_mm=2.5), _frame(plain["zip"]))
    assert refused.status == 400 and "voxel spacing" in refused.message


def test_one_input_kind_per_request_and_the_seg_needs_dicom(predictor, plain) -> None:
    nifti = _b64(_nifti(np.zeros((16, 16, 4), np.int16)))
    mixed = pd.DataFrame({"nifti_base64": [nifti, None], INPUT_DICOM: [None, plain["zip"]]})
    refused = _refusal(_serving(predictor), mixed)
    assert refused.status == 400 and "one input kind per request" in refused.message
    refused = _refusal(_serving(predictor), _frame(nifti, "nifti_base64"), {"return_dicom_seg": True})
    assert refused.status == 400 and "needs DICOM input" in refused.message
    assert "not valid base64" in _refusal(_serving(predictor), _frame("%% not base64")).message
    assert "must be true or false" in _refusal(_serving(predictor), _frame(plain["zip"]),
                                               {"return_dicom_seg": "yes"}).message
    # a NIfTI request answers the columns it always did
    answer = _serving(predictor).predict(None, _frame(nifti, "nifti_base64"))
    assert list(answer.columns) == ["case_id", "mask_nifti_base64", "patient_tumour_score"]


def test_a_header_value_highdicom_refuses_is_left_out_and_quoted_nowhere(predictor, ct, tmp_path: Path, caplog,
                                                                          capfd) -> None:
    """A malformed birth date, which a SEG copies and highdicom refuses (its error quotes it, so does
    pydicom's warning): the SEG is made with it empty, and the value appears in no answer or log."""
    import highdicom as hd

    caplog.set_level(logging.DEBUG)
    birth_date = "1970-02-31"
    _series(ct, tmp_path / "series", PatientBirthDate=birth_date)
    zipped = _zip(tmp_path / "series", tmp_path / "series.zip")
    capfd.readouterr()
    caplog.clear()
    answer = _serving(predictor).predict(None, _frame(zipped), {"return_dicom_seg": True})
    assert decode_mask(answer["mask_nifti_base64"][0]).shape == (122, 101, 10)
    seg_bytes = base64.b64decode(answer[OUTPUT_SEG][0])
    assert hd.seg.segread(io.BytesIO(seg_bytes)).PatientBirthDate == "" and birth_date.encode() not in seg_bytes
    _no_secrets(caplog.text + "".join(capfd.readouterr()), birth_date)   # the SEG itself names the patient


def test_the_signature_declares_the_dicom_column_and_the_seg_param() -> None:
    from pancreas_seg.inference.predictor import PredictionSettings

    declared = signature(PredictionSettings(batch_size=4, flip_tta=True))
    assert INPUT_DICOM in declared.inputs.input_names()
    assert {OUTPUT_SEG, OUTPUT_SEG_RECORD, OUTPUT_SEG_REFUSED} <= set(declared.outputs.input_names())
    assert {p.name: p.default for p in declared.params.params} == {"flip_tta": True, "keep_largest_component": False,
                                                                  "return_dicom_seg": False}


# --------------------------------------------------------------------------------------------
# Over HTTP: the real `mlflow models serve`
# --------------------------------------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.slow
def test_http_a_zipped_series_gets_its_mask_and_seg_and_a_zip_slip_a_400(served: Served, plain, slices) -> None:
    volume: DicomVolume = plain["volume"]
    body = json.dumps({"dataframe_split": {"columns": [INPUT_DICOM], "data": [[plain["zip"]]]},
                       "params": {"return_dicom_seg": True}}).encode()
    status, _, answer, _ = _post(served.base, body)
    assert status == 200, answer
    row = answer["predictions"][0]
    mask = decode_mask(row["mask_nifti_base64"])
    assert mask.shape == volume.array.shape and np.allclose(mask.affine, volume.affine, atol=1e-5)
    _, labels = _seg_labels(row[OUTPUT_SEG], [ds.SOPInstanceUID for ds in volume.datasets])
    np.testing.assert_array_equal(labels, np.asanyarray(mask.dataobj))
    assert row[OUTPUT_SEG_RECORD] is None and row[OUTPUT_SEG_REFUSED] is None

    evil = _zip_bytes({f"{FOLDER}IM0000.dcm": slices[0], f"../{FOLDER}evil.dcm": slices[1]})
    body = json.dumps({"dataframe_split": {"columns": [INPUT_DICOM], "data": [[evil]]}}).encode()
    status, _, answer, _ = _post(served.base, body)
    assert status == 400 and "path traversal" in answer["message"], answer
    _no_secrets(json.dumps(answer) + served.server.log_tail(1_000_000), "evil")
