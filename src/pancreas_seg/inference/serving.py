"""The MLflow pyfunc model: CT scans in, label maps out, through the inference pipeline's own code.

Every trained model (single, cascade, fold ensemble) is logged as an MLflow 3 pyfunc model whose
``predict`` runs the one predictor, :class:`pancreas_seg.inference.predictor.Predictor`: the same
preprocessing, prediction, map-back and post-processing as ``kedro run --pipelines=inference``.
The model's artifact ``bundle`` (see :func:`pancreas_seg.inference.model_store.write_bundle`) holds
the ``.keras`` file(s) and model card(s); ``bundle.json`` also records the prediction settings
(``inference`` parameters of the run that logged it: batch size, XLA, flip TTA, post-processing)
and the serving limits (``inference.serving``, :class:`~pancreas_seg.inference.serving_settings.ServingSettings`,
which ``PANCREAS_SEG_SERVING_<KEY>`` environment variables override at serve time).

Input, a DataFrame with one row per scan and, in each row, exactly one of the input columns
(:data:`INPUT_COLUMNS`; a new input kind is one more entry there and in :func:`signature`):

* ``nifti_base64``: the bytes of a ``.nii`` or ``.nii.gz`` file, base64-encoded (for HTTP);
* ``path``: a local NIfTI file path. **Off in the served model**: refused with one message,
  whether or not the file exists, unless the path (symlinks and ``..`` resolved) lies under one of
  ``serving.path_roots``. An in-process caller may allow any path:
  ``SegmentationModel(local_paths=True)``, or :func:`load_in_process`;
* ``dicom_zip_base64``: a ``.zip`` of ONE DICOM CT series, base64-encoded. A request is either
  DICOM (every row this column) or NIfTI (``nifti_base64`` / ``path``), never both.

Parameters (optional, per request): ``flip_tta`` and ``keep_largest_component``, as in the
inference pipeline's ``inference`` settings (their defaults are the recorded settings), and
``return_dicom_seg`` (default false; DICOM requests only).

Output, one row per input row: ``mask_nifti_base64``, the label map (uint8, 0 background,
1 pancreas, 2 tumour) as a base64-encoded ``.nii.gz`` with the input's shape, affine and header,
``case_id`` (``row<i>`` for uploaded bytes, the file's case id for a ``path``) and
``patient_tumour_score``: the maximum tumour probability over the scan (float in [0, 1], the
patient-level tumour score of :class:`~pancreas_seg.inference.predictor.ScanPrediction`; null for
a model without a tumour output). Clients that read only the mask are unaffected by that column. For a DICOM
series the mask is on the series grid as the inference pipeline writes it for DICOM input: the
array and affine of :func:`pancreas_seg.imaging.dicom_io.read_dicom_archive` (``mask[i, j, k]`` =
column i, row j of the k-th slice along the slice normal; affine voxel -> RAS mm; not dcm2niix's
row-flipped layout), no header. With ``return_dicom_seg`` three more columns:
``dicom_seg_base64`` (a DICOM-SEG of the series, :func:`pancreas_seg.imaging.dicom_seg.build_dicom_seg`),
``dicom_seg_record`` (JSON of the source UIDs generated for a series without usable ones, as in
the pipeline's sidecar; else null) and ``dicom_seg_refused`` (why no SEG could be made; the mask
is answered all the same; else null).

A DICOM upload is written to a private temporary folder (mode 0700) that is removed when the
request ends, checked from the zip's central directory (``dicom_max_members``,
``dicom_max_uncompressed_mib``, unsafe names: :func:`~pancreas_seg.imaging.dicom_io.check_archive`)
and from its images' headers (``max_dim``, ``max_voxels``) before anything is extracted or
decoded, then read in the slot (extracted to another private folder that the reader removes) and
its spacing checked. The reader's messages and logs name archive members; here errors are
rewritten to name only the problem, the reader's log records lose their arguments, and pydicom's
log records and warnings (which may quote header values) are withheld.

What a request may cost is bounded before any voxel data is inflated, in this order (statuses
as MLflow's scoring server answers them; see :mod:`pancreas_seg.inference.scoring_server_guard`
for what is checked before MLflow reads the body):

1. admission: at most ``max_in_flight + max_queue`` requests at once, else **503** with
   ``Retry-After`` (and ``retry_after_s`` in the JSON body);
2. the request: at most ``max_rows`` rows and ``max_request_mib`` of base64 text, else **413**;
3. each scan's bytes and NIfTI header (:mod:`pancreas_seg.imaging.nifti_upload`): file size,
   3D, each dimension, voxel count (**413** past a limit), voxel type and spacing range
   (**400**); a malformed row (not base64, not NIfTI, no input column) is **400**; a DICOM
   zip's size, central directory and image headers (**413** past a limit, **400** unsafe or not
   a zip);
4. a slot: wait at most ``queue_timeout_s`` for one of ``max_in_flight``, else **503**;
5. in the slot, per scan: the deadline (``request_timeout_s`` from admission, else **504**), the
   voxel data inflated into a buffer of the declared size (more or less data: **400**), finite
   voxels (**400**), then segmentation; a DICOM zip is read (no series, two series, an unusable
   series, a spacing out of range: **400**).

Every error is an :class:`mlflow.exceptions.MlflowException` (:class:`ServingError`) whose message
names the row and the problem and never a file name, a path or a header field that can identify
a patient; the scoring server answers it without a stack trace and keeps serving. An unexpected
error is answered 500 with its exception type only, and logged the same way.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import gzip
import io
import json
import logging
import numbers
import re
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pancreas_seg.core.backend import AUTO, apply_backend
from pancreas_seg.imaging.nifti_io import NiftiVolume, nifti_bytes
from pancreas_seg.imaging.nifti_upload import UploadRefused, VolumeLimits, read_upload, read_upload_header
from pancreas_seg.inference import scoring_server_guard
from pancreas_seg.inference.admission import (
    CURRENT_TICKET,
    Admission,
    DeadlineExceeded,
    Overloaded,
    Ticket,
    WaitingRoom,
)
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.model_store import (
    SERVING_MODEL_NAME,
    TrainedEnsemble,
    TrainedModel,
    read_bundle,
    read_bundle_serving_settings,
    read_bundle_settings,
    write_bundle,
)
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.inference.serving_settings import ServingSettings
from pancreas_seg.task07.layout import case_id_from_path

logger = logging.getLogger(__name__)

INPUT_BASE64, INPUT_PATH, INPUT_DICOM = "nifti_base64", "path", "dicom_zip_base64"
INPUT_COLUMNS = {INPUT_BASE64: "base64 NIfTI bytes", INPUT_PATH: "a local NIfTI file",
                 INPUT_DICOM: "a .zip of one DICOM CT series, base64"}
"""The input columns and what each holds; a row uses exactly one of them."""
BASE64_COLUMNS = (INPUT_BASE64, INPUT_DICOM)
"""Input columns whose text counts towards ``serving.max_request_mib``."""
DICOM_COLUMNS = (INPUT_DICOM,)
"""Input columns of DICOM uploads: a request's rows are all DICOM or all NIfTI (``nifti_base64``, ``path``)."""
OUTPUT_BASE64, OUTPUT_CASE = "mask_nifti_base64", "case_id"
OUTPUT_SCORE = "patient_tumour_score"
"""Output column: the patient-level tumour score (maximum tumour probability), null without a tumour output."""
OUTPUT_SEG, OUTPUT_SEG_RECORD, OUTPUT_SEG_REFUSED = "dicom_seg_base64", "dicom_seg_record", "dicom_seg_refused"
"""Output columns of a DICOM request with ``return_dicom_seg``: the SEG's bytes (base64), the JSON record of
the source UIDs generated for it (when the series lacked usable ones), and why no SEG was made."""
SEG_COLUMNS = (OUTPUT_SEG, OUTPUT_SEG_RECORD, OUTPUT_SEG_REFUSED)
BUNDLE_ARTIFACT = "bundle"
MODEL_NAME = SERVING_MODEL_NAME
"""The logged model's name in its run (what the UI shows under *Models*)."""
REQUEST_PARAMS = ("flip_tta", "keep_largest_component")
"""Prediction settings a request may change (the scoring server's ``params``); the defaults are the
settings recorded in the bundle."""
RETURN_DICOM_SEG = "return_dicom_seg"
RESPONSE_PARAMS = {RETURN_DICOM_SEG: False}
"""Boolean request params that choose what the answer holds (not prediction settings), with their defaults."""
PATH_REFUSED = ("row {index}: the '" + INPUT_PATH + "' input is refused: this server reads local files only "
                "under its allow-listed folders (serving.path_roots), and this is not a readable file under them")
