"""``DaskRunner``: run a Kedro 1.x pipeline on a ``dask.distributed`` cluster.

``kedro run --runner=pancreas_seg.runners.DaskRunner [--env E] [--runner-params address=tcp://...]``

How it works:

* The driver (the ``kedro run`` process) walks the pipeline graph and submits every node whose
  inputs are ready as one Dask task, so independent nodes (the architecture namespaces' training,
  their evaluations) run at the same time on different workers. A node whose tags appear under
  ``resources_by_tag`` in ``dask.yml`` holds those Dask resources while it runs:
  ``model_training: {accelerator: 1}`` pins each training node to a worker (or GPU) of its own.
* A task gets a catalog of just its node's datasets. Persisted datasets are read and written by the
  worker through their fsspec paths (local disk, NFS, ``s3://``...): nothing assumes the workers
  share memory with the driver or with each other. MemoryDatasets between nodes travel as Dask
  task results (over the network when the nodes run on different machines).
* A node that returns per-case lazy partitions (:class:`pancreas_seg.runners.parallel.LazyCaseParts`) for
  a ``PartitionedDataset`` has them saved by one task per case on the cluster (a case's image and
  label are computed together, once). Per-case loops inside a node use
  :func:`pancreas_seg.runners.parallel.map_over_cases` and are mapped over the workers the same way.
* MLflow: each task re-opens the driver's active run (kedro-mlflow's parent run) in its worker, so
  nested runs and metrics land where the sequential runner puts them; a node tagged
  ``no_mlflow_run`` (:data:`pancreas_seg.pipelines.NO_MLFLOW_RUN_TAG`: ingestion, preprocessing)
  runs without it, and a worker that runs only such nodes never loads MLflow. Node hooks
  (``before_node_run``/``after_node_run``/``on_node_error``) run in the driver with the node's
  parameter inputs (kedro-mlflow logs them from there); the node's datasets are never loaded in
  the driver. Dataset hooks do not run, as with Kedro's own ParallelRunner.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from dask.sizeof import sizeof as dask_sizeof
from distributed.diagnostics.plugin import WorkerPlugin
from kedro.framework.hooks.manager import _NullPluginManager
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.pipeline.node import Node
from kedro.runner import AbstractRunner
from kedro.runner.task import Task

from pancreas_seg.core.backend import ENV_VAR as KERAS_BACKEND_ENV_VAR
from pancreas_seg.core.backend import JAX, TENSORFLOW, apply_backend
from pancreas_seg.pipelines import NO_MLFLOW_RUN_TAG
from pancreas_seg.runners.cluster import (
    ClusterSettings,
    cluster_client,
    local_cluster,
    project_config,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowParent:
    """The driver's active MLflow run, re-opened by every task on its worker."""

    tracking_uri: str
    registry_uri: str | None
    experiment_id: str
    run_id: str


