"""Preprocessing throughput: one process (SequentialRunner) vs a 2-worker Dask LocalCluster
(DaskRunner), measured in ONE run on 30 MSD-sized cases.

What it measures
----------------
The first 30 cases of the MSD-scale SYNTHETIC phantoms (``_scale.MSD_SCALE_PHANTOM``: 512 x 512,
40-150 slices; written once into ``--data-root`` and reused, shared with
``msd_scale_rehearsal.py``) are ingested once into a throwaway project (``--env msd``,
``ingestion.msd_path`` = the phantoms; SequentialRunner; not timed as preprocessing). Then the
``preprocessing`` pipeline (intensity settings, each case's geometry planned from its header and
body box, 256 px image and label shards) runs ``--rounds`` times with each runner, interleaved
(sequential, dask, then dask, sequential, ...), so a change of load on the shared machine hits
both. Before every run ``data/04_feature`` and ``data/05_model_input`` are emptied, so each one
does the full work. Each run is a NEW PROCESS that starts one ``KedroSession`` and times its
``session.run``:

* ``sequential``: ``SequentialRunner()``, everything in that one process;
* ``dask``: ``DaskRunner(address=None, n_workers=2, threads_per_worker=1)``: it starts its own
  LocalCluster of 2 fresh worker processes (counted in the time) and closes it at the end;
* ``dask_running``: ``DaskRunner(address=...)`` on a LocalCluster of 2 workers that
  ``kedro dask-cluster --env msd`` started once, before the first round (its start-up is reported,
  not counted in the runs), as a user runs many pipelines on one cluster. One run on it before the
  rounds (reported, not counted) has its workers import the preprocessing node modules, which
  they keep for every later run. Its workers' peak RSS is
  reset before each run (``/proc/<pid>/clear_refs``), so each run reports its own peak.

Throughput is 30 cases / ``session.run`` seconds; the speed-up is the ratio of the medians, and
is also given per round. Peak memory is the kernel's ``VmHWM`` of every process in the child's
tree, sampled every 0.1 s: the single process's peak against the largest worker's peak (the Dask
driver's own peak is reported too). After every run the shards are hashed: both runners must write
identical shards.

Targets (issue "Beyond one machine"): speed-up >= 1.7 and worker peak <= the single process's
peak; both are reported for each of the two Dask variants.

``--ceiling`` also measures what this machine allows without Kedro or Dask: the same per-case
work (``plan_case_geometry``, ``preprocess_case``, the two ``.npy`` saves) over the 30 cases in
one process, and in a pool of 2 processes (spawned and warmed up first, so start-up is not
counted), interleaved over the same rounds. Its ratio is the best the runner could reach here.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.preprocessing_throughput --data-root /big/disk/msd_scale
    .venv/bin/python -m benchmarks.preprocessing_throughput --rounds 3 --ceiling

Results: ``data/08_reporting/benchmarks/preprocessing_throughput.json`` (every run's log in
``preprocessing_throughput_logs/`` next to it) and a table on stdout.
On 2 cores a round takes about 2 minutes (3 with ``--ceiling``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common, _scale
from benchmarks.support.project_copy import CHECKOUT, copy_project

#: This module's name (also as ``__main__``): the measured child runs ``python -m MODULE --child ...``.
MODULE = __spec__.name
RUNNERS = ("sequential", "dask", "dask_running")
PARALLEL = ("dask", "dask_running")


def child(args: argparse.Namespace) -> None:
    result = _scale.child_session_run(args.pipeline, args.runner, Path(args.raw_root), args.workers, args.threads,
                                      args.address)
    _common.emit_result(result)


def ceiling_settings() -> dict[str, Any]:
    """``preprocessing`` of ``conf/base`` + ``conf/msd`` at 256 px, as the runs get it (the soft merge)."""
    from pancreas_seg.learning.setup import merge_settings  # noqa: PLC0415

    merged = merge_settings(_common.conf("base", "parameters_preprocessing.yml")["preprocessing"],
                            _common.conf(_scale.ENV, "parameters.yml").get("preprocessing", {}))
    return {**merged, "image_size_px": _scale.IMAGE_SIZE_PX}


def _ceiling_case(item: tuple[str, str, str, dict[str, Any]]) -> int:
    """One case's whole preprocessing work, as the pipeline does it; returns its slice count."""
    from pancreas_seg.datasets import NumpyDataset  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import (  # noqa: PLC0415
        PreprocessingConfig,
        plan_case_geometry,
        preprocess_case,
    )

    image_path, label_path, out, settings = item
    config = PreprocessingConfig.from_params(settings)
    case = preprocess_case(image_path, label_path, config, None, plan_case_geometry(image_path, config))
    NumpyDataset(filepath=f"{out}/image.npy").save(case.image)
    NumpyDataset(filepath=f"{out}/label.npy").save(case.label)
    return int(case.image.shape[0])


