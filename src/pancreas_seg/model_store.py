"""Find a trained model and its model card: by architecture name or by MLflow run URI."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pancreas_seg.models.names import ARCHITECTURE_NAMES

logger = logging.getLogger(__name__)


def latest_model_file(models_dir: str | Path, architecture: str) -> Path:
    """``<models_dir>/<arch>/model.keras/<newest version>/model.keras`` (Kedro versioned layout)."""
    root = Path(models_dir) / architecture / "model.keras"
    versions = sorted(p for p in root.glob("*/model.keras") if p.is_file()) if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no trained '{architecture}' model under {root}; run "
                                f"`kedro run --pipeline=train --namespaces={architecture}` first")
    return versions[-1]


def resolve_model(reference: str, models_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Return a local ``.keras`` file and its model card for an architecture name or MLflow URI.

    Args:
        reference: ``unet`` / ``unet_small`` / ``fcn`` / ``vnet2d`` (the newest model in
            ``models_dir``) or ``runs:/<run_id>`` of an architecture's nested MLflow run.
        models_dir: the project's ``data/06_models``.
    """
    if reference in ARCHITECTURE_NAMES:
        model_file = latest_model_file(models_dir, reference)
        card_file = Path(models_dir) / reference / "model_card.json"
        if not card_file.is_file():
            raise FileNotFoundError(f"{card_file}: model card missing; re-run training")
        return model_file, json.loads(card_file.read_text())
    if reference.startswith("runs:/"):
        import mlflow  # noqa: PLC0415

        run_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference.rstrip("/") + "/"))
        models = sorted(run_root.glob("keras/*.keras"))
        card_file = run_root / "model_card.json"
        if not models or not card_file.is_file():
            raise FileNotFoundError(f"{reference}: expected artifacts keras/<architecture>.keras and "
                                    "model_card.json (logged by the training pipeline)")
        return models[0], json.loads(card_file.read_text())
    raise ValueError(f"inference.model {reference!r}: use an architecture name "
                     f"{list(ARCHITECTURE_NAMES)} or an MLflow URI runs:/<run_id>")