class DaskRunner(AbstractRunner):
    """Run the pipeline's nodes as tasks on a Dask cluster (see the module docstring)."""

    def __init__(self, address: str | None = None, n_workers: int | None = None,
                 threads_per_worker: int | None = None, trim_worker_memory: bool | None = None,
                 is_async: bool = False) -> None:
        """
        Args:
            address: scheduler address; overrides ``dask.scheduler_address`` of ``dask.yml``.
            n_workers: LocalCluster worker processes; overrides ``dask.local_cluster.n_workers``.
            threads_per_worker: overrides ``dask.local_cluster.threads_per_worker``.
            trim_worker_memory: overrides ``dask.trim_worker_memory``.
            is_async: load and save each node's datasets with threads (Kedro's ``--async``).
        """
        super().__init__(is_async=is_async)
        self._overrides = {"scheduler_address": address, "n_workers": n_workers,
                           "threads_per_worker": threads_per_worker, "trim_worker_memory": trim_worker_memory}

    def _get_executor(self, max_workers: int) -> None:
        return None  # the cluster is the executor (see _run)

    def _run(self, pipeline: Pipeline, catalog: Any, hook_manager: Any = None,
             run_id: str | None = None) -> None:
        settings = ClusterSettings.from_config(project_config(), **self._overrides)
        hooks = hook_manager or _NullPluginManager()
        parent = _active_mlflow_run()
        # MemoryDatasets that nodes produce move as task results; a free input held in memory (data
        # put in the catalog by the caller) travels, with its data, in the catalog of each node reading it
        memory = {name for name in pipeline.datasets() - pipeline.inputs()
                  if not _is_parameter(name) and isinstance(catalog.get(name, fallback_to_runtime_pattern=True),
                                                            MemoryDataset)}
        tracked = any(NO_MLFLOW_RUN_TAG not in node.tags for node in pipeline.nodes)
        with cluster_client(settings) as client:
            client.register_plugin(
                ProjectOnWorker(_package_name(), str(Path.cwd()), warm_modules=node_modules(pipeline.nodes),
                                mlflow_parent=parent if tracked else None,
                                trim_after_task=settings.trim_worker_memory),
                name=ProjectOnWorker.NAME)
            logger.info("Dask: %d node(s) on %d worker(s) (dashboard: %s)", len(pipeline.nodes),
                        len(client.scheduler_info().get("workers", {})), client.dashboard_link or "off")
            self._schedule(pipeline, catalog, hooks, run_id, client, settings, parent, memory)

    def _schedule(self, pipeline: Pipeline, catalog: Any, hooks: Any, run_id: str | None, client: Any,
                  settings: ClusterSettings, parent: MlflowParent | None, memory: set[str]) -> None:
        from distributed import wait  # noqa: PLC0415

        dependencies = pipeline.node_dependencies
        load_counts = Counter(chain.from_iterable(n.inputs for n in pipeline.nodes))
        producers: dict[str, Any] = {}   # memory dataset -> future of its producer's result dict
        todo, done = set(dependencies), set()
        running: dict[Any, Node] = {}
        while todo or running:
            for node in sorted((n for n in todo if dependencies[n] <= done), key=lambda n: n.name):
                todo.discard(node)
                params = {name: catalog.load(name) for name in node.inputs if _is_parameter(name)}
                hooks.hook.before_node_run(node=node, catalog=catalog, inputs=params,
                                           is_async=self._is_async, run_id=run_id)
                future = client.submit(
                    run_node_on_worker, node, _node_catalog(catalog, node, memory),
                    {name: producers[name] for name in node.inputs if name in memory},
                    [name for name in node.outputs if name in memory], parent, run_id, self._is_async,
                    key=f"{node.name}-{os.urandom(4).hex()}", resources=settings.resources_for(node.tags),
                    pure=False, retries=0)
                running[future] = node
            if not running:
                self._raise_runtime_error(todo, done, set(), None)
            finished, _ = wait(list(running), return_when="FIRST_COMPLETED")
            for future in finished:
                node = running.pop(future)
                params = {name: catalog.load(name) for name in node.inputs if _is_parameter(name)}
                try:
                    future.result()
                except Exception as error:
                    hooks.hook.on_node_error(error=error, node=node, catalog=catalog, inputs=params,
                                             is_async=self._is_async, run_id=run_id)
                    for other in running:
                        other.cancel()
                    self._suggest_resume_scenario(pipeline, done, catalog)
                    raise
                hooks.hook.after_node_run(node=node, catalog=catalog, inputs=params, outputs={},
                                          is_async=self._is_async, run_id=run_id)
                for name in node.outputs:
                    if name in memory:
                        producers[name] = future
                done.add(node)
                logger.info("Completed node %s (%d of %d) on the cluster", node.name, len(done),
                            len(pipeline.nodes))
                self._release_memory(node, pipeline, catalog, load_counts, producers, client)

    @staticmethod
    def _release_memory(node: Node, pipeline: Pipeline, catalog: Any, load_counts: Counter,
                        producers: dict[str, Any], client: Any) -> None:
        """Drop the futures of memory datasets nobody will read again; keep pipeline outputs."""
        for name in node.inputs:
            load_counts[name] -= 1
        for name in [*node.inputs, *node.outputs]:
            if name in producers and load_counts[name] < 1:
                future = producers.pop(name)
                if name in pipeline.outputs():
                    catalog.save(name, future.result()[name])  # a free output is returned by run()