def _warm(_: int) -> int:
    from pancreas_seg.datasets import NumpyDataset  # noqa: F401, PLC0415
    from pancreas_seg.imaging.preprocess import preprocess_case  # noqa: F401, PLC0415

    return os.getpid()


def child_ceiling(args: argparse.Namespace) -> None:
    """The per-case work of every case in 1 process (this one) or a pool of ``--procs`` processes."""
    import multiprocessing  # noqa: PLC0415

    pairs = _common.phantom_pairs(Path(args.raw_root))
    out = Path(args.out)
    settings = ceiling_settings()
    items = [(image, label, str(out / Path(image).name.removesuffix(".nii.gz")), settings) for image, label in pairs]
    if args.procs <= 1:
        _warm(0)
        start = time.perf_counter()
        slices = [_ceiling_case(item) for item in items]
        seconds = time.perf_counter() - start
    else:
        with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
            pool.map(_warm, range(args.procs), chunksize=1)
            start = time.perf_counter()
            slices = list(pool.imap_unordered(_ceiling_case, items, chunksize=1))
            seconds = time.perf_counter() - start
    _common.emit_result({"runner": f"plain_{args.procs}", "procs": args.procs, "seconds": seconds,
                         "slices": sum(slices)})


def _median_phase(runs: list[dict[str, Any]], phase: str) -> float | str:
    values = [r["phases_s"][phase] for r in runs if r["phases_s"].get(phase) is not None]
    return _common.median(values) if values else "?"


def clear_preprocessing_outputs(project: Path) -> None:
    """Empty ``data/04_feature`` and ``data/05_model_input`` (the folders stay)."""
    for layer in ("04_feature", "05_model_input"):
        folder = project / "data" / layer
        shutil.rmtree(folder)
        folder.mkdir()


def run_child(project: Path, raw_root: Path, pipeline: str, runner: str, log: Path,  # noqa: PLR0917
              args: argparse.Namespace, cluster: _scale.RunningCluster | None = None) -> dict[str, Any]:
    extra = ["--address", cluster.address] if runner == "dask_running" and cluster else []
    return _scale.run_sampled(["-m", MODULE, "--child", "--pipeline", pipeline, "--runner", runner,
                               "--raw-root", str(raw_root), "--workers", str(args.workers),
                               "--threads", str(args.threads), *extra], cwd=project, log_path=log,
                              timeout=args.timeout,
                              extra_workers=cluster.worker_pids if extra else (),
                              extra_log=cluster.log_path if extra else None)