"""The one message for every refused ``path`` in the served model (missing, outside the roots, a folder ...)."""

_ERROR_CODES = {400: INVALID_PARAMETER_VALUE, 403: PERMISSION_DENIED, 413: INVALID_PARAMETER_VALUE,
                500: INTERNAL_ERROR, 503: TEMPORARILY_UNAVAILABLE, 504: DEADLINE_EXCEEDED}
_PATH_LIKE = re.compile(r"(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'\"]+){2,}|[^\s/\\'\"]+\.nii(?:\.gz)?")
"""Something that looks like a path (two or more segments) or a NIfTI file name, for :func:`scrub`."""


def signature(settings: PredictionSettings) -> ModelSignature:
    """The pyfunc signature: NIfTI or zipped DICOM in, label maps (and DICOM-SEGs) out,
    :data:`REQUEST_PARAMS` defaulting to ``settings`` and :data:`RESPONSE_PARAMS` to their defaults."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", column, required=False) for column in INPUT_COLUMNS]),
        outputs=Schema([ColSpec("string", OUTPUT_CASE), ColSpec("string", OUTPUT_BASE64),
                        ColSpec("double", OUTPUT_SCORE, required=False),
                        *(ColSpec("string", column, required=False) for column in SEG_COLUMNS)]),
        params=ParamSchema([*(ParamSpec(name, "boolean", getattr(settings, name)) for name in REQUEST_PARAMS),
                            *(ParamSpec(name, "boolean", default) for name, default in RESPONSE_PARAMS.items())]),
    )


class ServingError(MlflowException):
    """A request the served model does not answer with masks: ``status`` is the HTTP status.

    MLflow's scoring server prefixes a model's error message with the whole request DataFrame
    (``Failed to predict data '<data>'``, ``mlflow/pyfunc/scoring_server/__init__.py``,
    ``invocations``); that would echo a client's paths and file contents back, so this message
    keeps its first value.
    """

    def __init__(self, message: str, status: int = 400, retry_after_s: int | None = None) -> None:
        extra = {"retry_after_s": retry_after_s} if retry_after_s is not None else {}
        super().__init__(message, error_code=_ERROR_CODES.get(status, INTERNAL_ERROR), **extra)
        self.status = status

    @property
    def message(self) -> str:  # type: ignore[override]
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value

    def get_http_status_code(self) -> int:
        return self.status


def scrub(text: str) -> str:
    """``text`` with anything that looks like a file path replaced by ``<path>`` (for logs)."""
    return _PATH_LIKE.sub("<path>", text)


def _flag(params: Mapping[str, Any], name: str) -> bool:
    """A boolean request param of :data:`RESPONSE_PARAMS` (absent or None: its default)."""
    value = params.get(name)
    if value is None:
        return RESPONSE_PARAMS[name]
    if isinstance(value, bool) or type(value).__name__ == "bool_":    # numpy's bool too
        return bool(value)
    raise ServingError(f"param '{name}' must be true or false, got a {type(value).__name__}")


class _RequestFolder:
    """A request's private temporary folder (mode 0700), made on first use and removed on exit."""

    def __init__(self) -> None:
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(prefix="pancreas_seg_serving_"))
        return self._path

    def __enter__(self) -> _RequestFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


