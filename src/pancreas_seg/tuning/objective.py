"""The objective of a study: train one architecture with a trial's settings, return its best
validation Dice (``monitor``, maximised) and log the trial to its own nested MLflow run.

A trial's settings are the architecture's training settings, then ``tuning.trial`` (epochs and
steps of every trial), then the sampled values, each deep-merged over the previous ones
(:func:`pancreas_seg.learning.setup.merge_settings`). It uses the training pipeline's own parts:
``make_loaders`` (the same loaders, foreground oversampling and augmentation), ``build_model``,
``compile_model`` (optimizer, learning-rate schedule, loss, Dice metrics). Trials are not
checkpointed: an interrupted trial is retried from its start (see :mod:`.storage`).

Keras is imported when a trial runs, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg.learning.setup import merge_settings
from pancreas_seg.tuning import mlflow_runs
from pancreas_seg.tuning.search_space import SearchSpace

logger = logging.getLogger(__name__)

#: Trial user attributes written by the objective.
MLFLOW_RUN_ATTR = mlflow_runs.MLFLOW_RUN_ATTR
ERROR_ATTR = "error"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides the trial itself (picklable: sent to worker processes).

    ``shards`` maps ``<case_id>/image`` and ``<case_id>/label`` to the file of a ``.npy`` shard
    (opened memory-mapped in the worker) or, for arrays that have no file, the array itself.
    """

    architecture: str
    study_name: str
    settings: dict[str, Any]        # training settings of every trial, before the sampled values
    search_space: SearchSpace
    preprocessing: dict[str, Any]
    case_manifest: pd.DataFrame     # case_id and split of the training and validation cases
    shards: dict[str, str | np.ndarray]
    mlflow: mlflow_runs.MlflowTarget | None = None

    @property
    def monitor(self) -> str:
        return str(self.settings.get("monitor", "val_dice_pancreas"))

    def trial_settings(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of a trial with sampled ``values`` (dotted names)."""
        return merge_settings(self.settings, self.search_space.to_overrides(values))

    def shard_loaders(self) -> dict[str, Callable[[], np.ndarray]]:
        """The ``model_input_slices``-like mapping ``make_loaders`` expects (memory-mapped files)."""
        def opener(source: str | np.ndarray) -> Callable[[], np.ndarray]:
            if isinstance(source, str):
                return lambda: np.load(source, mmap_mode="r", allow_pickle=False)
            return lambda: source
        return {key: opener(source) for key, source in self.shards.items()}


def shard_sources(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                  splits: tuple[str, ...] = ("train", "validation")) -> dict[str, str | np.ndarray]:
    """The file of each shard of the ``splits`` cases (``np.memmap.filename``), else the array."""
    from pancreas_seg.learning.setup import split_cases  # noqa: PLC0415

    sources: dict[str, str | np.ndarray] = {}
    for split in splits:
        for case_id, (image, label) in split_cases(model_input_slices, case_manifest, split).items():
            for kind, array in (("image", image), ("label", label)):
                filename = getattr(array, "filename", None)
                sources[f"{case_id}/{kind}"] = (str(filename) if filename and os.path.isfile(filename)
                                                else np.asarray(array))
    return sources


def retried_from(trial: Any) -> int | None:
    """The number of the interrupted trial that ``trial`` (a live ``optuna.Trial``) retries, if any."""
    frozen = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number), None)
    return None if frozen is None else frozen.system_attrs.get("failed_trial")


class KerasObjective:
    """``objective(trial) -> best monitored validation value`` of one architecture (see the module docstring)."""

    def __init__(self, context: TrialContext, label: str | None = None) -> None:
        self.context = context
        self.label = label or context.architecture
        self._loaders = context.shard_loaders()

    def __call__(self, trial: Any) -> float:
        try:
            return self._run(trial)
        except Exception as exc:
            import optuna  # noqa: PLC0415

            if not isinstance(exc, optuna.TrialPruned):
                trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:1000])
            raise

    def _run(self, trial: Any) -> float:
        import optuna  # noqa: PLC0415

        context = self.context
        values = context.search_space.suggest(trial)
        settings = context.trial_settings(values)
        prefix = f"{self.label} trial {trial.number}:"
        retried = retried_from(trial)
        logger.info("%s start%s: %s", prefix, f" (retry of trial {retried})" if retried is not None else "",
                    ", ".join(f"{k}={_short(v)}" for k, v in values.items()))
        trial.set_user_attr("worker_pid", os.getpid())
        run_id = mlflow_runs.start_trial_run(context, trial, values, settings, retried)
        if run_id is not None:
            trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
        start = time.perf_counter()
        try:
            history, pruned_at = self._fit(trial, settings, prefix, run_id)
        except Exception as exc:
            logger.error("%s failed: %s: %s", prefix, type(exc).__name__, exc)
            mlflow_runs.end_trial_run(run_id, "FAIL", {})
            raise
        monitored = [v for v in history.get(context.monitor, []) if math.isfinite(v)]
        best = max(monitored) if monitored else math.nan
        trial.set_user_attr("epochs_completed", len(history.get(context.monitor, [])))
        metrics = {f"best_{context.monitor}": best, "trial_seconds": time.perf_counter() - start}
        if pruned_at is not None:
            trial.set_user_attr("pruned_at_epoch", pruned_at)
            logger.info("%s pruned after epoch %d (%s=%.4f, best %.4f) in %.0f s", prefix, pruned_at,
                        context.monitor, history[context.monitor][-1], best, metrics["trial_seconds"])
            mlflow_runs.end_trial_run(run_id, "PRUNED", metrics)
            raise optuna.TrialPruned(f"{context.monitor} at epoch {pruned_at} below the median of earlier trials")
        if not monitored:
            mlflow_runs.end_trial_run(run_id, "FAIL", metrics)
            raise FloatingPointError(f"no finite {context.monitor} in any epoch")
        logger.info("%s complete: best %s=%.4f in %.0f s", prefix, context.monitor, best, metrics["trial_seconds"])
        mlflow_runs.end_trial_run(run_id, "COMPLETE", metrics)
        return best

    def _fit(self, trial: Any, settings: dict[str, Any], prefix: str,
             run_id: str | None) -> tuple[dict[str, list[float]], int | None]:
        import keras  # noqa: PLC0415

        from pancreas_seg import tracking  # noqa: PLC0415
        from pancreas_seg.core.runtime import dtype_policy, retained_heap  # noqa: PLC0415
        from pancreas_seg.imaging.preprocess import PreprocessingConfig  # noqa: PLC0415
        from pancreas_seg.learning.device_augmentation import train_step_augmentation  # noqa: PLC0415
        from pancreas_seg.learning.setup import compile_model, make_loaders  # noqa: PLC0415
        from pancreas_seg.learning.training import FitConfig  # noqa: PLC0415
        from pancreas_seg.models.registry import build_model  # noqa: PLC0415
        from pancreas_seg.tuning.pruning import OptunaPruning  # noqa: PLC0415

        context = self.context
        config = PreprocessingConfig.from_params(context.preprocessing)
        fit_config = FitConfig.from_settings(settings)
        if fit_config.distribution.enabled:
            logger.warning("%s trains on one device: training.distribution applies to the training, cascade and "
                           "cv pipelines, not to tuning trials (tuning.n_workers runs trials side by side)", prefix)
        train_loader, val_loader = make_loaders(self._loaders, context.case_manifest, settings, config)
        input_shape = (*config.image_size_px, config.context_slices)
        keras.utils.set_random_seed(fit_config.seed)
        pruning = OptunaPruning(trial, context.monitor)
        callbacks: list[keras.callbacks.Callback] = []
        if fit_config.reduce_lr_patience:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor=fit_config.monitor, mode="max", factor=fit_config.reduce_lr_factor,
                patience=fit_config.reduce_lr_patience, min_lr=fit_config.min_learning_rate))
        if fit_config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=fit_config.monitor, mode="max",
                                                           patience=fit_config.early_stopping_patience))
        callbacks.append(pruning)

        def epoch_end(epoch: int, logs: dict[str, Any]) -> None:
            logger.info("%s epoch %d/%d: %s=%.4f (loss %.4f)", prefix, epoch + 1, fit_config.epochs,
                        context.monitor, float(logs.get(context.monitor, math.nan)), float(logs.get("loss", math.nan)))
            if run_id is not None:
                tracking.log_epoch_metrics(run_id, logs, epoch + 1)

        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=epoch_end))
        policy = "mixed_float16" if settings.get("mixed_precision") else None
        try:
            with dtype_policy(policy), retained_heap(bool(settings.get("retain_heap", False))):
                model = build_model(context.architecture, input_shape, config.label_mode, **settings["model"])
                compile_model(model, settings, config.label_mode, total_steps=fit_config.epochs * len(train_loader))
                with train_step_augmentation(model, train_loader):  # augmentation.on_device: in the step
                    history = model.fit(train_loader, validation_data=val_loader, epochs=fit_config.epochs,
                                        callbacks=callbacks, verbose=0, shuffle=False)
        finally:
            keras.backend.clear_session()
        return {k: [float(v) for v in vs] for k, vs in history.history.items()}, pruning.pruned_at_epoch


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
