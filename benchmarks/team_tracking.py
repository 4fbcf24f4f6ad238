"""Four concurrent runs recording into the lab's tracking server (PostgreSQL) versus the same four on
today's default store (one shared ``sqlite:///mlflow.db`` file), medians and ratios (issue 27).

Two workloads:

* ``logging`` (default; tracking cost alone): 4 processes start at once; each does what one
  ``kedro run --pipelines=train`` logs, scaled up so the store's cost shows: a parent run with
  60 params and 5 nested runs, each with 40 params, 6 metrics x ``--steps`` epochs logged one
  call per value (as ``tracking.log_epoch_metrics`` does), 4 final metrics, a tag and 3 artifact
  files (two JSON, one 200 KB PNG-sized blob). Per repetition: the wall time until all 4 are done
  and each process's own time. ``--repeats`` repetitions per backend, fresh store each time.
* ``kedro``: 4 concurrent real ``kedro run --pipelines=train --namespaces=<model>`` smoke runs
  (``--env smoke`` on sqlite; ``--env team_smoke`` on the server), each in its own project copy
  whose data were prepared once; wall time until all 4 are done (CPU-bound on 2 cores: the
  tracking is a small share).

Backends: ``postgres`` (``mlflow server`` with 2 workers on a throwaway PostgreSQL:
:mod:`benchmarks.support.team_stack`), ``sqlite`` (the processes open the same sqlite file
directly, artifacts in a local folder: what several ``kedro run`` in one project do today), and
with ``--server-sqlite`` also ``mlflow server`` on sqlite (separates HTTP's cost from the database's).

    .venv/bin/python -m benchmarks.team_tracking                       # logging, 5 repeats
    .venv/bin/python -m benchmarks.team_tracking --workload kedro --repeats 1

Writes ``data/08_reporting/benchmarks/team_tracking.json`` and prints the table. Errors (e.g.
sqlite's "database is locked") are counted, not hidden: a process that fails is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, median, print_table, write_report

N_PROCESSES = 4
NAMESPACES = ("unet", "unet_small", "fcn", "vnet2d")
RESULT = "TEAM_BENCH:"
EXPERIMENT = "team_tracking_bench"


# ---------------------------------------------------------------------------------------------
# worker: one process's logging
# ---------------------------------------------------------------------------------------------
def worker(uri: str, experiment: str, steps: int, index: int) -> dict[str, Any]:
    import mlflow  # noqa: PLC0415
    from mlflow import MlflowClient  # noqa: PLC0415

    start = time.perf_counter()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment(client, experiment)
    payload = os.urandom(200_000)
    counts = {"runs": 0, "params": 0, "metric_steps": 0, "artifacts": 0}
    with tempfile.TemporaryDirectory() as folder:
        blob = Path(folder) / "curves.png"
        blob.write_bytes(payload)
        parent = client.create_run(experiment_id, run_name=f"train-{index}")
        client.log_batch(parent.info.run_id, params=[mlflow.entities.Param(f"p{i}", str(i)) for i in range(60)])
        counts["runs"] += 1
        counts["params"] += 60
        for arch in range(5):
            run = client.create_run(experiment_id, run_name=f"arch-{arch}",
                                    tags={"mlflow.parentRunId": parent.info.run_id, "architecture": str(arch)})
            run_id = run.info.run_id
            client.log_batch(run_id, params=[mlflow.entities.Param(f"training.k{i}", str(i)) for i in range(40)])
            for epoch in range(1, steps + 1):
                for key in ("loss", "dice", "val_loss", "val_dice", "val_dice_pancreas", "lr"):
                    client.log_metric(run_id, key, 1.0 / epoch, step=epoch)
                    counts["metric_steps"] += 1
            for key in ("final_val_dice", "test_dice_pancreas_mean", "test_dice_tumour_mean", "seconds"):
                client.log_metric(run_id, key, 0.5)
                counts["metric_steps"] += 1
            client.set_tag(run_id, "model_version", "1")
            client.log_dict(run_id, {"arch": arch, "epochs": steps}, "model_card.json")
            client.log_dict(run_id, {"history": list(range(steps))}, "training_history.json")
            client.log_artifact(run_id, str(blob), "plots")
            client.set_terminated(run_id)
            counts["runs"] += 1
            counts["params"] += 40
            counts["artifacts"] += 3
        client.set_terminated(parent.info.run_id)
    return {"seconds": time.perf_counter() - start, **counts}


def _experiment(client: Any, name: str) -> str:
    import mlflow  # noqa: PLC0415

    for _ in range(5):   # the 4 processes race to create it; the losers read it
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            time.sleep(0.2)
    raise RuntimeError(f"experiment {name} neither found nor created")


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
@contextmanager
def backend(kind: str, folder: Path) -> Iterator[tuple[str, dict[str, str], Any]]:
    """(tracking URI, environment for the processes, the stack or None)."""
    from benchmarks.support.project_copy import subprocess_env  # noqa: PLC0415

    if kind == "sqlite":
        (folder / "mlruns").mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{folder / 'mlflow.db'}", subprocess_env(), None
        return
    if kind == "postgres":
        from benchmarks.support.team_stack import team_stack  # noqa: PLC0415

        with team_stack(folder) as stack:
            yield stack.tracking_uri, stack.environment(), stack
        return
    if kind == "server-sqlite":
        from benchmarks.support.local_server import LocalServer, free_port  # noqa: PLC0415
        from pancreas_seg.tracking.server import server_command, server_environment  # noqa: PLC0415

        port = free_port()
        command = server_command(f"sqlite:///{folder / 'mlflow.db'}", folder / "mlartifacts", port=port, workers=2)
        url = f"http://127.0.0.1:{port}"
        with LocalServer(command, f"{url}/health", folder / "server.log", folder,
                         server_environment(subprocess_env())) as server:
            server.wait_ready(180)
            yield url, subprocess_env(MLFLOW_TRACKING_URI=url), None
        return
    raise ValueError(kind)


def run_logging(kind: str, steps: int, folder: Path) -> dict[str, Any]:
    from mlflow import MlflowClient  # noqa: PLC0415

    with backend(kind, folder) as (uri, env, _):
        # the store and the experiment exist before the clock starts, as a project's mlflow.db does
        # after its first run (4 processes creating a NEW sqlite file at once fail: see docs/team.md)
        _experiment(MlflowClient(tracking_uri=uri), EXPERIMENT)
        start = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.team_tracking", "--worker", uri,
                                       "--steps", str(steps), "--index", str(i)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(N_PROCESSES)]
        outputs = [p.communicate(timeout=3600) for p in processes]
        wall = time.perf_counter() - start
    results, errors = [], []
    for process, (out, err) in zip(processes, outputs, strict=True):
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
        if process.returncode == 0 and lines:
            results.append(json.loads(lines[-1].removeprefix(RESULT)))
        else:
            errors.append(err.strip().splitlines()[-1][:300] if err.strip() else f"exit {process.returncode}")
    return {"wall_s": wall, "process_s": [r["seconds"] for r in results], "errors": errors,
            "logged": results[0] if results else {}}


def run_kedro(kind: str, folder: Path, prepared: dict[str, Path]) -> dict[str, Any]:
    env_name = "team_smoke" if kind != "sqlite" else "smoke"
    from mlflow import MlflowClient  # noqa: PLC0415

    with backend(kind, folder) as (uri, env, _stack):
        if kind != "sqlite":   # the lab's experiment exists before four runs start at once (as it would)
            _experiment(MlflowClient(tracking_uri=uri), "pancreas_seg_smoke")
        projects = []
        for namespace in NAMESPACES:
            project = folder / namespace / "pancreas_seg"
            shutil.copytree(prepared[env_name], project)
            projects.append(project)
        start = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-m", "kedro", "run", "--env", env_name, "--pipelines=train",
                                       f"--namespaces={ns}"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
                     for ns, project in zip(NAMESPACES, projects, strict=True)]
        outputs = [p.communicate(timeout=3600) for p in processes]
        wall = time.perf_counter() - start
    errors = [err.strip().splitlines()[-1][:300] for p, (_, err) in zip(processes, outputs, strict=True)
              if p.returncode != 0]
    return {"wall_s": wall, "process_s": [], "errors": errors, "logged": {}}


def prepare_kedro_projects(folder: Path) -> dict[str, Path]:
    """Project copies with the smoke data prepared once (``--pipelines=data``), per environment."""
    from benchmarks.support.project_copy import copy_project, subprocess_env  # noqa: PLC0415
    from pancreas_seg.tracking.team_env import compose_environment  # noqa: PLC0415

    prepared = {}
    for env_name in ("smoke", "team_smoke"):
        project = copy_project(REPO_ROOT, folder / f"prepared_{env_name}" / "pancreas_seg")
        compose_environment(project / "conf", ["smoke", "team"], "team_smoke")
        # the data pipeline logs nothing that matters here: run it on a throwaway sqlite store
        subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "smoke", "--pipelines=data"], cwd=project,
                       env=subprocess_env(), check=True, capture_output=True, timeout=1800)
        for leftover in ("mlflow.db", "mlruns"):
            path = project / leftover
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        prepared[env_name] = project
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.team_tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["logging", "kedro"], default="logging")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="epochs of metrics per nested run (logging)")
    parser.add_argument("--server-sqlite", action="store_true", help="also time mlflow server on sqlite")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(worker(args.worker, EXPERIMENT, args.steps, args.index)), flush=True)
        return 0

    kinds = ["sqlite", "postgres", *(["server-sqlite"] if args.server_sqlite else [])]
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="team_tracking_") as tmp:
        root = Path(tmp)
        prepared = prepare_kedro_projects(root / "prepared") if args.workload == "kedro" else {}
        for repeat in range(args.repeats):
            for kind in kinds:   # interleaved, so drifting background load hits every backend alike
                folder = root / f"{kind}_{repeat}"
                folder.mkdir()
                result = (run_logging(kind, args.steps, folder) if args.workload == "logging"
                          else run_kedro(kind, folder, prepared))
                results[kind].append(result)
                print(f"  repeat {repeat + 1}/{args.repeats} {kind}: {result['wall_s']:.1f} s wall, "
                      f"{len(result['errors'])} failed process(es)", file=sys.stderr, flush=True)
    summary = {}
    for kind, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        per_process = [s for r in runs for s in r["process_s"]]
        summary[kind] = {"median_wall_s": median(walls), "median_process_s": median(per_process) if per_process else None,
                         "walls_s": walls, "failed_processes": sum(len(r["errors"]) for r in runs),
                         "errors": sorted({e for r in runs for e in r["errors"]})[:5]}
    base = summary["sqlite"]["median_wall_s"]
    rows = [[kind, s["median_wall_s"], s["median_process_s"] if s["median_process_s"] is not None else "-",
             s["median_wall_s"] / base, s["failed_processes"], len(s["walls_s"])] for kind, s in summary.items()]
    print_table(["backend", "median wall s (4 at once)", "median s per process", "wall / sqlite", "failed", "repeats"],
                rows)
    logged = next((r["logged"] for r in results["sqlite"] if r["logged"]), {})
    path = write_report(f"team_tracking_{args.workload}", {
        "workload": args.workload, "processes": N_PROCESSES, "repeats": args.repeats, "steps": args.steps,
        "logged_per_process": logged, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
