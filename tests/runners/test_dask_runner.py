"""``DaskRunner`` on a real 2-worker ``LocalCluster``: scheduling, data movement, resources, MLflow.

The pipeline here is small and built from this module's functions, which the workers (spawned
processes that cannot import a test module) receive by value (``cloudpickle.register_pickle_by_value``).
Datasets are real Kedro datasets on ``tmp_path``; MLflow is a real sqlite store.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset
from kedro_datasets.partitions import PartitionedDataset

from pancreas_seg.runners.parallel import LazyCaseParts, group_lazy_case_parts, map_over_cases
from pancreas_seg.pipelines import MODEL_TRAINING_TAG, NO_MLFLOW_RUN_TAG
from pancreas_seg.runners import DaskRunner
from pancreas_seg.runners.cluster import ClusterSettings, cluster_client, use_project_config
from pancreas_seg.runners.dask_runner import ProjectOnWorker, serve_local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow

CLUSTER = {"local_cluster": {"n_workers": 2, "threads_per_worker": 1, "resources": {"accelerator": 1}},
           "resources_by_tag": {MODEL_TRAINING_TAG: {"accelerator": 1}}}


# ---- node functions (run on the workers) ----

def make_table(n_rows: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    return pd.DataFrame({"case": [f"c{i}" for i in range(n_rows)], "value": np.arange(n_rows)}), \
        {"driver_note": "from memory", "pid": os.getpid()}


def where_am_i(table: pd.DataFrame, seconds: float) -> dict[str, Any]:
    """A 'training' node: holds its worker for ``seconds`` and says where and when it ran."""
    from distributed import get_worker  # noqa: PLC0415

    start = time.time()
    time.sleep(seconds)
    return {"worker": get_worker().address, "pid": os.getpid(), "start": start, "end": time.time(),
            "rows": len(table)}


def _square(x: int) -> dict[str, int]:
    return {"x": x, "square": x * x, "pid": os.getpid()}


def mapped_squares(table: pd.DataFrame) -> list[dict[str, int]]:
    return map_over_cases(_square, list(table["value"]), what="Squaring", names=list(table["case"]))


def _case_parts(case_id: str, size: int) -> dict[str, np.ndarray]:
    """Both parts carry the id of the one call that made them (pid, call counter)."""
    _case_parts.calls = getattr(_case_parts, "calls", 0) + 1  # type: ignore[attr-defined]
    stamp = np.array([os.getpid(), _case_parts.calls, size], dtype=np.int64)  # type: ignore[attr-defined]
    return {"image": stamp.copy(), "label": stamp.copy()}


def lazy_cases(table: pd.DataFrame) -> dict[str, Any]:
    partitions: dict[str, Any] = {}
    for row in table.itertuples():
        partitions.update(LazyCaseParts(_case_parts, (row.case, int(row.value)), ("image", "label"),
                                        f"case {row.case}").partitions(row.case))
    return partitions


def _started(value: int) -> dict[str, Any]:
    return {"value": value, "started": time.perf_counter(), "pid": os.getpid()}


def costliest_first_on_the_cluster(table: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mapped and lazy per-case work whose cost is the row's value (the rows are not in cost order)."""
    values = [int(v) for v in table["value"]]
    started = map_over_cases(_started, values, what="Timing", names=list(table["case"]), costs=values)
    partitions: dict[str, Any] = {}
    for row in table.itertuples():
        partitions.update(LazyCaseParts(_case_parts, (row.case, int(row.value)), ("image", "label"),
                                        f"case {row.case}", cost=int(row.value)).partitions(row.case))
    return started, partitions


def summarise(meta: dict[str, Any], first: dict[str, Any], second: dict[str, Any],
              squares: list[dict[str, int]]) -> dict[str, Any]:
    return {"meta": meta, "workers": sorted({first["worker"], second["worker"]}),
            "squares": [s["square"] for s in squares]}


def fail(table: pd.DataFrame) -> None:
    raise ValueError(f"/data/broken_case.nii.gz: not a NIfTI file ({len(table)} rows seen)")