#: :attr:`~pancreas_seg.imaging.dicom_io.UnsafeArchiveError.reason` -> (HTTP status, what the client is
#: told): the reader's messages name the archive's path and members, these do not.
_ARCHIVE_REFUSALS = {
    "not_zip": (400, "is not a readable zip file"),
    "too_many_members": (413, "has {found}members, more than the limit of {max_members} "
                              "(serving.dicom_max_members); nothing was extracted"),
    "too_large": (413, "holds {found}bytes uncompressed, more than the limit of {max_mib} MiB "
                       "(serving.dicom_max_uncompressed_mib); nothing was extracted"),
    "unsafe_path": (400, "has a member with an absolute or '..' path (path traversal); nothing was extracted"),
    "symbolic_link": (400, "has a member that is a symbolic link; nothing was extracted"),
    "encrypted": (400, "has an encrypted member"),
    "inflates": (413, "has a member that inflates past its declared size or the uncompressed limit"),
    "unreadable_member": (400, "has a member that cannot be extracted (corrupt, or an unsupported compression)"),
}
#: What the client is told for each kind of :class:`~pancreas_seg.imaging.dicom_io.SeriesProblem`
#: (kinds not listed are named as they are, with spaces).
_SERIES_PROBLEMS = {
    "not_ct": "not CT (Modality)",
    "localizer": "a localizer or scout, or a single slice",
    "gantry_tilt": "gantry tilt, which is refused, not resampled (convert the series with dcm2niix first)",
    "no_decoder": "a transfer syntax with no pixel decoder installed on the server",
    "too_few_slices": "too few slices",
    "ungrouped_file": "DICOM files in no series",
}

_READING_UPLOAD: contextvars.ContextVar[int | None] = contextvars.ContextVar("pancreas_seg_reading_upload",
                                                                            default=None)
"""The row whose DICOM upload this thread is reading (None: not reading one)."""
_READER_LOCK = threading.Lock()
"""Serialises the DICOM reads and SEG builds of concurrent requests: ``warnings.catch_warnings`` is process-wide."""


class _UploadLogFilter(logging.Filter):
    """While a DICOM upload is read, the DICOM reader's log records keep their text but not their
    arguments (archive paths, member names, series descriptions), numbers excepted, and pydicom's
    records (they may quote header values) are withheld entirely."""

    def filter(self, record: logging.LogRecord) -> bool:
        index = _READING_UPLOAD.get()
        if index is None:
            return True
        if record.name == "pydicom":
            record.msg, record.args = "row %d: a pydicom %s, withheld (it may quote header values)", (
                index, record.levelname.lower())
        else:
            args = record.args
            if isinstance(args, Mapping):
                record.args = {key: _loggable(value) for key, value in args.items()}
            elif args:
                record.args = tuple(_loggable(value) for value in args)
            record.msg = f"row {index}: {record.msg}"
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _loggable(value: object) -> object:
    return value if isinstance(value, numbers.Number) else "<withheld>"


_UPLOAD_LOG_FILTER = _UploadLogFilter()
for _name in ("pancreas_seg.imaging.dicom_io", "pydicom"):
    logging.getLogger(_name).addFilter(_UPLOAD_LOG_FILTER)


