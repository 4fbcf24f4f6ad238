"""Fitting with kill-safe resume and best-checkpoint selection (backend-agnostic Keras 3).

After every epoch the full model (weights + optimizer state) is written to ``last.keras`` and then
``state.json`` (the commit point), both atomically. Re-running the same training after a crash,
even ``kill -9``, resumes at the first unfinished epoch. ``best.keras`` keeps the model with the
best validation monitor (e.g. ``val_dice_pancreas``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import keras

from pancreas_seg.atomic import atomic_write_bytes
from pancreas_seg.models.io import load_model, save_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings (``params:training`` merged with per-architecture overrides)."""

    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 2e-4           # Adam, as in the study
    lr_schedule: str = "constant"         # constant | poly (see learning_rate_schedule)
    steps_per_epoch: int | None = None    # None = one pass over the training slices
    monitor: str = "val_dice_pancreas"    # maximised; picks best.keras
    early_stopping_patience: int | None = None   # epochs without improvement; None = off
    reduce_lr_patience: int | None = None        # epochs without improvement; None = off
    reduce_lr_factor: float = 0.5
    min_learning_rate: float = 1e-6
    seed: int = 42

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule != "constant" and self.reduce_lr_patience:
            raise ValueError(f"reduce_lr_patience needs lr_schedule 'constant': ReduceLROnPlateau cannot "
                             f"change a {self.lr_schedule!r} schedule; set one of them to off")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FitConfig:
        """The fields of this class found in merged ``training`` settings; other keys are ignored."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})

    def fingerprint(self, *parts: Any) -> str:
        """Hash of these settings plus anything else that must match for a resume to be valid."""
        payload = json.dumps([asdict(self), *parts], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


LR_SCHEDULES = ("constant", "poly")


def learning_rate_schedule(learning_rate: float, schedule: str,
                           total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The optimizer's learning rate: ``learning_rate`` itself (``constant``) or nnU-Net's per-step
    poly decay ``learning_rate * (1 - step / total_steps) ** 0.9`` (``poly``), 0 at ``total_steps``.

    A Keras schedule is saved with the optimizer, so a resumed run continues the same curve.
    """
    if schedule == "constant":
        return float(learning_rate)
    if schedule == "poly":
        if total_steps < 1:
            raise ValueError(f"poly lr_schedule needs total_steps >= 1, got {total_steps}")
        return keras.optimizers.schedules.PolynomialDecay(float(learning_rate), decay_steps=int(total_steps),
                                                          end_learning_rate=0.0, power=0.9)
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


class ResumableCheckpoint(keras.callbacks.Callback):
    """Writes ``last.keras`` + ``state.json`` every epoch and ``best.keras`` on improvement."""

    def __init__(self, directory: Path, fingerprint: str, monitor: str,
                 history: dict[str, list[float]], best_value: float) -> None:
        super().__init__()
        self.directory, self.fingerprint, self.monitor = directory, fingerprint, monitor
        self.history = history
        self.best_value = best_value

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        current = logs.get(self.monitor)
        if current is None:
            raise KeyError(f"monitor '{self.monitor}' not in epoch logs {sorted(logs)}")
        if not math.isnan(float(current)) and float(current) > self.best_value:
            self.best_value = float(current)
            save_model(self.model, self.directory / "best.keras")
            logger.info("Epoch %d: %s improved to %.4f; saved best.keras", epoch + 1, self.monitor, current)
        save_model(self.model, self.directory / "last.keras")
        state = {"fingerprint": self.fingerprint, "completed_epochs": epoch + 1,
                 "best_value": self.best_value, "monitor": self.monitor, "history": self.history}
        atomic_write_bytes(self.directory / "state.json", json.dumps(state, indent=1).encode())


class EpochProgress(keras.callbacks.Callback):
    """Logs one line per epoch (Kedro's log, not a progress bar)."""

    def __init__(self, label: str, epochs: int) -> None:
        super().__init__()
        self.label, self.epochs = label, epochs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        logger.info("[%s] epoch %d/%d: %s", self.label, epoch + 1, self.epochs, shown)


def read_checkpoint_state(directory: Path) -> dict[str, Any] | None:
    """The saved state, or None if there is no complete checkpoint."""
    state_path = directory / "state.json"
    if not (state_path.is_file() and (directory / "last.keras").is_file()):
        return None
    return json.loads(state_path.read_text())


@dataclass
class FitResult:
    """Outcome of :func:`fit_with_resume`."""

    model: keras.Model                  # the best model by ``monitor``
    history: dict[str, list[float]]     # per-epoch logs over all (resumed) sessions
    resumed_from_epoch: int             # 0 = fresh start
    best_value: float


def fit_with_resume(build_model: Callable[[], keras.Model], train_data: keras.utils.PyDataset,
                    validation_data: keras.utils.PyDataset, config: FitConfig, checkpoint_dir: Path,
                    fingerprint: str, label: str = "model",
                    callbacks: Sequence[keras.callbacks.Callback] = ()) -> FitResult:
    """Train ``build_model()`` (compiled) for ``config.epochs``, resuming from ``checkpoint_dir``.

    A checkpoint whose fingerprint differs (other settings or data) is moved aside, not reused.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint_state(checkpoint_dir)
    if state is not None and state["fingerprint"] != fingerprint:
        stale = checkpoint_dir.with_name(f"{checkpoint_dir.name}.stale-{state['fingerprint']}")
        logger.warning("[%s] checkpoint in %s was made with other settings; moving it to %s",
                       label, checkpoint_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(checkpoint_dir, stale)
        checkpoint_dir.mkdir(parents=True)
        state = None

    keras.utils.set_random_seed(config.seed)
    if state is None:
        model, initial_epoch, history, best_value = build_model(), 0, {}, -math.inf
    else:
        initial_epoch, history = int(state["completed_epochs"]), state["history"]
        best_value = float(state["best_value"])
        logger.info("[%s] resuming from %s after epoch %d", label, checkpoint_dir, initial_epoch)
        model = load_model(checkpoint_dir / "last.keras")
    train_data.epoch = initial_epoch

    if initial_epoch < config.epochs:
        fit_callbacks: list[keras.callbacks.Callback] = [
            ResumableCheckpoint(checkpoint_dir, fingerprint, config.monitor, history, best_value),
            EpochProgress(label, config.epochs), *callbacks,
        ]
        if config.reduce_lr_patience:
            fit_callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor=config.monitor, mode="max", factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience, min_lr=config.min_learning_rate))
        if config.early_stopping_patience:
            fit_callbacks.append(keras.callbacks.EarlyStopping(
                monitor=config.monitor, mode="max", patience=config.early_stopping_patience))
        model.fit(train_data, validation_data=validation_data, epochs=config.epochs,
                  initial_epoch=initial_epoch, callbacks=fit_callbacks, verbose=0,
                  shuffle=False)  # the loader shuffles, keyed on (seed, epoch, batch): resume-exact
        best_value = fit_callbacks[0].best_value
    else:
        logger.info("[%s] all %d epochs already completed in %s", label, config.epochs, checkpoint_dir)

    best_path = checkpoint_dir / "best.keras"
    best = load_model(best_path if best_path.is_file() else checkpoint_dir / "last.keras")
    return FitResult(model=best, history=history, resumed_from_epoch=initial_epoch, best_value=best_value)
