"""The MLflow pyfunc model: CT scans in, label maps out, through the inference pipeline's own code.

Every trained model (single, cascade, fold ensemble) is logged as an MLflow 3 pyfunc model whose
``predict`` runs the one predictor, :class:`pancreas_seg.inference.predictor.Predictor`: the same validation,
preprocessing, prediction, map-back and post-processing as ``kedro run --pipelines=inference``.
The model's artifact ``bundle`` (see :func:`pancreas_seg.inference.model_store.write_bundle`) holds the
``.keras`` file(s) and model card(s); ``bundle.json`` also records the prediction settings
(``inference`` parameters of the run that logged it: batch size, XLA, flip TTA, post-processing).

Input, a DataFrame with one row per scan and one of the columns:

* ``nifti_base64``: the bytes of a ``.nii`` or ``.nii.gz`` file, base64-encoded (for HTTP);
* ``path``: a local NIfTI file path (for in-process use).

Parameters (optional, per request): ``flip_tta`` and ``keep_largest_component``, as in the
inference pipeline's ``inference`` settings; their defaults are the recorded settings.

Output, one row per input row: ``mask_nifti_base64``, the label map (uint8, 0 background,
1 pancreas, 2 tumour) as a base64-encoded ``.nii.gz`` with the input's shape, affine and header,
and ``case_id``. A bad row (not NIfTI, not 3D, non-finite voxels, no column) raises an
:class:`mlflow.exceptions.MlflowException` whose message names the row and the problem; the
scoring server answers it with HTTP 400 and no stack trace, and keeps serving.
"""

from __future__ import annotations

import base64
import gzip
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pancreas_seg.imaging.nifti_io import save_nifti
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.model_store import (
    SERVING_MODEL_NAME,
    TrainedEnsemble,
    TrainedModel,
    read_bundle,
    read_bundle_settings,
    write_bundle,
)
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.task07.layout import case_id_from_path
from pancreas_seg.task07.validation import check_image

INPUT_BASE64, INPUT_PATH = "nifti_base64", "path"
OUTPUT_BASE64, OUTPUT_CASE = "mask_nifti_base64", "case_id"
BUNDLE_ARTIFACT = "bundle"
MODEL_NAME = SERVING_MODEL_NAME
"""The logged model's name in its run (what the UI shows under *Models*)."""
REQUEST_PARAMS = ("flip_tta", "keep_largest_component")
"""Prediction settings a request may change (the scoring server's ``params``); the defaults are the
settings recorded in the bundle."""


