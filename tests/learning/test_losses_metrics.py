"""Soft Dice / Dice+CE losses and the epoch-level ClassDice metric against hand-computed values."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pancreas_seg.learning.losses import (
    DiceCrossEntropyLoss,
    SoftDiceLoss,
    make_loss,
)
from pancreas_seg.learning.metrics import ClassDice, dice_metrics

# 4x4 binary truth: the top-left 2x2 square (4 pixels).
TRUTH = np.zeros((1, 4, 4, 1), dtype="float32")
TRUTH[0, :2, :2, 0] = 1.0
# Prediction 0.5 on the two top rows (8 pixels), 0 elsewhere.
HALF = np.zeros((1, 4, 4, 1), dtype="float32")
HALF[0, :2, :, 0] = 0.5
# Disjoint prediction: the bottom-right 2x2 square, probability 1.
DISJOINT = np.zeros((1, 4, 4, 1), dtype="float32")
DISJOINT[0, 2:, 2:, 0] = 1.0
EMPTY = np.zeros((1, 4, 4, 1), dtype="float32")


def _loss(loss: keras.losses.Loss, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))


def _dice(metric: ClassDice, *batches: tuple[np.ndarray, np.ndarray]) -> float:
    metric.reset_state()
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    return float(keras.ops.convert_to_numpy(metric.result()))


def _one_hot(labels: list[list[int]]) -> np.ndarray:
    return np.eye(3, dtype="float32")[np.asarray(labels)][None]


# --- soft Dice loss -----------------------------------------------------------------------------


def test_soft_dice_perfect_disjoint_and_empty() -> None:
    tiny = SoftDiceLoss(smooth=1e-6)
    assert _loss(tiny, TRUTH, TRUTH) == pytest.approx(0.0, abs=1e-6)
    assert _loss(tiny, TRUTH, DISJOINT) == pytest.approx(1.0, abs=1e-6)
    # smooth=1: dice = (0 + 1) / (4 + 4 + 1) = 1/9 for disjoint masks.
    assert _loss(SoftDiceLoss(smooth=1.0), TRUTH, DISJOINT) == pytest.approx(8 / 9, abs=1e-6)
    # Both empty: (0 + smooth) / (0 + smooth) = 1, loss 0.
    assert _loss(SoftDiceLoss(smooth=1.0), EMPTY, EMPTY) == pytest.approx(0.0, abs=1e-7)


def test_soft_dice_partial_overlap_by_hand() -> None:
    # sum(y*p) = 4 * 0.5 = 2; sum(y) = 4; sum(p) = 8 * 0.5 = 4.
    # dice = (2*2 + 1) / (4 + 4 + 1) = 5/9 -> loss = 4/9.
    assert _loss(SoftDiceLoss(smooth=1.0), TRUTH, HALF) == pytest.approx(4 / 9, abs=1e-6)
    # smooth = 0.5: (4 + 0.5) / (8 + 0.5) = 9/17 -> loss 8/17.
    assert _loss(SoftDiceLoss(smooth=0.5), TRUTH, HALF) == pytest.approx(8 / 17, abs=1e-6)


def test_soft_dice_pools_batch_and_spatial_axes() -> None:
    # Batch of two images: image 1 perfect (4 px), image 2 prediction of 4 px on empty truth.
    y_true = np.concatenate([TRUTH, EMPTY])
    y_pred = np.concatenate([TRUTH, DISJOINT])
    # One batch Dice: (2*4 + 1) / (4 + 8 + 1) = 9/13 (not the mean of per-image Dice values).
    assert _loss(SoftDiceLoss(1.0), y_true, y_pred) == pytest.approx(4 / 13, abs=1e-6)


MC_TRUTH = [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
MC_PRED = [[1, 2, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_soft_dice_multiclass_averages_foreground_channels() -> None:
    # Channel 1 (label 1): |y|=3, |p|=1, overlap 1 -> (2+1)/(3+1+1) = 3/5.
    # Channel 2 (label 2): |y|=1, |p|=2, overlap 1 -> (2+1)/(1+2+1) = 3/4.
    # Background is ignored: loss = 1 - (3/5 + 3/4) / 2 = 0.325.
    loss = _loss(SoftDiceLoss(1.0), _one_hot(MC_TRUTH), _one_hot(MC_PRED))
    assert loss == pytest.approx(0.325, abs=1e-6)


# --- Dice + cross-entropy -----------------------------------------------------------------------


def test_dice_ce_binary_by_hand() -> None:
    # Dice part 4/9 (above). BCE per pixel: truth pixels p=0.5 -> ln 2 (4 px); top-row background
    # pixels p=0.5 -> ln 2 (4 px); the other 8 px p=0 (clipped to 1e-7) -> ~1e-7.
    expected_ce = (8 * np.log(2.0) + 8 * -np.log1p(-1e-7)) / 16
    loss = DiceCrossEntropyLoss(smooth=1.0, dice_weight=1.0, ce_weight=1.0)
    assert _loss(loss, TRUTH, HALF) == pytest.approx(4 / 9 + expected_ce, abs=1e-5)
    weighted = DiceCrossEntropyLoss(smooth=1.0, dice_weight=0.5, ce_weight=2.0)
    assert _loss(weighted, TRUTH, HALF) == pytest.approx(0.5 * 4 / 9 + 2 * expected_ce, abs=1e-5)


def test_dice_ce_multiclass_and_stability() -> None:
    probs = np.full((1, 4, 4, 3), 0.1, dtype="float32")
    probs[..., 0] = 0.8
    y = _one_hot(MC_TRUTH)
    labels = np.asarray(MC_TRUTH)
    expected_ce = np.mean(np.where(labels == 0, -np.log(0.8), -np.log(0.1)))
    # Dice: ch1 (2*0.3 + 1)/(3 + 1.6 + 1), ch2 (2*0.1 + 1)/(1 + 1.6 + 1).
    dice = 1 - ((1.6 / 5.6) + (1.2 / 3.6)) / 2
    got = _loss(DiceCrossEntropyLoss(smooth=1.0), y, probs)
    assert got == pytest.approx(dice + expected_ce, abs=1e-5)
    # Confidently wrong hard predictions stay finite thanks to clipping.
    assert np.isfinite(_loss(DiceCrossEntropyLoss(), y, _one_hot(MC_PRED)))
    assert np.isfinite(_loss(DiceCrossEntropyLoss(), TRUTH, DISJOINT))


def test_make_loss_and_config_round_trip() -> None:
    soft = make_loss("soft_dice", "multiclass", smooth=0.25)
    assert isinstance(soft, SoftDiceLoss) and soft.smooth == 0.25
    dice_ce = make_loss("dice_ce", "tumour", smooth=2.0)
    assert isinstance(dice_ce, DiceCrossEntropyLoss) and dice_ce.smooth == 2.0
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(dice_ce))
    assert isinstance(restored, DiceCrossEntropyLoss)
    assert (restored.smooth, restored.dice_weight, restored.ce_weight) == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="Unknown loss"):
        make_loss("focal", "multiclass", 1.0)
    with pytest.raises(ValueError, match="label_mode"):
        make_loss("soft_dice", "liver", 1.0)


# --- ClassDice metric ---------------------------------------------------------------------------


def test_class_dice_binary_cases() -> None:
    metric = ClassDice("pancreas", "pancreas")
    assert metric.name == "dice_pancreas"
    assert _dice(metric, (TRUTH, TRUTH)) == pytest.approx(1.0)
    assert _dice(metric, (TRUTH, DISJOINT)) == pytest.approx(0.0)
    # HALF thresholds (p >= 0.5) to the two top rows: 2*4 / (4 + 8) = 2/3.
    assert _dice(metric, (TRUTH, HALF)) == pytest.approx(2 / 3)
    # Both empty over the whole epoch: 1.0 by the documented training-time convention.
    assert _dice(metric, (EMPTY, EMPTY)) == pytest.approx(1.0)


def test_class_dice_accumulates_over_the_epoch() -> None:
    metric = ClassDice("tumour", "tumour", name="val_tumour")
    assert metric.name == "val_tumour"
    # Batch 1 perfect (4 px), batch 2 missed (4 px truth, nothing predicted): 2*4 / (4 + 8) = 2/3,
    # not the mean of the per-batch values (0.5).
    assert _dice(metric, (TRUTH, TRUTH), (TRUTH, EMPTY)) == pytest.approx(2 / 3)
    metric.reset_state()
    assert float(keras.ops.convert_to_numpy(metric.result())) == 1.0


def test_class_dice_multiclass_union_semantics() -> None:
    y_true, y_pred = _one_hot(MC_TRUTH), _one_hot(MC_PRED)
    pancreas, tumour = dice_metrics("multiclass")
    # Pancreas = labels {1, 2}: truth 4 px, prediction 3 px, overlap 3 -> 6/7. Pixel (0, 1) is
    # predicted tumour where truth is pancreas: a pancreas hit ...
    assert _dice(pancreas, (y_true, y_pred)) == pytest.approx(6 / 7)
    # ... and a tumour miss: truth 1 px, prediction 2 px, overlap 1 -> 2/3.
    assert _dice(tumour, (y_true, y_pred)) == pytest.approx(2 / 3)
    # Soft probabilities use the argmax.
    soft = 0.6 * y_pred + 0.4 / 3
    assert _dice(pancreas, (y_true, soft)) == pytest.approx(6 / 7)


def test_dice_metrics_and_validation() -> None:
    assert [m.name for m in dice_metrics("multiclass")] == ["dice_pancreas", "dice_tumour"]
    assert [m.name for m in dice_metrics("pancreas")] == ["dice_pancreas"]
    assert [m.name for m in dice_metrics("tumour")] == ["dice_tumour"]
    with pytest.raises(ValueError, match="only supports class 'pancreas'"):
        ClassDice("tumour", "pancreas")
    with pytest.raises(ValueError, match="only supports class 'tumour'"):
        ClassDice("pancreas", "tumour")
    with pytest.raises(ValueError, match="Unknown class"):
        ClassDice("liver", "multiclass")
    config = ClassDice("tumour", "multiclass").get_config()
    restored = ClassDice.from_config(config)
    assert (restored.name, restored.class_name, restored.label_mode) == (
        "dice_tumour",
        "tumour",
        "multiclass",
    )
