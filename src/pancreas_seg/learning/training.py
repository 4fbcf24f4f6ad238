"""Fitting with kill-safe, exact resume and best-checkpoint selection (backend-agnostic Keras 3).

After every epoch, once every callback that changes training state at the end of an epoch has run
(``ReduceLROnPlateau`` may cut the learning rate, ``EarlyStopping`` may stop), the full model
(weights + optimizer state, including the current learning rate) is written to
``last-epoch-<N>.keras`` and then ``state.json``, the commit point, both atomically; ``state.json``
names the checkpoint it belongs to, and older ``last-epoch-*`` files are removed only after it is
written, so a kill at any moment leaves a consistent pair. ``state.json`` holds the history, the
best monitor value, the state of those callbacks (wait counters, best values, cooldown) and whether
the run is finished (all epochs done, or stopped early). Re-running the same training after a crash,
even ``kill -9``, resumes at the first unfinished epoch with the callbacks where they were, so the
resumed run reproduces an uninterrupted one; re-running a finished training trains nothing.
``best.keras`` keeps the model with the best validation monitor (e.g. ``val_dice_pancreas``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import keras

from pancreas_seg.core.atomic import atomic_write_bytes
from pancreas_seg.learning.curves import SECONDS_KEY, STEP_KEY, pad_curve_record, seconds_so_far
from pancreas_seg.learning.device_augmentation import train_step_augmentation
from pancreas_seg.learning.distribution import DistributionConfig, placement
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
    distribution: DistributionConfig | Any = None  # training.distribution (learning/distribution.py)

    #: Fields that choose where training runs, not what it computes: not in the fingerprint, so a
    #: checkpoint resumes on another number of devices (same result up to float summation order).
    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = ("distribution",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "distribution", DistributionConfig.from_setting(self.distribution))
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
        settings = {k: v for k, v in asdict(self).items() if k not in self.PLACEMENT_FIELDS}
        payload = json.dumps([settings, *parts], sort_keys=True, default=str)
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


def _optional_float(value: Any) -> float | None:
    """A JSON-safe copy of a monitor value (Python/NumPy/backend scalar or None)."""
    return None if value is None else float(keras.ops.convert_to_numpy(value))


def current_learning_rate(model: keras.Model) -> float:
    """The optimizer's learning rate now (a schedule is evaluated at the current step)."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class _ResumableStateMixin:
    """State of a Keras monitor callback that must survive a process restart, as JSON.

    Keras resets these counters in ``on_train_begin``; a resumed ``fit`` puts the saved values
    back right after that reset. ``state_fields`` are attributes holding ints or monitor values.
    """

    state_key: str = ""
    state_fields: tuple[str, ...] = ()
    restored_state: Mapping[str, Any] | None = None

    def callback_state(self) -> dict[str, Any]:
        """The fields as JSON-safe values (``best`` may be None before the first epoch)."""
        return {name: (_optional_float(getattr(self, name)) if name == "best" else int(getattr(self, name)))
                for name in self.state_fields}

    def _restore_state(self) -> None:
        if self.restored_state is None:
            return
        for name in self.state_fields:
            value = self.restored_state[name]
            setattr(self, name, value if name == "best" or value is None else int(value))