# ---- helpers ----

def _catalog(root: Path) -> DataCatalog:
    return DataCatalog(datasets={
        "table": CSVDataset(filepath=str(root / "table.csv")),
        "first": JSONDataset(filepath=str(root / "first.json")),
        "second": JSONDataset(filepath=str(root / "second.json")),
        "squares": JSONDataset(filepath=str(root / "squares.json")),
        "summary": JSONDataset(filepath=str(root / "summary.json")),
        "cases": PartitionedDataset(path=str(root / "cases"), dataset="pickle.PickleDataset",
                                    filename_suffix=".pkl", overwrite=True),
        "params:n_rows": MemoryDataset(4),
        "params:seconds": MemoryDataset(3.0),
    })


def _pipeline() -> Pipeline:
    return Pipeline([
        Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
        Node(where_am_i, ["table", "params:seconds"], "first", name="train_first", tags=MODEL_TRAINING_TAG),
        Node(where_am_i, ["table", "params:seconds"], "second", name="train_second", tags=MODEL_TRAINING_TAG),
        Node(mapped_squares, "table", "squares", name="mapped_squares"),
        Node(lazy_cases, "table", "cases", name="lazy_cases"),
        Node(summarise, ["meta", "first", "second", "squares"], "summary", name="summarise"),
    ])


class RecordingHooks:
    """A real Kedro hook implementation that records what the runner gives the driver-side hooks."""

    def __init__(self) -> None:
        self.before: dict[str, dict[str, Any]] = {}
        self.after: list[str] = []
        self.errors: list[str] = []

    @hook_impl
    def before_node_run(self, node: Node, inputs: dict[str, Any]) -> None:
        self.before[node.name] = inputs

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        self.after.append(node.name)

    @hook_impl
    def on_node_error(self, node: Node, error: Exception) -> None:
        self.errors.append(f"{node.name}: {error}")


@pytest.fixture
def sqlite_tracking(tmp_path: Path):
    """MLflow (the module) tracking to a real sqlite store in ``tmp_path``; the previous URI after."""
    import mlflow  # noqa: PLC0415

    saved_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow
    mlflow.set_tracking_uri(saved_uri)


@pytest.fixture
def dask_config():
    use_project_config(CLUSTER)
    yield
    use_project_config(None)


def test_settings_from_config_overrides_and_errors() -> None:
    settings = ClusterSettings.from_config(CLUSTER, n_workers=3, scheduler_address=None)
    assert (settings.n_workers, settings.threads_per_worker, settings.scheduler_address) == (3, 1, None)
    assert settings.worker_resources == {"accelerator": 1.0}
    assert settings.resources_for({MODEL_TRAINING_TAG, "other"}) == {"accelerator": 1.0}
    assert settings.resources_for(set()) is None
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['local_cluster.n_worker'\]"):
        ClusterSettings.from_config({"local_cluster": {"n_worker": 2}})
    with pytest.raises(ValueError, match="n_workers"):
        ClusterSettings.from_config({"local_cluster": {"n_workers": 0}})
    # the workers' glibc arenas: 1 by default, glibc's own default with null, never below 1
    environ = "distributed.nanny.pre-spawn-environ"
    assert settings.malloc_arena_max == 1 and settings.local_worker_config()[environ]["MALLOC_ARENA_MAX"] == 1
    glibc_default = ClusterSettings.from_config({"local_cluster": {"malloc_arena_max": None}})
    assert glibc_default.malloc_arena_max is None
    assert "MALLOC_ARENA_MAX" not in glibc_default.local_worker_config()[environ]
    assert glibc_default.local_worker_config()[environ]["OMP_NUM_THREADS"] == 1
    with pytest.raises(ValueError, match=r"local_cluster.malloc_arena_max \(0\) must be >= 1"):
        ClusterSettings.from_config({"local_cluster": {"malloc_arena_max": 0}})
    needs_gpu = ClusterSettings.from_config({"resources_by_tag": {MODEL_TRAINING_TAG: {"GPU": 1}}})
    with pytest.raises(ValueError, match=r"needs \['GPU'\], which no local_cluster worker offers"), \
            cluster_client(needs_gpu):
        pass