@contextlib.contextmanager
def _withheld_reader_output(index: int, capture_warnings: bool = True) -> Iterator[None]:
    """Read DICOM for row ``index`` with the reader's logs filtered (:class:`_UploadLogFilter`) and
    (``capture_warnings``) pydicom's warnings, which may quote header values, counted, not shown."""
    token = _READING_UPLOAD.set(index)
    try:
        if not capture_warnings:
            yield
            return
        with _READER_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                if caught:
                    logger.info("row %d: %d warning(s) of the DICOM reader withheld (they may quote header "
                                "values)", index, len(caught))
    finally:
        _READING_UPLOAD.reset(token)


def _check_dicom_images(archive: Path, limits: VolumeLimits, index: int) -> None:
    """Refuse (413) a zip whose DICOM images, read from their headers in the zip (no pixel data
    decoded, nothing extracted), exceed the per-scan limits: Rows or Columns or the number of
    images (slices) past ``max_dim``, or more than ``max_voxels`` voxels in all."""
    import pydicom  # noqa: PLC0415 - DICOM input only

    n_images = n_voxels = 0
    with zipfile.ZipFile(archive) as handle:
        for info in handle.infolist():
            if info.is_dir() or PurePosixPath(info.filename).name.startswith("._"):
                continue
            try:
                with handle.open(info) as member:
                    header = pydicom.dcmread(member, stop_before_pixels=True, force=False,
                                             specific_tags=["Rows", "Columns", "NumberOfFrames"])
                rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
                frames = int(header.get("NumberOfFrames") or 1)
            except Exception:  # noqa: BLE001 - not DICOM, or a bad header: the reader names it as it may
                continue
            if rows * columns == 0:
                continue                        # no image (a DICOMDIR, a report)
            if max(rows, columns) > limits.max_dim:
                raise ServingError(f"row {index}: a DICOM image of the archive is {rows} x {columns} pixels; at most "
                                   f"{limits.max_dim} along any axis are accepted", 413)
            n_images += max(frames, 1)
            n_voxels += rows * columns * max(frames, 1)
            if n_images > limits.max_dim or n_voxels > limits.max_voxels:
                raise ServingError(f"row {index}: the archive's DICOM images hold more than "
                                   + (f"{limits.max_dim} slices" if n_images > limits.max_dim
                                      else f"{limits.max_voxels} voxels")
                                   + "; at most that many are accepted per scan", 413)