def run_node_on_worker(node: Node, catalog: DataCatalog, upstream: Mapping[str, Mapping[str, Any]],
                       memory_outputs: list[str], parent: MlflowParent | None, run_id: str | None,
                       is_async: bool) -> dict[str, Any]:
    """Run one node on a Dask worker (the task function); return its MemoryDataset outputs.

    ``upstream`` maps each memory input to its producer's result dict (Dask has resolved the
    producers' futures to their values by the time this runs).
    """
    for name, result in upstream.items():
        catalog[name] = MemoryDataset(result[name])
    for name in memory_outputs:
        catalog[name] = MemoryDataset()
    mlflow_scope = _no_mlflow_run(node) if NO_MLFLOW_RUN_TAG in node.tags else _reopened_mlflow_run(parent)
    with mlflow_scope:
        Task(node=node, catalog=catalog, is_async=is_async, hook_manager=_NullPluginManager(),
             run_id=run_id).execute()
    return {name: catalog.load(name) for name in memory_outputs}


@contextmanager
def _no_mlflow_run(node: Node) -> Iterator[None]:
    """Run a node tagged :data:`~pancreas_seg.pipelines.NO_MLFLOW_RUN_TAG` without an MLflow run.

    Raises:
        RuntimeError: the node logged to MLflow after all (MLflow then started a run of its own,
            outside the pipeline's run); that run is ended as FAILED.
    """
    yield
    if "mlflow" not in sys.modules:  # the node never imported it
        return
    import mlflow  # noqa: PLC0415

    stray = mlflow.active_run()
    if stray is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")
    raise RuntimeError(f"Node {node.name!r} is tagged {NO_MLFLOW_RUN_TAG!r} but logged to MLflow, which started "
                       f"run {stray.info.run_id} outside the pipeline's run; remove the tag so that the node "
                       "logs into the pipeline's run")


def _node_catalog(catalog: Any, node: Node, memory: set[str]) -> DataCatalog:
    """A catalog of ``node``'s persisted datasets and parameters (what its task ships to a worker)."""
    from kedro_datasets.partitions import PartitionedDataset  # noqa: PLC0415

    datasets: dict[str, AbstractDataset] = {}
    for name in dict.fromkeys([*node.inputs, *node.outputs]):
        if name in memory:
            continue
        dataset = catalog.get(name, fallback_to_runtime_pattern=True)
        if name in node.outputs and isinstance(dataset, PartitionedDataset):
            dataset = ClusterPartitionedSave(dataset)
        datasets[name] = dataset
    return DataCatalog(datasets=datasets)


class ClusterPartitionedSave(AbstractDataset):
    """A ``PartitionedDataset`` whose per-case lazy partitions are saved by tasks on the cluster.

    ``save(partitions)`` of :class:`pancreas_seg.runners.parallel.LazyCaseParts` partitions saves each case
    in one task (its callables run there, so a case's image and label come from one computation).
    Any other data, or a save outside a Dask worker, is saved here exactly as the wrapped dataset
    saves it.
    """

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset

    def load(self) -> Any:
        return self._dataset.load()

    def save(self, data: Any) -> None:
        from pancreas_seg.runners.parallel import group_lazy_case_parts, on_dask_worker  # noqa: PLC0415

        groups = group_lazy_case_parts(data) if on_dask_worker() else None
        if not groups:
            self._dataset.save(data)
            return
        from distributed import worker_client  # noqa: PLC0415

        self._dataset.save({})  # clears the folder first when the dataset has overwrite: true
        group_dataset = _without_overwrite(self._dataset)
        with worker_client() as client:
            futures = [client.submit(_save_partitions, group_dataset, group, pure=False,
                                     key=f"save-{next(iter(group)).split('/')[0]}-{os.urandom(4).hex()}")
                       for group in groups]
            try:
                for index, future in enumerate(futures, start=1):
                    future.result()
                    logger.info("Saved partition group %d/%d on the cluster", index, len(futures))
            finally:
                client.cancel([f for f in futures if not f.done()])

    def _describe(self) -> dict[str, Any]:
        return {"dataset": type(self._dataset).__name__, "saved_on": "dask workers"}

    def _exists(self) -> bool:
        return self._dataset.exists()