def test_lazy_case_parts_compute_once_and_group_by_case() -> None:
    partitions = {**LazyCaseParts(_case_parts, ("a", 1), ("image", "label"), "a").partitions("a"),
                  **LazyCaseParts(_case_parts, ("b", 2), ("image", "label"), "b").partitions("b")}
    groups = group_lazy_case_parts(partitions)
    assert [sorted(g) for g in groups] == [["a/image", "a/label"], ["b/image", "b/label"]]
    image, label = partitions["a/label"](), partitions["a/image"]()  # either order: one computation
    np.testing.assert_array_equal(image, label)
    again = partitions["a/image"]()  # both parts were taken: the result was dropped, so this recomputes
    assert again[1] == image[1] + 1
    assert group_lazy_case_parts({"x": lambda: 1}) is None  # not LazyCaseParts: never shipped
    assert map_over_cases(_square, [2, 3], what="Squaring") == [
        {"x": 2, "square": 4, "pid": os.getpid()}, {"x": 3, "square": 9, "pid": os.getpid()}]


def test_cases_are_grouped_costliest_first_and_costs_must_match_the_items() -> None:
    partitions: dict[str, Any] = {}
    for case, cost in (("a", 5), ("b", 9), ("c", 5), ("d", 1)):
        partitions.update(LazyCaseParts(_case_parts, (case, 0), ("image", "label"), case, cost=cost).partitions(case))
    groups = group_lazy_case_parts(partitions)
    # the costliest case first; equal costs (a, c) keep their key order; each group in key order
    assert [list(g) for g in groups] == [[f"{case}/image", f"{case}/label"] for case in "bacd"]
    # without a cluster the items run in their own order, whatever the costs
    assert [r["x"] for r in map_over_cases(_square, [1, 3, 2], what="Squaring", costs=[1, 3, 2])] == [1, 3, 2]
    with pytest.raises(ValueError, match=r"Squaring: 2 cost\(s\) for 3 item\(s\)"):
        map_over_cases(_square, [1, 3, 2], what="Squaring", costs=[1, 3])


def test_a_worker_runs_the_costliest_cases_first(tmp_path: Path, dask_config) -> None:
    """One worker with one thread runs tasks one at a time: their start order is the order given."""
    values = [2, 7, 1, 9, 4, 6, 3]
    catalog = DataCatalog(datasets={
        # a free input held in memory (as a notebook user puts data in the catalog) reaches the worker
        "table": MemoryDataset(pd.DataFrame({"case": [f"c{v}" for v in values], "value": values})),
        "started": JSONDataset(filepath=str(tmp_path / "started.json")),
        "cases": PartitionedDataset(path=str(tmp_path / "cases"), dataset="pickle.PickleDataset",
                                    filename_suffix=".pkl", overwrite=True)})
    pipeline = Pipeline([Node(costliest_first_on_the_cluster, "table", ["started", "cases"], name="by_cost")])
    DaskRunner(n_workers=1).run(pipeline, catalog)

    started = json.loads((tmp_path / "started.json").read_text())
    assert [s["value"] for s in started] == values           # results in the items' order
    assert os.getpid() not in {s["pid"] for s in started}      # computed on the worker
    by_start = sorted(started, key=lambda s: s["started"])
    assert [s["value"] for s in by_start] == sorted(values, reverse=True)
    # the per-case saves ran costliest first too: the worker's call counter rises as the cost falls
    cases = PartitionedDataset(path=str(tmp_path / "cases"), dataset="pickle.PickleDataset",
                               filename_suffix=".pkl").load()
    stamps = [cases[f"c{v}/image"]() for v in values]
    assert len({int(stamp[0]) for stamp in stamps}) == 1 and int(stamps[0][0]) != os.getpid()
    by_call = sorted(stamps, key=lambda stamp: int(stamp[1]))
    assert [int(stamp[2]) for stamp in by_call] == sorted(values, reverse=True)


