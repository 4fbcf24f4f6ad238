"""Running a study's trials in parallel worker processes that share its journal file.

:func:`run_study` starts ``n_workers`` processes (``multiprocessing``'s *spawn* start method: a
fresh interpreter each, nothing inherited from the Kedro process but the arguments). Each worker

1. asks the kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a ``kill -9``
   of ``kedro run`` leaves no orphan training on,
2. limits its threads to ``threads`` (``cores // n_workers`` by default) *before* Keras imports its
   backend: ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` /
   ``OMP_NUM_THREADS`` in its environment, then ``tf.config.threading`` under TensorFlow; under
   JAX one thread also means XLA's ``--xla_cpu_multi_thread_eigen=false``; with
   ``tuning.pin_cores`` (off by default) several workers are also pinned to ``threads`` cores
   each (``os.sched_setaffinity``), so every thread pool sized from the visible CPUs fits them.
   (A Keras worker with one TensorFlow thread still keeps about 1.5 cores busy: Python's fit
   loop, the loader and augmentation run beside TensorFlow's compute thread.)
3. opens the same journal storage, loads the study with its own TPE sampler (seeded from the
   study seed, its index and the trials so far) and the median pruner, and runs
   :func:`pancreas_seg.tuning.storage.optimize_until` with :class:`KerasObjective`.

The data reach the workers as file names of the memory-mapped shards (``TrialContext.shards``),
not as pickled arrays. Workers log with Python's ``logging`` to stderr (one line per trial start,
epoch and end). Between rounds the parent fails and re-queues stale trials and starts workers
again while the study is short of ``n_trials`` and the last round made progress.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pancreas_seg.tuning import mlflow_runs
from pancreas_seg.tuning.config import TuningConfig
from pancreas_seg.tuning.objective import TrialContext

logger = logging.getLogger(__name__)

THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process gets (pickled once, at its start)."""

    context: TrialContext
    config: TuningConfig
    storage_path: str                        # the journal file, or a database URL (tuning.storage)
    index: int = 0
    threads: int = 1
    cores: tuple[int, ...] | None = None     # CPU affinity; None = not pinned
    parent_pid: int = 0
    log_level: int = logging.INFO


def make_sampler(config: TuningConfig, seed: int) -> Any:
    """TPE with ``tuning.sampler`` settings; ``constant_liar`` keeps parallel workers apart."""
    import optuna  # noqa: PLC0415

    options = {"n_startup_trials": 4, "constant_liar": True, "multivariate": True, **config.sampler}
    return optuna.samplers.TPESampler(seed=seed, **options)


def make_pruner(config: TuningConfig) -> Any:
    """The median pruner with ``tuning.pruner`` settings (steps are 1-based epochs)."""
    import optuna  # noqa: PLC0415

    options = {"n_startup_trials": 2, "n_warmup_steps": 1, "interval_steps": 1, **config.pruner}
    return optuna.pruners.MedianPruner(**options)


def worker_seed(config: TuningConfig, index: int, trials_so_far: int) -> int:
    """Distinct per worker and per resume, so no two samplers draw the same random start-up points."""
    return (config.seed * 1_000_003 + index * 7_919 + trials_so_far * 104_729) % (2**32)


def configure_threads(threads: int, cores: tuple[int, ...] | None = None) -> None:
    """Limit this process's compute threads (and pin it to ``cores``); call before Keras imports its backend."""
    if cores:
        os.sched_setaffinity(0, cores)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax" and threads == 1:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already initialised: the environment variables decided
            pass


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit at once if it is already gone."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(3)


def stale_trial_callback(config: TuningConfig, mark_mlflow: bool) -> Any:
    """Mark a stale trial's MLflow run KILLED (if any), then queue the trial again."""
    from pancreas_seg.tuning.storage import retry_stale_trials  # noqa: PLC0415

    retry = retry_stale_trials(config.max_retry)

    def callback(study: Any, trial: Any) -> None:
        if mark_mlflow:
            mlflow_runs.mark_trial_run_killed(trial)
        retry(study, trial)

    return callback


