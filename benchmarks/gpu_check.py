"""GPU check of the ``msd`` environment under JAX: a short training that must reach a set Dice, with timings.

What it checks
--------------
The settings ``kedro run --env msd`` gives the U-Net (``conf/base/parameters_*.yml`` with
``conf/msd/parameters.yml`` deep-merged over them, as the project's ``OmegaConfigLoader`` does with
``merge_strategy: soft``; read here with PyYAML, so neither Kedro nor MLflow is needed): mixed
precision (``mixed_float16``), 256 x 256 px body-framed slices, U-Net base 32 / depth 4, batch 16,
Adam 2e-4 with the Dice + cross-entropy loss, augmentation, 4 loader threads.

1. Draws ``--cases`` SYNTHETIC phantoms with the MSD-like generator settings of the benchmarks
   (``_common.phantom_config``: 512 x 512 px, 0.7-0.9 mm pixels, 1.5-1.7 mm slices over
   150-170 mm, about 100 slices a case; in parallel processes) and preprocesses each through the
   project's one path (``preprocess_image`` / ``preprocess_label``).
2. Builds the loaders (``learning.setup.make_loaders``: the pipeline's ``SliceLoader``s), the model
   (``models.registry.build_model``) and compiles it (``learning.setup.compile_model``) inside
   ``runtime.dtype_policy("mixed_float16")``, then trains ``--epochs`` x ``--steps-per-epoch`` with
   ``model.fit``, validating every epoch on the held-out phantoms.
3. Fails (exit 1) unless the best validation pancreas Dice reaches ``--min-val-dice``
   (:data:`DEFAULT_MIN_VAL_DICE`), or if the loss is not finite, or if the trained model does not
   come back identical through ``models.io.save_model`` / ``load_model``.

What it measures
----------------
* ``fit_slices_per_s``: training through the loader (augmentation in 4 threads) inside
  ``model.fit``, per epoch from its start to the start of its validation (the device is synced
  there), median over the epochs after the first (the first one compiles).
* ``train_step_slices_per_s``: the compiled training step alone: ``train_on_batch`` on batches
  already on the device, after two warm-up steps, median over ``--timed-chunks`` chunks of
  ``--chunk-steps`` steps. ``train_on_batch`` returns its logs to the host, so each step syncs.
* ``infer_slices_per_s``: ``inference.forward.predict_slices`` (the forward pass of the predictor
  that evaluation and inference run) over the validation volumes, batch 16, float32 probabilities
  back on the host, after a warm-up call; median over ``--infer-repeats`` passes.
* Peak device memory (JAX: ``memory_stats()["peak_bytes_in_use"]`` of the first device, after
  training and at the end), the device, JAX/jaxlib/Keras versions, wall time of every phase.

The thresholds and the numbers of one run on an H200 are in ``docs/gpu_check.md``.

How to run
----------
On a machine with a GPU, JAX (CUDA) and Keras (no TensorFlow, Kedro or MLflow needed), from the
repository root (``PYTHONPATH=src`` if the project is not installed). A copy of the project needs
``src/``, ``conf/base`` (``globals.yml`` included), ``conf/msd`` and ``benchmarks/{__init__.py,
_common.py,gpu_check.py}``, and runs the module from the folder that holds them::

    KERAS_BACKEND=jax python -m benchmarks.gpu_check                 # about 2 minutes on an H200
    KERAS_BACKEND=jax python -m benchmarks.gpu_check --epochs 20 --min-val-dice 0.8 --output /tmp/g.json

Without a GPU it stops (exit 2) and says so; ``--allow-cpu`` then runs a tiny version of the same
code path (64 px, base 4, 1 epoch x 2 steps, 3 small phantoms, no Dice threshold) in about 30 s::

    KERAS_BACKEND=jax python -m benchmarks.gpu_check --allow-cpu

Every setting can be overridden (``--help``); overridden settings are listed in the report.
The report goes to ``--output`` (default ``data/08_reporting/gpu_check.json``), written atomically,
also when the check fails (``passed: false`` with the reasons).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import _common

#: Minimum best validation pancreas Dice of the default GPU run (12 phantoms, 12 x 80 steps). Two
#: H200 runs (docs/gpu_check.md) passed 0.81-0.82 after 2 epochs and 0.85-0.87 after 3, and ended at
#: 0.960 and 0.966: 0.85 leaves about 0.11 of margin for other GPUs and library versions (other
#: cuDNN kernels round differently), while a broken path (NaN loss, broken loss scaling, labels
#: misaligned with images) stays far below it.
#: With fewer ``--epochs`` set ``--min-val-dice`` too.
DEFAULT_MIN_VAL_DICE = 0.85
#: The architecture whose ``msd`` settings are checked.
ARCHITECTURE = "unet"
#: What the issue asks the msd environment to be; a mismatch is reported (the check runs what msd says).
EXPECTED_MSD = {"mixed_precision": True, "image_size_px": 256, "base_filters": 32, "batch_size": 16}
DEFAULT_OUTPUT = _common.REPO_ROOT / "data" / "08_reporting" / "gpu_check.json"
BLOCKED_MODULES = ("tensorflow", "kedro", "mlflow")

#: Defaults of a run on a GPU and of the tiny CPU run (``--allow-cpu`` without a GPU).
GPU_DEFAULTS = {"epochs": 12, "steps_per_epoch": 80, "cases": 12, "val_cases": 4, "timed_chunks": 5,
                "chunk_steps": 20, "infer_repeats": 5, "min_val_dice": DEFAULT_MIN_VAL_DICE, "phantom": "msd"}
CPU_TINY_DEFAULTS = {"epochs": 1, "steps_per_epoch": 2, "cases": 3, "val_cases": 1, "timed_chunks": 2,
                     "chunk_steps": 2, "infer_repeats": 2, "min_val_dice": 0.0, "phantom": "tiny",
                     "image_size": 64, "base_filters": 4, "batch_size": 4, "workers": 1}


class CheckFailed(Exception):
    """The run completed but a check did not pass (exit 1)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
