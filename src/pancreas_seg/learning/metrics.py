"""Per-class hard Dice metrics accumulated over an epoch (backend-agnostic ``keras.ops``).

Classes follow the MSD Task07 convention: "pancreas" = labels 1 and 2 (whole pancreas including
the mass), "tumour" = label 2. ``y_true`` has the layout of ``y_pred``: one-hot (B, H, W, 3) for
"multiclass", binary (B, H, W, 1) for the "pancreas" / "tumour" label modes.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from pancreas_seg.core.labels import CLASS_LABELS
from pancreas_seg.models.blocks import validate_label_mode

CLASS_NAMES: tuple[str, ...] = tuple(CLASS_LABELS)


@keras.saving.register_keras_serializable(package="pancreas_seg")
class ClassDice(keras.metrics.Metric):
    """Dataset-level Dice ``2|A∩B| / (|A| + |B|)`` of one class over all pixels seen in an epoch.

    Hard masks: multiclass -> ``c = argmax`` over channels (prediction and one-hot truth alike);
    pancreas mask ``c in {1, 2}``, tumour mask ``c == 2``. So a pixel predicted tumour whose truth
    is pancreas counts as a pancreas hit and a tumour miss. Binary modes -> ``p >= 0.5`` (truth
    ``y >= 0.5``); the "pancreas" mode supports only class "pancreas", "tumour" only "tumour".

    If both masks are empty over the whole epoch the result is 1.0 (a finite value keeps
    checkpoint monitoring and log averaging working). The 3D evaluation instead reports NaN in
    that case (nnU-Net rule). Counts are float32; ``sample_weight`` is accepted and ignored.
    """

    def __init__(
        self, class_name: str, label_mode: str, name: str | None = None, **kwargs: Any
    ) -> None:
        validate_label_mode(label_mode)
        if class_name not in CLASS_NAMES:
            raise ValueError(f"Unknown class {class_name!r}; expected one of {list(CLASS_NAMES)}.")
        if label_mode not in {"multiclass", class_name}:
            raise ValueError(
                f"label_mode {label_mode!r} only supports class {label_mode!r}, got {class_name!r}."
            )
        super().__init__(name=name or f"dice_{class_name}", **kwargs)
        self.class_name = class_name
        self.label_mode = label_mode
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.pred_sum = self.add_variable(shape=(), initializer="zeros", name="pred_sum")
        self.true_sum = self.add_variable(shape=(), initializer="zeros", name="true_sum")

    def _mask(self, y: Any) -> Any:
        """(B, H, W, K) probabilities or targets -> float32 (B, H, W) hard mask of the class."""
        if self.label_mode == "multiclass":
            cls = ops.argmax(y, axis=-1)
            # channel index = MSD label value; a class is the set of its values (labels.py)
            mask = ops.any(ops.stack([cls == value for value in CLASS_LABELS[self.class_name]]), axis=0)
        else:
            mask = y[..., 0] >= 0.5
        return ops.cast(mask, "float32")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add this batch's intersection and mask sizes to the epoch totals."""
        truth = self._mask(ops.cast(y_true, "float32"))
        pred = self._mask(ops.cast(y_pred, "float32"))
        self.intersection.assign_add(ops.sum(truth * pred))
        self.pred_sum.assign_add(ops.sum(pred))
        self.true_sum.assign_add(ops.sum(truth))

    def result(self) -> Any:
        """float32 scalar Dice; 1.0 when both masks were empty over the epoch."""
        denominator = self.pred_sum + self.true_sum
        safe = ops.where(denominator > 0, denominator, ops.ones_like(denominator))
        return ops.where(
            denominator > 0, 2.0 * self.intersection / safe, ops.ones_like(denominator)
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "class_name": self.class_name,
            "label_mode": self.label_mode,
        }


def dice_metrics(label_mode: str) -> list[ClassDice]:
    """Metrics for a label mode: multiclass -> [dice_pancreas, dice_tumour]; binary -> its class."""
    validate_label_mode(label_mode)
    classes = CLASS_NAMES if label_mode == "multiclass" else (label_mode,)
    return [ClassDice(c, label_mode) for c in classes]
