"""The Keras pruning callback with a real Optuna study, a real median pruner and real ``fit`` runs:
every epoch's monitored value is reported (step = Keras' 0-based epoch index), and a trial below the median stops
training after the epoch the pruner decided on."""

from __future__ import annotations

import keras
import numpy as np
import optuna

from pancreas_seg.tuning.pruning import OptunaPruning

MONITOR = "val_dice_pancreas"


def _fit(trial: optuna.Trial, values: list[float], epochs: int) -> tuple[OptunaPruning, dict]:
    """A tiny real model trained for ``epochs``; epoch e's monitor value is ``values[e]`` (set by a
    callback that runs before the pruning callback, as the Dice metric would)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((8, 4), "float32"), np.zeros((8, 1), "float32")
    score = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update({MONITOR: values[epoch]}))
    pruning = OptunaPruning(trial, MONITOR)
    history = model.fit(x, y, epochs=epochs, batch_size=4, verbose=0, callbacks=[score, pruning])
    return pruning, history.history


def test_reports_every_epoch_and_prunes_below_the_median() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    # two complete trials set the median per epoch: (0.5 + 0.7) / 2 = 0.6 at epoch 2 (step 1)
    for curve in ([0.4, 0.5, 0.6, 0.7], [0.5, 0.7, 0.8, 0.9]):
        trial = study.ask()
        pruning, history = _fit(trial, curve, epochs=4)
        assert pruning.pruned_at_epoch is None and len(history["loss"]) == 4
        study.tell(trial, max(curve))
    assert study.trials[0].intermediate_values == {0: 0.4, 1: 0.5, 2: 0.6, 3: 0.7}

    # a poor trial: epoch 1 is warm-up (never pruned), epoch 2 is below the median -> stops there
    trial = study.ask()
    pruning, history = _fit(trial, [0.0, 0.1, 0.9, 0.9], epochs=4)
    assert pruning.pruned_at_epoch == 2
    assert len(history["loss"]) == 2, "training must stop after the pruned epoch"
    assert pruning.reported == {0: 0.0, 1: 0.1}
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED
    assert study.trials[2].intermediate_values == {0: 0.0, 1: 0.1}

    # a good trial is not pruned
    trial = study.ask()
    pruning, history = _fit(trial, [0.6, 0.8, 0.9, 0.95], epochs=4)
    assert pruning.pruned_at_epoch is None and len(history["loss"]) == 4


def test_a_missing_monitor_is_an_error_that_names_it() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    callback = OptunaPruning(trial, "val_dice_tumour")
    try:
        callback.on_epoch_end(0, {"loss": 1.0})
    except KeyError as error:
        assert "val_dice_tumour" in str(error) and "loss" in str(error)
    else:
        raise AssertionError("no KeyError")
