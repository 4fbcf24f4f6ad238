"""Shared helpers for the MSD-scale scripts (not a benchmark itself).

Used by :mod:`benchmarks.msd_scale_rehearsal` and :mod:`benchmarks.preprocessing_throughput`:

* :func:`msd_scale_config` / :func:`ensure_phantoms`: SYNTHETIC phantoms at the scale of MSD
  Task07 (512 x 512 in-plane, 0.6-0.98 mm pixels, 1.5-2.5 mm slices over 100-225 mm: 40-150
  slices), one Task07 folder per case count. The largest set is generated once (both cores,
  :func:`pancreas_seg.phantoms.write_synthetic_task07` with ``processes``); a smaller one is its
  first ``n`` cases, hard-linked, with its own ``dataset.json``. Those are exactly the files the
  generator writes for ``n`` cases (same seeds, same LPS cases), so it carries the generator's own
  fingerprint for ``n``.
* The runs happen in throwaway project copies (``conf/``, ``pyproject.toml``, an empty ``src/``,
  the ``data/`` skeleton) made by :func:`benchmarks.support.project_copy.copy_project`, the helper
  the end-to-end tests use too; :func:`child_env` is the environment of a process in one. The
  pipelines read the phantoms in place as real data (``--env msd``, ``ingestion.msd_path``).
* :func:`run_sampled`: runs a child process and samples the peak RSS of it and of every process
  it starts (``VmHWM`` from ``/proc``, the kernel's own high-water mark, read every 0.1 s), so
  the LocalCluster's worker processes are measured too.
* :func:`child_session_run`: the child side, one ``KedroSession.run`` with a given runner, timed.
* :func:`disk_by_layer`, :func:`shards_digest`, :func:`flatness`, :func:`throughput_summary`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import _common
from benchmarks.support.project_copy import DATA_LAYERS, subprocess_env

REPO_ROOT = _common.REPO_ROOT
#: Where the phantoms go unless ``--data-root`` says otherwise (git-ignored; several GiB at 281).
DEFAULT_DATA_ROOT = REPO_ROOT / "data" / "01_raw" / "benchmark_msd_scale"
PHANTOM_SEED = 7007
#: MSD Task07: 512 x 512 in-plane, 0.61-0.98 mm pixels, most slices 1.5-2.5 mm (nnU-Net's median
#: 2.5 x 0.8 x 0.8 mm), tens to ~150 slices around the pancreas. 100-225 mm at 1.5-2.5 mm gives
#: 40-150 slices (about 83 on average).
MSD_SCALE_PHANTOM = {"shape_xy_px": 512, "spacing_xy_mm": (0.6, 0.98), "slice_thickness_mm": (1.5, 2.5),
                     "z_extent_mm": (100.0, 225.0)}
SLICE_RANGE = (40, 150)
SIZES = (30, 100, 281)
ENV = "msd"              # real-data settings: ingestion.source msd, preprocessing at 256 px
IMAGE_SIZE_PX = 256
#: How the LocalCluster's worker processes start (``distributed.worker.multiprocessing-method``
#: is ``spawn`` by default); workers started otherwise would be listed under ``others``.
WORKER_PROCESS_MARKERS = ("multiprocessing.spawn",)
HELPER_PROCESS_MARKERS = ("resource_tracker", "semaphore_tracker")


# ------------------------------------------------------------------------------------------------
# Phantoms
# ------------------------------------------------------------------------------------------------
def msd_scale_config() -> Any:
    """The generator's :class:`PhantomConfig` at MSD scale (other settings as the defaults)."""
    from pancreas_seg.phantoms import PhantomConfig  # noqa: PLC0415

    return PhantomConfig(**MSD_SCALE_PHANTOM)


def dataset_folder(data_root: Path, n: int) -> Path:
    return Path(data_root) / f"Task07_Pancreas_phantoms_{n:03d}"


