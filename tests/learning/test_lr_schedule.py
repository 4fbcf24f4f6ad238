"""Learning-rate schedules (``constant`` and nnU-Net's ``poly``) and their configuration checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pancreas_seg.learning.training import FitConfig, learning_rate_schedule


def test_constant_is_the_plain_float():
    assert learning_rate_schedule(2e-3, "constant", total_steps=100) == 2e-3


@pytest.mark.parametrize("step", [0, 1, 25, 50, 99, 100, 150])
def test_poly_matches_nnunet_formula(step):
    schedule = learning_rate_schedule(2e-3, "poly", total_steps=100)
    expected = 2e-3 * (1 - min(step, 100) / 100) ** 0.9
    assert float(keras.ops.convert_to_numpy(schedule(step))) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_poly_decreases_monotonically_to_zero():
    schedule = learning_rate_schedule(1e-2, "poly", total_steps=40)
    values = np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in range(41)])
    assert values[0] == pytest.approx(1e-2)
    assert np.all(np.diff(values) < 0)
    assert values[-1] == 0.0


def test_poly_round_trips_through_keras_serialization():
    schedule = learning_rate_schedule(1e-3, "poly", total_steps=10)
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    restored = keras.optimizers.Adam.from_config(optimizer.get_config())
    assert float(keras.ops.convert_to_numpy(restored.learning_rate)) == pytest.approx(1e-3)
    config = restored.get_config()["learning_rate"]
    assert config["class_name"] == "PolynomialDecay" and config["config"]["decay_steps"] == 10


def test_unknown_schedule_and_conflicts_are_rejected():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        FitConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        learning_rate_schedule(1e-3, "step", total_steps=10)
    with pytest.raises(ValueError, match="ReduceLROnPlateau cannot"):
        FitConfig(lr_schedule="poly", reduce_lr_patience=2)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        learning_rate_schedule(1e-3, "poly", total_steps=0)
