"""Find a trained model and the model card of the same version: by architecture name or MLflow URI.

The training pipeline saves ``<models_dir>/<arch>/model.keras/<version>/model.keras`` and
``<models_dir>/<arch>/model_card.json/<version>/model_card.json`` from one node, so both carry the
same Kedro version string. A model is only ever paired with the card of its own version. The
cascade also saves its stage 1 there (``cascade/stage1_model.keras/<version>/``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pancreas_seg.models.names import CASCADE_NAME, MODEL_NAMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A model file and its card (``card["version"]`` is the Kedro version or the MLflow run).

    For the cascade, ``model_file`` is stage 2 and ``stage1_file`` stage 1 (None otherwise).
    """

    model_file: Path
    card: dict[str, Any]
    stage1_file: Path | None = None


def _versions(folder: Path, filename: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.parent.name: p for p in folder.glob(f"*/{filename}") if p.is_file()}


def latest_trained_model(models_dir: str | Path, architecture: str) -> TrainedModel:
    """The newest model version of ``architecture`` in ``models_dir`` with the card of that version."""
    root = Path(models_dir) / architecture
    models = _versions(root / "model.keras", "model.keras")
    if not models:
        raise FileNotFoundError(f"no trained '{architecture}' model under {root / 'model.keras'}; run "
                                f"`kedro run --pipelines=train_{architecture}` first")
    version = max(models)
    cards = _versions(root / "model_card.json", "model_card.json")
    if version not in cards:
        raise FileNotFoundError(f"{models[version]}: no model card of the same version "
                                f"({root / 'model_card.json' / version / 'model_card.json'} is missing); "
                                "the model cannot be used without it. Retrain it.")
    card = json.loads(cards[version].read_text())
    stage1_file = None
    if architecture == CASCADE_NAME:
        stage1_file = root / "stage1_model.keras" / version / "stage1_model.keras"
        if not stage1_file.is_file():
            raise FileNotFoundError(f"{models[version]}: the cascade's stage-1 model of the same version "
                                    f"({stage1_file}) is missing; retrain the cascade.")
    return TrainedModel(models[version], {**card, "version": version}, stage1_file)


def resolve_model(reference: str, models_dir: str | Path) -> TrainedModel:
    """Return a local ``.keras`` file and its model card for an architecture name or MLflow URI.

    Args:
        reference: ``unet`` / ``unet_small`` / ``fcn`` / ``vnet2d`` / ``cascade`` (the newest model
            version in ``models_dir``) or ``runs:/<run_id>`` of a model's nested MLflow run.
        models_dir: the project's ``data/06_models``.
    """
    if reference in MODEL_NAMES:
        return latest_trained_model(models_dir, reference)
    if reference.startswith("runs:/"):
        import mlflow  # noqa: PLC0415

        run_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference.rstrip("/") + "/"))
        card_file = run_root / "model_card.json"
        if not card_file.is_file():
            raise FileNotFoundError(f"{reference}: no model_card.json artifact (logged by the training pipeline)")
        card = {**json.loads(card_file.read_text()), "version": reference}
        if card.get("architecture") == CASCADE_NAME:
            stage1, stage2 = run_root / "keras" / "stage1.keras", run_root / "keras" / "stage2.keras"
            if not (stage1.is_file() and stage2.is_file()):
                raise FileNotFoundError(f"{reference}: expected artifacts keras/stage1.keras and keras/stage2.keras")
            return TrainedModel(stage2, card, stage1)
        models = sorted(run_root.glob("keras/*.keras"))
        if not models:
            raise FileNotFoundError(f"{reference}: expected the artifact keras/<architecture>.keras")
        return TrainedModel(models[0], card)
    raise ValueError(f"inference.model {reference!r}: use a model name "
                     f"{list(MODEL_NAMES)} or an MLflow URI runs:/<run_id>")