def test_runs_the_pipeline_on_two_workers(tmp_path: Path, dask_config) -> None:
    hooks = RecordingHooks()
    manager = _create_hook_manager()
    manager.register(hooks)
    catalog = _catalog(tmp_path)

    environ = dict(os.environ)
    DaskRunner().run(_pipeline(), catalog, hook_manager=manager)
    assert dict(os.environ) == environ  # nothing of the workers' settings left in the driver

    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    # the two training nodes each held the one "accelerator" of a different worker, at the same time
    assert first["worker"] != second["worker"]
    assert first["pid"] != os.getpid() and second["pid"] != os.getpid()
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])
    # a MemoryDataset crossed from one worker task to another, never through the driver's memory
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["driver_note"] == "from memory" and summary["meta"]["pid"] != os.getpid()
    # per-case work inside a node was mapped over the workers, results in input order
    squares = json.loads((tmp_path / "squares.json").read_text())
    assert [s["square"] for s in squares] == [0, 1, 4, 9] == summary["squares"]
    assert os.getpid() not in {s["pid"] for s in squares}
    # lazy per-case partitions: each case computed once (image == label stamp) in a worker process
    cases = PartitionedDataset(path=str(tmp_path / "cases"), dataset="pickle.PickleDataset",
                               filename_suffix=".pkl").load()
    assert sorted(cases) == [f"c{i}/{part}" for i in range(4) for part in ("image", "label")]
    for i in range(4):
        image, label = cases[f"c{i}/image"](), cases[f"c{i}/label"]()
        np.testing.assert_array_equal(image, label)
        assert image[0] != os.getpid() and image[2] == i
    # node hooks ran in the driver, with the parameter inputs only
    assert set(hooks.before) == set(hooks.after) == {n.name for n in _pipeline().nodes}
    assert hooks.before["make_table"] == {"params:n_rows": 4}
    assert hooks.before["summarise"] == {}
    assert not hooks.errors


def test_a_failing_node_stops_the_run_with_its_error(tmp_path: Path, dask_config) -> None:
    hooks = RecordingHooks()
    manager = _create_hook_manager()
    manager.register(hooks)
    pipeline = Pipeline([Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
                         Node(fail, "table", None, name="fail"),
                         Node(where_am_i, ["table", "params:seconds"], "first", name="after_fail")])
    with pytest.raises(ValueError, match=r"broken_case\.nii\.gz: not a NIfTI file \(4 rows seen\)"):
        DaskRunner(n_workers=1).run(pipeline, _catalog(tmp_path), hook_manager=manager)
    assert hooks.errors == ["fail: /data/broken_case.nii.gz: not a NIfTI file (4 rows seen)"]


def test_nested_mlflow_runs_from_workers_land_under_the_driver_run(tmp_path: Path, dask_config,
                                                                     sqlite_tracking) -> None:
    from pancreas_seg import tracking  # noqa: PLC0415

    mlflow = sqlite_tracking

    def log_child(table: pd.DataFrame) -> dict[str, Any]:
        with tracking.architecture_run("child") as run:
            mlflow.log_metric("rows", len(table))
            return {"run_id": run.info.run_id}

    experiment = mlflow.set_experiment("dask_runner_test")
    with mlflow.start_run(run_name="parent") as parent:
        pipeline = Pipeline([Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
                             Node(log_child, "table", "first", name="log_child")])
        DaskRunner().run(pipeline, _catalog(tmp_path))
        assert mlflow.get_run(parent.info.run_id).info.status == "RUNNING"  # workers left it open
    child_id = json.loads((tmp_path / "first.json").read_text())["run_id"]
    child = mlflow.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.experiment_id == experiment.experiment_id
    assert child.data.metrics == {"rows": 4.0} and child.info.status == "FINISHED"
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"