def open_config_storage(config: TuningConfig, storage_path: str | Path, mark_mlflow: bool) -> Any:
    from pancreas_seg.tuning.storage import open_storage  # noqa: PLC0415

    return open_storage(storage_path, config.heartbeat_interval_s, config.grace_period_s,
                        stale_trial_callback(config, mark_mlflow))


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (see the module docstring)."""
    _die_with_parent(spec.parent_pid)
    label = f"tune worker {spec.index}"
    logging.basicConfig(level=spec.log_level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s [{label}] %(name)s: %(message)s")
    from pancreas_seg.core.warnings_filter import install  # noqa: PLC0415

    install()
    configure_threads(spec.threads, spec.cores)
    import optuna  # noqa: PLC0415

    optuna.logging.disable_default_handler()   # Optuna's records go through the handler above
    optuna.logging.enable_propagation()
    from pancreas_seg.tuning.objective import KerasObjective  # noqa: PLC0415
    from pancreas_seg.tuning.storage import describe_storage, optimize_until  # noqa: PLC0415

    if spec.context.mlflow is not None:
        import mlflow  # noqa: PLC0415

        mlflow.set_tracking_uri(spec.context.mlflow.tracking_uri)
    storage = open_config_storage(spec.config, spec.storage_path, spec.context.mlflow is not None)
    study = optuna.load_study(study_name=spec.context.study_name, storage=storage)
    seed = worker_seed(spec.config, spec.index, len(study.get_trials(deepcopy=False)))
    study = optuna.load_study(study_name=spec.context.study_name, storage=storage,
                              sampler=make_sampler(spec.config, seed), pruner=make_pruner(spec.config))
    logger.info("%d thread(s)%s, pid %d, study %r in %s", spec.threads,
                f" on core(s) {list(spec.cores)}" if spec.cores else "", os.getpid(), study.study_name,
                describe_storage(spec.storage_path))
    ran = optimize_until(study, KerasObjective(spec.context, spec.context.architecture), spec.config.n_trials,
                         spec.storage_path)
    logger.info("done: ran %d trial(s)", ran)


@dataclass(frozen=True)
class RoundResult:
    workers: int
    exit_codes: tuple[int | None, ...]
    seconds: float


def _join(processes: list[Any]) -> None:
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:   # e.g. Ctrl-C in kedro run: stop the workers, their trials are retried
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        raise


def run_study(context: TrialContext, config: TuningConfig, storage_path: str | Path | None = None,
              n_workers: int | None = None, threads: int | None = None,
              pin_cores: bool | None = None) -> list[RoundResult]:
    """Run the study until COMPLETE + PRUNED trials reach ``config.n_trials``, in worker processes.

    The study must exist in the storage (:func:`pancreas_seg.tuning.storage.open_study`). Each
    round fails and re-queues stale trials, then starts ``min(n_workers, trials still needed)``
    workers and waits for them. Raises ``RuntimeError`` when a round ends without a single new
    COMPLETE or PRUNED trial (every trial failing, workers crashing), naming what happened.
    """
    import optuna  # noqa: PLC0415

    from pancreas_seg.tuning.storage import recover_stale_trials, trial_counts, trials_to_start  # noqa: PLC0415

    storage_path = str(storage_path or config.storage_location())
    n_workers = n_workers or config.n_workers
    threads = threads or replace(config, n_workers=n_workers).threads()
    if pin_cores is not None:
        config = replace(config, pin_cores=pin_cores)
    storage = open_config_storage(config, storage_path, context.mlflow is not None)
    study = optuna.load_study(study_name=context.study_name, storage=storage)
    spawn = multiprocessing.get_context("spawn")
    rounds: list[RoundResult] = []
    while True:
        recover_stale_trials(study)
        needed = trials_to_start(study, config.n_trials)
        counts = trial_counts(study)
        if needed <= 0:
            if counts["RUNNING"] == 0:
                return rounds
            logger.info("%s: waiting for %d trial(s) running in other processes", context.architecture,
                        counts["RUNNING"])
            time.sleep(config.heartbeat_interval_s)
            continue
        done_before = counts["COMPLETE"] + counts["PRUNED"]
        workers = min(n_workers, needed)
        cores = config.worker_cores(workers, threads)
        logger.info("%s: %d of %d trials done (%d pruned, %d failed, %d queued); starting %d worker "
                    "process(es) with %d thread(s) each%s", context.architecture, done_before, config.n_trials,
                    counts["PRUNED"], counts["FAIL"], counts["WAITING"], workers, threads,
                    f", pinned to cores {[list(c) for c in cores]}" if cores[0] else "")
        specs = [WorkerSpec(context=context, config=config, storage_path=storage_path, index=index,
                            threads=threads, cores=cores[index], parent_pid=os.getpid()) for index in range(workers)]
        processes = [spawn.Process(target=worker_main, args=(spec,), name=f"tune-{context.architecture}-{spec.index}")
                     for spec in specs]
        start = time.perf_counter()
        for process in processes:
            process.start()
        _join(processes)
        rounds.append(RoundResult(workers, tuple(p.exitcode for p in processes), time.perf_counter() - start))
        recover_stale_trials(study)   # trials of workers that crashed: failed and queued again now
        after = trial_counts(study)
        progress = after["COMPLETE"] + after["PRUNED"] - done_before
        if progress == 0 and (after["FAIL"] > counts["FAIL"] or any(rounds[-1].exit_codes)):
            failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
            last_error = failed[-1].user_attrs.get("error", "see the workers' log") if failed else "none recorded"
            raise RuntimeError(
                f"[{context.architecture}] no trial finished in the last round: worker exit codes "
                f"{list(rounds[-1].exit_codes)}, {after['FAIL']} failed trial(s) in the study; "
                f"last error: {last_error}")
