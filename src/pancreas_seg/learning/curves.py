"""Learning curves: the x-axes that make runs of different models comparable.

Keras' history has one value per epoch, and an epoch means different things for different models
and settings. :class:`pancreas_seg.learning.training.LearningCurveClock` adds two entries to each
epoch's logs, so they land in the training history (``state.json``, ``<model>.training_history``,
MLflow) next to the metrics:

* :data:`STEP_KEY`: optimizer steps applied since the model was built (the optimizer's own
  ``iterations`` counter, saved with the optimizer, so it continues across a resume);
* :data:`SECONDS_KEY`: wall-clock seconds spent in ``fit`` since training began (training,
  validation and checkpoint writing), summed over resumed sessions; the time between a crash and
  its resume is not counted. NaN when a resumed history from an older version has no record.

Nothing here imports Keras, so plotting and reports stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

STEP_KEY = "optimizer_step"
SECONDS_KEY = "training_seconds"
CURVE_KEYS = (STEP_KEY, SECONDS_KEY)


def pad_curve_record(history: dict[str, list[float]], completed_epochs: int) -> None:
    """Give a resumed ``history`` without a curve record (written by an older version) NaN entries
    for its ``completed_epochs``, so every key keeps one value per epoch."""
    if completed_epochs <= 0:
        return
    for key in CURVE_KEYS:
        values = history.setdefault(key, [])
        if len(values) < completed_epochs:
            values[:0] = [math.nan] * (completed_epochs - len(values))


def seconds_so_far(history: Mapping[str, Sequence[float]]) -> float:
    """The training seconds recorded by the last completed epoch (0 for a fresh history, NaN if unknown)."""
    values = history.get(SECONDS_KEY, ())
    if not len(values):
        return 0.0 if not any(len(v) for v in history.values()) else math.nan
    return float(values[-1])


def curve(history: Mapping[str, Sequence[float]], metric: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of ``metric`` against ``x_key`` (:data:`STEP_KEY` or :data:`SECONDS_KEY`), epochs
    where either is missing or NaN left out; empty arrays when the history lacks either key."""
    if metric not in history or x_key not in history:
        return np.empty(0), np.empty(0)
    y = np.asarray(history[metric], dtype=float)
    x = np.asarray(history[x_key], dtype=float)
    n = min(len(x), len(y))
    x, y = x[len(x) - n:], y[len(y) - n:]  # the latest n epochs of each (a padded record has all)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]