def modules_loaded(table: pd.DataFrame) -> dict[str, Any]:
    """A data node: whether its worker process has loaded MLflow."""
    return {"pid": os.getpid(), "rows": len(table), "mlflow_loaded": "mlflow" in sys.modules}


def logs_anyway(table: pd.DataFrame) -> dict[str, Any]:
    import mlflow  # noqa: PLC0415

    mlflow.log_metric("rows", len(table))
    return {"rows": len(table)}


def test_nodes_tagged_no_mlflow_run_leave_mlflow_off_the_workers(tmp_path: Path, dask_config,
                                                                  sqlite_tracking) -> None:
    """Under an active MLflow run, a pipeline of tagged nodes (as ingestion and preprocessing are)
    runs on workers that never load MLflow; a tagged node that logs all the same fails, naming itself,
    and the run MLflow started for it is ended as FAILED."""
    mlflow = sqlite_tracking
    experiment = mlflow.set_experiment("dask_runner_untracked")
    with mlflow.start_run(run_name="parent") as parent:
        untracked = Pipeline([Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
                              Node(modules_loaded, "table", "first", name="modules_loaded")],
                             tags=NO_MLFLOW_RUN_TAG)
        DaskRunner().run(untracked, _catalog(tmp_path))
        report = json.loads((tmp_path / "first.json").read_text())
        assert report["pid"] != os.getpid() and report["rows"] == 4
        assert report["mlflow_loaded"] is False
        misused = Pipeline([Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
                            Node(logs_anyway, "table", "second", name="logs_anyway")], tags=NO_MLFLOW_RUN_TAG)
        with pytest.raises(RuntimeError, match=r"Node 'logs_anyway' is tagged 'no_mlflow_run' but logged to "
                                               r"MLflow, which started run \w+ outside the pipeline's run"):
            DaskRunner().run(misused, _catalog(tmp_path))
    # nothing was logged into the pipeline's run; the run MLflow started for the node was ended
    assert mlflow.get_run(parent.info.run_id).data.metrics == {}
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list")
    stray = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert len(stray) == 1 and stray[0].data.metrics == {"rows": 4.0} and stray[0].info.status == "FAILED"
    assert "mlflow.parentRunId" not in stray[0].data.tags


def test_a_cluster_manager_class_from_config_runs_the_pipeline(tmp_path: Path) -> None:
    """``dask.cluster.class`` (here distributed's own LocalCluster, the SLURM config's code path)."""
    environ = dict(os.environ)
    use_project_config({"cluster": {"class": "distributed.LocalCluster", "n_workers": 2,
                                    "kwargs": {"n_workers": 0, "threads_per_worker": 1, "processes": True,
                                               "dashboard_address": None}}})
    try:
        DaskRunner().run(Pipeline([Node(make_table, "params:n_rows", ["table", "meta"], name="make_table"),
                                   Node(where_am_i, ["table", "params:seconds"], "first", name="where")]),
                         _catalog(tmp_path))
    finally:
        use_project_config(None)
    assert json.loads((tmp_path / "first.json").read_text())["rows"] == 4
    # Dask's nanny writes its worker settings (MALLOC_TRIM_THRESHOLD_ ...) into the driver's
    # environment; the runner undoes that when the cluster closes
    assert dict(os.environ) == environ
    with pytest.raises(ValueError, match=r"cluster.class 'nowhere.Cluster' cannot be imported .*\[slurm\]"), \
            cluster_client(ClusterSettings.from_config({"cluster": {"class": "nowhere.Cluster"}})):
        pass