@dataclass
class _Row:
    """One checked input row: the scan's bytes, what the output calls it, what logs call it; for a
    DICOM upload, the column and where its archive waits in the request's private folder."""

    index: int
    payload: bytes
    case_id: str
    column: str = INPUT_BASE64
    archive: Path | None = None

    @property
    def name(self) -> str:
        return f"row{self.index}"


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a pancreas_seg segmenter (see the module docstring for the signature).

    Args:
        local_paths: allow the ``path`` input for any file this process can read (in-process use
            only: the served model is built with the default, False, and then reads paths only
            under ``serving.path_roots``).
    """

    def __init__(self, local_paths: bool = False) -> None:
        self.local_paths = local_paths

    def load_context(self, context: Any) -> None:
        # The served model loads Keras here, in a process Kedro never set up: choose the backend first
        # (a GPU install has no TensorFlow, Keras' default). `auto`: KERAS_BACKEND when set, else JAX on
        # a GPU, else TensorFlow when installed; Keras already imported keeps its backend.
        backend = apply_backend(AUTO)
        logger.info("serving on the Keras %s backend", backend)
        folder = Path(context.artifacts[BUNDLE_ARTIFACT])
        trained = read_bundle(folder, "the pyfunc bundle")
        # the models are loaded and checked now, not on the first request
        self.predictor = Predictor.from_trained(trained, read_bundle_settings(folder, "the pyfunc bundle"))
        self.configure(ServingSettings.from_params(read_bundle_serving_settings(folder)).with_environment())

    def configure(self, settings: ServingSettings) -> None:
        """Apply serving ``settings`` (limits, admission); in the scoring server, install its guard."""
        self.settings = settings
        self.limits: VolumeLimits = settings.volume_limits
        self.admission = Admission(settings.max_in_flight, settings.max_queue, settings.queue_timeout_s,
                                   settings.request_timeout_s, settings.retry_after_s)
        logger.info("serving limits: %s", {k: v for k, v in settings.to_dict().items() if k != "path_roots"}
                    | {"path_roots": len(settings.path_roots)})
        if scoring_server_guard.in_scoring_server():
            scoring_server_guard.install(self.admission, settings.max_request_bytes, settings.retry_after_s,
                                         WaitingRoom(settings.max_waiting, settings.queue_timeout_s))

    def _predictor(self, params: Mapping[str, Any]) -> Predictor:
        changes = {name: bool(params[name]) for name in REQUEST_PARAMS if params.get(name) is not None}
        return self.predictor.with_settings(**changes) if changes else self.predictor

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        ticket = CURRENT_TICKET.get()   # admitted by the scoring-server guard before the body was read
        own_ticket = ticket is None
        try:
            if own_ticket:
                ticket = self.admission.admit()
            return self._predict(model_input, params or {}, ticket)
        except ServingError as exc:
            logger.warning("request refused (%d): %s", exc.status, scrub(exc.message))
            raise
        except Overloaded as exc:
            logger.warning("request refused (503): %s", exc)
            raise ServingError(str(exc), 503, exc.retry_after_s) from None
        except DeadlineExceeded as exc:
            logger.warning("request stopped (504): %s", exc)
            raise ServingError(str(exc), 504) from None
        except Exception as exc:  # noqa: BLE001 - never a stack trace or a server path to the client
            logger.error("request failed (500): %s", type(exc).__name__)
            logger.debug("request failed: %s", scrub(str(exc)))
            raise ServingError(f"internal error while segmenting ({type(exc).__name__}); see the server log",
                               500) from None
        finally:
            if own_ticket and ticket is not None:
                ticket.release()

    def _predict(self, model_input: Any, params: Mapping[str, Any], ticket: Ticket) -> pd.DataFrame:
        want_seg = _flag(params, RETURN_DICOM_SEG)
        with _RequestFolder() as folder:       # DICOM archives wait here; removed whatever happens
            rows = self._checked_rows(model_input, folder)
            if want_seg and not any(row.column in DICOM_COLUMNS for row in rows):
                raise ServingError(f"'{RETURN_DICOM_SEG}' needs DICOM input: a DICOM-SEG references the series "
                                   f"it segments, so send the series as '{INPUT_DICOM}'")
            predictor = self._predictor(params)
            ticket.check_deadline("waiting for a slot")
            outputs = []
            with ticket.slot():
                for row in rows:
                    ticket.check_deadline(f"segmenting row {row.index}")
                    if row.column in DICOM_COLUMNS:
                        outputs.append(self._segment_dicom(row, predictor, ticket, want_seg))
                        continue
                    ct = self._read(row)
                    row.payload = b""                      # the compressed bytes are not needed any more
                    labels, score = _segment(predictor, ct.array, ct.affine, row.name)
                    mask = nifti_bytes(labels, ct.affine, ct.header, compress=True)
                    outputs.append({OUTPUT_CASE: row.case_id, OUTPUT_BASE64: base64.b64encode(mask).decode("ascii"),
                                    OUTPUT_SCORE: score})
                    del ct, labels, mask
        return pd.DataFrame(outputs, columns=[OUTPUT_CASE, OUTPUT_BASE64, OUTPUT_SCORE,
                                              *(SEG_COLUMNS if want_seg else ())])

    def _checked_rows(self, model_input: Any, folder: _RequestFolder) -> list[_Row]:
        """Every row's bytes with its size and NIfTI header checked (nothing inflated yet); a DICOM
        archive written to ``folder`` and checked from its central directory and image headers."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        columns = [c for c in INPUT_COLUMNS if c in model_input.columns]
        if not columns:
            raise ServingError("the request has neither " + " nor ".join(
                f"a '{c}' column ({what})" for c, what in INPUT_COLUMNS.items()))
        if len(model_input) > self.settings.max_rows:
            raise ServingError(f"the request has {len(model_input)} rows; at most {self.settings.max_rows} scans "
                               "per request are accepted", 413)
        text = sum(len(v) for c in BASE64_COLUMNS if c in model_input.columns
                   for v in model_input[c] if isinstance(v, str))
        if text > self.settings.max_request_bytes:
            raise ServingError(f"the request holds {text} bytes of base64 input, more than the limit of "
                               f"{self.settings.max_request_bytes} bytes", 413)
        rows = []
        for index, record in enumerate(model_input[columns].to_dict(orient="records")):
            given = [c for c in columns if isinstance(record.get(c), str) and record[c]]
            if len(given) != 1:
                raise ServingError(f"row {index}: give exactly one of " + ", ".join(f"'{c}'" for c in INPUT_COLUMNS)
                                   + (f" (neither is given)" if not given else f" (got {', '.join(given)})"))
            column = given[0]
            if rows and (column in DICOM_COLUMNS) != (rows[0].column in DICOM_COLUMNS):
                raise ServingError(f"row {index}: one input kind per request: rows {rows[0].index} and {index} mix "
                                   f"DICOM ('{INPUT_DICOM}') and NIfTI ('{INPUT_BASE64}', '{INPUT_PATH}'); send "
                                   "them in separate requests")
            payload, case_id = _READERS[column](self, record[column], index)
            if column in DICOM_COLUMNS:
                rows.append(self._checked_archive(_Row(index, payload, case_id, column), folder))
                continue
            try:
                read_upload_header(payload, self.limits)
            except UploadRefused as exc:
                raise ServingError(f"row {index}: {exc}", exc.status) from None
            rows.append(_Row(index, payload, case_id, column))
        return rows

    def _read(self, row: _Row) -> NiftiVolume:
        try:
            return read_upload(row.payload, self.limits)
        except UploadRefused as exc:
            raise ServingError(f"row {row.index}: {exc}", exc.status) from None

    def _from_base64(self, encoded: str, index: int, column: str = INPUT_BASE64) -> tuple[bytes, str]:
        try:
            return base64.b64decode(encoded, validate=True), f"row{index}"
        except (binascii.Error, ValueError) as exc:
            raise ServingError(f"row {index}: '{column}' is not valid base64 ({exc})") from None

    def _from_dicom_base64(self, encoded: str, index: int) -> tuple[bytes, str]:
        return self._from_base64(encoded, index, INPUT_DICOM)

    # ----------------------------------------------------------------------------------------
    # DICOM uploads: a .zip of one CT series in, the mask (and a DICOM-SEG when asked) out
    # ----------------------------------------------------------------------------------------
    def _checked_archive(self, row: _Row, folder: _RequestFolder) -> _Row:
        """``row``'s zip written to the request's private folder and checked before anything is
        extracted: its size, its central directory (:func:`~pancreas_seg.imaging.dicom_io.check_archive`
        with :attr:`ServingSettings.archive_limits`: member count, uncompressed size, unsafe names)
        and its images' headers against the per-scan voxel limits."""
        from pancreas_seg.imaging.dicom_io import UnsafeArchiveError, check_archive  # noqa: PLC0415 - pydicom

        if len(row.payload) > self.limits.max_file_bytes:
            raise ServingError(f"row {row.index}: the archive is {len(row.payload)} bytes, more than the limit of "
                               f"{self.limits.max_file_bytes} bytes", 413)
        row.archive = folder.path / f"row{row.index}.zip"
        row.archive.write_bytes(row.payload)
        row.payload = b""                          # the archive is on disk (private folder) now
        try:
            check_archive(row.archive, self.settings.archive_limits)
        except UnsafeArchiveError as exc:
            raise self._archive_refused(row.index, exc) from None
        with _withheld_reader_output(row.index, capture_warnings=False):   # three integer tags are parsed
            _check_dicom_images(row.archive, self.limits, row.index)
        return row

    def _archive_refused(self, index: int, exc: Exception) -> ServingError:
        """The client's message for an error of the DICOM reader: what is wrong, never a member name,
        a path or a header value (the reader's own messages name them, for local use)."""
        from pancreas_seg.imaging.dicom_io import InvalidSeriesError, UnsafeArchiveError  # noqa: PLC0415

        head = f"row {index}: '{INPUT_DICOM}'"
        text = str(exc)
        if isinstance(exc, UnsafeArchiveError):
            status, what = _ARCHIVE_REFUSALS[exc.reason]
            what = what.format(found=f"{exc.count} " if exc.count is not None else "",
                               max_members=self.settings.dicom_max_members,
                               max_mib=f"{self.settings.dicom_max_uncompressed_mib:g}")
            return ServingError(f"{head}: the archive {what}", status)
        if isinstance(exc, InvalidSeriesError):
            kinds = sorted({problem.kind for problem in exc.problems})
            n_series = len({problem.series_uid for problem in exc.problems})
            return ServingError(f"{head}: {n_series} DICOM series in the archive "
                                f"{'is' if n_series == 1 else 'are'} not usable as a CT volume ("
                                + "; ".join(_SERIES_PROBLEMS.get(kind, kind.replace("_", " ")) for kind in kinds)
                                + "); send a zip of one CT series")
        if isinstance(exc, FileNotFoundError):
            return ServingError(f"{head}: the archive holds no DICOM series (no member is a DICOM image "
                                "of a series)")
        found = re.search(r"expected one CT series, found (\d+)", text)
        if found:
            return ServingError(f"{head}: the archive holds {found.group(1)} CT series; send one series per row")
        return ServingError(f"{head}: the archive cannot be read as a DICOM CT series ({type(exc).__name__})")

    def _read_dicom(self, row: _Row) -> Any:
        """The one CT series of ``row``'s archive (:func:`~pancreas_seg.imaging.dicom_io.read_dicom_archive`:
        extracted to a private temporary folder it removes); the archive is deleted after."""
        from pancreas_seg.imaging.dicom_io import read_dicom_archive  # noqa: PLC0415 - pydicom

        assert row.archive is not None
        try:
            with _withheld_reader_output(row.index):
                volume = read_dicom_archive(row.archive, on_invalid="fail", limits=self.settings.archive_limits)
        except ValueError as exc:               # UnsafeArchiveError, InvalidSeriesError, one series expected
            raise self._archive_refused(row.index, exc) from None
        except FileNotFoundError as exc:        # no DICOM series in it
            raise self._archive_refused(row.index, exc) from None
        finally:
            row.archive.unlink(missing_ok=True)
        spacing = volume.spacing_mm
        if not all(self.limits.min_spacing_mm <= s <= self.limits.max_spacing_mm for s in spacing):
            raise ServingError(f"row {row.index}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside "
                               f"the accepted range [{self.limits.min_spacing_mm}, {self.limits.max_spacing_mm}] mm")
        return volume

    def _segment_dicom(self, row: _Row, predictor: Predictor, ticket: Ticket, want_seg: bool) -> dict[str, Any]:
        """One DICOM row's answer: the mask on the series grid, as the inference pipeline writes it for
        DICOM input (the reader's array and affine, no header), and the DICOM-SEG when asked."""
        volume = self._read_dicom(row)
        ticket.check_deadline(f"segmenting row {row.index}")
        labels, score = _segment(predictor, volume.array, volume.affine, row.name)
        mask = nifti_bytes(labels, volume.affine, None, compress=True)
        answer = {OUTPUT_CASE: row.case_id, OUTPUT_BASE64: base64.b64encode(mask).decode("ascii"),
                  OUTPUT_SCORE: score}
        del mask
        if want_seg:
            answer |= self._dicom_seg(row, volume, labels, predictor.name)
        return answer

    def _dicom_seg(self, row: _Row, volume: Any, labels: Any, model_name: str) -> dict[str, Any]:
        """The SEG columns: the SEG (base64) and the generated-UID record (JSON) when UIDs were generated,
        or why no SEG can be made (:func:`~pancreas_seg.imaging.dicom_seg.seg_refusal`; the mask is
        answered anyway)."""
        from pancreas_seg.imaging.dicom_seg import (  # noqa: PLC0415 - highdicom for DICOM-SEG only
            SegmentationRefusedError,
            build_dicom_seg,
            prepare_seg_sources,
            seg_refusal,
        )

        answer: dict[str, Any] = dict.fromkeys(SEG_COLUMNS)
        reason = seg_refusal(volume.datasets, volume.array.shape)
        if reason is None:
            members = [PurePosixPath(*Path(file).relative_to(row.archive).parts) for file in volume.files]
            try:
                with _withheld_reader_output(row.index):
                    sources = prepare_seg_sources(volume.datasets, source_files=members, source_array=volume.array,
                                                  label=f"of row {row.index}")
                    segmentation = build_dicom_seg(labels, sources.datasets, model=model_name)
                    buffer = io.BytesIO()
                    segmentation.save_as(buffer)
            except SegmentationRefusedError as exc:        # its message names attributes and counts only
                reason = str(exc).removeprefix("no DICOM-SEG can be made: ")
            except Exception as exc:  # noqa: BLE001 - the mask is still answered
                reason = f"the DICOM-SEG could not be built ({type(exc).__name__})"
            else:
                answer[OUTPUT_SEG] = base64.b64encode(buffer.getvalue()).decode("ascii")
                if sources.generated is not None:
                    answer[OUTPUT_SEG_RECORD] = json.dumps(sources.generated.to_dict())
        if reason is not None:
            logger.warning("row %d: no DICOM-SEG (%s); the mask is answered", row.index, scrub(reason))
            answer[OUTPUT_SEG_REFUSED] = f"no DICOM-SEG can be made: {reason}"
        return answer

    def _from_path(self, value: str, index: int) -> tuple[bytes, str]:
        if self.local_paths:   # in-process: the caller owns the file system; detailed messages
            path = Path(value).expanduser()
            if not path.is_file():
                raise ServingError(f"row {index}: {INPUT_PATH} {value} is not a file")
            return _read_capped(path, self.limits.max_file_bytes, index), case_id_from_path(path)
        refused = ServingError(PATH_REFUSED.format(index=index), 403)
        roots = self.settings.resolved_roots
        if not roots:
            raise refused
        try:
            resolved = Path(value).expanduser().resolve(strict=True)   # symlinks and ".." resolved
            if not (resolved.is_file() and any(resolved.is_relative_to(root) for root in roots)):
                raise refused
            return _read_capped(resolved, self.limits.max_file_bytes, index), case_id_from_path(resolved)
        except (OSError, RuntimeError, ValueError):
            raise refused from None


