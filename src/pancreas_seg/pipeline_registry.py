"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines import evaluation, inference, ingestion, preprocessing, training

_enabled_architectures: tuple[str, ...] = ARCHITECTURE_NAMES


def set_enabled_architectures(names: list[str]) -> bool:
    """Select which architecture namespaces ``train`` and ``evaluation`` contain; True if changed."""
    global _enabled_architectures  # noqa: PLW0603
    unknown = sorted(set(names) - set(ARCHITECTURE_NAMES))
    if unknown or not names:
        raise ValueError(f"training.architectures: unknown or empty {unknown or names}; "
                         f"choose from {list(ARCHITECTURE_NAMES)}")
    selected = tuple(n for n in ARCHITECTURE_NAMES if n in names)
    changed = selected != _enabled_architectures
    _enabled_architectures = selected
    return changed


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    ``train`` (the default) = ingestion -> preprocessing -> training of every enabled
    architecture -> held-out evaluation. ``--namespaces=unet`` restricts it to one model.
    """
    archs = _enabled_architectures
    data = ingestion.create_pipeline() + preprocessing.create_pipeline()
    train_models = training.create_pipeline(archs)
    evaluate_models = evaluation.create_pipeline(archs)
    train = data + train_models + evaluate_models
    return {
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "data": data,
        "training": train_models,
        "evaluation": evaluate_models,
        "inference": inference.create_pipeline(),
        "train": train,
        "__default__": train,
    }