def signature(settings: PredictionSettings) -> ModelSignature:
    """The pyfunc signature: NIfTI in, label maps out, :data:`REQUEST_PARAMS` defaulting to ``settings``."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_BASE64, required=False),
                       ColSpec("string", INPUT_PATH, required=False)]),
        outputs=Schema([ColSpec("string", OUTPUT_CASE), ColSpec("string", OUTPUT_BASE64)]),
        params=ParamSchema([ParamSpec(name, "boolean", getattr(settings, name)) for name in REQUEST_PARAMS]),
    )


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _nifti_suffix(payload: bytes) -> str:
    return ".nii.gz" if payload[:2] == b"\x1f\x8b" else ".nii"


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a pancreas_seg segmenter (see the module docstring for the signature)."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts[BUNDLE_ARTIFACT])
        trained = read_bundle(folder, f"pyfunc bundle {folder}")
        # the models are loaded and checked now, not on the first request
        self.predictor = Predictor.from_trained(trained, read_bundle_settings(folder, f"pyfunc bundle {folder}"))

    def _predictor(self, params: Mapping[str, Any]) -> Predictor:
        changes = {name: bool(params[name]) for name in REQUEST_PARAMS if params.get(name) is not None}
        return self.predictor.with_settings(**changes) if changes else self.predictor

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if not ({INPUT_BASE64, INPUT_PATH} & set(model_input.columns)):
            raise _bad_request(f"the request has neither a '{INPUT_BASE64}' column (base64 NIfTI bytes) nor a "
                               f"'{INPUT_PATH}' column (a local NIfTI file)")
        predictor = self._predictor(params or {})
        rows = []
        with tempfile.TemporaryDirectory(prefix="pancreas_seg_serving_") as tmp:
            for index, row in enumerate(model_input.to_dict(orient="records")):
                path = self._input_file(row, index, Path(tmp))
                case_id = case_id_from_path(path) if row.get(INPUT_PATH) else f"row{index}"
                ct, findings = check_image(path, case_id)   # the inference node's input checks; read once
                if ct is None or findings:
                    problems = "; ".join(f.message.replace(str(path), "the uploaded file") for f in findings)
                    raise _bad_request(f"row {index}: {problems}")
                labels = predictor.segment(ct.array, ct.affine, case_id)
                mask_path = Path(tmp) / f"mask{index}.nii.gz"
                save_nifti(mask_path, labels, ct.affine, ct.header)
                rows.append({OUTPUT_CASE: case_id,
                             OUTPUT_BASE64: base64.b64encode(mask_path.read_bytes()).decode("ascii")})
        return pd.DataFrame(rows, columns=[OUTPUT_CASE, OUTPUT_BASE64])

    @staticmethod
    def _input_file(row: Mapping[str, Any], index: int, tmp: Path) -> Path:
        encoded, local = row.get(INPUT_BASE64), row.get(INPUT_PATH)
        if isinstance(local, str) and local:
            path = Path(local).expanduser()
            if not path.is_file():
                raise _bad_request(f"row {index}: {INPUT_PATH} {local} is not a file")
            return path
        if not isinstance(encoded, str) or not encoded:
            raise _bad_request(f"row {index}: neither '{INPUT_BASE64}' nor '{INPUT_PATH}' is given")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (ValueError, TypeError) as exc:
            raise _bad_request(f"row {index}: '{INPUT_BASE64}' is not valid base64 ({exc})") from None
        path = tmp / f"scan{index}{_nifti_suffix(payload)}"
        path.write_bytes(payload)
        return path


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
                           settings: PredictionSettings) -> str:
    """Log ``trained`` as the pyfunc model ``segmenter`` of MLflow run ``run_id``; returns its URI.

    The model carries a bundle of the ``.keras`` file(s), card(s) and the prediction ``settings``
    it applies by default (the ``inference`` parameters). Serve it with
    ``mlflow models serve -m <uri> --env-manager local`` from the project's environment (the
    ``pancreas_seg`` package must be importable; it is not on PyPI).
    """
    with tempfile.TemporaryDirectory(prefix="pancreas_seg_bundle_") as tmp:
        folder = write_bundle(Path(tmp) / BUNDLE_ARTIFACT, name, trained, settings.to_dict())
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
                      stage1_model: Any = None) -> str:
    """:func:`log_segmentation_model` for an in-memory Keras model (and the cascade's stage 1)."""
    from pancreas_seg.models.io import save_model  # noqa: PLC0415 - Keras

    with tempfile.TemporaryDirectory(prefix="pancreas_seg_model_") as tmp:
        model_file = Path(tmp) / "model.keras"
        save_model(model, model_file)
        stage1_file = None
        if stage1_model is not None:
            stage1_file = Path(tmp) / "stage1.keras"
            save_model(stage1_model, stage1_file)
        return log_segmentation_model(run_id, TrainedModel(model_file, card, stage1_file), name, settings)


def log_ensemble_objects(run_id: str, name: str, models: Mapping[str, Any], cards: Mapping[str, ModelCard],
                         settings: PredictionSettings) -> str:
    """:func:`log_segmentation_model` for in-memory fold models (``{"fold0": model}``, same keys in ``cards``)."""
    from pancreas_seg.models.io import save_model  # noqa: PLC0415 - Keras

    with tempfile.TemporaryDirectory(prefix="pancreas_seg_ensemble_") as tmp:
        trained = []
        for key in sorted(models):
            save_model(models[key], Path(tmp) / f"{key}.keras")
            trained.append(TrainedModel(Path(tmp) / f"{key}.keras", cards[key]))
        return log_segmentation_model(run_id, TrainedEnsemble(name, tuple(trained)), name, settings)