def _fingerprint_of(root: Path) -> str | None:
    try:
        return str(json.loads((root / "dataset.json").read_text())["synthetic"]["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def first_cases_are_the_smaller_set(n_full: int, n: int, non_ras_every: int) -> bool:
    """True if the first ``n`` cases of an ``n_full``-case set are the generator's ``n``-case set
    (the same cases stored LPS; with few cases the generator picks another one)."""
    from pancreas_seg.phantoms import non_ras_indices  # noqa: PLC0415

    return non_ras_indices(n, 0, non_ras_every) == {i for i in non_ras_indices(n_full, 0, non_ras_every) if i < n}


def ensure_phantoms(data_root: Path, n: int, processes: int = 2, progress: bool = True,  # noqa: PLR0917
                    config: Any = None, seed: int = PHANTOM_SEED) -> Path:
    """The ``n``-case Task07 folder (``config``: default MSD scale): reused if there, else taken
    from a larger set of the same settings that is there (hard links), else generated with
    ``processes`` processes."""
    from pancreas_seg.phantoms import dataset_fingerprint, write_synthetic_task07  # noqa: PLC0415

    config = config or msd_scale_config()
    target = dataset_folder(data_root, n)
    if _fingerprint_of(target) == dataset_fingerprint(n, 0, config, seed):
        return target
    def usable(folder: Path) -> int | None:
        """The case count of a larger set of the same settings whose first cases are this set."""
        count = folder.name.rsplit("_", 1)[-1]
        if not (folder.is_dir() and count.isdigit() and int(count) > n):
            return None
        same = _fingerprint_of(folder) == dataset_fingerprint(int(count), 0, config, seed)
        return int(count) if same and first_cases_are_the_smaller_set(int(count), n, config.non_ras_every) else None

    larger = sorted((folder for folder in Path(data_root).glob("Task07_Pancreas_phantoms_*") if usable(folder)),
                    key=usable)
    if larger:
        return subset_dataset(larger[0], n, target)
    start = time.perf_counter()

    def report(i: int, total: int, case_id: str) -> None:
        if progress:
            elapsed = time.perf_counter() - start
            print(f"\r  phantoms: {i}/{total} written ({case_id}), {elapsed:.0f} s, "
                  f"about {elapsed / i * (total - i):.0f} s left   ", end="" if i < total else "\n",
                  file=sys.stderr, flush=True)

    return write_synthetic_task07(target, n_train=n, n_test=0, config=config, seed=seed,
                                  progress=report, processes=processes)


def subset_dataset(full: Path, n: int, target: Path) -> Path:
    """``target``: the first ``n`` training cases of the synthetic set ``full`` (hard links) and
    the ``dataset.json`` the generator writes for ``n`` cases with the same settings and seed."""
    from pancreas_seg.phantoms import PhantomConfig, dataset_fingerprint  # noqa: PLC0415

    meta = json.loads((full / "dataset.json").read_text())
    synthetic = meta["synthetic"]
    config, seed, n_full = PhantomConfig(**synthetic["config"]), int(synthetic["seed"]), int(meta["numTraining"])
    if synthetic["fingerprint"] != dataset_fingerprint(n_full, int(meta["numTest"]), config, seed):
        raise ValueError(f"{full}: dataset.json does not match its generator settings")
    if meta["numTest"] != 0 or not 1 <= n <= n_full:
        raise ValueError(f"{full}: need a set without test cases and 1 <= n <= {n_full}, got n={n}")
    if config.tumour_fraction is not None:   # the tumour cases are chosen per data-set size
        raise ValueError(f"{full}: a set with tumour_fraction is not a superset of its smaller sets")
    if not first_cases_are_the_smaller_set(n_full, n, config.non_ras_every):
        raise ValueError(f"the first {n} cases of {full} are not the {n}-case data set (LPS cases differ)")
    subset = {**meta, "numTraining": n, "training": meta["training"][:n],
              "synthetic": {**synthetic, "fingerprint": dataset_fingerprint(n, 0, config, seed),
                            "cases": synthetic["cases"][:n]}}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for entry in subset["training"]:
            for rel in (entry["image"], entry["label"]):
                os.link(full / rel, tmp / rel)
        (tmp / "dataset.json").write_text(json.dumps(subset, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def slice_counts(root: Path) -> list[int]:
    """Slices per training case, from the phantom set's ``dataset.json``."""
    cases = json.loads((Path(root) / "dataset.json").read_text())["synthetic"]["cases"]
    return [int(c["shape"][2]) for c in cases if c["split"] == "train"]


# ------------------------------------------------------------------------------------------------
# Child processes (in project copies: benchmarks.support.project_copy.copy_project)
# ------------------------------------------------------------------------------------------------
#: The runs' logging (``KEDRO_LOGGING_CONFIG``; the DaskRunner hands it to its workers): the
#: project's loggers and levels, one plain line per record with the Unix time, so the phases of
#: a run can be timed from its log (:func:`log_phases`).
BENCH_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"timed": {"format": "%(created).3f %(process)d %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "INFO", "formatter": "timed",
                            "stream": "ext://sys.stderr"}},
    "loggers": {"kedro": {"level": "INFO"}, "pancreas_seg": {"level": "INFO"}, "distributed": {"level": "WARNING"}},
    "root": {"handlers": ["stderr"]},
}


def write_logging_config(folder: Path) -> Path:
    path = Path(folder) / "benchmark_logging.json"   # JSON is YAML: Kedro reads it as such
    path.write_text(json.dumps(BENCH_LOGGING, indent=1))
    return path


def child_env(logging_config: Path | None = None) -> dict[str, str]:
    """The environment of a process in a project copy:
    :func:`benchmarks.support.project_copy.subprocess_env` (no telemetry, this checkout's ``src/``
    first on ``PYTHONPATH``; the LocalCluster's worker processes inherit it), the repository root
    last on ``PYTHONPATH`` (the benchmarks' own ``python -m benchmarks.<name>`` children run
    there), and ``KEDRO_LOGGING_CONFIG`` if given."""
    env = subprocess_env()
    if logging_config is not None:
        env["KEDRO_LOGGING_CONFIG"] = str(logging_config)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(REPO_ROOT)])
    return env