_READERS: dict[str, Callable[[SegmentationModel, str, int], tuple[bytes, str]]] = {
    INPUT_BASE64: SegmentationModel._from_base64,
    INPUT_PATH: SegmentationModel._from_path,
    INPUT_DICOM: SegmentationModel._from_dicom_base64,
}
"""Input column -> how a row's value becomes the scan's bytes and its output case id."""


def _segment(predictor: Predictor, hu: Any, affine: Any, name: str) -> tuple[Any, float | None]:
    """The labels of a scan and its patient tumour score (None without a tumour output), without a
    probability map of the scan's size (:meth:`Predictor.segment_with_score`)."""
    if not predictor.has_tumour_output:
        return predictor.segment(hu, affine, name), None
    prediction = predictor.segment_with_score(hu, affine, name)
    return prediction.labels, prediction.patient_tumour_score


def _read_capped(path: Path, max_bytes: int, index: int) -> bytes:
    """A file's bytes, refusing (413) one larger than ``max_bytes`` without reading it all."""
    with path.open("rb") as file:
        payload = file.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise ServingError(f"row {index}: the file is more than the limit of {max_bytes} bytes", 413)
    return payload


def load_in_process(model_uri: str) -> Any:
    """A logged model loaded in this process with the ``path`` input allowed for any readable file.

    ``mlflow.pyfunc.load_model(model_uri)`` builds the model as the server does (paths refused
    outside ``serving.path_roots``); this flips :attr:`SegmentationModel.local_paths` on it.
    """
    model = mlflow.pyfunc.load_model(model_uri)
    model.unwrap_python_model().local_paths = True
    return model


