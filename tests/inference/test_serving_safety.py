"""An endpoint that is safe to expose (issue 24): the served model's limits, path policy, back-pressure
and error hygiene.

Two halves:

* in-process (fast tier): the NIfTI header checks and the capped inflation
  (``pancreas_seg.imaging.nifti_upload``) on real NIfTI bytes written by nibabel and gzip, the
  settings and their environment overrides, admission, and the pyfunc model's ``path`` policy
  and messages (``SegmentationModel`` with a stand-in predictor, so no Keras is needed there);
* over HTTP (``subprocess`` + ``slow``): one real ``mlflow models serve --env-manager local`` on
  127.0.0.1 per module, serving a tiny real Keras model logged through the project's own
  ``log_model_objects`` into a private sqlite store, driven by a plain ``urllib`` / ``http.client``
  client as a hostile one would drive it. The server's RSS is read with psutil.

The bomb is a real one: a gzip stream of 1 GiB of zero voxels behind a 512 x 512 x 2048 header,
about 1 MB (built from one compressed 16 MiB block repeated after full flushes, with the true CRC
and size in its trailer, so it costs under a second to make).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import struct
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks.support.bombs import ZERO_BLOCK, gzip_of_zeros
from pancreas_seg.imaging.nifti_upload import (
    UploadRefused,
    VolumeLimits,
    inflate_exactly,
    read_upload,
    read_upload_header,
)
from pancreas_seg.inference.admission import Admission, DeadlineExceeded, Overloaded, WaitingRoom
from pancreas_seg.inference.model_store import read_bundle_serving_settings, write_bundle
from pancreas_seg.inference.serving import PATH_REFUSED, SegmentationModel, ServingError, scrub
from pancreas_seg.inference.serving_settings import ENV_PREFIX, ServingSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


# --------------------------------------------------------------------------------------------
# Real NIfTI bytes
# --------------------------------------------------------------------------------------------
def _nifti(array: np.ndarray, spacing: tuple[float, float, float] = (0.8, 0.8, 2.5), **header: Any) -> bytes:
    image = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    for key, value in header.items():
        image.header[key] = value
    return image.to_bytes()


def _ct(shape: tuple[int, int, int] = (24, 20, 6)) -> np.ndarray:
    """Smooth int16 HU values (they compress well)."""
    return (np.indices(shape).sum(0).astype(np.int16) % 300) - 100


def _header_only(shape: tuple[int, int, int], dtype: Any = np.int16, spacing=(0.8, 0.8, 1.0)) -> bytes:
    """The 352 bytes (header + extension flag) of a single-file NIfTI-1 of ``shape``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([*spacing, 1.0]), code=1)
    header.set_sform(np.diag([*spacing, 1.0]), code=1)
    header["magic"] = b"n+1"
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1 GiB of zeros behind a 512 x 512 x 2048 uint8 header, gzip: about 1 MB."""
    payload = gzip_of_zeros(_header_only((512, 512, 2048), np.uint8), 1 << 30)
    assert len(payload) < 1.1e6
    # it is what it claims: a valid stream whose first 32 MiB inflate to the header and zeros, and
    # whose trailer says 1 GiB + 352 bytes (mod 2**32)
    inflater = zlib.decompressobj(wbits=31)
    start = inflater.decompress(payload, 2 * ZERO_BLOCK)
    assert start[:348] == _header_only((512, 512, 2048), np.uint8)[:348] and not any(start[352:])
    assert len(start) == 2 * ZERO_BLOCK
    assert struct.unpack("<I", payload[-4:])[0] == (352 + (1 << 30)) & 0xFFFFFFFF
    return payload


@pytest.fixture(scope="module")
def liar() -> bytes:
    """A header that declares 16 x 20 x 6 int16 voxels (3840 bytes) in front of 1 GiB of zeros."""
    return gzip_of_zeros(_header_only((16, 20, 6)), 1 << 30)


def _measure(function, *args) -> tuple[Any, float, int]:
    """(result or the exception, seconds, peak bytes traced) of ``function(*args)``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = function(*args)
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        result = exc
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


# --------------------------------------------------------------------------------------------
# The header checks and the capped inflation, in-process
# --------------------------------------------------------------------------------------------
def test_a_gzip_bomb_is_refused_from_its_header_before_inflating(bomb: bytes) -> None:
    result, seconds, peak = _measure(read_upload, bomb, VolumeLimits())
    assert isinstance(result, UploadRefused) and result.status == 413, result
    assert "536870912 voxels" in str(result) and "(512, 512, 2048)" in str(result)
    assert seconds < 1.0 and peak < 4 * MIB, (seconds, peak)


