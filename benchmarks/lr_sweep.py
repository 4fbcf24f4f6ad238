"""Learning-rate sweep at the default training budget: which initial Adam rate each model trains best with.

What it does
------------
1. A throwaway copy of this project (``conf/`` + an empty ``data/`` skeleton,
   :func:`benchmarks.support.project_copy.copy_project`, under ``--workdir``) runs ``kedro run
   --pipelines=data`` once: the default SYNTHETIC phantoms, validated, split by patient and
   preprocessed exactly as ``kedro run --pipelines=train`` does.
2. For each learning rate of ``--lrs`` (in that order), one ``kedro run --pipelines=training`` in a
   NEW PROCESS trains every model of ``--models`` (default: the four architectures and the
   cascade's stage 2) at that rate, with ``--params <model>...learning_rate=<lr>``; everything else
   (the equal budget, ``training.seed``, the data, the split) is ``conf/<--env>``'s. The cascade's
   stage 1 is the U-Net of the same run, i.e. trained at the same rate (it only sets stage 2's
   position jitter).
3. Per (model, rate) it reads what the run wrote: the best checkpoint's validation Dice
   (``final_val_dice_pancreas`` and ``final_val_dice_tumour`` of ``<model>_validation_metrics.json``:
   all validation slices; the cascade: its crops around the true pancreas), the 3D validation
   pancreas Dice the registry selects on (mean over the validation cases of
   ``<model>_validation_metrics_per_case.csv``), and from the training history the optimizer
   steps, the training seconds and the rate of the first epoch (checked against the rate asked for).
4. Per model it chooses the rate with the highest best-checkpoint validation pancreas Dice (ties:
   the smaller rate). No test case is ever used.

Results: a table on stdout with progress lines while it runs, every run's log in
``<workdir>/logs/``, and ``benchmarks/results/lr_sweep.json`` (``--output``), rewritten atomically
after every rate so an interrupted sweep keeps what it measured.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.lr_sweep                                   # 3 rates x 5 models
    .venv/bin/python -m benchmarks.lr_sweep --lrs 6e-4 2e-3 --models unet fcn
    .venv/bin/python -m benchmarks.lr_sweep --env smoke --output /tmp/lr_sweep_smoke.json   # a minute

The default (3 rates, every model, ``conf/base``) takes about as long as three default ``train`` runs
without the evaluation, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import _common
from benchmarks.support.project_copy import CHECKOUT, copy_project, subprocess_env

DEFAULT_LRS = (2e-4, 6e-4, 2e-3)
DEFAULT_OUTPUT = CHECKOUT / "benchmarks" / "results" / "lr_sweep.json"
SELECTION_METRIC = "final_val_dice_pancreas"
EPOCH_LINE = re.compile(r"(\S+): epoch (\d+/\d+)")


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for the table and the progress lines; ``-`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def lr_parameter(model: str) -> str:
    """The dotted parameter that sets ``model``'s initial learning rate (conf/base/parameters_*.yml)."""
    from pancreas_seg.models.names import CASCADE_NAME  # noqa: PLC0415

    if model == CASCADE_NAME:
        return "cascade.stage2.overrides.learning_rate"
    return f"{model}.architecture.overrides.learning_rate"


def lr_params(models: Iterable[str], lr: float) -> str:
    """The ``--params`` value that gives every model in ``models`` the rate ``lr``."""
    return ",".join(f"{lr_parameter(model)}={lr:.3e}" for model in models)


def choose_learning_rates(rows: Sequence[Mapping[str, Any]], metric: str = SELECTION_METRIC) -> dict[str, dict]:
    """Per model, the row with the highest finite ``metric`` (ties: the smaller learning rate).

    Returns ``{model: {"learning_rate": ..., metric: ...}}``; a model with no finite value is left out.
    """
    chosen: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["model"], r["learning_rate"])):
        value = row.get(metric)
        if value is None or not math.isfinite(float(value)):
            continue
        best = chosen.get(row["model"])
        if best is None or float(value) > best[metric]:
            chosen[row["model"]] = {"learning_rate": float(row["learning_rate"]), metric: float(value)}
    return chosen