GLOBALS_FILE = "globals.yml"
_GLOBALS_REFERENCE = re.compile(r"\$\{globals:([^,}]+)(?:,([^}]*))?\}")


def _read_globals(conf_dir: Path, env: str) -> dict[str, Any]:
    """``conf/base/globals.yml`` with the top-level keys of ``conf/<env>/globals.yml`` over it (Kedro's
    default merge for ``globals``, the values ``${globals:...}`` reads)."""
    merged: dict[str, Any] = {}
    for folder in (conf_dir / "base", conf_dir / env):
        if (folder / GLOBALS_FILE).is_file():
            merged.update(yaml.safe_load((folder / GLOBALS_FILE).read_text()) or {})
    return merged


def _global_value(match: re.Match, globals_: Mapping[str, Any], path: Path) -> Any:
    """The value of one ``${globals:key}`` / ``${globals:key,default}`` (``key`` may be dotted)."""
    key, default = match.group(1).strip(), match.group(2)
    value: Any = globals_
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is None:
                raise ValueError(f"{path}: globals key {key!r} is in no {GLOBALS_FILE} and has no default")
            return yaml.safe_load(default)
        value = value[part]
    return value


def _resolve_globals(value: Any, globals_: Mapping[str, Any], path: Path) -> Any:
    """``value`` with every ``${globals:...}`` replaced, as OmegaConf's ``globals`` resolver does: a string
    that is one reference takes the value's type. Any other interpolation is refused: PyYAML would
    keep its raw string."""
    if isinstance(value, Mapping):
        return {key: _resolve_globals(item, globals_, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_globals(item, globals_, path) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _GLOBALS_REFERENCE.fullmatch(value)
    if whole:
        return _global_value(whole, globals_, path)
    resolved = _GLOBALS_REFERENCE.sub(lambda match: str(_global_value(match, globals_, path)), value)
    if "${" in resolved:
        raise ValueError(f"{path} uses OmegaConf interpolation other than ${{globals:...}} ({value!r}), "
                         "which gpu_check's YAML reader does not resolve")
    return resolved


def _read_parameters(folder: Path, globals_: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys of every ``parameters*.yml`` in ``folder``, ``${globals:...}`` resolved from
    ``globals_``; a key in two files is an error (as Kedro)."""
    merged: dict[str, Any] = {}
    for path in sorted(folder.glob("parameters*.yml")) + sorted(folder.glob("parameters*.yaml")):
        data = _resolve_globals(yaml.safe_load(path.read_text()) or {}, globals_, path)
        duplicated = sorted(set(data) & set(merged))
        if duplicated:
            raise ValueError(f"{path}: top-level key(s) {duplicated} already defined in another file of {folder}")
        merged.update(data)
    return merged


def environment_parameters(conf_dir: Path, env: str = "msd") -> dict[str, Any]:
    """The parameters ``kedro run --env <env>`` sees: ``conf/base`` with ``conf/<env>`` deep-merged over it.

    Dictionaries merge key by key, anything else (lists too) is replaced: the project's
    ``merge_strategy: {parameters: soft}``. The only interpolation read is ``${globals:...}``
    (``globals.yml`` of ``conf/base`` and ``conf/<env>``); any other is refused.
    """
    from pancreas_seg.learning.setup import merge_settings  # noqa: PLC0415

    globals_ = _read_globals(conf_dir, env)
    return merge_settings(_read_parameters(conf_dir / "base", globals_), _read_parameters(conf_dir / env, globals_))


def resolve_settings(params: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    """(training settings of the U-Net, preprocessing parameters, overridden keys) after the command line."""
    from pancreas_seg.learning.setup import architecture_settings  # noqa: PLC0415

    settings = architecture_settings(params["training"], params[ARCHITECTURE]["architecture"])
    preprocessing = json.loads(json.dumps(params["preprocessing"]))
    overridden: list[str] = []

    def override(key: str, value: Any, target: dict, name: str) -> None:
        if value is not None and target.get(key) != value:
            target[key] = value
            overridden.append(name)

    override("image_size_px", args.image_size, preprocessing, "image_size_px")
    override("base_filters", args.base_filters, settings["model"], "base_filters")
    override("depth", args.depth, settings["model"], "depth")
    override("batch_size", args.batch_size, settings, "batch_size")
    override("mixed_precision", args.mixed_precision, settings, "mixed_precision")
    override("learning_rate", args.learning_rate, settings, "learning_rate")
    override("workers", args.workers, settings, "workers")
    # a short run by design: these always differ from msd's 30 epochs over every slice
    settings["epochs"], settings["steps_per_epoch"] = int(args.epochs), int(args.steps_per_epoch)
    settings["early_stopping_patience"] = settings["reduce_lr_patience"] = None  # irrelevant in a short run
    return settings, preprocessing, overridden


def msd_key_values(params: Mapping[str, Any]) -> dict[str, Any]:
    from pancreas_seg.learning.setup import architecture_settings  # noqa: PLC0415

    unet = architecture_settings(params["training"], params[ARCHITECTURE]["architecture"])
    return {"mixed_precision": bool(unet["mixed_precision"]), "image_size_px": params["preprocessing"]["image_size_px"],
            "base_filters": unet["model"]["base_filters"], "batch_size": unet["batch_size"]}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def phantom_kwargs(kind: str) -> dict[str, Any]:
    if kind == "msd":
        config = _common.phantom_config()
    else:  # the smoke environment's small phantoms (conf/smoke/parameters.yml)
        from pancreas_seg.phantoms import PhantomConfig  # noqa: PLC0415

        config = PhantomConfig(shape_xy_px=96, spacing_xy_mm=(4.0, 4.4), slice_thickness_mm=(6.0, 8.0),
                               z_extent_mm=(120.0, 140.0))
    return config.to_dict()


def make_case(job: tuple[int, int, dict[str, Any], dict[str, Any]]) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """One SYNTHETIC phantom, preprocessed: (case id, image (Z, H, W), label (Z, H, W), facts)."""
    from pancreas_seg.imaging.preprocess import (  # noqa: PLC0415
        PreprocessingConfig,
        preprocess_image,
        preprocess_label,
    )
    from pancreas_seg.phantoms import PhantomConfig, case_seed, make_phantom  # noqa: PLC0415

    index, seed, phantom, preprocessing = job
    case = make_phantom(case_seed(seed, index), PhantomConfig(**phantom), store_non_ras=index % 3 == 2)
    config = PreprocessingConfig.from_params(preprocessing)
    image, geometry = preprocess_image(case.hu, case.affine, config)
    label = preprocess_label(case.label, geometry, config.label_mode)
    facts = {"shape": list(case.hu.shape), "orientation": case.meta["orientation"],
             "tumour": bool((case.label == 2).any()), "slices_with_pancreas": int((label > 0).any(axis=(1, 2)).sum())}
    return f"phantom_{index + 1:03d}", image, label, facts


def make_cases(n: int, seed: int, phantom: dict, preprocessing: dict, processes: int) -> list[tuple]:
    jobs = [(i, seed, phantom, preprocessing) for i in range(n)]
    if processes <= 1:
        return [make_case(job) for job in jobs]
    # spawn: fresh interpreters, whatever the parent has imported (JAX must never be forked)
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        return list(pool.map(make_case, jobs))


# --------------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------------
def device_facts() -> dict[str, Any]:
    import jax  # noqa: PLC0415

    devices = jax.devices()
    first = devices[0]
    facts: dict[str, Any] = {"backend": jax.default_backend(), "platform": first.platform,
                             "name": getattr(first, "device_kind", str(first)), "count": len(devices)}
    try:
        from jax.extend.backend import get_backend  # noqa: PLC0415

        facts["platform_version"] = get_backend().platform_version
    except Exception:  # noqa: BLE001 - informative only
        pass
    stats = memory_stats()
    if stats and stats.get("bytes_limit"):
        facts["memory_limit_gib"] = round(stats["bytes_limit"] / 2**30, 2)
    return facts


def memory_stats() -> dict[str, int] | None:
    import jax  # noqa: PLC0415

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices may not implement it
        return None


def peak_device_gib() -> float | None:
    stats = memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**30, 3)


def versions() -> dict[str, str]:
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415
    import keras  # noqa: PLC0415

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(jaxlib, "__version__", None) or jaxlib.version.__version__,
            "keras": keras.__version__, "keras_backend": keras.backend.backend(), "numpy": np.__version__}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _epoch_timer():
    import jax  # noqa: PLC0415
    import keras  # noqa: PLC0415

    class EpochTimer(keras.callbacks.Callback):
        """Seconds of each epoch's training part (device synced) and of its validation; prints a line."""

        def __init__(self, epochs: int) -> None:
            super().__init__()
            self.epochs = epochs
            self.train_s: list[float] = []
            self.val_s: list[float] = []
            self._start = self._val_start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_test_begin(self, logs: dict | None = None) -> None:
            # fit has written the last step's state back to the variables: wait for it to exist
            jax.block_until_ready([v.value for v in self.model.trainable_variables])
            self._val_start = time.perf_counter()
            self.train_s.append(self._val_start - self._start)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.val_s.append(time.perf_counter() - self._val_start)
            logs = logs or {}
            shown = ", ".join(f"{k}={float(logs[k]):.4f}" for k in
                              ("loss", "dice_pancreas", "val_loss", "val_dice_pancreas", "val_dice_tumour") if k in logs)
            print(f"  epoch {epoch + 1}/{self.epochs}: {shown} (train {self.train_s[-1]:.1f} s, "
                  f"validation {self.val_s[-1]:.1f} s)", flush=True)

    return EpochTimer


def run_check(args: argparse.Namespace, report: dict[str, Any]) -> None:  # noqa: PLR0912, PLR0915
    """Everything after device detection; fills ``report`` as it goes (it is written even on failure)."""
    timings = report.setdefault("timings_s", {})
    params = environment_parameters(Path(args.conf_dir), "msd")
    report["msd_settings"] = msd_key_values(params)
    report["msd_settings_as_expected"] = report["msd_settings"] == EXPECTED_MSD
    if not report["msd_settings_as_expected"]:
        print(f"NOTE: conf/msd no longer gives {EXPECTED_MSD} but {report['msd_settings']}; checking what it gives",
              flush=True)
    settings, preprocessing, overridden = resolve_settings(params, args)
    report["overridden"] = overridden
    if preprocessing.get("intensity", {}).get("mode", "window") != "window":
        raise ValueError("gpu_check draws no training foreground statistics: it needs intensity mode 'window'")

    # 1. phantoms, preprocessed (before Keras is imported: the workers are fresh interpreters anyway)
    t = time.perf_counter()
    phantom = phantom_kwargs(args.phantom)
    processes = args.processes or min(args.cases, os.cpu_count() or 1)
    cases = make_cases(args.cases, args.seed, phantom, preprocessing, processes)
    timings["phantoms_and_preprocessing"] = round(time.perf_counter() - t, 2)
    n_val = args.val_cases
    if not 1 <= n_val < len(cases):
        raise ValueError(f"--val-cases must be in [1, {len(cases) - 1}], got {n_val}")
    splits = ["train"] * (len(cases) - n_val) + ["validation"] * n_val
    report["data"] = {"synthetic": True, "phantom": phantom, "seed": args.seed, "processes": processes,
                      "cases": [{"case_id": c[0], "split": s, **c[3]} for c, s in zip(cases, splits, strict=True)],
                      "train_slices": int(sum(len(c[1]) for c, s in zip(cases, splits, strict=True) if s == "train")),
                      "validation_slices": int(sum(len(c[1]) for c, s in zip(cases, splits, strict=True)
                                                   if s == "validation"))}
    print(f"phantoms: {len(cases)} ({report['data']['train_slices']} training, "
          f"{report['data']['validation_slices']} validation slices) in {timings['phantoms_and_preprocessing']:.1f} s",
          flush=True)

    import jax  # noqa: PLC0415
    import keras  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from pancreas_seg.core.runtime import dtype_policy  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import PreprocessingConfig, context_stack  # noqa: PLC0415
    from pancreas_seg.inference.forward import predict_slices  # noqa: PLC0415
    from pancreas_seg.learning.setup import compile_model, make_loaders  # noqa: PLC0415
    from pancreas_seg.models.io import load_model, save_model  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    config = PreprocessingConfig.from_params(preprocessing)
    shards = {}
    for case_id, image, label, _ in cases:
        shards[f"{case_id}/image"] = (lambda a=image: a)
        shards[f"{case_id}/label"] = (lambda a=label: a)
    manifest = pd.DataFrame({"case_id": [c[0] for c in cases], "split": splits})
    train, validation = make_loaders(shards, manifest, settings, config)
    batch_size = int(settings["batch_size"])
    input_shape = (*config.image_size_px, config.context_slices)
    epochs, steps = int(settings["epochs"]), int(settings["steps_per_epoch"])
    policy = "mixed_float16" if settings.get("mixed_precision") else None
    report["settings"] = {
        "architecture": ARCHITECTURE, "image_size_px": list(config.image_size_px), "crop_to_body": config.crop_to_body,
        "label_mode": config.label_mode, "model": settings["model"], "batch_size": batch_size,
        "mixed_precision": bool(settings.get("mixed_precision")), "learning_rate": settings["learning_rate"],
        "lr_schedule": settings["lr_schedule"], "loss": settings["loss"], "epochs": epochs,
        "steps_per_epoch": steps, "foreground_fraction": settings["foreground_fraction"],
        "augmentation": settings["augmentation"], "loader_workers": settings.get("workers", 1),
        "seed": settings["seed"]}

    with dtype_policy(policy) as policy_name:
        report["settings"]["dtype_policy"] = policy_name
        # 2. build, compile, train
        t = time.perf_counter()
        keras.utils.set_random_seed(int(settings["seed"]))
        model = build_model(ARCHITECTURE, input_shape, config.label_mode, **settings["model"])
        compile_model(model, settings, config.label_mode, total_steps=epochs * steps)
        report["model"] = {"parameters": int(model.count_params()),
                           "compute_dtype": next(la for la in model.layers if la.weights).compute_dtype,
                           "output_dtype": str(model.outputs[0].dtype)}
        timings["build_and_compile"] = round(time.perf_counter() - t, 2)
        print(f"U-Net: {report['model']['parameters']:,} parameters, policy {policy_name}; training "
              f"{epochs} x {steps} steps of {batch_size} slices", flush=True)
        timer = _epoch_timer()(epochs)
        t = time.perf_counter()
        history = model.fit(train, validation_data=validation, epochs=epochs, verbose=0, callbacks=[timer]).history
        timings["training"] = round(time.perf_counter() - t, 2)
        history = {k: [float(v) for v in values] for k, values in history.items()}
        steady = timer.train_s[1:] or timer.train_s
        fit_rates = [steps * batch_size / s for s in steady]
        val_dice = history.get("val_dice_pancreas", [])
        report["training"] = {
            "history": history, "epoch_train_s": [round(s, 3) for s in timer.train_s],
            "epoch_validation_s": [round(s, 3) for s in timer.val_s],
            "first_epoch_s": round(timer.train_s[0] + timer.val_s[0], 2),
            "fit_slices_per_s": round(_common.median(fit_rates), 1),
            "fit_slices_per_s_includes_compile": len(timer.train_s) < 2,
            "best_val_dice_pancreas": max(val_dice) if val_dice else None,
            "best_epoch": int(np.argmax(val_dice)) + 1 if val_dice else None,
            "final_val_dice_pancreas": val_dice[-1] if val_dice else None,
            "final_val_dice_tumour": history.get("val_dice_tumour", [None])[-1],
        }
        report["memory"] = {"peak_gib_after_training": peak_device_gib()}

        # 3. the compiled training step alone, on batches already on the device
        batches = [train[i % len(train)] for i in range(args.chunk_steps)]
        on_device = [(jax.device_put(x), jax.device_put(y)) for x, y in batches]
        for x, y in on_device[:2]:
            model.train_on_batch(x, y)
        step_rates = []
        for _ in range(args.timed_chunks):
            t = time.perf_counter()
            for x, y in on_device:
                model.train_on_batch(x, y)
            step_rates.append(len(on_device) * batch_size / (time.perf_counter() - t))
        report["training"]["train_step_slices_per_s"] = round(_common.median(step_rates), 1)
        report["training"]["train_step_chunks_slices_per_s"] = [round(r, 1) for r in step_rates]

        # 4. inference through forward.predict_slices over the validation volumes
        volumes = [image for (_, image, _, _), s in zip(cases, splits, strict=True) if s == "validation"]
        n_slices = sum(len(v) for v in volumes)
        t = time.perf_counter()
        predict_slices(model, volumes[0][:batch_size], config.context_slices, batch_size)  # compiles
        timings["inference_warmup"] = round(time.perf_counter() - t, 2)
        infer_rates = []
        for _ in range(args.infer_repeats):
            t = time.perf_counter()
            for volume in volumes:
                predict_slices(model, volume, config.context_slices, batch_size)
            infer_rates.append(n_slices / (time.perf_counter() - t))
        report["inference"] = {"function": "pancreas_seg.inference.forward.predict_slices", "batch_size": batch_size,
                               "slices_per_pass": n_slices, "slices_per_s": round(_common.median(infer_rates), 1),
                               "passes_slices_per_s": [round(r, 1) for r in infer_rates]}

        # 5. the trained model survives save_model / load_model (mixed precision included)
        t = time.perf_counter()
        probe = context_stack(volumes[0], np.minimum(np.arange(batch_size), len(volumes[0]) - 1),
                              config.context_slices)
        before = np.asarray(model.predict_on_batch(probe), dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, Path(tmp) / "unet.keras")
            after = np.asarray(load_model(Path(tmp) / "unet.keras", compile=False).predict_on_batch(probe),
                               dtype=np.float32)
        agreement = float((before.argmax(-1) == after.argmax(-1)).mean())
        report["checkpoint_roundtrip"] = {"max_abs_diff": float(np.abs(before - after).max()),
                                          "label_agreement": agreement, "seconds": round(time.perf_counter() - t, 2)}
    report["memory"]["peak_gib"] = peak_device_gib()
    stats = memory_stats() or {}
    report["memory"]["bytes_limit_gib"] = round(stats["bytes_limit"] / 2**30, 2) if stats.get("bytes_limit") else None

    failures = []
    losses = history.get("loss", [])
    if not losses or not all(math.isfinite(v) for v in losses + history.get("val_loss", [])):
        failures.append(f"loss not finite: loss {losses}, val_loss {history.get('val_loss')}")
    best = report["training"]["best_val_dice_pancreas"]
    if best is None or not best >= args.min_val_dice:
        failures.append(f"best validation pancreas Dice {best} < required {args.min_val_dice}")
    if agreement < 0.999:
        failures.append(f"save_model/load_model changed the predicted labels of {1 - agreement:.2%} of the pixels")
    report["failures"] = failures
    if failures:
        raise CheckFailed("; ".join(failures))


def print_summary(report: dict[str, Any]) -> None:
    training, inference = report.get("training", {}), report.get("inference", {})
    device, ver, memory = report.get("device", {}), report.get("versions", {}), report.get("memory", {})
    settings = report.get("settings", {})
    rows = [
        ["device", f"{device.get('name')} ({device.get('platform')}, {device.get('count')} device(s))"],
        ["versions", f"jax {ver.get('jax')}, jaxlib {ver.get('jaxlib')}, keras {ver.get('keras')}, "
                     f"python {ver.get('python')}"],
        ["settings", f"{settings.get('image_size_px')} px, U-Net base {settings.get('model', {}).get('base_filters')} "
                     f"depth {settings.get('model', {}).get('depth')}, batch {settings.get('batch_size')}, "
                     f"{settings.get('dtype_policy')}, {settings.get('epochs')} x {settings.get('steps_per_epoch')} steps"],
        ["training slices/s (fit, loader)", training.get("fit_slices_per_s")],
        ["training slices/s (step on device)", training.get("train_step_slices_per_s")],
        ["inference slices/s (predict_slices)", inference.get("slices_per_s")],
        ["peak device memory, GiB", memory.get("peak_gib")],
        ["first epoch (compile), s", training.get("first_epoch_s")],
        ["best val pancreas Dice (epoch)", f"{training.get('best_val_dice_pancreas')} ({training.get('best_epoch')})"],
        ["required val pancreas Dice", report.get("min_val_dice")],
        ["wall time, s", report.get("wall_s")],
        ["passed", report.get("passed")],
    ]
    _common.print_table(["gpu_check", "value"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("the run (defaults: GPU run / tiny CPU run)")
    run.add_argument("--epochs", type=int, help=f"GPU {GPU_DEFAULTS['epochs']}, CPU 1")
    run.add_argument("--steps-per-epoch", type=int, help=f"GPU {GPU_DEFAULTS['steps_per_epoch']}, CPU 2")
    run.add_argument("--cases", type=int, help="phantoms drawn (GPU 12, CPU 3)")
    run.add_argument("--val-cases", type=int, help="of which validation (GPU 4, CPU 1)")
    run.add_argument("--min-val-dice", type=float,
                     help=f"required best validation pancreas Dice (GPU {DEFAULT_MIN_VAL_DICE}, CPU 0)")
    run.add_argument("--phantom", choices=("msd", "tiny"), help="msd: 512 px, ~100 slices; tiny: 96 px, ~20 slices")
    run.add_argument("--timed-chunks", type=int, help="training-step timing chunks")
    run.add_argument("--chunk-steps", type=int, help="training steps per timing chunk")
    run.add_argument("--infer-repeats", type=int, help="timed inference passes over the validation volumes")
    run.add_argument("--seed", type=int, default=512, help="phantom seed (default 512)")
    run.add_argument("--processes", type=int, help="phantom processes (default: one per case, up to the CPUs)")
    msd = parser.add_argument_group("overrides of the msd settings")
    msd.add_argument("--image-size", type=int)
    msd.add_argument("--base-filters", type=int)
    msd.add_argument("--depth", type=int)
    msd.add_argument("--batch-size", type=int)
    msd.add_argument("--learning-rate", type=float)
    msd.add_argument("--workers", type=int, help="loader threads")
    msd.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run the tiny version on the CPU")
    parser.add_argument("--conf-dir", default=str(_common.REPO_ROOT / "conf"))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON report (default %(default)s)")
    return parser.parse_args(argv)


def apply_defaults(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        print(f"gpu_check runs under JAX; KERAS_BACKEND is {backend!r}: unset it or set KERAS_BACKEND=jax",
              file=sys.stderr)
        return 2
    from pancreas_seg.core.atomic import atomic_write_text  # noqa: PLC0415

    t = time.perf_counter()
    try:
        import jax  # noqa: PLC0415
    except ImportError as error:
        print(f"gpu_check needs JAX (with CUDA for a GPU): {error}", file=sys.stderr)
        return 2
    device = device_facts()
    on_cpu = device["platform"] == "cpu"
    if on_cpu and not args.allow_cpu:
        print(f"NO GPU: JAX sees only CPU devices ({jax.devices()}). gpu_check needs an accelerator "
              "(install jax with CUDA on a GPU machine). Pass --allow-cpu for a tiny CPU run of the same code path.",
              file=sys.stderr)
        return 2
    if on_cpu:
        print("NO GPU: running the tiny CPU version (--allow-cpu); its numbers say nothing about a GPU", flush=True)
    apply_defaults(args, CPU_TINY_DEFAULTS if on_cpu else GPU_DEFAULTS)
    report: dict[str, Any] = {"check": "gpu_check", "mode": "cpu-tiny" if on_cpu else "gpu", "passed": False,
                              "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
                              "device": device, "versions": versions(), "min_val_dice": args.min_val_dice,
                              "timings_s": {"jax_import_and_devices": round(time.perf_counter() - t, 2)}}
    print(f"device: {device['name']} ({device['platform']}); jax {report['versions']['jax']}, "
          f"keras {report['versions']['keras']}", flush=True)
    code = 0
    try:
        run_check(args, report)
        report["passed"] = True
    except CheckFailed as failure:
        print(f"GPU CHECK FAILED: {failure}", file=sys.stderr)
        code = 1
    except Exception as error:
        report["error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        report["modules_imported"] = {name: name in sys.modules for name in BLOCKED_MODULES}
        atomic_write_text(args.output, json.dumps(report, indent=2, default=str) + "\n")
        print_summary(report)
        print(f"report: {args.output}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