class ResumableEarlyStopping(_ResumableStateMixin, keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` whose wait/best counters continue across a resume."""

    state_key = "early_stopping"
    state_fields = ("wait", "best", "best_epoch", "stopped_epoch")

    def __init__(self, *args: Any, restored_state: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.restore_best_weights:
            raise ValueError("restore_best_weights is not resumable; fit_with_resume keeps best.keras instead")
        self.restored_state = restored_state

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self._restore_state()


class ResumableReduceLROnPlateau(_ResumableStateMixin, keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` whose wait/best/cooldown continue across a resume.

    The learning rate itself is optimizer state: it is restored from the last checkpoint.
    """

    state_key = "reduce_lr_on_plateau"
    state_fields = ("wait", "best", "cooldown_counter")

    def __init__(self, *args: Any, restored_state: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restored_state = restored_state

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self._restore_state()


class ResumableCheckpoint(keras.callbacks.Callback):
    """Writes ``last-epoch-<N>.keras`` + ``state.json`` every epoch and ``best.keras`` on improvement.

    Must come after every callback that changes the model, the optimizer or its own state in
    ``on_epoch_end`` (their state is read here and committed with the model). It adds
    ``learning_rate`` (the rate at the start of the epoch) to the epoch logs and history.

    In a multi-process run every process writes the same files (their replicated weights are
    identical and every write is atomic): JAX needs every process to run the same computations,
    and saving reads the model's values.
    """

    def __init__(self, directory: Path, fingerprint: str, monitor: str,
                 history: dict[str, list[float]], best_value: float, *, epochs: int | None = None,
                 stateful: Sequence[_ResumableStateMixin] = ()) -> None:
        super().__init__()
        self.directory, self.fingerprint, self.monitor = directory, fingerprint, monitor
        self.history = history
        self.best_value = best_value
        self.epochs = epochs
        self.stateful = list(stateful)
        self.stopped_early = False
        self._epoch_learning_rate = math.nan

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_learning_rate = current_learning_rate(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self._epoch_learning_rate  # ReduceLROnPlateau logs the same (pre-cut) value
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        current = logs.get(self.monitor)
        if current is None:
            raise KeyError(f"monitor '{self.monitor}' not in epoch logs {sorted(logs)}")
        if not math.isnan(float(current)) and float(current) > self.best_value:
            self.best_value = float(current)
            save_model(self.model, self.directory / "best.keras")
            logger.info("Epoch %d: %s improved to %.4f; saved best.keras", epoch + 1, self.monitor, current)
        completed = epoch + 1
        checkpoint = last_checkpoint_name(completed)
        save_model(self.model, self.directory / checkpoint)
        self.stopped_early = bool(self.model.stop_training)  # set by EarlyStopping just before
        state = {"fingerprint": self.fingerprint, "completed_epochs": completed, "checkpoint": checkpoint,
                 "best_value": self.best_value, "monitor": self.monitor, "history": self.history,
                 "learning_rate": current_learning_rate(self.model),  # for the next epoch (after any cut)
                 "callbacks": {c.state_key: c.callback_state() for c in self.stateful},
                 "stopped_early": self.stopped_early,
                 "finished": self.stopped_early or (self.epochs is not None and completed >= self.epochs)}
        atomic_write_bytes(self.directory / "state.json", json.dumps(state, indent=1).encode())
        for older in self.directory.glob("last-epoch-*.keras"):  # only once the new pair is committed
            if older.name != checkpoint:
                older.unlink(missing_ok=True)


class LearningCurveClock(keras.callbacks.Callback):
    """Adds the optimizer step count and the training seconds to each epoch's logs (see
    :mod:`pancreas_seg.learning.curves`), so learning curves can be drawn against steps and time.

    The step count is the optimizer's ``iterations`` (restored with the optimizer on resume); the
    seconds start at ``seconds_before`` (what earlier sessions of a resumed run recorded) and add
    the time since ``on_train_begin``. Must run before :class:`ResumableCheckpoint`, which copies
    the epoch's logs into the saved history. Uses no backend-specific API.
    """

    def __init__(self, seconds_before: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.seconds_before, self.clock = float(seconds_before), clock
        self._started = math.nan

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._started = self.clock()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        logs[STEP_KEY] = float(self.model.optimizer.iterations.numpy())  # a Keras variable, any backend
        logs[SECONDS_KEY] = self.seconds_before + (self.clock() - self._started)


class EpochProgress(keras.callbacks.Callback):
    """Logs one line per epoch (Kedro's log, not a progress bar)."""

    def __init__(self, label: str, epochs: int) -> None:
        super().__init__()
        self.label, self.epochs = label, epochs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        logger.info("%s: epoch %d/%d: %s", self.label, epoch + 1, self.epochs, shown)


def last_checkpoint_name(completed_epochs: int) -> str:
    """File name of the model checkpoint written after ``completed_epochs`` epochs."""
    return f"last-epoch-{completed_epochs:04d}.keras"


def committed_checkpoint(directory: Path, state: Mapping[str, Any]) -> Path:
    """The model file ``state`` belongs to (``last.keras`` for checkpoints of older versions)."""
    return Path(directory) / state.get("checkpoint", "last.keras")


def read_checkpoint_state(directory: Path) -> dict[str, Any] | None:
    """The saved state, or None if there is no complete checkpoint (state and its model file)."""
    state_path = Path(directory) / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    return state if committed_checkpoint(directory, state).is_file() else None


@dataclass
class FitResult:
    """Outcome of :func:`fit_with_resume`."""

    model: keras.Model                  # the best model by ``monitor``
    history: dict[str, list[float]]     # per-epoch logs over all (resumed) sessions
    resumed_from_epoch: int             # 0 = fresh start
    best_value: float
    stopped_early: bool = False         # EarlyStopping ended the run (in this or an earlier session)


def _set_aside_stale(checkpoint_dir: Path, fingerprint: str, label: str) -> None:
    """Move a checkpoint made with other settings or data to ``<dir>.stale-<its fingerprint>``."""
    state = read_checkpoint_state(checkpoint_dir)
    if state is None or state["fingerprint"] == fingerprint:
        return
    stale = checkpoint_dir.with_name(f"{checkpoint_dir.name}.stale-{state['fingerprint']}")
    logger.warning("%s: checkpoint in %s was made with other settings; moving it to %s",
                   label, checkpoint_dir, stale)
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(checkpoint_dir, stale)
    checkpoint_dir.mkdir(parents=True)


def _restore(checkpoint_dir: Path, state: Mapping[str, Any], label: str) -> keras.Model:
    """The compiled model of the committed checkpoint (weights and optimizer state)."""
    logger.info("%s: resuming from %s after epoch %d", label, checkpoint_dir, state["completed_epochs"])
    return load_model(committed_checkpoint(checkpoint_dir, state))


def fit_with_resume(build_model: Callable[[], keras.Model], train_data: keras.utils.PyDataset,
                    validation_data: keras.utils.PyDataset, config: FitConfig, checkpoint_dir: Path,
                    fingerprint: str, label: str = "model",
                    callbacks: Sequence[keras.callbacks.Callback] = ()) -> FitResult:
    """Train ``build_model()`` (compiled) for ``config.epochs``, resuming from ``checkpoint_dir``.

    A loader that augments on the device (``augmentation.on_device``,
    :mod:`pancreas_seg.learning.device_augmentation`) has its draws applied inside the training step;
    the checkpoints and the returned model stay plain Keras models.

    With ``config.distribution`` set (:mod:`pancreas_seg.learning.distribution`), the model is
    built (or restored from the checkpoint), compiled and trained on the configured devices; the
    returned best model is loaded on one device, as without it.

    A checkpoint whose fingerprint differs (other settings or data) is moved aside, not reused. A
    finished checkpoint (all epochs done, or stopped early) is not trained further: the best model
    is returned. ``callbacks`` run after the checkpoint of each epoch, so they must not change the
    model or optimizer at epoch end (such a change would not be in the checkpoint).
    """
    checkpoint_dir = Path(checkpoint_dir)
    where = placement(config.distribution, config.batch_size)  # one device unless configured
    if where.primary:  # several processes (multi-host) share the folder: the first one tidies it
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _set_aside_stale(checkpoint_dir, fingerprint, label)
    where.synchronize("pancreas_seg: checkpoint folder ready")
    state = read_checkpoint_state(checkpoint_dir)
    where.check_same(0 if state is None else int(state["completed_epochs"]),
                     f"the epochs completed in {checkpoint_dir} (training.checkpoint_root must be a folder "
                     "every process sees)")

    keras.utils.set_random_seed(config.seed)
    callback_states: Mapping[str, Any] = {}
    stopped_early = False
    if state is None:
        initial_epoch, history, best_value = 0, {}, -math.inf
    else:
        initial_epoch, history = int(state["completed_epochs"]), state["history"]
        best_value = float(state["best_value"])
        stopped_early = bool(state.get("stopped_early", False))
        callback_states = state.get("callbacks", {})

    if stopped_early:
        logger.info("%s: stopped early after epoch %d in %s; not training further",
                    label, initial_epoch, checkpoint_dir)
    elif initial_epoch >= config.epochs:
        logger.info("%s: all %d epochs already completed in %s", label, config.epochs, checkpoint_dir)
    else:
        train_data.epoch = initial_epoch
        stateful: list[_ResumableStateMixin] = []
        if config.reduce_lr_patience:
            stateful.append(ResumableReduceLROnPlateau(
                monitor=config.monitor, mode="max", factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience, min_lr=config.min_learning_rate,
                restored_state=callback_states.get(ResumableReduceLROnPlateau.state_key)))
        if config.early_stopping_patience:
            stateful.append(ResumableEarlyStopping(
                monitor=config.monitor, mode="max", patience=config.early_stopping_patience,
                restored_state=callback_states.get(ResumableEarlyStopping.state_key)))
        missing = [c.state_key for c in stateful if c.restored_state is None]
        if state is not None and missing:
            logger.warning("%s: checkpoint has no saved state for %s (older format); they start afresh",
                           label, missing)
        pad_curve_record(history, initial_epoch)  # a history from an older version: NaN steps/seconds
        clock = LearningCurveClock(seconds_before=seconds_so_far(history))
        checkpoint = ResumableCheckpoint(checkpoint_dir, fingerprint, config.monitor, history, best_value,
                                         epochs=config.epochs, stateful=stateful)
        # Order matters: the curve record and state-changing callbacks, then the commit, then observers.
        fit_callbacks: list[keras.callbacks.Callback] = [
            *where.callbacks(), clock, *stateful, checkpoint, EpochProgress(label, config.epochs), *callbacks]
        fit_data = where.training_data(train_data)
        with where.scope():  # build or restore, compile and fit on the configured devices
            model = build_model() if state is None else _restore(checkpoint_dir, state, label)
            with train_step_augmentation(model, train_data, fit_data):
                model.fit(fit_data, validation_data=validation_data, epochs=config.epochs,
                          initial_epoch=initial_epoch, callbacks=fit_callbacks, verbose=0,
                          shuffle=False)  # the loader shuffles, keyed on (seed, epoch, batch): resume-exact
        best_value, stopped_early = checkpoint.best_value, checkpoint.stopped_early
        if stopped_early:
            logger.info("%s: stopped early after epoch %d (no %s improvement)", label,
                        len(history.get("loss", [])), config.monitor)

    best_path = checkpoint_dir / "best.keras"
    if not best_path.is_file():  # no epoch had a finite monitor value
        best_path = committed_checkpoint(checkpoint_dir, read_checkpoint_state(checkpoint_dir) or {})
    best = load_model(best_path)
    return FitResult(model=best, history=history, resumed_from_epoch=initial_epoch, best_value=best_value,
                     stopped_early=stopped_early)