def parent(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    raw_root = _scale.ensure_phantoms(Path(args.data_root).resolve(), args.cases, processes=args.processes)
    counts = _scale.slice_counts(raw_root)
    workdir = Path(tempfile.mkdtemp(prefix="preprocessing_throughput_", dir=args.workdir))
    project = copy_project(CHECKOUT, workdir / "project")
    print(f"{args.cases} MSD-scale phantom cases ({sum(counts)} slices of 512 x 512, {min(counts)}-{max(counts)} "
          f"per case) from {raw_root}; project {project}", flush=True)
    runs: list[dict[str, Any]] = []
    ceiling: list[dict[str, Any]] = []
    logs = _scale.log_folder("preprocessing_throughput")
    cluster, first_on_cluster = None, None
    try:
        ingestion = run_child(project, raw_root, "ingestion", "sequential", logs / "ingestion.log", args)
        print(f"ingestion (once, SequentialRunner): {ingestion['session_run_s']:.1f} s", flush=True)
        cluster = _scale.RunningCluster(project, args.workers, logs / "running_cluster.log")
        print(f"running cluster (`kedro dask-cluster`, started once, not timed in the runs): ready at "
              f"{cluster.address} after {cluster.start_s:.1f} s", flush=True)
        clear_preprocessing_outputs(project)
        first_on_cluster = run_child(project, raw_root, "preprocessing", "dask_running",
                                     logs / "running_cluster_first_run.log", args, cluster)
        print(f"  its first run (workers import the node modules; not counted): "
              f"{first_on_cluster['session_run_s']:.1f} s", flush=True)
        for round_index in range(args.rounds):
            for runner in RUNNERS if round_index % 2 == 0 else RUNNERS[::-1]:
                clear_preprocessing_outputs(project)
                result = run_child(project, raw_root, "preprocessing", runner,
                                   logs / f"preprocessing_{round_index}_{runner}.log", args, cluster)
                shards = project / "data" / "05_model_input" / "slices"
                n_written = sum(1 for p in shards.iterdir()) if shards.is_dir() else 0
                if n_written != args.cases:
                    raise RuntimeError(f"{runner}: {n_written} of {args.cases} cases written")
                result.update({"round": round_index, "shards_sha256": _scale.shards_digest(project),
                               "load_avg_after": list(os.getloadavg())})
                runs.append(result)
                phases = {k: "?" if v is None else f"{v:.1f}" for k, v in result["phases_s"].items()}
                print(f"  round {round_index + 1} {runner:<12}: {result['session_run_s']:6.1f} s "
                      f"({args.cases / result['session_run_s']:.3f} cases/s; start to node {phases['to_preprocess_cases']} s, "
                      f"planning {phases['planning']} s, shards {phases['shards']} s), peak RSS: driver "
                      f"{result['driver_peak_rss_mib']:.0f} MiB, workers "
                      f"{', '.join(f'{w:.0f}' for w in result['worker_peak_rss_mib']) or '-'} MiB "
                      f"(load {result['load_avg_after'][0]:.2f})", flush=True)
                if runner != "sequential" and len(result["worker_peak_rss_mib"]) != args.workers:
                    print(f"  WARNING: {len(result['worker_peak_rss_mib'])} worker processes seen, "
                          f"expected {args.workers}: {result['processes']['workers']}", flush=True)
            if args.ceiling:
                for procs in (1, args.workers) if round_index % 2 == 0 else (args.workers, 1):
                    out = workdir / "ceiling"
                    shutil.rmtree(out, ignore_errors=True)
                    result = _scale.run_sampled(["-m", MODULE, "--child-ceiling", "--procs", str(procs), "--raw-root",
                                                 str(raw_root), "--out", str(out)], cwd=project,
                                                log_path=logs / f"ceiling_{round_index}_{procs}.log", timeout=args.timeout)
                    result["round"] = round_index
                    ceiling.append(result)
                    print(f"  round {round_index + 1} plain {procs} process(es), no Kedro/Dask: {result['seconds']:6.1f} s "
                          f"({args.cases / result['seconds']:.3f} cases/s)", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summaries = {name: _scale.throughput_summary(runs, args.cases, args.target, parallel=name) for name in PARALLEL}
    identical = len({r["shards_sha256"] for r in runs}) == 1
    print()
    rows = []
    for runner in RUNNERS:
        sel = [r for r in runs if r["runner"] == runner]
        rows.append([runner, _common.median([r["session_run_s"] for r in sel]),
                     _common.median([args.cases / r["session_run_s"] for r in sel]),
                     *[_median_phase(sel, phase) for phase in ("to_preprocess_cases", "planning", "shards")],
                     _common.median([sum(r["cpu_s"].values()) for r in sel]),
                     _common.median([r["driver_peak_rss_mib"] for r in sel]),
                     (_common.median([max(r["worker_peak_rss_mib"]) for r in sel]) if runner != "sequential" else "-"),
                     " ".join(f"{r['session_run_s']:.1f}" for r in sel)])
    _common.print_table(["runner", "median s", "cases/s", "start to node s", "planning s", "shards s",
                         "CPU s", "driver peak MiB", "worker peak MiB", "all s"], rows)
    what = {"dask": "its own LocalCluster, started and closed in the run",
            "dask_running": "the running LocalCluster (`kedro dask-cluster`)"}
    for name, summary in summaries.items():
        print(f"\n{name} ({what[name]}): speed-up, {args.workers} workers vs 1 process: {summary['speedup']:.2f}x "
              f"(median cases/s; per round {', '.join(f'{r:.2f}' for r in summary['round_speedups'])}); "
              f"target >= {args.target}: {'PASS' if summary['speedup_pass'] else 'FAIL'}")
        print(f"  peak RSS, largest worker vs single process: {summary['median_peak_rss_mib_worker']:.0f} vs "
              f"{summary['median_peak_rss_mib_single']:.0f} MiB: {'PASS' if summary['memory_pass'] else 'FAIL'}")
    work = {runner: _common.median([r["phases_s"]["planning"] + r["phases_s"]["shards"] for r in runs
                                    if r["runner"] == runner]) for runner in RUNNERS}
    print("\nper-case phases only (planning + shards, without start-up): " + ", ".join(
        f"{runner} {work[runner]:.1f} s ({work['sequential'] / work[runner]:.2f}x)" for runner in RUNNERS))
    print(f"shards identical in every run: {'yes' if identical else 'NO'}")
    ceiling_summary = None
    if ceiling:
        one = _common.median([r["seconds"] for r in ceiling if r["procs"] == 1])
        many = _common.median([r["seconds"] for r in ceiling if r["procs"] == args.workers])
        ceiling_summary = {"median_s_1_process": one, f"median_s_{args.workers}_processes": many,
                           "speedup": one / many}
        print(f"this machine's ceiling (the per-case work alone, 1 vs {args.workers} plain processes): {one:.1f} s vs "
              f"{many:.1f} s, {one / many:.2f}x")
    path = _common.write_report("preprocessing_throughput", {
        "settings": {"cases": args.cases, "rounds": args.rounds, "n_workers": args.workers,
                     "threads_per_worker": args.threads, "env": _scale.ENV, "image_size_px": _scale.IMAGE_SIZE_PX,
                     "phantom_root": str(raw_root), "slices": sum(counts), "slices_per_case": counts},
        "ingestion": ingestion, "summary": summaries["dask"], "summary_running_cluster": summaries["dask_running"],
        "running_cluster_start_s": cluster.start_s if cluster else None,
        "running_cluster_first_run": first_on_cluster, "shards_identical": identical,
        "median_per_case_phases_s": work,
        "per_case_phases_speedup": {name: work["sequential"] / work[name] for name in PARALLEL},
        "ceiling": ceiling_summary, "ceiling_runs": ceiling,
        "median_phases_s": {runner: {phase: _median_phase([r for r in runs if r["runner"] == runner], phase)
                                     for phase in ("to_preprocess_cases", "planning", "shards")} for runner in RUNNERS},
        "runs": runs,
        "total_wall_s": time.perf_counter() - t_start})
    print(f"wrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one run of each runner)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--target", type=float, default=1.7, help="speed-up required")
    parser.add_argument("--data-root", default=str(_scale.DEFAULT_DATA_ROOT), help="where the phantoms are kept")
    parser.add_argument("--workdir", default=None, help="where the throwaway project goes (default: system temp)")
    parser.add_argument("--processes", type=int, default=2, help="processes that generate missing phantoms")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the per-case work alone in 1 and in --workers plain processes")
    parser.add_argument("--keep", action="store_true", help="keep the project copy (the logs are always kept)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="preprocessing", help=argparse.SUPPRESS)
    parser.add_argument("--runner", choices=RUNNERS, default="sequential", help=argparse.SUPPRESS)
    parser.add_argument("--raw-root", help=argparse.SUPPRESS)
    parser.add_argument("--child-ceiling", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ceiling:
        child_ceiling(args)
    elif args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
