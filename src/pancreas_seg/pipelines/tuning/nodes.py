"""Tuning nodes: thin wrappers around :mod:`pancreas_seg.tuning` (search space, storage, workers, report,
parameter importances).

Optuna, MLflow and the worker machinery are imported inside the node, so ``kedro viz`` and
catalog loading stay fast; Keras is imported only in the worker processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.learning.setup import RESULT_NEUTRAL_SETTINGS, architecture_settings
from pancreas_seg.tuning.config import TuningConfig
from pancreas_seg.tuning.search_space import SearchSpaceError

logger = logging.getLogger(__name__)

#: Settings that change how fast trials run, not what they compute: left out of the study fingerprint.
SPEED_ONLY_SETTINGS = (*RESULT_NEUTRAL_SETTINGS, "workers", "checkpoint_root")


@contextmanager
def optuna_logs_through_logging() -> Iterator[None]:
    """Optuna's log records go to the root logger (Kedro's handlers) instead of Optuna's own
    stderr handler inside the block; the ``optuna`` logger is restored afterwards."""
    optuna_logger = logging.getLogger("optuna")
    handlers, propagate = list(optuna_logger.handlers), optuna_logger.propagate
    for handler in handlers:
        optuna_logger.removeHandler(handler)
    optuna_logger.propagate = True
    try:
        yield
    finally:
        optuna_logger.propagate = propagate
        for handler in handlers:
            optuna_logger.addHandler(handler)


def check_known_settings(overrides: Mapping[str, Any], settings: Mapping[str, Any], key: str) -> None:
    """Fail when ``overrides`` (e.g. ``tuning.trial``) names a setting ``settings`` does not have."""
    for name, value in overrides.items():
        if name not in settings:
            raise SearchSpaceError(f"{key}.{name}: not a training setting (known: {', '.join(sorted(settings))})")
        if isinstance(value, Mapping) and isinstance(settings[name], Mapping):
            check_known_settings(value, settings[name], f"{key}.{name}")


def tune_architecture(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                      intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                      tuning: dict[str, Any], architecture: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """Run (or continue) the Optuna study of one architecture to ``tuning.n_trials`` trials.

    The study lives in ``<tuning.storage_dir>/<architecture>.optuna.log``, or in the database of
    ``tuning.storage`` (docs/team.md); trials run in
    ``tuning.n_workers`` worker processes. Each trial is a nested MLflow run under this node's
    study run (itself nested under kedro-mlflow's run).

    Returns the best trial (JSON), the trials table and the study figure.
    """
    import optuna  # noqa: PLC0415

    from pancreas_seg.tuning import mlflow_runs  # noqa: PLC0415
    from pancreas_seg.tuning.objective import TrialContext, shard_sources  # noqa: PLC0415
    from pancreas_seg.tuning.report import best_trial_summary, plot_study, trials_table  # noqa: PLC0415
    from pancreas_seg.tuning.storage import (  # noqa: PLC0415
        describe_storage,
        open_study,
        recover_stale_trials,
        trial_counts,
    )
    from pancreas_seg.tuning.workers import open_config_storage, run_study  # noqa: PLC0415

    name = architecture["name"]
    config = TuningConfig.from_params(tuning, name)
    check_known_settings(config.trial, architecture_settings(training, architecture), "tuning.trial")
    settings = config.trial_settings(training, architecture)
    config.search_space.check_settings(settings, f"{name}'s training settings")
    manifest = case_manifest.loc[case_manifest["split"].isin(["train", "validation"]), ["case_id", "split"]]
    manifest = manifest.reset_index(drop=True)
    cases = {split: sorted(manifest.loc[manifest["split"] == split, "case_id"].astype(str))
             for split in ("train", "validation")}
    study_settings = {
        "architecture": name, "search_space": config.search_space.describe(),
        "trial_settings": {k: v for k, v in settings.items() if k not in SPEED_ONLY_SETTINGS},
        "preprocessing": preprocessing, "intensity_stats": intensity_stats, "cases": cases,
    }
    source = str(case_manifest["source"].iloc[0]) if "source" in case_manifest else "unknown"
    storage_path = config.storage_location()   # the journal file's absolute path, or a database URL
    where = describe_storage(storage_path)      # without a password: for tags and logs
    start = time.perf_counter()
    with optuna_logs_through_logging():
        storage = open_config_storage(config, storage_path, mark_mlflow=True)
        study = open_study(storage, name, study_settings)
        recover_stale_trials(study)
        with tracking.architecture_run(f"{name} study") as run:
            tracking.set_tags({**mlflow_runs.study_run_tags(name), "optuna_storage": where,
                               "data_source": source, "git_commit": tracking.git_commit()})
            mlflow_runs.close_interrupted_study_runs(run.info.experiment_id, name, run.info.run_id)
            tracking.log_params({
                "tuning": {"n_trials": config.n_trials, "n_workers": config.n_workers,
                           "threads_per_worker": config.threads(), "seed": config.seed, "sampler": config.sampler,
                           "pruner": config.pruner, "trial": config.trial, "max_retry": config.max_retry},
                "search_space": {p.name: p.describe().partition(": ")[2] for p in config.search_space}})
            logger.info("%s: tuning %s in %s (%d trials; %s)%s", name, ", ".join(config.search_space.names),
                        where, config.n_trials, "; ".join(config.search_space.describe()),
                        " - SYNTHETIC phantoms" if source == "synthetic" else "")
            context = TrialContext(
                architecture=name, study_name=name, settings=settings, search_space=config.search_space,
                preprocessing=preprocessing, case_manifest=manifest,
                shards=shard_sources(model_input_slices, manifest),
                mlflow=mlflow_runs.MlflowTarget(tracking.absolute_tracking_uri(), run.info.experiment_id,
                                                run.info.run_id))
            run_study(context, config, storage_path)
            study = optuna.load_study(study_name=name, storage=storage)
            counts = trial_counts(study)
            monitor = context.monitor
            best = best_trial_summary(study, config.search_space, monitor, config.n_trials,
                                      architecture=name, storage=where,
                                      mlflow_study_run_id=run.info.run_id, data_source=source)
            table = trials_table(study)
            figure = plot_study(study, config.search_space, monitor,
                                f"{name}: Optuna study ({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
                                f"{source} data)")
            run_id = run.info.run_id
            tracking.log_json(run_id, best, "tuning/best_trial.json")
            tracking.log_text(run_id, table.to_csv(index=False), "tuning/trials.csv")
            tracking.log_figure(run_id, figure, "plots/tuning.png")
            tracking.log_final_metrics(run_id, {
                f"best_{monitor}": best["best"]["value"] if best["best"] else None,
                "trials_complete": counts["COMPLETE"], "trials_pruned": counts["PRUNED"],
                "trials_failed": counts["FAIL"], "tuning_seconds": time.perf_counter() - start})
    if best["best"] is None:
        logger.warning("%s: no trial completed: no best parameters", name)
    else:
        logger.info("%s: best trial %d: %s=%.4f with %s", name, best["best"]["number"], monitor,
                    best["best"]["value"], best["best"]["params"])
    return best, table, figure


def report_importances(best_trial: dict[str, Any], training: dict[str, Any], tuning: dict[str, Any],
                       architecture: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """What mattered in one architecture's finished study: parameter importances
    (``tuning.importance_evaluator``, over the COMPLETE trials), the best configuration, Optuna's
    importance plot and its parallel-coordinate plot.

    Reads the study from its journal file and logs everything to the study's MLflow run (the one
    ``best_trial`` names; see :func:`pancreas_seg.tuning.mlflow_runs.log_importances`). A study with
    fewer than 2 complete trials, or no varied parameter, gets a warning and outputs that say why
    there are no importances, not an error.

    Returns the importances (JSON), the importance plot and the parallel-coordinate plot.
    """
    import optuna  # noqa: PLC0415

    from pancreas_seg.tuning import mlflow_runs  # noqa: PLC0415
    from pancreas_seg.tuning.importance import (  # noqa: PLC0415
        COMPUTED,
        NOT_COMPUTED,
        plot_parallel_coordinate,
        plot_param_importances,
        study_importances,
    )

    name = architecture["name"]
    config = TuningConfig.from_params(tuning, name)
    monitor = str(config.trial_settings(training, architecture).get("monitor", "val_dice_pancreas"))
    from pancreas_seg.tuning.storage import describe_storage, is_database_url, load_storage  # noqa: PLC0415

    storage_path = config.storage_location()
    if not is_database_url(storage_path) and not Path(storage_path).is_file():
        raise FileNotFoundError(f"{name}: no study at {storage_path}: run `kedro run --pipelines=tune_{name}` first")
    with optuna_logs_through_logging():
        storage = load_storage(storage_path)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError as error:   # a database without this study
            raise FileNotFoundError(f"{name}: no study {name!r} in {describe_storage(storage_path)}: run "
                                    f"`kedro run --pipelines=tune_{name}` first") from error
        logger.info("%s: parameter importances (%s) of study %s: %d trial(s)", name, config.importance_evaluator,
                    describe_storage(storage_path), len(study.get_trials(deepcopy=False)))
        result = study_importances(study, config.importance_evaluator, seed=config.seed, objective=monitor,
                                   search_space=config.search_space)
        importance_plot = plot_param_importances(study, result, seed=config.seed)
        parallel_plot = plot_parallel_coordinate(study, result)
    if result["status"] == COMPUTED:
        logger.info("%s: importances (%s, %d complete trials, for %s): %s", name, result["evaluator"],
                    result["n_complete_trials"], monitor,
                    ", ".join(f"{param} {value:.3f}" for param, value in result["importances"].items()))
    elif result["status"] == NOT_COMPUTED:
        logger.warning("%s: parameter importances not computed: %s", name, result["reason"])
    else:
        logger.warning("%s: importances computed, but %s", name, result["reason"])
    for note in result["notes"]:
        logger.warning("%s: importance note (%s): %s", name, result["evaluator"], note)
    if result["best"] is not None:
        logger.info("%s: best configuration: trial %d, %s=%.4f, %s", name, result["best"]["number"], monitor,
                    result["best"]["value"], result["best"]["params"])
    run_id = best_trial.get("mlflow_study_run_id")
    if run_id:
        mlflow_runs.log_importances(run_id, result, importance_plot, parallel_plot)
        logger.info("%s: importances, importance plot and parallel coordinates logged to MLflow run %s (%s, %s, %s)",
                    name, run_id, mlflow_runs.IMPORTANCES_ARTIFACT, mlflow_runs.IMPORTANCE_PLOT_ARTIFACT,
                    mlflow_runs.PARALLEL_COORDINATE_ARTIFACT)
    else:
        logger.warning("%s: the best-trial report names no MLflow study run: importances not logged to MLflow", name)
    return result, importance_plot, parallel_plot
