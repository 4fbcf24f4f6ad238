"""Find a trained model and the model card of the same version: by architecture name or MLflow URI.

The training pipeline saves ``<models_dir>/<arch>/model.keras/<version>/model.keras`` and
``<models_dir>/<arch>/model_card.json/<version>/model_card.json`` from one node, so both carry the
same Kedro version string. A model is only ever paired with the card of its own version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pancreas_seg.models.names import ARCHITECTURE_NAMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A model file and its card (``card["version"]`` is the Kedro version or the MLflow run)."""

    model_file: Path
    card: dict[str, Any]


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
    return TrainedModel(models[version], {**card, "version": version})


def resolve_model(reference: str, models_dir: str | Path) -> TrainedModel:
    """Return a local ``.keras`` file and its model card for an architecture name or MLflow URI.

    Args:
        reference: ``unet`` / ``unet_small`` / ``fcn`` / ``vnet2d`` (the newest model version in
            ``models_dir``) or ``runs:/<run_id>`` of an architecture's nested MLflow run.
        models_dir: the project's ``data/06_models``.
    """
    if reference in ARCHITECTURE_NAMES:
        return latest_trained_model(models_dir, reference)
    if reference.startswith("runs:/"):
        import mlflow  # noqa: PLC0415

        run_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference.rstrip("/") + "/"))
        models = sorted(run_root.glob("keras/*.keras"))
        card_file = run_root / "model_card.json"
        if not models or not card_file.is_file():
            raise FileNotFoundError(f"{reference}: expected artifacts keras/<architecture>.keras and "
                                    "model_card.json (logged by the training pipeline)")
        return TrainedModel(models[0], {**json.loads(card_file.read_text()), "version": reference})
    raise ValueError(f"inference.model {reference!r}: use an architecture name "
                     f"{list(ARCHITECTURE_NAMES)} or an MLflow URI runs:/<run_id>")
