"""Where the Dask cluster comes from: ``conf/<env>/dask.yml``, runner arguments, or a LocalCluster.

The project hook :class:`pancreas_seg.hooks.DaskConfigHook` hands the ``dask`` section of the
configuration (``conf/base/dask.yml`` merged with ``conf/<env>/dask.yml``) to
:func:`use_project_config` when a session starts; :class:`~pancreas_seg.runners.DaskRunner`'s
keyword arguments (``--runner-params``) override single keys of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

_project_config: dict[str, Any] = {}

#: Dask settings of the LocalCluster's worker processes (docs/dask.md):
#: * not daemonic: a node may start processes of its own (the tuning node's trial workers), and
#:   Python forbids children of daemonic processes;
#: * no ``MALLOC_TRIM_THRESHOLD_``: Dask sets it by default, and setting it turns off glibc's dynamic
#:   mmap threshold, so every large array (a 512 x 512 CT) becomes a fresh mmap with page faults on
#:   first touch: preprocessing was slower in a worker than in a plain process
#:   (benchmarks/preprocessing_throughput.py), and training's ``retain_heap`` stood aside. The
#:   one-thread limits of numerical libraries stay: several tasks may share a worker's cores.
#: ``local_cluster.malloc_arena_max`` (:attr:`ClusterSettings.malloc_arena_max`) adds
#: ``MALLOC_ARENA_MAX`` to the workers' environment.
LOCAL_WORKER_CONFIG: dict[str, Any] = {
    "distributed.worker.daemon": False,
    "distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1,
                                            "OPENBLAS_NUM_THREADS": 1},
}


def use_project_config(config: Mapping[str, Any] | None) -> None:
    """Remember the session's ``dask`` configuration (called by the project hook)."""
    global _project_config  # noqa: PLW0603 - one session's settings, replaced by the next session
    _project_config = dict(config or {})


def project_config() -> dict[str, Any]:
    """The ``dask`` configuration of the current session (empty outside a Kedro session)."""
    return dict(_project_config)