def _last(values: Sequence[float]) -> float | None:
    return float(values[-1]) if len(values) else None


def read_model_result(project: Path, model: str) -> dict[str, Any]:
    """What one ``training`` run wrote for ``model`` (see the module docstring, step 3)."""
    reporting = project / "data" / "08_reporting" / "training"
    metrics = json.loads((reporting / f"{model}_validation_metrics.json").read_text())
    per_case = pd.read_csv(reporting / f"{model}_validation_metrics_per_case.csv")
    history = json.loads((project / "data" / "06_models" / model / "training_history.json").read_text())
    pancreas = per_case.loc[per_case["class"] == "pancreas", "dice"]
    return {
        "final_val_dice_pancreas": metrics.get("final_val_dice_pancreas"),
        "final_val_dice_tumour": metrics.get("final_val_dice_tumour"),
        "validation_dice_pancreas_mean_3d": float(pancreas.mean()) if len(pancreas) else None,
        "epochs": len(history.get("loss", [])),
        "optimizer_steps": _last(history.get("optimizer_step", [])),
        "training_seconds": _last(history.get("training_seconds", [])),
        "first_epoch_learning_rate": (history.get("learning_rate") or [None])[0],
        "val_dice_pancreas_per_epoch": history.get("val_dice_pancreas", []),
    }


def run_kedro(project: Path, args: Sequence[str], log_path: Path, timeout: float) -> float:
    """``python -m kedro run *args`` in ``project``; epoch lines echoed as progress; returns the wall time."""
    command = [sys.executable, "-m", "kedro", "run", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(shlex.join(command) + "\n")
        process = subprocess.Popen(command, cwd=project, env=subprocess_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            progress = EPOCH_LINE.search(line)  # EpochProgress: "<model>: epoch k/n: ..."
            if progress:
                print(f"    {time.perf_counter() - start:6.0f} s  {progress.group(1)}: epoch {progress.group(2)}",
                      flush=True)
        try:
            returncode = process.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    wall = time.perf_counter() - start
    if returncode != 0:
        raise RuntimeError(f"kedro run {' '.join(args)} failed (rc={returncode}); log: {log_path}\n"
                           + log_path.read_text()[-4000:])
    return wall


def _report(args: argparse.Namespace, rows: list[dict], runs: list[dict], data_wall: float | None,
            complete: bool) -> dict[str, Any]:
    from pancreas_seg.learning.setup import merge_settings  # noqa: PLC0415

    training = _common.conf("base", "parameters_training.yml")["training"]
    if args.env != "base":
        training = merge_settings(training, _common.conf(args.env, "parameters.yml").get("training"))
    return {
        "benchmark": "lr_sweep",
        "command": "python -m benchmarks.lr_sweep " + shlex.join(sys.argv[1:]),
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=CHECKOUT, check=False).stdout.strip() or "unknown",
        "env": args.env,
        "data": "SYNTHETIC phantoms (ingestion.synthetic of the environment)",
        "budget": {key: training.get(key) for key in ("epochs", "steps_per_epoch", "batch_size", "lr_schedule", "seed")},
        "learning_rates": list(args.lrs),
        "models": list(args.models),
        "selection": f"per model, the rate with the highest {SELECTION_METRIC} (ties: the smaller rate)",
        "complete": complete,
        "data_pipeline_wall_s": data_wall,
        "runs": runs,
        "results": rows,
        "chosen": choose_learning_rates(rows),
        "machine": _common.machine_info(),
    }


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    from pancreas_seg.core.atomic import atomic_write_text  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, default=float) + "\n")