def _save_partitions(dataset: Any, partitions: Mapping[str, Any]) -> int:
    dataset.save(dict(partitions))
    return len(partitions)


def _without_overwrite(dataset: Any) -> Any:
    """A copy of a PartitionedDataset that adds partitions without deleting the others.

    kedro-datasets 9.6's PartitionedDataset keeps ``overwrite`` in ``_overwrite`` (pinned version).
    """
    import copy  # noqa: PLC0415

    clone = copy.copy(dataset)
    clone._overwrite = False  # noqa: SLF001
    return clone


@contextmanager
def _reopened_mlflow_run(parent: MlflowParent | None) -> Iterator[None]:
    """Make ``parent`` this thread's active MLflow run for one task; leave it RUNNING afterwards."""
    if parent is None:
        yield
        return
    import mlflow  # noqa: PLC0415

    mlflow.set_tracking_uri(parent.tracking_uri)
    if parent.registry_uri:
        mlflow.set_registry_uri(parent.registry_uri)
    mlflow.set_experiment(experiment_id=parent.experiment_id)
    mlflow.start_run(run_id=parent.run_id)
    try:
        yield
    finally:
        while (active := mlflow.active_run()) is not None and active.info.run_id != parent.run_id:
            mlflow.end_run("FAILED")  # a nested run the node left open
        mlflow.end_run("RUNNING")  # only the driver ends the parent run (it rewrites the end time)


def _active_mlflow_run() -> MlflowParent | None:
    try:
        import mlflow  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    from pancreas_seg.tracking import absolute_tracking_uri  # noqa: PLC0415

    registry = mlflow.get_registry_uri()
    return MlflowParent(tracking_uri=absolute_tracking_uri(mlflow.get_tracking_uri()),
                        registry_uri=absolute_tracking_uri(registry) if registry else None,
                        experiment_id=run.info.experiment_id, run_id=run.info.run_id)


def deterministic_collection_sizeof(collection: list | tuple) -> int:
    """Dask's size estimate of a list or tuple, from evenly spaced items instead of random ones.

    Dask's own estimate samples with ``random.sample``, i.e. Python's global generator, in the
    worker's event-loop thread while a task runs. Keras draws the seeds of layers built without one
    from that same generator (``keras.utils.set_random_seed`` seeds it just before), so the sampling
    changed the initial weights of a model by the timing of the cluster's messages: a training node
    gave other weights than under the SequentialRunner. Bytes, approximately, as Dask's.
    """
    sample_size = 10
    size = sys.getsizeof(collection)
    if len(collection) <= sample_size:
        return size + sum(dask_sizeof(item) for item in collection)
    step = len(collection) / sample_size
    sampled = [collection[int(i * step)] for i in range(sample_size)]
    return size + int(len(collection) / sample_size * sum(dask_sizeof(item) for item in sampled))


def use_deterministic_collection_sizeof() -> None:
    """Register :func:`deterministic_collection_sizeof` for lists and tuples with Dask (this process)."""
    dask_sizeof.register(list)(deterministic_collection_sizeof)
    dask_sizeof.register(tuple)(deterministic_collection_sizeof)


def _is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def _package_name() -> str | None:
    from kedro.framework.project import PACKAGE_NAME  # noqa: PLC0415

    return PACKAGE_NAME


def serve_local_cluster(settings: ClusterSettings, scheduler_port: int, on_ready: Callable[[str], None],
                        stop: threading.Event) -> None:
    """Run a LocalCluster for many ``kedro run``s until ``stop`` is set (blocks).

    The workers start with the project configured (:class:`ProjectOnWorker`). A run that connects
    to the scheduler (``--runner-params address=...``) does not pay the cluster's start-up, and
    each of its node modules is imported once per worker, by the first run that needs it (the
    runner's warm-up). ``on_ready`` gets the scheduler address once the workers are ready.
    """
    from distributed import Client  # noqa: PLC0415

    with local_cluster(settings, scheduler_port) as cluster, Client(cluster) as client:
        client.register_plugin(ProjectOnWorker(_package_name(), str(Path.cwd()),
                                               trim_after_task=settings.trim_worker_memory),
                               name=ProjectOnWorker.NAME)
        on_ready(cluster.scheduler_address)
        while not stop.wait(0.5):
            pass