@dataclass(frozen=True)
class ClusterSettings:
    """How to reach (or start) the cluster and what each node may ask of its workers.

    Attributes:
        scheduler_address: ``tcp://host:8786`` of a running scheduler (SLURM, Kubernetes ...);
            None starts a ``LocalCluster`` with the ``local_*`` settings for this run only.
        n_workers: LocalCluster worker processes.
        threads_per_worker: task slots per LocalCluster worker.
        memory_limit: per LocalCluster worker, e.g. ``"8GiB"``; ``"auto"`` shares the machine's
            memory between the workers; ``0``/None: no limit.
        worker_resources: abstract resources each LocalCluster worker offers, e.g.
            ``{"accelerator": 1}``. Remote workers declare theirs with ``dask worker --resources``.
        dashboard_address: LocalCluster dashboard (needs bokeh), e.g. ``127.0.0.1:8787``; None: off.
        resources_by_tag: Kedro node tag -> resources a node with that tag holds while it runs;
            ``{"model_training": {"accelerator": 1}}`` gives every training node a worker (or GPU)
            of its own.
        cluster_class: a Dask cluster manager started for the run instead of a LocalCluster, e.g.
            ``dask_jobqueue.SLURMCluster`` (each worker is a batch job); None: LocalCluster.
        cluster_kwargs: keyword arguments of ``cluster_class`` (queue, cores, memory, walltime ...).
        cluster_workers: how many workers (jobs, for dask-jobqueue) ``cluster_class`` is scaled to.
        malloc_arena_max: glibc malloc arenas per LocalCluster worker process (its
            ``MALLOC_ARENA_MAX``). 1: a task's thread allocates from the process's main heap, as in
            a plain single-threaded process; otherwise each task thread gets an arena of its own,
            which keeps what a task freed (a 512 x 512 scan's preprocessing peaked about 25 MiB
            higher, docs/dask.md). None: glibc's default (8 per core).
        trim_worker_memory: after each task, every worker hands the memory the task freed back to
            the kernel (glibc ``malloc_trim``), so freed memory does not pile up in it over a run.
    """

    scheduler_address: str | None = None
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int | None = "auto"
    worker_resources: dict[str, float] = field(default_factory=dict)
    dashboard_address: str | None = None
    malloc_arena_max: int | None = 1
    resources_by_tag: dict[str, dict[str, float]] = field(default_factory=dict)
    cluster_class: str | None = None
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    cluster_workers: int = 1
    trim_worker_memory: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ClusterSettings:
        """Settings from a ``dask.yml`` ``dask`` section, then non-None ``overrides``.

        Raises:
            ValueError: unknown keys (naming them), or invalid worker counts.
        """
        config = dict(config or {})
        local = dict(config.pop("local_cluster", None) or {})
        manager = dict(config.pop("cluster", None) or {})
        known_top = {"scheduler_address", "resources_by_tag", "trim_worker_memory"}
        known_local = {"n_workers", "threads_per_worker", "memory_limit", "resources", "dashboard_address",
                       "malloc_arena_max"}
        known_manager = {"class", "kwargs", "n_workers"}
        unknown = (sorted(set(config) - known_top) + sorted(f"local_cluster.{k}" for k in set(local) - known_local)
                   + sorted(f"cluster.{k}" for k in set(manager) - known_manager))
        if unknown:
            raise ValueError(f"dask.yml: unknown setting(s) {unknown}; known: {sorted(known_top)}, "
                             f"local_cluster.{sorted(known_local)} and cluster.{sorted(known_manager)}")
        arenas = local.get("malloc_arena_max", cls.malloc_arena_max)
        settings = cls(
            scheduler_address=config.get("scheduler_address") or None,
            n_workers=int(local.get("n_workers", cls.n_workers)),
            threads_per_worker=int(local.get("threads_per_worker", cls.threads_per_worker)),
            memory_limit=local.get("memory_limit", cls.memory_limit),
            worker_resources={str(k): float(v) for k, v in (local.get("resources") or {}).items()},
            dashboard_address=local.get("dashboard_address") or None,
            malloc_arena_max=None if arenas is None else int(arenas),
            resources_by_tag={str(tag): {str(k): float(v) for k, v in (res or {}).items()}
                              for tag, res in (config.get("resources_by_tag") or {}).items()},
            cluster_class=manager.get("class") or None,
            cluster_kwargs=dict(manager.get("kwargs") or {}),
            cluster_workers=int(manager.get("n_workers", 1)),
            trim_worker_memory=bool(config.get("trim_worker_memory", cls.trim_worker_memory)),
        )
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if settings.n_workers < 1 or settings.threads_per_worker < 1:
            raise ValueError(f"dask.yml: local_cluster.n_workers ({settings.n_workers}) and "
                             f"threads_per_worker ({settings.threads_per_worker}) must be >= 1")
        if settings.malloc_arena_max is not None and settings.malloc_arena_max < 1:
            raise ValueError(f"dask.yml: local_cluster.malloc_arena_max ({settings.malloc_arena_max}) must be "
                             ">= 1, or null for glibc's default")
        return settings

    def local_worker_config(self) -> dict[str, Any]:
        """The Dask configuration that LocalCluster workers start with: :data:`LOCAL_WORKER_CONFIG`
        plus ``MALLOC_ARENA_MAX`` in their environment (glibc reads it when a process starts)."""
        environ = dict(LOCAL_WORKER_CONFIG["distributed.nanny.pre-spawn-environ"])
        if self.malloc_arena_max is not None:
            environ["MALLOC_ARENA_MAX"] = self.malloc_arena_max
        return {**LOCAL_WORKER_CONFIG, "distributed.nanny.pre-spawn-environ": environ}

    def resources_for(self, tags: set[str] | frozenset[str]) -> dict[str, float] | None:
        """The Dask resources a node with ``tags`` needs (summed over its tags); None if none."""
        needed: dict[str, float] = {}
        for tag in sorted(tags):
            for name, amount in self.resources_by_tag.get(tag, {}).items():
                needed[name] = needed.get(name, 0.0) + amount
        return needed or None


