"""Logging and registering the pyfunc model (``pancreas_seg.inference.serving``, ``tracking.register_model``)
without the MLflow warnings a ``kedro run --pipelines=train`` used to print.

The model is a placeholder bundle (MLflow does not load the model while logging it, as no input
example is given), in a temporary sqlite store, so Keras is not needed. MLflow warns through ``warnings`` ("An input example was not provided")
and through its own ``mlflow.*`` loggers, which do not propagate to the root logger (so
``caplog`` would not see them): a handler is attached to the ``mlflow`` logger instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
UNWANTED = (
    "An input example was not provided",         # mlflow/pyfunc/__init__.py, save_model
    "has no artifacts at artifact path",         # mlflow/tracking/_model_registry/fluent.py, _register_model
    "Add type hints to the `predict` method",    # mlflow/pyfunc/utils/data_validation.py
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def mlflow_log() -> Iterator[_Records]:
    handler, logger = _Records(), logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def tracking_store(tmp_path: Path) -> Iterator[str]:
    """A private sqlite store whose artifacts go under ``tmp_path`` (not ``./mlruns``)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment_id = mlflow.create_experiment("serving_logging", artifact_location=(tmp_path / "artifacts").as_uri())
        yield experiment_id
    finally:
        mlflow.set_tracking_uri(previous)


def _unwanted(texts: list[str]) -> list[str]:
    return [t for t in texts if any(u.lower() in t.lower() for u in UNWANTED)]


def test_logging_and_registering_a_model_warns_nothing(tracking_store: str, mlflow_log: _Records,
                                                       tmp_path: Path) -> None:
    from pancreas_seg import tracking
    from pancreas_seg.inference import serving
    from pancreas_seg.inference.model_card import CaseSplit, ModelCard
    from pancreas_seg.inference.model_store import TrainedModel
    from pancreas_seg.inference.predictor import PredictionSettings

    run_id = mlflow.MlflowClient().create_run(tracking_store).info.run_id
    placeholder = tmp_path / "model.keras"
    placeholder.write_bytes(b"not loaded while logging")
    card = ModelCard.for_trained_model("unet", "multiclass", {"image_size_px": 96}, None, "Task07_Pancreas",
                                       CaseSplit(("t0",), ("v0",)), "a" * 64, mlflow_run_id=run_id)
    trained = TrainedModel(placeholder, card)
    settings = PredictionSettings(batch_size=4, flip_tta=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        uri = serving.log_segmentation_model(run_id, trained, "unet", settings)
        # the filter for MLflow's input-example message is confined to the logging call
        assert warnings.filters == filters
        version = tracking.register_model(f"runs:/{run_id}/{serving.MODEL_NAME}", "pancreas_seg", {"architecture": "unet"})
    assert _unwanted([str(w.message) for w in caught] + mlflow_log.messages) == []

    client = mlflow.MlflowClient()
    registered = client.get_model_version("pancreas_seg", version)
    assert registered.run_id == run_id and registered.source == uri      # the run's logged model "segmenter"
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.name == serving.MODEL_NAME and logged.source_run_id == run_id
    signature = mlflow.models.get_model_info(uri).signature
    assert signature == serving.signature(settings)
    # the request parameters default to the recorded settings, not to copies in code
    assert {p.name: p.default for p in signature.params.params} == {"flip_tta": True, "keep_largest_component": False,
                                                                    "return_dicom_seg": False}
    # the registry's description is markdown: no <...> placeholder that the UI would drop as an HTML tag
    description = client.get_registered_model("pancreas_seg").description
    assert "models:/pancreas_seg@champion" in description and "<" not in description


@pytest.mark.subprocess
def test_defining_the_pyfunc_model_asks_for_no_type_hints() -> None:
    """MLflow checks ``predict``'s type hints when the class is defined (``PythonModel.__init_subclass__``)
    and warns once per process, so this needs a fresh one. ``serving.py`` postpones annotations:
    ``pd.DataFrame`` must stay importable at run time for MLflow to resolve the hint."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-W", "always", "-c", "import pancreas_seg.inference.serving_model"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300, check=True)
    assert _unwanted([result.stderr, result.stdout]) == []