def test_the_slurm_environment_builds_a_slurm_job_per_gpu_worker() -> None:
    """conf/slurm/dask.yml, merged over conf/base as Kedro merges it, gives a real dask-jobqueue
    SLURMCluster whose batch script asks for one GPU and offers one training slot per worker."""
    from dask_jobqueue import SLURMCluster  # noqa: PLC0415
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from pancreas_seg.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    conf = Path(__file__).resolve().parents[2] / "conf"
    loader = OmegaConfigLoader(str(conf), **{**CONFIG_LOADER_ARGS, "default_run_env": "slurm"})
    settings = ClusterSettings.from_config(loader["dask"]["dask"])
    assert settings.cluster_class == "dask_jobqueue.SLURMCluster" and settings.cluster_workers == 4
    assert settings.resources_for({MODEL_TRAINING_TAG}) == {"accelerator": 1.0}
    kwargs = {**settings.cluster_kwargs, "scheduler_options": {"host": "127.0.0.1", "dashboard_address": None}}
    with SLURMCluster(**kwargs) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p gpu" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH -t 12:00:00" in script
    assert "--resources accelerator=1" in script and "cd /path/to/pancreas_seg" in script
    assert "export KERAS_BACKEND=jax" in script and "--no-nanny" in script
    assert "export MALLOC_ARENA_MAX=1\n" in script  # what a LocalCluster's workers get from the runner


def test_worker_size_estimates_leave_the_global_random_generator_alone() -> None:
    """Dask samples big lists with Python's global generator; Keras takes layer seeds from it. The
    workers' estimate must not draw from it and must stay close to Dask's own."""
    import random  # noqa: PLC0415

    from dask.sizeof import sizeof  # noqa: PLC0415

    from pancreas_seg.runners.dask_runner import deterministic_collection_sizeof  # noqa: PLC0415

    items = [np.zeros(1000 + 10 * i, dtype=np.float32) for i in range(100)]
    random.seed(0)   # Dask's own estimate samples at random: seeded, so the comparison cannot flake
    dasks_own = sizeof(items)
    random.seed(7)
    state = random.getstate()
    ours = deterministic_collection_sizeof(items)
    assert random.getstate() == state
    assert abs(ours - dasks_own) / dasks_own < 0.1
    assert deterministic_collection_sizeof(tuple(items[:5])) == sizeof(tuple(items[:5]))  # small: exact


PROBE_MODULE = """
import os


def stamp(n_rows: int) -> dict:
    return {"pid": os.getpid(), "n_rows": n_rows}
"""


def test_a_running_cluster_serves_runs_and_every_worker_is_warmed_up(tmp_path: Path, dask_config,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``kedro dask-cluster`` runs (:func:`serve_local_cluster`) stays up across runs that
    connect to it, and each run imports its node modules in every worker before the first task,
    also in the worker that never runs the node."""
    import importlib  # noqa: PLC0415

    from distributed import Client  # noqa: PLC0415

    module_name = f"warm_probe_{os.getpid()}"
    (tmp_path / f"{module_name}.py").write_text(PROBE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this process's sys.path
    probe = importlib.import_module(module_name)   # so the node is pickled by reference, as a project's is
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    server = threading.Thread(target=serve_local_cluster,
                              args=(ClusterSettings.from_config(CLUSTER), 0, ready.put, stop), daemon=True)
    server.start()
    try:
        address = ready.get(timeout=120)
        with Client(address) as client:
            workers = client.run(os.getpid)
            assert client.run(lambda: module_name in sys.modules) == dict.fromkeys(workers, False)
            # the project's worker settings reached the worker processes' environment
            assert client.run(lambda: os.environ.get("MALLOC_ARENA_MAX")) == dict.fromkeys(workers, "1")
        pipeline = Pipeline([Node(probe.stamp, "params:n_rows", "first", name="stamp")])
        stamps = []
        for _ in range(2):
            DaskRunner(address=address).run(pipeline, _catalog(tmp_path))  # one task, on one worker
            stamps.append(json.loads((tmp_path / "first.json").read_text()))
            with Client(address) as client:
                assert client.run(os.getpid) == workers   # the same worker processes serve every run
                assert client.run(lambda: module_name in sys.modules) == dict.fromkeys(workers, True)
                plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
                assert all(ProjectOnWorker.NAME in names for names in plugins.values())
        assert {s["pid"] for s in stamps} <= set(workers.values()) and stamps[0]["n_rows"] == 4
    finally:
        stop.set()
        server.join(timeout=60)
    assert not server.is_alive()
