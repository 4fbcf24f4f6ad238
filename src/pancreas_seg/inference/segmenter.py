"""A trained model (single, cascade or ensemble) as one function: CT in HU -> MSD label map.

The one place that loads models for use: the inference pipeline, the MLflow pyfunc model
(:mod:`pancreas_seg.inference.serving`) and the benchmarks all call :func:`load_segmenter`, so a scan goes
through the same preprocessing, prediction, map-back and post-processing wherever it is segmented.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from pancreas_seg.imaging.preprocess import PreprocessingConfig, intensity_stats_from_dict
from pancreas_seg.inference.model_card import (
    ModelMismatchError,
    check_card_consistent,
    check_cascade_weights,
    check_disjoint,
    check_fold_ensemble,
    check_weights,
)
from pancreas_seg.inference.model_store import TrainedEnsemble, TrainedModel, members
from pancreas_seg.inference.prediction import segment_volume, use_xla

Segment = Callable[[np.ndarray, np.ndarray, str], np.ndarray]
"""``segment(hu (X, Y, Z) in file order, affine 4x4 mm, case_id) -> uint8 labels of hu's shape``."""


def model_name(trained: TrainedModel | TrainedEnsemble) -> str:
    """``unet``, ``cascade``, ``unet.ensemble`` ...: what reports and overlays call the model."""
    return trained.name if isinstance(trained, TrainedEnsemble) else str(trained.card["architecture"])


def check_trained_model(trained: TrainedModel | TrainedEnsemble, case_ids: Iterable[str] | None) -> None:
    """Refuse edited cards, fold models that are not one ensemble, and (unless ``case_ids`` is None)
    a model trained or validated on one of ``case_ids``."""
    for member in members(trained):
        check_card_consistent(member.card)
        if case_ids is not None:
            check_disjoint(member.card, case_ids,
                           "was asked to segment (set inference.allow_training_cases: true to allow it)")
    if isinstance(trained, TrainedEnsemble) and all(m.card.get("fold") is not None for m in trained.members):
        check_fold_ensemble(trained.cards)


def load_segmenter(trained: TrainedModel | TrainedEnsemble, inference: Mapping[str, Any]) -> Segment:
    """Load a trained model (both stages of the cascade, or every model of an ensemble), check them
    against their cards, and return ``segment(hu, affine, case_id) -> labels`` with the inference
    settings applied (``batch_size``, ``flip_tta``, ``keep_largest_component``, ``xla``). An
    ensemble averages its members' softmax outputs."""
    from pancreas_seg.models.io import load_model, weights_sha256  # noqa: PLC0415 - lazy: Keras

    batch_size, flip_tta = int(inference["batch_size"]), bool(inference["flip_tta"])
    keep_lcc = bool(inference["keep_largest_component"])
    if isinstance(trained, TrainedEnsemble):
        cards = trained.cards
        if any("cascade" in card for card in cards):
            raise ValueError(f"inference.model {trained.name}: the cascade cannot be part of an ensemble")
        if len({card["preprocessing_fingerprint"] for card in cards}) != 1 or len({card["label_mode"] for card in cards}) != 1:
            raise ModelMismatchError(f"inference.model {trained.name}: its models differ in preprocessing or "
                                     "label mode, so their outputs cannot be averaged")
        models = []
        for member in trained.members:
            model = load_model(member.model_file, compile=False)
            check_weights(member.card, weights_sha256(model))
            use_xla(model, bool(inference.get("xla", True)))
            models.append(model)
        config = PreprocessingConfig.from_params(cards[0]["preprocessing"])
        stats = intensity_stats_from_dict(cards[0].get("intensity_stats"))
        return lambda hu, affine, name: segment_volume(models, hu, affine, config, stats, batch_size, flip_tta,
                                                       keep_lcc)
    card = trained.card
    model = load_model(trained.model_file, compile=False)
    use_xla(model, bool(inference.get("xla", True)))
    if "cascade" in card:
        if trained.stage1_file is None:
            raise FileNotFoundError(f"{trained.model_file}: a cascade card without its stage-1 model file")
        from pancreas_seg.cascade.predict import cascade_from_card, segment_volume_cascade  # noqa: PLC0415

        stage1 = load_model(trained.stage1_file, compile=False)
        check_cascade_weights(card, weights_sha256(stage1), weights_sha256(model))
        use_xla(stage1, bool(inference.get("xla", True)))
        cascade = cascade_from_card(card, stage1, model)
        return lambda hu, affine, name: segment_volume_cascade(cascade, hu, affine, batch_size, flip_tta,
                                                               keep_lcc, name)[0]
    check_weights(card, weights_sha256(model))
    config = PreprocessingConfig.from_params(card["preprocessing"])
    stats = intensity_stats_from_dict(card.get("intensity_stats"))
    return lambda hu, affine, name: segment_volume(model, hu, affine, config, stats, batch_size, flip_tta, keep_lcc)