def print_results(rows: Sequence[Mapping[str, Any]]) -> None:
    chosen = choose_learning_rates(rows)
    table = []
    for row in sorted(rows, key=lambda r: (r["model"], r["learning_rate"])):
        mark = "*" if chosen.get(row["model"], {}).get("learning_rate") == row["learning_rate"] else ""
        table.append([row["model"], f"{row['learning_rate']:.0e}{mark}", _fmt(row["final_val_dice_pancreas"]),
                      _fmt(row["final_val_dice_tumour"]), _fmt(row["validation_dice_pancreas_mean_3d"]),
                      _fmt(row["optimizer_steps"], 0), _fmt(row["training_seconds"], 0)])
    _common.print_table(["model", "lr (*chosen)", "val Dice pancreas", "val Dice tumour", "3D val Dice pancreas",
                         "steps", "train s"], table)


def main(argv: Sequence[str] | None = None) -> int:
    from pancreas_seg.models.names import CASCADE_NAME, CASCADE_STAGE1, MODEL_NAMES  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="initial Adam rates")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=list(MODEL_NAMES))
    parser.add_argument("--env", default="base", help="Kedro environment of the runs (smoke: a quick check)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--workdir", type=Path, default=None, help="where the project copy goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the project copy")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per kedro run")
    args = parser.parse_args(argv)
    if CASCADE_NAME in args.models and CASCADE_STAGE1 not in args.models:
        parser.error(f"the cascade's stage 1 is the {CASCADE_STAGE1} of the same run: add {CASCADE_STAGE1} to --models")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lr_sweep_"))
    project = copy_project(CHECKOUT, workdir / "pancreas_seg")
    logs = workdir / "logs"
    env_args = [] if args.env == "base" else ["--env", args.env]
    rows: list[dict] = []
    runs: list[dict] = []
    data_wall = None
    started = time.perf_counter()
    print(f"lr sweep: {len(args.lrs)} rate(s) x {len(args.models)} model(s), env {args.env}, project {project}",
          flush=True)
    try:
        print("[data] kedro run --pipelines=data", flush=True)
        data_wall = run_kedro(project, ["--pipelines=data", *env_args], logs / "data.log", args.timeout)
        print(f"[data] done in {data_wall:.0f} s", flush=True)
        all_models = set(args.models) == set(MODEL_NAMES)
        for index, lr in enumerate(args.lrs, start=1):
            selection = [] if all_models else [f"--namespaces={','.join(args.models)}"]
            print(f"[{index}/{len(args.lrs)}] lr {lr:.0e}: training {', '.join(args.models)} "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)
            wall = run_kedro(project, ["--pipelines=training", *selection, *env_args,
                                       "--params", lr_params(args.models, lr)],
                             logs / f"training_lr{lr:.0e}.log", args.timeout)
            runs.append({"learning_rate": lr, "wall_s": wall})
            for model in args.models:
                result = {"model": model, "learning_rate": lr, **read_model_result(project, model)}
                first = result["first_epoch_learning_rate"]
                if first is None or not math.isclose(first, lr, rel_tol=1e-3):
                    raise RuntimeError(f"{model} trained with learning rate {first}, not {lr}: "
                                       f"is {lr_parameter(model)} the parameter that sets it?")
                rows.append(result)
                print(f"    {model:10s} lr {lr:.0e}: val Dice pancreas {_fmt(result['final_val_dice_pancreas'])}, "
                      f"3D {_fmt(result['validation_dice_pancreas_mean_3d'])}, {_fmt(result['optimizer_steps'], 0)} "
                      f"steps in {_fmt(result['training_seconds'], 0)} s", flush=True)
            write_atomically(args.output, _report(args, rows, runs, data_wall, complete=False))
            print(f"[{index}/{len(args.lrs)}] lr {lr:.0e} done in {wall:.0f} s", flush=True)
        write_atomically(args.output, _report(args, rows, runs, data_wall, complete=True))
    finally:
        if not args.keep:
            shutil.rmtree(project, ignore_errors=True)
    print(f"\nlr sweep finished in {time.perf_counter() - started:.0f} s; {args.output}\n")
    print_results(rows)
    for model, choice in choose_learning_rates(rows).items():
        print(f"{model}: learning_rate {choice['learning_rate']:.0e} ({SELECTION_METRIC} {choice[SELECTION_METRIC]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
