"""Training one model inside its own MLflow run: the training, cross-validation and cascade
pipelines all train through here.

:func:`train_model` merges the settings, builds the loaders, fits with resume under a nested MLflow
run, logs the curves and returns the model with its :class:`~pancreas_seg.inference.model_card.ModelCard`.
Keras is imported inside the functions, so importing the pipelines stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.core.runtime import dtype_policy, retained_heap
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.inference.model_card import CaseSplit, ModelCard
from pancreas_seg.learning.setup import (
    architecture_settings,
    compile_model,
    make_loaders,
    resume_fingerprint,
)
from pancreas_seg.task07.splits import manifest_dataset, split_case_ids

logger = logging.getLogger(__name__)


def training_card(architecture: str, run_id: str, input_shape: tuple[int, int, int], label_mode: str,
                  preprocessing: dict[str, Any], intensity_stats: dict[str, Any], case_manifest: pd.DataFrame,
                  result: Any, monitor: str, weights_sha256: str, **extra: Any) -> ModelCard:
    """The card of a model just trained: what inference needs and what it is bound to
    (see :mod:`pancreas_seg.inference.model_card`); ``extra`` sets fold or cascade fields."""
    import keras  # noqa: PLC0415

    return ModelCard.for_trained_model(
        architecture, label_mode, preprocessing, intensity_stats, manifest_dataset(case_manifest),
        CaseSplit.from_dict(split_case_ids(case_manifest)), weights_sha256, mlflow_run_id=run_id,
        input_shape=tuple(input_shape), data_source=str(case_manifest["source"].iloc[0]), monitor=monitor,
        best_value=result.best_value, epochs_completed=len(next(iter(result.history.values()), [])),
        keras_backend=keras.backend.backend(), git_commit=tracking.git_commit(), **extra)


def log_run_setup(name: str, settings: dict[str, Any], preprocessing: dict[str, Any], source: str,
                   label_mode: str) -> None:
    import keras  # noqa: PLC0415
    import mlflow  # noqa: PLC0415

    from pancreas_seg.core.backend import describe_devices  # noqa: PLC0415

    backend = keras.backend.backend()
    mlflow.set_tags({"architecture": name, "data_source": source, "keras_backend": backend,
                     "keras_devices": ", ".join(describe_devices(backend))[:5000],   # e.g. gpu:0 NVIDIA H100
                     "git_commit": tracking.git_commit(), "label_mode": label_mode})
    mlflow.log_params(tracking.flatten({"architecture": name, "training": settings,
                                        "preprocessing": preprocessing}))


def log_training_result(run_id: str, name: str, result: Any, source: str) -> Any:
    """Complete the epoch curves after a resume; log the training-curve figure and history."""
    from pancreas_seg.evaluation.plots import plot_training_curves  # noqa: PLC0415

    if result.resumed_from_epoch:
        import mlflow  # noqa: PLC0415

        mlflow.set_tag("resumed_from_epoch", result.resumed_from_epoch)
        for epoch in range(result.resumed_from_epoch):  # earlier epochs, so curves are complete
            tracking.log_epoch_metrics(run_id, {k: v[epoch] for k, v in result.history.items()}, epoch + 1)
    figure = plot_training_curves(result.history, title=f"{name} ({source} data)")
    tracking.log_figure(run_id, figure, "plots/training_curves.png")
    tracking.log_json(run_id, result.history, "training_history.json")
    return figure


def train_model(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                architecture: dict[str, Any]) -> tuple[Any, dict[str, Any], Any, ModelCard]:
    """Train one architecture with resume; log it to its own nested MLflow run.

    Steps: merge the settings, build the loaders, fit (resuming a checkpoint of the same settings
    and data) under the configured dtype policy and allocator tuning, log the run, write the card.
    Process-wide settings (mixed precision, malloc tuning) are restored when the node ends.

    Returns the best model (by ``monitor``), the training history, the training-curve figure and
    the model card (see :mod:`pancreas_seg.inference.model_card`). The cross-validation passes
    ``fold`` and ``n_folds`` in ``architecture``: the run is then ``<name>.fold<k>``.
    """
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    name = architecture["name"]
    fold = architecture.get("fold")   # set by the cross-validation pipeline: one model per fold
    run_name = name if fold is None else f"{name}.fold{fold}"
    settings = architecture_settings(training, architecture)
    config = PreprocessingConfig.from_params(preprocessing)
    fit_config = FitConfig.from_settings(settings)
    train_loader, val_loader = make_loaders(model_input_slices, case_manifest, settings, config)
    input_shape = (*config.image_size_px, config.context_slices)
    data_key = sorted(train_loader.case_ids) + sorted(val_loader.case_ids)
    fingerprint = resume_fingerprint(fit_config, name, settings, preprocessing, intensity_stats, data_key)
    source = str(case_manifest["source"].iloc[0])
    logger.info("%s: training on %d slices (%d cases), validating on %d slices (%d cases)%s", run_name,
                train_loader.n_slices, len(train_loader.case_ids), val_loader.n_slices,
                len(val_loader.case_ids), " - SYNTHETIC phantoms" if source == "synthetic" else "")

    def build():
        model = build_model(name, input_shape, config.label_mode, **settings["model"])
        return compile_model(model, settings, config.label_mode, total_steps=fit_config.epochs * len(train_loader))

    policy = "mixed_float16" if settings.get("mixed_precision") else None
    checkpoint_dir = Path(settings["checkpoint_root"]) / name / ("" if fold is None else f"fold{fold}")
    with tracking.architecture_run(run_name) as run, dtype_policy(policy):
        run_id = run.info.run_id
        log_run_setup(name, settings, preprocessing, source, config.label_mode)
        if fold is not None:
            import mlflow  # noqa: PLC0415

            mlflow.set_tags({"fold": fold, "n_folds": architecture["n_folds"]})
        epoch_logger = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracking.log_epoch_metrics(run_id, logs, epoch + 1))
        with retained_heap(bool(settings["retain_heap"])):
            result = fit_with_resume(build, train_loader, val_loader, fit_config, checkpoint_dir, fingerprint,
                                     label=run_name, callbacks=[epoch_logger])
        figure = log_training_result(run_id, run_name, result, source)
    folds = {} if fold is None else {"fold": int(fold), "n_folds": int(architecture["n_folds"])}
    card = training_card(name, run_id, input_shape, config.label_mode, preprocessing, intensity_stats, case_manifest,
                         result, fit_config.monitor, weights_sha256(result.model), **folds)
    return result.model, result.history, figure, card