def decode_mask(encoded: str) -> Any:
    """``mask_nifti_base64`` -> a nibabel image (for clients and tests)."""
    import nibabel as nib  # noqa: PLC0415

    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))


def encode_nifti_file(path: str | Path) -> str:
    """A NIfTI file's bytes as the ``nifti_base64`` input value."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def pip_requirements() -> list[str]:
    """The project's pinned runtime requirements (from its installed metadata)."""
    try:
        requirements = metadata.requires("pancreas_seg") or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in requirements if "extra ==" not in r]


def log_segmentation_model(run_id: str, trained: TrainedModel | TrainedEnsemble, name: str,
                           settings: PredictionSettings, serving: Mapping[str, Any] | None = None) -> str:
    """Log ``trained`` as the pyfunc model ``segmenter`` of MLflow run ``run_id``; returns its URI.

    The model carries a bundle of the ``.keras`` file(s), card(s), the prediction ``settings``
    it applies by default (the ``inference`` parameters) and its serving limits: ``serving``, the
    ``inference.serving`` parameters (checked now; missing keys and a missing block keep the
    defaults of :class:`~pancreas_seg.inference.serving_settings.ServingSettings`). Serve it with
    ``mlflow models serve -m <uri> --env-manager local`` from the project's environment (the
    ``pancreas_seg`` package must be importable; it is not on PyPI).
    """
    serving_settings = ServingSettings.from_params(serving).to_dict()
    with tempfile.TemporaryDirectory(prefix="pancreas_seg_bundle_") as tmp:
        folder = write_bundle(Path(tmp) / BUNDLE_ARTIFACT, name, trained, settings.to_dict(), serving_settings)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
            # mlflow 3.17.2 warns "An input example was not provided when logging the model" whenever
            # a signature comes without an input example (mlflow/pyfunc/__init__.py:3344, in
            # mlflow.pyfunc.save_model). The signature is complete (inputs, outputs, params), and an
            # input example is not free: with one, Model.log loads the logged model and runs predict
            # on it (mlflow/models/model.py:1250, _validate_serving_input), with no switch in
            # pyfunc.log_model to skip that (pyfunc.save_model refuses extra keyword arguments,
            # mlflow/pyfunc/__init__.py:3128). Tried on the smoke train: seconds more per logged
            # model, and TensorFlow "triggered tf.function retracing" warnings, as every freshly
            # loaded model traces its predict function for one call. tests/pipelines/test_serving.py
            # checks the served API end to end instead. Only this message, only from mlflow.pyfunc,
            # only in this call; MLflow prefixes it with an ANSI colour code.
            warnings.filterwarnings("ignore", message=r"(\x1b\[[0-9;]*m)?An input example was not provided",
                                    category=UserWarning, module=r"mlflow\.pyfunc\Z")
            info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(Path(__file__).with_name("serving_model.py")),
                                           artifacts={BUNDLE_ARTIFACT: str(folder)}, signature=signature(settings),
                                           pip_requirements=pip_requirements())
    return info.model_uri