def runtime_params(raw_root: Path) -> dict[str, Any]:
    """What ``--params ingestion.msd_path=<raw_root>,preprocessing.image_size_px=256`` gives."""
    return {"ingestion": {"source": "msd", "msd_path": str(raw_root)},
            "preprocessing": {"image_size_px": IMAGE_SIZE_PX}}


def _vm_hwm_mib(pid: int) -> float | None:
    """The kernel's peak RSS (``VmHWM``) of a live process, MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def is_worker_process(cmdline: str) -> bool:
    """A LocalCluster worker process (multiprocessing's spawn), not a resource tracker."""
    return (any(m in cmdline for m in WORKER_PROCESS_MARKERS)
            and not any(m in cmdline for m in HELPER_PROCESS_MARKERS))


class TreeSampler(threading.Thread):
    """Samples a process and all its descendants every ``interval`` s until :meth:`stop`.

    Per process: its command line, the highest ``VmHWM`` seen (the kernel's peak RSS, so a short
    spike between two samples still counts) and when it was last raised, the highest sampled RSS
    and its CPU seconds (user + system) at the last sample.
    """

    def __init__(self, pid: int, interval: float = 0.1, extra_workers: Sequence[int] = ()) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.extra_workers = pid, interval, tuple(extra_workers)
        self.processes: dict[int, dict[str, Any]] = {}
        self.started = time.monotonic()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        import psutil  # noqa: PLC0415

        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for pid in self.extra_workers:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        for proc in procs:
            try:
                cmdline = " ".join(proc.cmdline())[:300]
                info = self.processes.get(proc.pid)
                if not cmdline or proc.status() == psutil.STATUS_ZOMBIE:
                    continue   # exited: its command line and memory are gone, keep what was seen
                if info is None or info["cmdline"] != cmdline:
                    # new, or it replaced its program (fork, then exec: git, a shell ...): the peak
                    # counted so far was its parent's copy, not this program's
                    info = self.processes[proc.pid] = {
                        "pid": proc.pid, "cmdline": cmdline, "parent": proc.ppid(), "peak_rss_mib": 0.0,
                        "max_sampled_rss_mib": 0.0, "first_seen_s": time.monotonic() - self.started}
                if proc.pid in self.extra_workers and "cpu_base_s" not in info:
                    times = proc.cpu_times()   # a running cluster's worker: count this run's CPU only
                    info["cpu_base_s"] = times.user + times.system
                rss = proc.memory_info().rss / 2**20
                hwm = _vm_hwm_mib(proc.pid) or rss
                if hwm > info["peak_rss_mib"]:
                    info["peak_rss_mib"] = hwm
                    info["peak_at_unix"] = time.time()   # when the peak was last raised (+- one interval)
                info["max_sampled_rss_mib"] = max(info["max_sampled_rss_mib"], rss)
                times = proc.cpu_times()
                info["cpu_s"] = times.user + times.system - info.get("cpu_base_s", 0.0)   # at the last sample
                info["last_seen_s"] = time.monotonic() - self.started
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def roles(self) -> dict[str, list[dict[str, Any]]]:
        """``driver`` (the child itself), ``workers`` (processes it started through
        ``multiprocessing``: the LocalCluster's worker processes; and ``extra_workers``, the workers
        of a cluster that runs on its own) and ``others`` (its resource
        tracker, ``git`` started by MLflow, short-lived forks ...)."""
        driver = [p for p in self.processes.values() if p["pid"] == self.root]
        others = [p for p in self.processes.values() if p["pid"] != self.root]
        workers = [p for p in others if p["pid"] in self.extra_workers or is_worker_process(p["cmdline"])]
        return {"driver": driver, "workers": workers, "others": [p for p in others if p not in workers]}


def reset_peak_rss(pid: int) -> None:
    """Set a process's kernel peak RSS (``VmHWM``) to its current RSS (``/proc/<pid>/clear_refs``, 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def run_sampled(args: Sequence[str], cwd: Path, log_path: Path, timeout: float = 7200.0,  # noqa: PLR0917
                interval: float = 0.1, extra_workers: Sequence[int] = (), extra_log: Path | None = None
                ) -> dict[str, Any]:
    """Run ``python *args`` (e.g. ``-m benchmarks.<name> ...``) in ``cwd`` (output to ``log_path``),
    sampling its process tree.

    ``extra_workers``: worker processes of a cluster that runs on its own (not started by the
    child); their peak RSS is reset before the child starts, so it is this run's peak.

    Returns the child's result (the ``_common.emit_result`` line) plus ``driver_peak_rss_mib``,
    ``worker_peak_rss_mib`` (one per worker process), ``processes`` and ``process_wall_s``.
    """
    for pid in extra_workers:
        reset_peak_rss(pid)
    start = time.perf_counter()
    logging_config = write_logging_config(Path(log_path).parent)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=child_env(logging_config), stdout=subprocess.PIPE,
                                stderr=log, text=True)
        sampler = TreeSampler(proc.pid, interval, extra_workers)
        sampler.start()
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sampler.stop()
        log.write(stdout)
    wall = time.perf_counter() - start
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_common.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}); see {log_path}:\n"
                           f"{log_path.read_text()[-5000:]}")
    result = json.loads(lines[-1][len(_common.RESULT_PREFIX):])
    roles = sampler.roles()
    if "run_start_unix" in result:
        text = Path(log_path).read_text() + ("\n" + Path(extra_log).read_text() if extra_log else "")
        result["phases_s"] = log_phases(text, result["run_start_unix"], result["run_end_unix"])
    result.update({
        "process_wall_s": wall,
        # the child's own ru_maxrss covers the time after the last sample too
        "driver_peak_rss_mib": max([result["peak_rss_mib"], *[p["peak_rss_mib"] for p in roles["driver"]]]),
        "worker_peak_rss_mib": sorted((p["peak_rss_mib"] for p in roles["workers"]), reverse=True),
        "cpu_s": {role: sum(p.get("cpu_s", 0.0) for p in procs) for role, procs in roles.items()},
        "processes": roles})
    return result


def make_runner(name: str, n_workers: int = 2, threads_per_worker: int = 1, address: str | None = None) -> Any:
    """``sequential``: Kedro's SequentialRunner; ``dask``: the project's DaskRunner with its own
    LocalCluster of ``n_workers`` processes; ``dask_running``: the DaskRunner on the running
    cluster at ``address`` (:func:`start_running_cluster`).
    """
    if name == "sequential":
        from kedro.runner import SequentialRunner  # noqa: PLC0415

        return SequentialRunner()
    if name == "dask":
        from pancreas_seg.runners import DaskRunner  # noqa: PLC0415

        return DaskRunner(address=None, n_workers=n_workers, threads_per_worker=threads_per_worker)
    if name == "dask_running":
        from pancreas_seg.runners import DaskRunner  # noqa: PLC0415

        if not address:
            raise ValueError("dask_running needs the running cluster's address")
        return DaskRunner(address=address)
    raise ValueError(f"unknown runner {name!r}")


class RunningCluster:
    """``kedro dask-cluster --env msd`` started in a project (a LocalCluster that outlives runs).

    Attributes: ``address`` (scheduler), ``worker_pids``, ``start_s`` (launch to the address file,
    i.e. workers registered and warmed up), ``process`` (the ``kedro`` process).
    """

    def __init__(self, project: Path, n_workers: int, log_path: Path, timeout: float = 180.0) -> None:
        """Start it and wait until it is ready; ``n_workers`` must be what ``dask.yml`` gives."""
        import psutil  # noqa: PLC0415

        address_file = Path(log_path).with_suffix(".address")
        address_file.unlink(missing_ok=True)
        start = time.perf_counter()
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kedro", "dask-cluster", "--env", ENV, "--port", "0",
             "--address-file", str(address_file)],
            cwd=project, env=child_env(write_logging_config(Path(log_path).parent)), stdout=self._log,
            stderr=subprocess.STDOUT, text=True)
        while not address_file.is_file():
            if self.process.poll() is not None or time.perf_counter() - start > timeout:
                self.close()
                raise RuntimeError(f"kedro dask-cluster did not start; see {log_path}:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.05)
        self.start_s = time.perf_counter() - start
        self.log_path = Path(log_path)
        self.address = address_file.read_text().strip()
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.worker_pids = [p.pid for p in children if is_worker_process(" ".join(p.cmdline()))]
        if len(self.worker_pids) != n_workers:
            self.close()
            raise RuntimeError(f"kedro dask-cluster started {len(self.worker_pids)} worker(s), expected {n_workers} "
                               f"(conf/{ENV}/dask.yml local_cluster.n_workers)")

    def close(self) -> None:
        """SIGTERM, as a user's Ctrl-C: the command closes its cluster."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def child_session_run(pipeline: str, runner_name: str, raw_root: Path, n_workers: int = 2,  # noqa: PLR0917
                      threads_per_worker: int = 1, address: str | None = None) -> dict[str, Any]:
    """Child side: one ``KedroSession.run`` of ``pipeline`` (env ``msd``, the phantoms at
    ``raw_root`` as ``ingestion.msd_path``) in the project that is the working directory.

    ``session_run_s`` is ``session.run`` alone (for the Dask runner that includes starting and
    closing its LocalCluster); ``run_start_unix``/``run_end_unix`` place it in the log.
    """
    start_process = time.perf_counter()
    from kedro.framework.session import KedroSession  # noqa: PLC0415
    from kedro.framework.startup import bootstrap_project  # noqa: PLC0415

    project = Path.cwd()
    bootstrap_project(project)
    runner = make_runner(runner_name, n_workers, threads_per_worker, address)
    with KedroSession.create(project_path=project, env=ENV, runtime_params=runtime_params(raw_root)) as session:
        wall_start = time.time()
        start = time.perf_counter()
        session.run(pipeline_names=[pipeline], runner=runner)
        seconds = time.perf_counter() - start
        wall_end = time.time()
    parallel = runner_name.startswith("dask")
    return {"pipeline": pipeline, "runner": runner_name, "n_workers": n_workers if parallel else 1,
            "threads_per_worker": threads_per_worker if parallel else 1,
            "session_run_s": seconds,
            "before_run_s": start - start_process, "run_start_unix": wall_start, "run_end_unix": wall_end}