def node_modules(nodes: Iterable[Node]) -> tuple[str, ...]:
    """The modules that define ``nodes``' functions (what unpickling a node imports), sorted."""
    modules = {getattr(getattr(node.func, "func", node.func), "__module__", None) for node in nodes}
    return tuple(sorted(name for name in modules if name and name != "__main__"))


class ProjectOnWorker(WorkerPlugin):
    """Worker plugin: the Kedro project in each worker process.

    On registration (every run of the runner, in all workers at once) it works from the project
    folder when the worker can see it (LocalCluster, shared file systems), configures the project's
    settings and logging, and keeps Python's global random generator to the node being run
    (:func:`deterministic_collection_sizeof`). It then warms the worker up: it imports the modules of
    the run's node functions and, when the run has an MLflow parent run and a node that may log to it
    (one without the ``no_mlflow_run`` tag), opens its tracking store.
    Fresh workers do that side by side, instead of each on its first task, one after the other as
    the pipeline reaches them (a fresh worker's first task took 2-5 s more). After each task it
    hands the memory the task freed back to the kernel (:func:`pancreas_seg.core.runtime.release_free_heap`),
    so what its tasks freed does not pile up in a worker over hundreds of tasks.
    """

    NAME = "pancreas_seg-project"

    def __init__(self, package_name: str | None, project_path: str, warm_modules: Iterable[str] = (),
                 mlflow_parent: MlflowParent | None = None, trim_after_task: bool = True) -> None:
        from kedro.framework.project import LOGGING  # noqa: PLC0415

        self.package_name = package_name
        self.project_path = project_path
        self.logging_config = dict(LOGGING)  # the driver's (conf/logging.yml or KEDRO_LOGGING_CONFIG)
        self.warm_modules = tuple(warm_modules)
        self.mlflow_parent = mlflow_parent
        self.trim_after_task = trim_after_task
        # The driver's Keras backend (KerasBackendHook wrote runtime.keras_backend there): a LocalCluster's
        # workers inherit it, workers started elsewhere (a scheduler address, SLURM) get it in setup().
        self.keras_backend = os.environ.get(KERAS_BACKEND_ENV_VAR) or None

    def setup(self, worker: Any) -> None:
        from kedro.framework.project import configure_logging, configure_project  # noqa: PLC0415

        if self.keras_backend in (JAX, TENSORFLOW):   # before warm_up imports the node modules (and Keras)
            apply_backend(self.keras_backend)

        if Path(self.project_path).is_dir():
            os.chdir(self.project_path)
        else:
            logger.warning("Dask worker %s: project folder %s not found; relative catalog paths resolve "
                           "against %s", worker.address, self.project_path, Path.cwd())
        use_deterministic_collection_sizeof()
        if self.package_name:
            configure_project(self.package_name)
        if self.logging_config:
            configure_logging(self.logging_config)
        self.warm_up(worker)

    def warm_up(self, worker: Any) -> None:
        """Import the node modules and open the MLflow store (if given) now. A module the worker
        cannot import (a function shipped by value, say) is skipped: the task that needs it raises
        the real error."""
        import importlib  # noqa: PLC0415

        for name in self.warm_modules:
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - the node's own task reports it properly
                logger.debug("Dask worker %s: importing %s failed (%s: %s)", worker.address, name,
                             type(error).__name__, error)
        if self.mlflow_parent is not None:
            try:
                import mlflow  # noqa: PLC0415

                mlflow.MlflowClient(tracking_uri=self.mlflow_parent.tracking_uri).get_experiment(
                    self.mlflow_parent.experiment_id)
            except Exception as error:  # noqa: BLE001
                logger.warning("Dask worker %s: MLflow store %s not reachable (%s: %s)", worker.address,
                               self.mlflow_parent.tracking_uri, type(error).__name__, error)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if self.trim_after_task and start in _TASK_RUNNING and finish not in _TASK_RUNNING:  # a task ended
            from pancreas_seg.core.runtime import release_free_heap  # noqa: PLC0415

            release_free_heap()


#: Worker task states in which a task is running (``long-running``: seceded, e.g. with worker_client).
_TASK_RUNNING = frozenset({"executing", "long-running"})