@contextmanager
def cluster_client(settings: ClusterSettings) -> Iterator[Any]:
    """A ``distributed.Client`` on ``settings.scheduler_address``, else on a cluster started (and
    closed) here: ``settings.cluster_class`` (dask-jobqueue's SLURMCluster ...) or a LocalCluster.

    Raises:
        ValueError: a node tag asks for resources that no LocalCluster worker offers.
    """
    from distributed import Client  # noqa: PLC0415

    _quiet_dask_logs()
    if settings.scheduler_address:
        logger.info("Dask: connecting to the scheduler at %s", settings.scheduler_address)
        with Client(settings.scheduler_address) as client:
            yield client
        return

    if settings.cluster_class:
        with start_cluster_manager(settings) as cluster, Client(cluster) as client:
            yield client
        return

    with local_cluster(settings) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def local_cluster(settings: ClusterSettings, scheduler_port: int = 0) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` of ``settings.n_workers`` worker processes on 127.0.0.1 (its
    scheduler on ``scheduler_port``; 0: any free port), with this project's worker settings
    (:meth:`ClusterSettings.local_worker_config`); closed on exit.

    Raises:
        ValueError: a node tag asks for resources that no worker offers.
    """
    import dask  # noqa: PLC0415
    from distributed import LocalCluster  # noqa: PLC0415

    _quiet_dask_logs()
    offered = set(settings.worker_resources)
    for tag, resources in settings.resources_by_tag.items():
        missing = set(resources) - offered
        if missing:
            raise ValueError(f"dask.yml: resources_by_tag.{tag} needs {sorted(missing)}, which no "
                             f"local_cluster worker offers (local_cluster.resources: {sorted(offered)})")
    logger.info("Dask: starting a LocalCluster of %d worker process(es) x %d thread(s), resources %s",
                settings.n_workers, settings.threads_per_worker, settings.worker_resources or "none")
    with _driver_environ_restored(), dask.config.set(settings.local_worker_config()), LocalCluster(
            n_workers=settings.n_workers, threads_per_worker=settings.threads_per_worker, processes=True,
            memory_limit=settings.memory_limit or 0, host="127.0.0.1", scheduler_port=scheduler_port,
            dashboard_address=settings.dashboard_address,
            resources=settings.worker_resources or None) as cluster:
        yield cluster


@contextmanager
def start_cluster_manager(settings: ClusterSettings) -> Iterator[Any]:
    """Start ``settings.cluster_class(**cluster_kwargs)`` scaled to ``cluster_workers``; close it after.

    Raises:
        ValueError: the class cannot be imported (naming it and the package to install).
    """
    import importlib  # noqa: PLC0415

    import dask  # noqa: PLC0415

    module_name, _, class_name = str(settings.cluster_class).rpartition(".")
    try:
        cluster_type = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"dask.yml: cluster.class {settings.cluster_class!r} cannot be imported ({error}); "
                         "for SLURM install dask-jobqueue: pip install -e '.[slurm]'") from error
    with _driver_environ_restored(), dask.config.set(LOCAL_WORKER_CONFIG):
        cluster = cluster_type(**settings.cluster_kwargs)
        try:
            logger.info("Dask: %s scaled to %d worker(s); tasks wait until workers have joined",
                        settings.cluster_class, settings.cluster_workers)
            cluster.scale(settings.cluster_workers)
            yield cluster
        finally:
            cluster.close()


def _quiet_dask_logs() -> None:
    """Dask sets its loggers to INFO when imported; keep its cluster start/stop chatter out of the
    run's log (conf/logging.yml does the same in the workers). Its warnings and errors still show."""
    logging.getLogger("distributed").setLevel(logging.WARNING)


@contextmanager
def _driver_environ_restored() -> Iterator[None]:
    """Undo what Dask's nanny writes into this (the driver's) ``os.environ`` before it spawns
    workers (its ``pre-spawn-environ``: thread limits, allocator settings), once the cluster is
    closed, so they do not leak into the rest of the process or its later subprocesses."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