def log_model_objects(run_id: str, name: str, model: Any, card: ModelCard, settings: PredictionSettings,
                      stage1_model: Any = None, serving: Mapping[str, Any] | None = None) -> str:
    """:func:`log_segmentation_model` for an in-memory Keras model (and the cascade's stage 1)."""
    from pancreas_seg.models.io import save_model  # noqa: PLC0415 - Keras

    with tempfile.TemporaryDirectory(prefix="pancreas_seg_model_") as tmp:
        model_file = Path(tmp) / "model.keras"
        save_model(model, model_file)
        stage1_file = None
        if stage1_model is not None:
            stage1_file = Path(tmp) / "stage1.keras"
            save_model(stage1_model, stage1_file)
        return log_segmentation_model(run_id, TrainedModel(model_file, card, stage1_file), name, settings, serving)


def log_ensemble_objects(run_id: str, name: str, models: Mapping[str, Any], cards: Mapping[str, ModelCard],
                         settings: PredictionSettings, serving: Mapping[str, Any] | None = None,
                         stage1_models: Mapping[str, Any] | None = None) -> str:
    """:func:`log_segmentation_model` for in-memory fold models (``{"fold0": model}``, same keys in
    ``cards``; for the cascade's fold ensemble, each fold's stage 1 in ``stage1_models``)."""
    from pancreas_seg.models.io import save_model  # noqa: PLC0415 - Keras

    with tempfile.TemporaryDirectory(prefix="pancreas_seg_ensemble_") as tmp:
        trained = []
        for key in sorted(models):
            save_model(models[key], Path(tmp) / f"{key}.keras")
            stage1_file = None
            if stage1_models is not None:
                stage1_file = Path(tmp) / f"{key}_stage1.keras"
                save_model(stage1_models[key], stage1_file)
            trained.append(TrainedModel(Path(tmp) / f"{key}.keras", cards[key], stage1_file))
        return log_segmentation_model(run_id, TrainedEnsemble(name, tuple(trained)), name, settings, serving)