def log_events(text: str, since: float = 0.0) -> dict[str, float]:
    """First Unix time (at or after ``since``) of each event in a :data:`BENCH_LOGGING` log:
    ``node:<name>`` (Kedro's "Running node: <name>: ..."), ``first_case_shards`` (the first
    "Preprocessing case")."""
    events: dict[str, float] = {}
    for line in text.splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            continue
        if when < since:
            continue
        message = rest.split(": ", 1)[-1]
        if message.startswith("Running node: "):
            events.setdefault("node:" + message[len("Running node: "):].split(":", 1)[0].strip(), when)
        elif message.startswith("Preprocessing case "):
            events.setdefault("first_case_shards", when)
    return events


def log_phases(text: str, run_start: float, run_end: float) -> dict[str, float | None]:
    """Seconds of a run's phases, from its log (1 ms stamps; a phase is None if its marks are missing):

    * ``ingestion``: start of ``session.run`` to the first preprocessing node (a ``data`` run);
    * ``to_preprocess_cases``: start of ``session.run`` to the ``preprocess_cases`` node (a
      ``preprocessing`` run: for the Dask runner, starting the cluster and the first node);
    * ``validation``: the ``validate_raw_dataset`` node (reads every case);
    * ``planning``: ``preprocess_cases`` starting to its first case's shards (every case's
      geometry planned);
    * ``shards``: the first case's shards to the end of ``session.run`` (all shards written).
    """
    events = log_events(text, since=run_start)

    def between(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    node = events.get("node:preprocess_cases")
    return {"ingestion": between(run_start, events.get("node:fit_intensity_stats"))
            if "node:stage_raw_dataset" in events else None,
            "to_preprocess_cases": between(run_start, node),
            "validation": between(events.get("node:validate_raw_dataset"), events.get("node:apply_invalid_policy")),
            "planning": between(node, events.get("first_case_shards")),
            "shards": between(events.get("first_case_shards"), run_end)}


# ------------------------------------------------------------------------------------------------
# Measurements of the outputs, and the summaries
# ------------------------------------------------------------------------------------------------
def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (``du``: blocks, hard links counted once, links not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def disk_by_layer(project: Path) -> dict[str, int]:
    """Bytes under each ``data/<layer>`` of a project, and ``total``."""
    usage = {layer: disk_usage(project / "data" / layer) for layer in DATA_LAYERS}
    usage["total"] = sum(usage.values())
    return usage


def dataset_bytes(raw_root: Path) -> int:
    """Bytes on disk of a Task07 folder's listed files (what a subset's hard links point at)."""
    meta = json.loads((raw_root / "dataset.json").read_text())
    files = [raw_root / rel for e in meta["training"] for rel in (e["image"], e["label"])]
    files += [raw_root / rel for rel in meta.get("test", [])]
    return sum(f.stat().st_blocks * 512 for f in files) + (raw_root / "dataset.json").stat().st_blocks * 512


def shards_digest(project: Path) -> str:
    """SHA-256 over every shard under ``data/05_model_input/slices`` (relative path + bytes)."""
    digest = hashlib.sha256()
    root = project / "data" / "05_model_input" / "slices"
    for path in sorted(root.rglob("*.npy")):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def flatness(per_size: Mapping[int, Mapping[str, float]], limit: float = 1.15) -> dict[str, Any]:
    """Cost per case and peak worker RSS of the largest case count over the smallest.

    ``per_size``: ``{n_cases: {"wall_s": ..., "peak_worker_rss_mib": ...}}``. Both ratios must be
    <= ``limit``.
    """
    lo, hi = min(per_size), max(per_size)
    per_case = {n: per_size[n]["wall_s"] / n for n in per_size}
    cost = per_case[hi] / per_case[lo]
    memory = per_size[hi]["peak_worker_rss_mib"] / per_size[lo]["peak_worker_rss_mib"]
    return {"smallest": lo, "largest": hi, "wall_per_case_s": per_case, "cost_per_case_ratio": cost,
            "peak_worker_rss_ratio": memory, "limit": limit, "cost_pass": cost <= limit,
            "memory_pass": memory <= limit, "pass": cost <= limit and memory <= limit}


def throughput_summary(runs: Sequence[Mapping[str, Any]], n_cases: int, target_ratio: float = 1.7,
                       parallel: str = "dask") -> dict[str, Any]:
    """Medians of interleaved ``sequential`` and ``parallel`` (``dask``, ``dask_running``) runs and
    their ratios.

    Each run: ``{"runner", "round", "session_run_s", "driver_peak_rss_mib", "worker_peak_rss_mib"}``.
    Throughput is cases / ``session_run_s``; the speed-up is median(parallel cases/s) /
    median(sequential cases/s). The single process's peak is its driver's; the Dask side's is its
    largest worker.
    """
    seq = [r for r in runs if r["runner"] == "sequential"]
    dask = [r for r in runs if r["runner"] == parallel]
    if not seq or not dask:
        raise ValueError(f"need at least one sequential and one {parallel} run")
    seq_tp = _common.median([n_cases / r["session_run_s"] for r in seq])
    dask_tp = _common.median([n_cases / r["session_run_s"] for r in dask])
    single_peak = _common.median([r["driver_peak_rss_mib"] for r in seq])
    worker_peak = _common.median([max(r["worker_peak_rss_mib"]) for r in dask])
    rounds = sorted({r["round"] for r in runs})
    per_round = [next(r["session_run_s"] for r in seq if r["round"] == k)
                 / next(r["session_run_s"] for r in dask if r["round"] == k)
                 for k in rounds if any(r["round"] == k for r in seq) and any(r["round"] == k for r in dask)]
    ratio = dask_tp / seq_tp
    return {"runner": parallel, "n_cases": n_cases, "median_cases_per_s_sequential": seq_tp,
            "median_cases_per_s_dask": dask_tp,
            "median_s_sequential": _common.median([r["session_run_s"] for r in seq]),
            "median_s_dask": _common.median([r["session_run_s"] for r in dask]),
            "speedup": ratio, "round_speedups": per_round, "target_speedup": target_ratio,
            "speedup_pass": ratio >= target_ratio,
            "median_peak_rss_mib_single": single_peak, "median_peak_rss_mib_worker": worker_peak,
            "median_peak_rss_mib_dask_driver": _common.median([r["driver_peak_rss_mib"] for r in dask]),
            "memory_pass": worker_peak <= single_peak,
            "pass": ratio >= target_ratio and worker_peak <= single_peak}


def log_folder(name: str) -> Path:
    """``data/08_reporting/benchmarks/<name>_logs/``, emptied: each run's log is kept there."""
    folder = _common.REPORT_DIR / f"{name}_logs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
