"""The learning-curve record: optimizer steps and training seconds in every epoch's history, across
a resume, and the figure that puts every model on those two axes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from pancreas_seg.evaluation.plots import plot_learning_curves
from pancreas_seg.learning.curves import SECONDS_KEY, STEP_KEY, curve, pad_curve_record
from pancreas_seg.learning.training import FitConfig, LearningCurveClock, fit_with_resume

STEPS_PER_EPOCH = 3


class Batches(keras.utils.PyDataset):
    """``STEPS_PER_EPOCH`` fixed batches of a linear target; ``epoch`` as fit_with_resume sets it."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def __len__(self) -> int:
        return STEPS_PER_EPOCH

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(index).normal(size=(4, 3)).astype("float32")
        return x, x.sum(axis=1, keepdims=True)


def build() -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


class FakeClock:
    """Returns 100, 101.5, 103, ... : 1.5 s between calls."""

    def __init__(self) -> None:
        self.now = 98.5

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


def test_clock_adds_steps_and_seconds_to_each_epoch_of_a_real_fit() -> None:
    model = build()
    clock = LearningCurveClock(seconds_before=10.0, clock=FakeClock())
    history = model.fit(Batches(), validation_data=Batches(), epochs=2, verbose=0, callbacks=[clock]).history
    # optimizer iterations after each epoch, and 10 s before + the time since on_train_begin
    assert history[STEP_KEY] == [3.0, 6.0]
    assert history[SECONDS_KEY] == pytest.approx([11.5, 13.0])
    assert len(history["val_loss"]) == 2


def _fit(directory: Path, epochs: int):
    return fit_with_resume(build, Batches(), Batches(), FitConfig(epochs=epochs, batch_size=4, monitor="val_loss"),
                           directory, fingerprint="curves", label="tiny")


def test_record_is_saved_and_continues_across_a_resume(tmp_path: Path) -> None:
    first = _fit(tmp_path, epochs=2)
    assert first.history[STEP_KEY] == [3.0, 6.0]
    seconds = first.history[SECONDS_KEY]
    assert 0.0 < seconds[0] < seconds[1]
    saved = json.loads((tmp_path / "state.json").read_text())["history"]
    assert saved[STEP_KEY] == [3.0, 6.0] and saved[SECONDS_KEY] == seconds

    # a new session on the same checkpoint (as after a crash, or a longer run): the step count
    # comes back with the optimizer, the seconds continue from the recorded ones
    resumed = _fit(tmp_path, epochs=4)
    assert resumed.resumed_from_epoch == 2
    assert resumed.history[STEP_KEY] == [3.0, 6.0, 9.0, 12.0]
    assert resumed.history[SECONDS_KEY][:2] == seconds
    assert np.all(np.diff(resumed.history[SECONDS_KEY]) > 0)
    assert all(len(values) == 4 for values in resumed.history.values())


def test_a_history_without_the_record_is_padded_not_misaligned(tmp_path: Path) -> None:
    """A checkpoint written before the record existed: earlier epochs get NaN, later ones real steps;
    the seconds are unknown (NaN), since the earlier sessions' time was never recorded."""
    _fit(tmp_path, epochs=1)
    state = json.loads((tmp_path / "state.json").read_text())
    for key in (STEP_KEY, SECONDS_KEY):
        del state["history"][key]
    (tmp_path / "state.json").write_text(json.dumps(state))

    resumed = _fit(tmp_path, epochs=2)
    assert math.isnan(resumed.history[STEP_KEY][0]) and resumed.history[STEP_KEY][1] == 6.0
    assert all(math.isnan(v) for v in resumed.history[SECONDS_KEY])
    assert all(len(values) == 2 for values in resumed.history.values())


def test_pad_and_curve_helpers() -> None:
    history = {"loss": [1.0, 0.5]}
    pad_curve_record(history, 2)
    assert [math.isnan(v) for v in history[STEP_KEY]] == [True, True]
    fresh: dict[str, list[float]] = {}
    pad_curve_record(fresh, 0)
    assert fresh == {}
    x, y = curve({"val_dice_pancreas": [0.1, 0.2, 0.3], STEP_KEY: [math.nan, 60.0, 120.0]},
                 "val_dice_pancreas", STEP_KEY)
    assert x.tolist() == [60.0, 120.0] and y.tolist() == [0.2, 0.3]
    assert curve({"loss": [1.0]}, "val_dice_pancreas", STEP_KEY)[0].size == 0


def test_learning_curve_figure_has_two_panels_and_a_line_per_model() -> None:
    def history(final: float, seconds_per_epoch: float) -> dict[str, list[float]]:
        return {"val_dice_pancreas": list(np.linspace(0.2, final, 5)), STEP_KEY: [60.0 * e for e in range(1, 6)],
                SECONDS_KEY: [seconds_per_epoch * e for e in range(1, 6)], "loss": [1.0] * 5}

    histories = {"unet": history(0.8, 20.0), "fcn": history(0.3, 45.0), "cascade": history(0.9, 15.0),
                 "old": {"val_dice_pancreas": [0.5]}}   # no step record: named, not drawn
    figure = plot_learning_curves(histories, labels={"cascade": "cascade (stage 2, on crops)"})
    steps, seconds = figure.axes
    assert [line.get_label() for line in steps.get_lines()] == ["unet", "fcn", "cascade (stage 2, on crops)"]
    assert [line.get_label() for line in seconds.get_lines()] == ["unet", "fcn", "cascade (stage 2, on crops)"]
    assert steps.get_xlabel() == "optimizer steps" and "seconds" in seconds.get_xlabel()
    # the same steps for every model, each model's own time
    assert all(line.get_xdata().tolist() == [60.0, 120.0, 180.0, 240.0, 300.0] for line in steps.get_lines())
    assert [line.get_xdata()[-1] for line in seconds.get_lines()] == [100.0, 225.0, 75.0]
    assert [line.get_color() for line in steps.get_lines()] == [line.get_color() for line in seconds.get_lines()]
    assert any("old" in text.get_text() for text in figure.texts)
    (legend,) = figure.legends   # one legend for both panels
    assert [t.get_text() for t in legend.get_texts()] == ["unet", "fcn", "cascade (stage 2, on crops)"]
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
