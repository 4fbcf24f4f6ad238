"""``OptunaPruning``: a Keras 3 callback that reports the monitored value to Optuna after every
epoch and stops training when the trial's pruner says so (any backend).

``optuna-integration``'s ``KerasPruningCallback`` does the same but raises ``TrialPruned`` from
inside ``fit``; this one sets ``model.stop_training`` instead, so the caller logs the partial
run before raising ``optuna.TrialPruned`` itself (:attr:`OptunaPruning.pruned_at_epoch`).
"""

from __future__ import annotations

from typing import Any

import keras


class OptunaPruning(keras.callbacks.Callback):
    """Report ``logs[monitor]`` as the intermediate value of step ``epoch`` (Keras' 0-based epoch
    index, as optuna-integration's callback does: the pruner's ``n_warmup_steps: k`` spares the
    first k epochs); :attr:`pruned_at_epoch` is 1-based, as in the logs.

    A NaN value is reported as it is (Optuna's median pruner prunes it once past its warm-up).
    """

    def __init__(self, trial: Any, monitor: str = "val_dice_pancreas") -> None:
        super().__init__()
        self.trial, self.monitor = trial, monitor
        self.pruned_at_epoch: int | None = None
        self.reported: dict[int, float] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"pruning monitor '{self.monitor}' not in epoch logs {sorted(logs)}")
        value = float(keras.ops.convert_to_numpy(logs[self.monitor]))
        self.reported[epoch] = value
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned_at_epoch = epoch + 1
            self.model.stop_training = True
