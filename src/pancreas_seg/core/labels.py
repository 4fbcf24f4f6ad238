"""The meaning of MSD Task07 label values: the one place every module takes it from.

Label maps on disk (``labelsTr/*.nii.gz``, predictions) hold integer values:

* 0 = background
* 1 = pancreas parenchyma
* 2 = tumour (the MSD ``dataset.json`` calls it "cancer": a pancreatic mass, cyst or tumour)

The evaluated *classes* are sets of label values: ``pancreas`` = 1 ∪ 2 (the whole organ including
its mass) and ``tumour`` = 2. A model is trained in one *label mode*: ``multiclass`` (3-channel
softmax over the values above), ``pancreas`` (1 channel, 1 ∪ 2) or ``tumour`` (1 channel, 2 only).
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
PANCREAS = 1
TUMOUR = 2

LABEL_VALUES: tuple[int, ...] = (BACKGROUND, PANCREAS, TUMOUR)
"""Every valid value of a Task07 label map."""

LABEL_NAMES: dict[int, str] = {BACKGROUND: "background", PANCREAS: "pancreas", TUMOUR: "tumour"}
"""Label value -> the name this project uses in tables, plots and reports."""

MSD_DATASET_LABELS: dict[str, str] = {"0": "background", "1": "pancreas", "2": "cancer"}
"""The ``labels`` entry of the MSD Task07 ``dataset.json`` (written by the phantom generator)."""

CLASS_LABELS: dict[str, tuple[int, ...]] = {"pancreas": (PANCREAS, TUMOUR), "tumour": (TUMOUR,)}
"""Evaluated class -> the label values forming it (pancreas = 1 ∪ 2, tumour = 2)."""

PANCREAS_REGION: tuple[int, ...] = CLASS_LABELS["pancreas"]
"""Label values that together form the pancreas region (parenchyma and its mass)."""

LABEL_MODES: tuple[str, ...] = ("multiclass", "pancreas", "tumour")
"""What a model predicts: all values (softmax), or one class as a binary target (sigmoid)."""


def check_label_mode(label_mode: str) -> str:
    """Return ``label_mode`` if it is one of :data:`LABEL_MODES`, else raise ValueError."""
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    return label_mode


def output_channels(label_mode: str) -> int:
    """Model output channels: 3 (softmax over the label values) for multiclass, else 1 (sigmoid)."""
    return len(LABEL_VALUES) if check_label_mode(label_mode) == "multiclass" else 1


def tumour_channel(label_mode: str) -> int | None:
    """The model output channel holding the tumour probability: 2 (softmax) for multiclass, 0 (sigmoid)
    for tumour, None for pancreas (no tumour output)."""
    mode = check_label_mode(label_mode)
    return TUMOUR if mode == "multiclass" else (0 if mode == "tumour" else None)


def class_mask(labels: np.ndarray, class_name: str) -> np.ndarray:
    """Boolean mask of one evaluated class (e.g. pancreas = values 1 ∪ 2) of an integer label map."""
    if class_name not in CLASS_LABELS:
        raise KeyError(f"unknown class {class_name!r}; known: {sorted(CLASS_LABELS)}")
    return np.isin(np.asarray(labels), CLASS_LABELS[class_name])


def to_training_target(labels: np.ndarray, label_mode: str) -> np.ndarray:
    """MSD label map -> uint8 training target: multiclass {0, 1, 2}; pancreas 1 ∪ 2 -> 1; tumour 2 -> 1."""
    labels = np.asarray(labels)
    if check_label_mode(label_mode) == "multiclass":
        return labels.astype(np.uint8, copy=False)
    return class_mask(labels, label_mode).astype(np.uint8)


def binary_label_value(label_mode: str) -> int:
    """The MSD value a binary (sigmoid) model's foreground stands for: pancreas -> 1, tumour -> 2."""
    if check_label_mode(label_mode) == "multiclass":
        raise ValueError("multiclass models have no single foreground value")
    return PANCREAS if label_mode == "pancreas" else TUMOUR


def probabilities_to_labels(probabilities: np.ndarray, label_mode: str) -> np.ndarray:
    """(..., C) model output -> uint8 MSD label values: argmax for multiclass, p >= 0.5 otherwise."""
    if check_label_mode(label_mode) == "multiclass":
        return np.argmax(probabilities, axis=-1).astype(np.uint8)
    return (probabilities[..., 0] >= 0.5).astype(np.uint8) * np.uint8(binary_label_value(label_mode))
