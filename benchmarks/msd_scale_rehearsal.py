"""Full-scale rehearsal on the CPU: ingestion + preprocessing of 30, 100 and 281 MSD-sized cases
on a 2-worker Dask LocalCluster. A benchmark script, not part of CI.

What it does
------------
1. SYNTHETIC phantoms at MSD Task07 scale (``_scale.MSD_SCALE_PHANTOM``): 512 x 512 in-plane,
   0.6-0.98 mm pixels, 1.5-2.5 mm slices over 100-225 mm, so 40-150 slices (about 83 on average;
   MSD's median is 2.5 mm and about 90 slices). The 281-case set is generated once, with both
   cores, into ``--data-root`` (default ``data/01_raw/benchmark_msd_scale``; about 6 GiB); the
   30- and 100-case sets are its first cases, hard-linked, each with its own ``dataset.json``.
   Later runs reuse them.
2. For each case count, a fresh throwaway project (``conf/`` + an empty ``data/`` skeleton, under
   ``--workdir``) runs the ``data`` pipeline (ingestion + preprocessing) once in a NEW PROCESS:
   ``KedroSession.run(pipeline_names=["data"], runner=DaskRunner(address=None, n_workers=2,
   threads_per_worker=1))`` with ``--env msd`` and ``--params
   ingestion.msd_path=<phantoms>,preprocessing.image_size_px=256``, the path real data takes
   (the phantoms are read in place, validated, split, framed on the body and written as 256 px
   shards). ``--runner sequential`` runs the same with Kedro's SequentialRunner instead.
3. It reports per case count: the wall time of ``session.run`` (for Dask including starting and
   closing the LocalCluster) and per case and per slice, when ingestion finished (the manifest's
   mtime), the peak RSS of every worker process and of the driver (the kernel's ``VmHWM``, sampled
   every 0.1 s over the child's whole process tree), and the disk used under ``data/`` by layer
   after the run (the raw phantoms are read in place; their size is given separately).
4. The target (issue "Beyond one machine", item 3): cost per case and peak worker RSS stay flat as
   the case count grows, largest / smallest count <= 1.15 for both. PASS/FAIL is printed.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.msd_scale_rehearsal --data-root /big/disk/msd_scale --workdir /big/disk
    .venv/bin/python -m benchmarks.msd_scale_rehearsal --sizes 30 100 --repeats 2
    .venv/bin/python -m benchmarks.msd_scale_rehearsal --generate-only        # only write the phantoms
    .venv/bin/python -m benchmarks.msd_scale_rehearsal --runner sequential    # the same, one process

It needs about 6 GiB for the phantoms plus 8 GiB for the 281-case shards while they are measured
(each project is deleted after its run unless ``--keep``). Results:
``data/08_reporting/benchmarks/msd_scale_rehearsal.json`` (every run's log in
``msd_scale_rehearsal_logs/`` next to it) and tables on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common, _scale
from benchmarks.support.project_copy import CHECKOUT, copy_project

#: This module's name (also as ``__main__``): the measured child runs ``python -m MODULE --child ...``.
MODULE = __spec__.name


def _fmt(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.0f}"


def _median_phase(runs: list[dict[str, Any]], phase: str) -> float | None:
    values = [r["phases_s"][phase] for r in runs if r["phases_s"].get(phase) is not None]
    return _common.median(values) if values else None


def child(args: argparse.Namespace) -> None:
    result = _scale.child_session_run("data", args.runner, Path(args.raw_root), args.workers, args.threads)
    _common.emit_result(result)


def run_one(raw_root: Path, n: int, repeat: int, workdir: Path, logs: Path,  # noqa: PLR0917
            args: argparse.Namespace) -> dict[str, Any]:
    project = copy_project(CHECKOUT, workdir / f"project_{n:03d}_{repeat}")
    log = logs / f"data_{n:03d}_{repeat}.log"
    result = _scale.run_sampled(["-m", MODULE, "--child", "--raw-root", str(raw_root), "--runner", args.runner,
                                 "--workers", str(args.workers), "--threads", str(args.threads)],
                                cwd=project, log_path=log, timeout=args.timeout)
    shards = project / "data" / "05_model_input" / "slices"
    written = sorted(p.name for p in shards.iterdir()) if shards.is_dir() else []
    if len(written) != n:
        raise RuntimeError(f"{n} cases in, {len(written)} shard folders out ({shards}); see {log}")
    result.update({"n_cases": n, "repeat": repeat, "disk_bytes": _scale.disk_by_layer(project),
                   "log": str(log)})
    if not args.keep:
        shutil.rmtree(project)
    return result


def summarise(runs: list[dict[str, Any]], phantoms: dict[int, dict[str, Any]], limit: float
              ) -> tuple[dict[int, dict[str, Any]], dict[str, Any] | None]:
    """Medians per case count, and the flatness of the largest count against the smallest."""
    summary: dict[int, dict[str, Any]] = {}
    for n in sorted({r["n_cases"] for r in runs}):
        sel = [r for r in runs if r["n_cases"] == n]
        wall = _common.median([r["session_run_s"] for r in sel])
        cpu = _common.median([sum(r["cpu_s"].values()) for r in sel])
        summary[n] = {
            "repeats": len(sel), "wall_s": wall, "wall_per_case_s": wall / n,
            "wall_per_slice_ms": 1000 * wall / phantoms[n]["slices_total"],
            "phases_s": {phase: _median_phase(sel, phase) for phase in ("ingestion", "validation", "planning", "shards")},
            "cpu_s": cpu, "cpu_per_case_s": cpu / n,
            # the sequential runner has no workers: its one process stands for them
            "peak_worker_rss_mib": _common.median([max(r["worker_peak_rss_mib"] or [r["driver_peak_rss_mib"]])
                                                   for r in sel]),
            "worker_peaks_mib": [r["worker_peak_rss_mib"] for r in sel],
            "peak_driver_rss_mib": _common.median([r["driver_peak_rss_mib"] for r in sel]),
            "disk_bytes": {k: _common.median([r["disk_bytes"][k] for r in sel]) for k in sel[0]["disk_bytes"]},
            "raw_bytes": phantoms[n]["bytes"], "all_wall_s": [r["session_run_s"] for r in sel]}
    if len(summary) < 2:
        return summary, None
    flat = _scale.flatness({n: {"wall_s": s["wall_s"], "peak_worker_rss_mib": s["peak_worker_rss_mib"]}
                            for n, s in summary.items()}, limit=limit)
    lo, hi = flat["smallest"], flat["largest"]
    flat["cpu_per_case_ratio"] = summary[hi]["cpu_per_case_s"] / summary[lo]["cpu_per_case_s"]
    flat["slices_per_case_ratio"] = (phantoms[hi]["slices_total"] / hi) / (phantoms[lo]["slices_total"] / lo)
    return summary, flat


def print_summary(summary: dict[int, dict[str, Any]], flat: dict[str, Any] | None,
                  phantoms: dict[int, dict[str, Any]]) -> None:
    print()
    _common.print_table(
        ["cases", "slices", "wall s", "s/case", "CPU s/case", "ms/slice", "ingestion s", "(validation)", "planning s",
         "shards s", "worker peaks MiB", "driver peak MiB", "03_primary MiB", "04_feature MiB", "05_model_input GiB",
         "data/ GiB", "raw GiB"],
        [[n, phantoms[n]["slices_total"], s["wall_s"], s["wall_per_case_s"], s["cpu_per_case_s"], s["wall_per_slice_ms"],
          *[_fmt(s["phases_s"][k]) for k in ("ingestion", "validation", "planning", "shards")],
          " / ".join(f"{w:.0f}" for w in s["worker_peaks_mib"][0]) or "-", s["peak_driver_rss_mib"],
          _scale.mib(s["disk_bytes"]["03_primary"]), _scale.mib(s["disk_bytes"]["04_feature"]),
          _scale.mib(s["disk_bytes"]["05_model_input"]) / 1024, _scale.mib(s["disk_bytes"]["total"]) / 1024,
          _scale.mib(s["raw_bytes"]) / 1024] for n, s in summary.items()])
    if flat is None:
        return
    lo, hi, limit = flat["smallest"], flat["largest"], flat["limit"]
    print(f"\ncost per case {hi} / {lo} cases: {flat['cost_per_case_ratio']:.3f} "
          f"(limit {limit}): {'PASS' if flat['cost_pass'] else 'FAIL'}")
    print(f"peak worker RSS {hi} / {lo} cases: {flat['peak_worker_rss_ratio']:.3f} "
          f"(limit {limit}): {'PASS' if flat['memory_pass'] else 'FAIL'}")
    print(f"(for context: CPU seconds per case {hi} / {lo}: {flat['cpu_per_case_ratio']:.3f}, less sensitive to "
          f"other jobs on the machine; slices per case {hi} / {lo}: {flat['slices_per_case_ratio']:.3f})")


def parent(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    data_root = Path(args.data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes))
    roots: dict[int, Path] = {}
    t_gen = time.perf_counter()
    for n in sorted(sizes, reverse=True):   # the largest first: the others are its first cases
        print(f"phantoms: {n} cases ...", flush=True)
        roots[n] = _scale.ensure_phantoms(data_root, n, processes=args.processes)
    generation_s = time.perf_counter() - t_gen
    rows = []
    phantoms: dict[int, dict[str, Any]] = {}
    for n in sizes:
        counts = _scale.slice_counts(roots[n])
        phantoms[n] = {"root": str(roots[n]), "slices_total": sum(counts), "slices_min": min(counts),
                       "slices_median": _common.median(counts), "slices_max": max(counts),
                       "bytes": _scale.dataset_bytes(roots[n])}
        rows.append([n, sum(counts), min(counts), _common.median(counts), max(counts),
                     _scale.mib(phantoms[n]["bytes"]) / 1024])
    print(f"phantoms ready in {generation_s:.0f} s ({data_root})")
    _common.print_table(["cases", "slices", "min", "median", "max", "GiB on disk"], rows)
    if args.generate_only:
        return

    workdir = Path(tempfile.mkdtemp(prefix="msd_scale_rehearsal_", dir=args.workdir))
    runner = (f"DaskRunner LocalCluster {args.workers} workers x {args.threads} thread(s)"
              if args.runner == "dask" else "SequentialRunner")
    print(f"\ndata pipeline (ingestion + preprocessing, --env {_scale.ENV}, {_scale.IMAGE_SIZE_PX} px) with "
          f"{runner}; projects under {workdir}", flush=True)
    runs: list[dict[str, Any]] = []
    logs = _scale.log_folder("msd_scale_rehearsal")
    try:
        for repeat in range(args.repeats):
            for n in sizes if repeat % 2 == 0 else sizes[::-1]:
                result = run_one(roots[n], n, repeat, workdir, logs, args)
                runs.append(result)
                _common.write_report("msd_scale_rehearsal", {"partial": True, "phantoms": phantoms, "runs": runs})
                workers = result["worker_peak_rss_mib"]
                phases = result["phases_s"]
                print(f"  {n:>3} cases (repeat {repeat}): {result['session_run_s']:7.1f} s "
                      f"({result['session_run_s'] / n:.2f} s/case; ingestion {_fmt(phases['ingestion'])} s, "
                      f"planning {_fmt(phases['planning'])} s, shards {_fmt(phases['shards'])} s), driver peak "
                      f"{result['driver_peak_rss_mib']:.0f} MiB, workers' peaks "
                      f"{', '.join(f'{w:.0f}' for w in workers) or '-'} MiB, data/ "
                      f"{_scale.mib(result['disk_bytes']['total']) / 1024:.2f} GiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summary, flat = summarise(runs, phantoms, args.limit)
    print_summary(summary, flat, phantoms)
    path = _common.write_report("msd_scale_rehearsal", {
        "settings": {"sizes": sizes, "repeats": args.repeats, "runner": args.runner, "n_workers": args.workers,
                     "threads_per_worker": args.threads, "env": _scale.ENV, "image_size_px": _scale.IMAGE_SIZE_PX,
                     "phantom": {k: list(v) if isinstance(v, tuple) else v for k, v in _scale.MSD_SCALE_PHANTOM.items()},
                     "phantom_seed": _scale.PHANTOM_SEED, "data_root": str(data_root)},
        "phantoms": phantoms, "generation_s": generation_s, "summary": summary, "flatness": flat, "runs": runs,
        "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(_scale.SIZES), help="case counts")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case count (medians)")
    parser.add_argument("--runner", choices=("dask", "sequential"), default="dask")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--data-root", default=str(_scale.DEFAULT_DATA_ROOT), help="where the phantoms are kept")
    parser.add_argument("--workdir", default=None, help="where the throwaway projects go (default: system temp)")
    parser.add_argument("--processes", type=int, default=2, help="processes that generate the phantoms")
    parser.add_argument("--limit", type=float, default=1.15, help="largest / smallest ratio allowed")
    parser.add_argument("--generate-only", action="store_true", help="write the phantoms, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the project copies (the logs are always kept)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