def test_a_lying_header_cannot_make_the_stream_inflate_more_than_it_declares(liar: bytes) -> None:
    result, seconds, peak = _measure(read_upload, liar, VolumeLimits())
    assert isinstance(result, UploadRefused) and result.status == 400, result
    assert "more data than its header declares" in str(result)
    assert seconds < 1.0 and peak < 4 * MIB, (seconds, peak)
    # the cap itself: a stream of 1000 bytes asked for 100 stops after 101
    with pytest.raises(UploadRefused, match="more data than its header declares"):
        inflate_exactly(gzip.compress(bytes(1000)), 100)
    assert inflate_exactly(gzip.compress(b"x" * 100), 100) == b"x" * 100


def test_a_truncated_or_corrupt_stream_is_refused() -> None:
    good = gzip.compress(_nifti(_ct()))
    assert read_upload(good, VolumeLimits()).array.shape == (24, 20, 6)
    cases = {
        "cut in the voxel data": (good[:len(good) // 2], "looks truncated"),
        "cut in the trailer": (good[:-4], "truncated"),
        "cut in the header": (good[:40], "not readable as NIfTI"),
        "flipped CRC": (good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:], "corrupt"),
        "uncompressed, cut": (_nifti(_ct())[:-10], "looks truncated"),
        "uncompressed, junk after": (_nifti(_ct()) + b"junk", "more data than its header declares"),
        "not NIfTI": (b"certainly not a NIfTI file", "not readable as NIfTI"),
        "gzip, not NIfTI": (gzip.compress(b"x" * 600), "not readable as NIfTI"),
    }
    for name, (payload, expected) in cases.items():
        with pytest.raises(UploadRefused, match=expected) as refused:
            read_upload(payload, VolumeLimits())
        assert refused.value.status == 400, name


LIMITS = VolumeLimits(max_file_bytes=10 * MIB, max_voxels=10_000, max_dim=40, min_spacing_mm=0.5,
                      max_spacing_mm=5.0)


@pytest.mark.parametrize(("payload", "status", "expected"), [
    pytest.param(lambda: _nifti(_ct((41, 10, 10))), 413, "at most 40 voxels along any axis", id="one dimension"),
    pytest.param(lambda: _nifti(_ct((30, 30, 12))), 413, "10800 voxels", id="voxel count"),
    pytest.param(lambda: _nifti(_ct(), spacing=(0.4, 0.8, 2.5)), 400, "outside the accepted range", id="spacing small"),
    pytest.param(lambda: _nifti(_ct(), spacing=(0.8, 0.8, 6.0)), 400, "outside the accepted range", id="spacing large"),
    pytest.param(lambda: _nifti(np.zeros((8, 8), np.int16)), 400, "must be 3D, got 2D", id="2D"),
    pytest.param(lambda: _nifti(np.zeros((8, 8, 4, 2), np.int16)), 400, "must be 3D, got 4D", id="4D"),
    pytest.param(lambda: _nifti(np.zeros((8, 8, 4), np.complex64)), 400, "not a CT intensity type", id="complex"),
    pytest.param(lambda: _nifti(_ct()).replace(b"n+1\x00", b"ni1\x00", 1), 400, "single-file", id="pair header"),
    pytest.param(lambda: _nifti(_ct()) + np.random.default_rng(0).bytes(11 * MIB), 413, "more than the limit",
                 id="file size"),
])
def test_each_limit_is_checked_from_the_header(payload, status: int, expected: str) -> None:
    data = payload()
    with pytest.raises(UploadRefused, match=expected) as refused:
        read_upload_header(data, LIMITS)
    assert refused.value.status == status
    with pytest.raises(UploadRefused, match=expected):
        read_upload(data, LIMITS)


def test_the_defaults_fit_a_512x512x1000_ct_and_equal_conf_base() -> None:
    defaults = ServingSettings()
    ct_header = gzip.compress(_header_only((512, 512, 1000), np.int16, (0.7, 0.7, 0.8)))
    checked = read_upload_header(ct_header, defaults.volume_limits)
    assert checked.shape == (512, 512, 1000) and checked.data_bytes == 512 * 512 * 1000 * 2
    # an uncompressed int16 512x512x1000 .nii (500 MiB + 352 bytes) fits the request limit, as base64 too
    assert 4 * -(-(checked.file_bytes) // 3) <= defaults.max_request_bytes
    assert checked.file_bytes <= defaults.volume_limits.max_file_bytes
    with pytest.raises(UploadRefused):
        read_upload_header(gzip.compress(_header_only((512, 512, 2048), np.int16)), defaults.volume_limits)
    conf = yaml.safe_load((REPO_ROOT / "conf" / "base" / "parameters_inference.yml").read_text())
    assert ServingSettings.from_params(conf["inference"]["serving"]) == defaults


def test_uploads_read_exactly_as_nibabel_reads_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = [(np.int16, None), (np.int16, (2.0, -1024.0)), (np.uint8, (0.5, 0.0)), (np.float32, None)]
    for dtype, scaling in cases:
        image = nib.Nifti1Image((rng.random((20, 18, 7)) * 200).astype(dtype), np.diag([0.8, 0.9, 3.0, 1.0]))
        if scaling:
            image.header.set_slope_inter(*scaling)
        raw = image.to_bytes()
        (tmp_path / "scan.nii").write_bytes(raw)
        expected = nib.load(tmp_path / "scan.nii")
        for payload in (raw, gzip.compress(raw), gzip.compress(raw[:500]) + gzip.compress(raw[500:])):
            volume = read_upload(payload, VolumeLimits())
            reference = np.asanyarray(expected.dataobj)
            assert volume.array.dtype == reference.dtype and np.array_equal(volume.array, reference), (dtype, scaling)
            assert np.array_equal(volume.affine, expected.affine)
    nifti2 = nib.Nifti2Image(_ct(), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert np.array_equal(read_upload(gzip.compress(nifti2.to_bytes()), VolumeLimits()).array, _ct())
    with_nan = _ct().astype(np.float32)
    with_nan[1, 2, 3] = np.nan
    with pytest.raises(UploadRefused, match="1 non-finite voxels"):
        read_upload(_nifti(with_nan), VolumeLimits())


# --------------------------------------------------------------------------------------------
# Settings, the bundle, environment overrides
# --------------------------------------------------------------------------------------------
def test_settings_are_recorded_in_the_bundle_and_overridden_by_the_environment(tmp_path: Path) -> None:
    from pancreas_seg.inference.model_card import CaseSplit, ModelCard
    from pancreas_seg.inference.model_store import TrainedModel

    placeholder = tmp_path / "model.keras"
    placeholder.write_bytes(b"not loaded here")
    card = ModelCard.for_trained_model("unet", "multiclass", {"image_size_px": 32}, None, "Task07_Pancreas",
                                       CaseSplit(("t0",), ("v0",)), "a" * 64)
    recorded = ServingSettings.from_params({"max_in_flight": 3, "path_roots": ["/srv/scans"]})
    folder = write_bundle(tmp_path / "bundle", "unet", TrainedModel(placeholder, card), {"batch_size": 4,
                                                                                        "flip_tta": False},
                          recorded.to_dict())
    loaded = ServingSettings.from_params(read_bundle_serving_settings(folder))
    assert loaded == recorded and loaded.max_in_flight == 3 and loaded.path_roots == ("/srv/scans",)
    old = write_bundle(tmp_path / "old", "unet", TrainedModel(placeholder, card), {"batch_size": 4, "flip_tta": False})
    assert ServingSettings.from_params(read_bundle_serving_settings(old)) == ServingSettings()

    environ = {f"{ENV_PREFIX}MAX_IN_FLIGHT": "2", f"{ENV_PREFIX}RETRY_AFTER_S": "5",
               f"{ENV_PREFIX}PATH_ROOTS": os.pathsep.join(["/a", "/b"]), f"{ENV_PREFIX}MAX_REQUEST_MIB": "1.5",
               "UNRELATED": "x"}
    overridden = loaded.with_environment(environ)
    assert (overridden.max_in_flight, overridden.retry_after_s, overridden.path_roots) == (2, 5, ("/a", "/b"))
    assert overridden.max_request_bytes == int(1.5 * MIB) and overridden.max_queue == loaded.max_queue
    assert loaded.with_environment({f"{ENV_PREFIX}PATH_ROOTS": ""}).path_roots == ()
    with pytest.raises(ValueError, match=f"{ENV_PREFIX}MAX_IN_FLIGHT='two'"):
        loaded.with_environment({f"{ENV_PREFIX}MAX_IN_FLIGHT": "two"})
    with pytest.raises(ValueError, match="max_in_flight must be positive"):
        loaded.with_environment({f"{ENV_PREFIX}MAX_IN_FLIGHT": "0"})
    with pytest.raises(ValueError, match="unknown keys"):
        ServingSettings.from_params({"max_inflight": 2})


def test_the_waiting_room_serves_first_come_first_served() -> None:
    """A client that asks again the moment it is answered cannot overtake one that waits."""
    import asyncio

    async def scenario() -> list[str]:
        admission = Admission(max_in_flight=1, max_queue=0, queue_timeout_s=5, request_timeout_s=5, retry_after_s=3)
        room = WaitingRoom(max_waiting=2, wait_s=2.0, poll_s=0.01)
        order: list[str] = []
        held = await room.admit(admission)                       # the one in flight

        async def client(name: str, hold_s: float) -> None:
            ticket = await room.admit(admission)
            order.append(name)
            await asyncio.sleep(hold_s)
            ticket.release()

        waiter = asyncio.create_task(client("waited", 0.05))
        await asyncio.sleep(0.05)
        assert room.waiting == 1
        second = asyncio.create_task(client("second", 0.05))
        await asyncio.sleep(0.02)
        assert room.waiting == 2
        with pytest.raises(Overloaded, match="busy") as full:     # max_waiting 2: a third waiter is refused
            await room.admit(admission)
        assert full.value.retry_after_s == 3 and room.waiting == 2
        room.max_waiting = 3                                      # room for the one that asks again
        held.release()                                            # the one in flight is answered and asks again
        again = asyncio.create_task(client("asked again", 0.0))
        await asyncio.gather(waiter, second, again)
        return order

    assert asyncio.run(scenario()) == ["waited", "second", "asked again"]


def test_the_waiting_room_gives_up_after_its_wait() -> None:
    import asyncio

    admission = Admission(max_in_flight=1, max_queue=0, queue_timeout_s=5, request_timeout_s=5, retry_after_s=3)
    admission.admit()
    room = WaitingRoom(max_waiting=4, wait_s=0.1, poll_s=0.01)
    start = time.monotonic()
    with pytest.raises(Overloaded, match="no place became free within 0.1 s"):
        asyncio.run(room.admit(admission))
    assert 0.09 < time.monotonic() - start < 1.0 and room.waiting == 0


def test_admission_bounds_requests_in_flight_and_waiting() -> None:
    admission = Admission(max_in_flight=1, max_queue=1, queue_timeout_s=0.2, request_timeout_s=5, retry_after_s=7)
    first, second = admission.admit(), admission.admit()
    with pytest.raises(Overloaded) as busy:
        admission.admit()
    assert busy.value.retry_after_s == 7 and admission.admitted == 2
    with first.slot():
        start = time.monotonic()
        with pytest.raises(Overloaded, match="no segmentation slot"), second.slot():
            pass
        assert 0.15 < time.monotonic() - start < 2
    with second.slot():
        pass
    first.release()
    first.release()                     # idempotent
    assert admission.admitted == 1
    third = admission.admit()
    third.deadline = time.monotonic() - 1
    with pytest.raises(DeadlineExceeded):
        third.check_deadline("segmenting")
    second.release()
    third.release()
    assert admission.admitted == 0


# --------------------------------------------------------------------------------------------
# The pyfunc model in-process: path policy, messages, logs
# --------------------------------------------------------------------------------------------
class _StandIn:
    """Stands in for the Predictor (no Keras): labels 1 wherever HU > 0; no tumour output (no patient score)."""

    has_tumour_output = False

    def __init__(self) -> None:
        self.names: list[str] = []

    def with_settings(self, **changes: Any) -> _StandIn:
        return self

    def segment(self, hu: np.ndarray, affine: np.ndarray, name: str = "scan") -> np.ndarray:
        self.names.append(name)
        return (np.asarray(hu) > 0).astype(np.uint8)


def _model(local_paths: bool = False, **settings: Any) -> SegmentationModel:
    model = SegmentationModel(local_paths=local_paths)
    model.predictor = _StandIn()
    model.configure(ServingSettings(**settings))
    return model


def _refusal(model: SegmentationModel, frame: pd.DataFrame) -> ServingError:
    with pytest.raises(ServingError) as refused:
        model.predict(None, frame)
    return refused.value


@pytest.fixture
def files(tmp_path: Path, small_task07: Path) -> dict[str, Path]:
    """A real training image (outside the allowed root), an allowed root with a scan, and links."""
    training = sorted((small_task07 / "imagesTr").glob("pancreas_*.nii.gz"))[0]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = allowed / "scan.nii.gz"
    inside.write_bytes(gzip.compress(_nifti(_ct())))
    (allowed / "link.nii.gz").symlink_to(training)
    return {"training": training, "allowed": allowed, "inside": inside, "link": allowed / "link.nii.gz",
            "missing": tmp_path / "no_such_patient.nii.gz"}


def test_the_served_model_refuses_paths_alike_whether_or_not_they_exist(files: dict[str, Path], caplog) -> None:
    model = _model()
    refusals = [_refusal(model, pd.DataFrame({"path": [str(path)]}))
                for path in (files["training"], files["missing"], files["inside"], files["allowed"])]
    assert {(r.status, r.message) for r in refusals} == {(403, PATH_REFUSED.format(index=0))}
    # allow-listed: inside the root is read; a symlink or ".." out of it is refused with the same message
    model = _model(path_roots=(str(files["allowed"]),))
    answer = model.predict(None, pd.DataFrame({"path": [str(files["inside"])]}))
    assert list(answer["case_id"]) == ["scan"]
    escapes = [files["link"], files["allowed"] / ".." / "no_such_patient.nii.gz",
               Path(str(files["allowed"]) + "/../" + os.path.relpath(files["training"], files["allowed"].parent)),
               files["allowed"] / "missing.nii.gz", files["allowed"]]
    for path in escapes:
        refused = _refusal(model, pd.DataFrame({"path": [str(path)]}))
        assert (refused.status, refused.message) == (403, PATH_REFUSED.format(index=0)), path
    text = caplog.text + " ".join(r.message for r in refusals)
    for path in files.values():
        assert str(path) not in text and path.name not in text


def test_an_in_process_caller_may_read_any_path(files: dict[str, Path], caplog) -> None:
    model = _model(local_paths=True)
    answer = model.predict(None, pd.DataFrame({"path": [str(files["training"])]}))
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(answer["mask_nifti_base64"][0])))
    assert mask.shape == nib.load(files["training"]).shape and answer["case_id"][0] == "pancreas_001"
    assert model.predictor.names == ["row0"]          # the predictor (and its logs) never see the file name
    assert "is not a file" in _refusal(model, pd.DataFrame({"path": [str(files["missing"])]})).message
    assert "request refused (400)" in caplog.text and files["missing"].name not in caplog.text   # logs: scrubbed


def test_request_limits_statuses_and_messages(caplog) -> None:
    model = _model(max_rows=2, max_request_mib=0.01, max_dim=64)
    good = base64.b64encode(gzip.compress(_nifti(_ct()))).decode()
    assert _refusal(model, pd.DataFrame({"nifti_base64": [good] * 3})).status == 413
    oversize = _refusal(model, pd.DataFrame({"nifti_base64": ["A" * 11000]}))
    assert oversize.status == 413 and "base64 input" in oversize.message
    tall = base64.b64encode(gzip.compress(_header_only((8, 8, 65)))).decode()
    assert _refusal(model, pd.DataFrame({"nifti_base64": [tall]})).status == 413
    assert _refusal(model, pd.DataFrame({"nifti_base64": ["%%% not base64"]})).status == 400
    both = _refusal(model, pd.DataFrame({"nifti_base64": [good], "path": ["/x"]}))
    assert both.status == 400 and "exactly one" in both.message
    assert "neither" in _refusal(model, pd.DataFrame({"scan": ["x"]})).message
    answer = model.predict(None, pd.DataFrame({"nifti_base64": [good, good]}))
    assert list(answer["case_id"]) == ["row0", "row1"]
    # a header field that may hold a patient's name never reaches an error or a log
    named = _nifti(_ct(), spacing=(0.01, 0.8, 2.5), descrip=b"Doe^John PID123456", db_name=b"Doe^John")
    refused = _refusal(model, pd.DataFrame({"nifti_base64": [base64.b64encode(named).decode()]}))
    assert refused.status == 400 and "spacing" in refused.message
    assert "Doe" not in refused.message + caplog.text and "PID123456" not in refused.message + caplog.text


def test_mlflow_cannot_prefix_the_request_into_an_error_and_statuses_map() -> None:
    error = ServingError("row 0: refused", 413)
    error.message = "Failed to predict data '  path\n0  /data/patient_smith.nii.gz'. \nError: row 0: refused"
    assert error.message == "row 0: refused" and error.get_http_status_code() == 413
    assert json.loads(error.serialize_as_json())["message"] == "row 0: refused"
    busy = json.loads(ServingError("busy", 503, retry_after_s=7).serialize_as_json())
    assert busy["retry_after_s"] == 7 and busy["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert scrub("cannot open /data/raw/patient_smith.nii.gz nor smith.nii") == "cannot open <path> nor <path>"


def test_an_unexpected_error_is_a_500_naming_only_its_type(caplog) -> None:
    class Failing(_StandIn):
        def segment(self, hu, affine, name="scan"):
            raise RuntimeError("cannot write /tmp/pancreas_seg_x/patient_smith.nii.gz")

    model = _model()
    model.predictor = Failing()
    refused = _refusal(model, pd.DataFrame({"nifti_base64": [base64.b64encode(_nifti(_ct())).decode()]}))
    assert refused.status == 500 and "RuntimeError" in refused.message
    assert "smith" not in refused.message and "smith" not in caplog.text
    assert "stack_trace" not in json.loads(refused.serialize_as_json())


# --------------------------------------------------------------------------------------------
# Over HTTP: the real `mlflow models serve`
# --------------------------------------------------------------------------------------------
RECORDED = {"max_in_flight": 1, "max_queue": 1, "max_waiting": 2, "retry_after_s": 7, "max_rows": 2,
            "max_request_mib": 8, "queue_timeout_s": 30, "request_timeout_s": 120}
"""Logged into the model's bundle (as ``inference.serving`` would be)."""
MAX_REQUEST_MIB = 2
"""Set at serve time through the environment (overrides the recorded 8 MiB)."""
QUEUE_TIMEOUT_S = 0.5
STARTUP_TIMEOUT_S = 240
PREPROCESSING = {"image_size_px": 128, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}


@dataclass
class Served:
    base: str
    server: Any
    allowed: Path
    inside: Path
    training: Path
    log_path: Path

    def uvicorn(self) -> Any:
        """The process that serves (``mlflow models serve`` execs uvicorn in a child shell)."""
        import psutil

        parent = psutil.Process(self.server.process.pid)
        family = [parent, *parent.children(recursive=True)]
        return max(family, key=lambda p: p.memory_info().rss)


def _post(base: str, body: bytes, timeout: float = 120) -> tuple[int, dict[str, str], dict, float]:
    request = urllib.request.Request(f"{base}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, text = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, dict(error.headers), error.read()
    seconds = time.perf_counter() - start
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"raw": text.decode(errors="replace")}
    return status, {k.lower(): v for k, v in headers.items()}, answer, seconds


def _body(column: str, *values: str, **params: Any) -> bytes:
    payload: dict[str, Any] = {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}
    if params:
        payload["params"] = params
    return json.dumps(payload).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, small_task07: Path) -> Iterator[Served]:
    """A tiny real Keras model logged with :data:`RECORDED` and served on a free loopback port."""
    import keras
    import mlflow

    from benchmarks.support.local_server import LocalServer, ServerError, free_port
    from benchmarks.support.project_copy import subprocess_env
    from pancreas_seg.inference import serving
    from pancreas_seg.inference.model_card import CaseSplit, ModelCard
    from pancreas_seg.inference.predictor import PredictionSettings
    from pancreas_seg.models.io import weights_sha256

    folder = tmp_path_factory.mktemp("serving_safety")
    inputs = keras.Input((None, None, 1), name="image")
    hidden = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    hidden = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(hidden)
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax", name="classes")(hidden)
    model = keras.Model(inputs, outputs, name="probe")
    card = ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("pancreas_001",), ("pancreas_002",)), weights_sha256(model))
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("serving_safety", artifact_location=(folder / "artifacts").as_uri())
        run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
        uri = serving.log_model_objects(run_id, "unet", model, card, PredictionSettings(batch_size=4, flip_tta=False),
                                        serving=RECORDED)
    finally:
        mlflow.set_tracking_uri(previous)

    allowed = folder / "allowed"
    allowed.mkdir()
    inside = allowed / "scan.nii.gz"
    inside.write_bytes(gzip.compress(_nifti(_ct())))
    env = subprocess_env(MLFLOW_TRACKING_URI=tracking_uri,
                         PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                         **{f"{ENV_PREFIX}MAX_REQUEST_MIB": str(MAX_REQUEST_MIB),
                            f"{ENV_PREFIX}QUEUE_TIMEOUT_S": str(QUEUE_TIMEOUT_S),
                            f"{ENV_PREFIX}PATH_ROOTS": str(allowed)})
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    base = f"http://127.0.0.1:{port}"
    with LocalServer(command, f"{base}/ping", folder / "serve.log", folder, env) as server:
        try:
            server.wait_ready(STARTUP_TIMEOUT_S, interval_s=1)
        except ServerError as error:
            pytest.fail(str(error))
        status, _, answer, _ = _post(base, _body("nifti_base64", _b64(gzip.compress(_nifti(_ct()))))) # warm-up
        assert status == 200, (answer, server.log_tail())
        yield Served(base, server, allowed, inside, sorted((small_task07 / "imagesTr").glob("*.nii.gz"))[0],
                     folder / "serve.log")


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_a_good_scan_is_segmented_in_its_own_geometry(served: Served) -> None:
    array = _ct((40, 36, 10))
    status, _, answer, _ = _post(served.base, _body("nifti_base64", _b64(gzip.compress(_nifti(array)))))
    assert status == 200, answer
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(answer["predictions"][0]["mask_nifti_base64"])))
    assert mask.shape == array.shape and mask.get_data_dtype() == np.uint8
    assert np.allclose(mask.affine, np.diag([0.8, 0.8, 2.5, 1.0]))
    # an uncompressed .nii too (its voxels are a read-only view of the request's bytes)
    status, _, answer, _ = _post(served.base, _body("nifti_base64", _b64(_nifti(array))))
    assert status == 200, answer


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_the_path_input_is_refused_alike_whether_or_not_the_file_exists(served: Served) -> None:
    refused = []
    for path in (served.training, served.training.with_name("pancreas_999.nii.gz"),
                 served.allowed / ".." / served.allowed.name / ".." / "mlflow.db", served.allowed / "nothing.nii.gz",
                 Path("/etc/passwd")):
        status, headers, answer, _ = _post(served.base, _body("path", str(path)))
        refused.append((status, answer))
        assert str(path) not in json.dumps(answer) and path.name not in json.dumps(answer)
    assert all(r == refused[0] for r in refused), refused
    assert refused[0][0] == 403 and refused[0][1]["message"] == PATH_REFUSED.format(index=0)
    # under the allow-listed root (set through PANCREAS_SEG_SERVING_PATH_ROOTS) the file is read
    status, _, answer, _ = _post(served.base, _body("path", str(served.inside)))
    assert status == 200 and answer["predictions"][0]["case_id"] == "scan", answer


