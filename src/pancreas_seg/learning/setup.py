"""Setting up a training run from the project's data and settings: merged settings, loaders, compile.

Shared by the training, cascade, cross-validation and tuning pipelines (no Kedro imports). Keras
is imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg.imaging.preprocess import PreprocessingConfig


def merge_settings(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge per-architecture ``overrides`` over the shared ``training`` defaults."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def split_cases(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case_id: (image memmap, label memmap)}`` for one split of the manifest."""
    case_ids = case_manifest.loc[case_manifest["split"] == split, "case_id"].tolist()
    missing = [c for c in case_ids if f"{c}/image" not in model_input_slices]
    if missing:
        raise ValueError(f"no preprocessed shards for {split} case(s) {missing}; "
                         "run `kedro run --pipelines=preprocessing` first")
    return {c: (model_input_slices[f"{c}/image"](), model_input_slices[f"{c}/label"]()) for c in case_ids}


def check_shards(cases: Mapping[str, tuple[np.ndarray, np.ndarray]], config: PreprocessingConfig) -> None:
    """Fail clearly when the shards on disk were made with other preprocessing settings."""
    for case_id, (image, _) in cases.items():
        if tuple(image.shape[1:]) != tuple(config.image_size_px) or image.dtype != np.dtype(config.image_dtype):
            raise ValueError(
                f"data/05_model_input/slices/{case_id}/image.npy is {image.shape[1:]} {image.dtype} but "
                f"preprocessing asks for {config.image_size_px} {config.image_dtype}: the shards come from "
                "another environment or settings; run `kedro run --pipelines=preprocessing` (same --env) first")


def make_loaders(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                 settings: dict[str, Any], preprocessing: PreprocessingConfig):
    """Training and validation ``SliceLoader``s of the manifest's ``train`` / ``validation`` cases."""
    from pancreas_seg.learning.augmentation import AugmentationConfig  # noqa: PLC0415
    from pancreas_seg.learning.loader import SliceLoader  # noqa: PLC0415

    common = {"batch_size": int(settings["batch_size"]), "label_mode": preprocessing.label_mode,
              "context_slices": preprocessing.context_slices, "seed": int(settings["seed"]),
              "workers": int(settings.get("workers", 1))}
    train_cases = split_cases(model_input_slices, case_manifest, "train")
    validation_cases = split_cases(model_input_slices, case_manifest, "validation")
    check_shards({**train_cases, **validation_cases}, preprocessing)
    train = SliceLoader(train_cases, training=True,
                        foreground_fraction=float(settings["foreground_fraction"]),
                        augmentation=AugmentationConfig.from_params(settings.get("augmentation")),
                        steps_per_epoch=settings.get("steps_per_epoch"), **common)
    validation = SliceLoader(validation_cases, training=False, **common)
    return train, validation


def compile_model(model, settings: dict[str, Any], label_mode: str, total_steps: int = 1):
    """Compile ``model`` with Adam (the configured schedule over ``total_steps``), the configured loss
    and the per-class Dice metrics of ``label_mode``; returns it."""
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.losses import make_loss  # noqa: PLC0415
    from pancreas_seg.learning.metrics import dice_metrics  # noqa: PLC0415
    from pancreas_seg.learning.training import FitConfig, learning_rate_schedule  # noqa: PLC0415

    fit_config = FitConfig.from_settings(settings)
    learning_rate = learning_rate_schedule(fit_config.learning_rate, fit_config.lr_schedule, total_steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss=make_loss(settings["loss"], label_mode, float(settings["dice_smooth"])),
                  metrics=dice_metrics(label_mode))
    return model


#: Training settings that change how fast a run goes, not what it computes: a checkpoint written
#: with one value resumes with the other (retain_heap: identical weights and metrics, measured;
#: distribution: the same computation on more devices, equal up to float summation order, measured
#: in tests/learning/test_distribution.py).
RESULT_NEUTRAL_SETTINGS = ("retain_heap", "distribution")


def resume_fingerprint(fit_config: Any, name: str, settings: Mapping[str, Any], *parts: Any) -> str:
    """The checkpoint fingerprint: fit settings, architecture, merged training settings (less
    :data:`RESULT_NEUTRAL_SETTINGS`) and ``parts`` (preprocessing, intensity stats, case ids).

    ``augmentation.on_device`` counts (float32 sampling on the device is not bit-identical to the
    host's), but only when true: a checkpoint of the host path keeps the fingerprint it had before
    the setting existed."""
    relevant = {k: v for k, v in settings.items() if k not in RESULT_NEUTRAL_SETTINGS}
    augmentation = relevant.get("augmentation")
    if isinstance(augmentation, Mapping) and not augmentation.get("on_device", False):
        relevant["augmentation"] = {k: v for k, v in augmentation.items() if k != "on_device"}
    return fit_config.fingerprint(name, relevant, *parts)


def architecture_settings(training: Mapping[str, Any], architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The shared ``training`` defaults with the architecture's ``overrides`` deep-merged over them."""
    return merge_settings(training, architecture.get("overrides"))