def _rss_while(served: Served, body: bytes) -> tuple[int, dict, float, int]:
    """Post ``body``; (status, answer, seconds, the server's peak RSS growth in bytes while it ran)."""
    process = served.uvicorn()
    before, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status, _, answer, seconds = _post(served.base, body)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return status, answer, seconds, peak[0] - before


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_a_gzip_bomb_and_a_lying_header_are_refused_fast_and_small(served: Served, bomb: bytes,
                                                                        liar: bytes) -> None:
    status, answer, seconds, growth = _rss_while(served, _body("nifti_base64", _b64(bomb)))
    assert status == 413 and "536870912 voxels" in answer["message"], answer
    assert seconds < 1.0 and growth < 100 * MIB, (seconds, growth / MIB)
    status, answer, seconds, growth = _rss_while(served, _body("nifti_base64", _b64(liar)))
    assert status == 400 and "more data than its header declares" in answer["message"], answer
    assert seconds < 1.0 and growth < 100 * MIB, (seconds, growth / MIB)


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_truncated_corrupt_and_malformed_uploads_get_400(served: Served) -> None:
    good = gzip.compress(_nifti(_ct()))
    cases = {"truncated gzip": (good[:len(good) // 2], "truncated"), "no trailer": (good[:-4], "truncated"),
             "not NIfTI": (b"certainly not a NIfTI file", "not readable as NIfTI"),
             "2D": (_nifti(np.zeros((16, 16), np.int16)), "must be 3D"),
             "spacing": (_nifti(_ct(), spacing=(0.8, 0.8, 50.0)), "outside the accepted range")}
    for name, (payload, expected) in cases.items():
        status, _, answer, seconds = _post(served.base, _body("nifti_base64", _b64(payload)))
        assert status == 400 and expected in answer["message"], (name, answer)
        assert "stack_trace" not in answer and "Failed to predict data" not in answer["message"], (name, answer)
        assert seconds < 1.0, (name, seconds)


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_an_oversize_request_is_refused_before_it_is_read(served: Served) -> None:
    limit = MAX_REQUEST_MIB * MIB
    # far past the limit: answered from the Content-Length header alone, before any of the body
    # (a client that sent all of it would see the connection closed under it)
    host = served.base.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=30)
    start = time.perf_counter()
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(30 * MIB))
    connection.endheaders()
    connection.send(b'{"dataframe_split": {"columns": ["nifti_base64"], "data": [["AAAA')
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 413 and f"limit of {limit + 64 * 1024} bytes" in answer["message"], answer
    assert time.perf_counter() - start < 1.0
    connection.close()
    # just past it (within the JSON slack): refused by the model from the base64 text
    status, _, answer, _ = _post(served.base, _body("nifti_base64", "A" * (limit + 1000)))
    assert status == 413 and "bytes of base64 input" in answer["message"], answer
    # too many rows (2 recorded)
    one = _b64(gzip.compress(_nifti(_ct())))
    status, _, answer, _ = _post(served.base, _body("nifti_base64", one, one, one))
    assert status == 413 and "at most 2 scans" in answer["message"], answer
    # no Content-Length (chunked): 411, nothing read
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"10\r\n" + b'{"dataframe_spl' + b"i\r\n0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 411, response.read()
    connection.close()


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_past_the_queue_the_answer_is_503_with_retry_after_then_200_again(served: Served) -> None:
    heavy = _b64(gzip.compress(_nifti(_ct((256, 256, 240)))))
    slow = _body("nifti_base64", heavy, heavy, flip_tta=True)        # two scans, mirrored TTA: seconds
    small = _body("nifti_base64", _b64(gzip.compress(_nifti(_ct()))))
    results: dict[str, tuple] = {}

    def send(name: str, body: bytes) -> None:
        results[name] = _post(served.base, body)

    first = threading.Thread(target=send, args=("in flight", slow))
    first.start()
    time.sleep(0.5)                                  # admitted and segmenting (it takes seconds)
    others = [threading.Thread(target=send, args=(f"burst{i}", small)) for i in range(6)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=300)
    statuses = {name: result[0] for name, result in results.items()}
    assert statuses["in flight"] == 200, results["in flight"][2]
    assert results["in flight"][3] > 2.0, "the long request must outlast the burst and the 0.5 s queue wait"
    burst = [results[f"burst{i}"] for i in range(6)]
    assert all(status == 503 for status, *_ in burst), statuses
    for status, headers, answer, _ in burst:
        assert headers.get("retry-after") == "7" and answer.get("retry_after_s") == 7, (headers, answer)
    messages = [answer["message"].split(" (")[0].split(";")[0] for _, _, answer, _ in burst]
    # admitted but no slot in time, held in the waiting room (max_waiting 2, bodies unread) past
    # the 0.5 s wait, or refused at once because the room was full; how many of each depends on
    # when the burst's threads arrive
    assert set(messages) <= {"no place became free within 0.5 s", "no segmentation slot became free within 0.5 s",
                             "the server is busy"}, messages
    assert "the server is busy" in messages, messages     # the waiting room is bounded
    status, _, answer, _ = _post(served.base, small)
    assert status == 200, answer


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_the_server_log_names_no_file_and_no_patient(served: Served, bomb: bytes) -> None:
    _post(served.base, _body("path", str(served.training)))
    _post(served.base, _body("nifti_base64", _b64(_nifti(_ct(), spacing=(0.8, 0.8, 50.0), descrip=b"Doe^John"))))
    log = served.server.log_tail(1_000_000)
    assert "request refused (403)" in log and "request refused (400)" in log   # the refusals are logged ...
    for secret in (str(served.training), served.training.name, "pancreas_999", str(served.allowed), "Doe^John",
                   "/etc/passwd", "nothing.nii.gz"):
        assert secret not in log, secret                                         # ... without what they named


@pytest.mark.subprocess
@pytest.mark.slow
def test_http_a_client_that_disconnects_mid_upload_costs_one_log_line(served: Served) -> None:
    import socket

    host, port = served.base.removeprefix("http://").split(":")
    before = served.server.log_tail(1_000_000)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000000\r\n\r\n" + b'{"dataframe_split": ' + b" " * 4000)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log = served.server.log_tail(1_000_000)[len(before):]
        if "disconnected before its request was read" in log:
            break
        time.sleep(0.2)
    assert "disconnected before its request was read" in log, log[-2000:]
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-2000:]
    status, _, answer, _ = _post(served.base, _body("nifti_base64", _b64(gzip.compress(_nifti(_ct())))))
    assert status == 200, answer                                  # its admission was released
