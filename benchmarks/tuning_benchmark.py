"""Tuning throughput: the SAME trials with 1 worker process and with 2, in one invocation.

What it measures
----------------
A small SYNTHETIC data set is built once per run in a temporary folder: ``--cases`` phantoms drawn
with the ``conf/base`` phantom settings (256 px, 1.4-1.8 mm pixels, 2-5 mm slices; seed 4242, not
the pipeline's seed) are preprocessed with ``conf/base/parameters_preprocessing.yml`` (96 px,
``crop_to_body``) into ``<case>/image.npy`` / ``label.npy`` shards; 70 % of the cases are ``train``,
the rest ``validation`` (19 cases: 13 / 6, as the ``conf/base`` split of its 24 phantoms).

Each *variant* is one fresh Optuna study (its own journal file) of ``--arch`` (default ``unet``,
the ``conf/base`` settings) that runs the same fixed trials: ``--trials`` parameter sets are
enqueued (``study.enqueue_trial``; same batch size 8 for all, so every trial costs the same; the
learning rate, loss, Dice smooth, dropout and L2 differ), pruning is off, and every trial trains
``--epochs`` epochs of ``--steps`` batches (default: ``tuning.trial`` of ``conf/base``, 4 x 30, the
trials ``kedro run --pipelines=tune`` runs) and validates after each epoch. The study is run by
``pancreas_seg.tuning.workers.run_study``, the code ``kedro run --pipelines=tune`` runs, with

* ``1x<cores>``: one worker process with every core's threads,
* ``2x<cores // 2>``: two worker processes with ``cores // 2`` threads each (pinned to cores of
  their own if ``tuning.pin_cores`` of ``conf/base`` says so; then the name ends in ``-pinned``),
* optionally (``--diagnose``) ``1x1``: one worker with one thread, alone on the machine (its trial
  time against ``1x<cores>``: how much TensorFlow's extra threads help; against the 2-worker
  trials: how much two workers slow each other down), and the two workers with the other
  ``pin_cores`` choice (what pinning each worker to its own cores changes),

without MLflow logging. The wall time is measured from ``run_study``'s call to its return, so it
includes spawning the workers, importing TensorFlow in each and tracing the model in every trial
(as in a real study). From the journal it also reports the median trial duration and each
worker's start-up (round start to its first trial's start).

``--rounds`` repeats the variants, alternating their order (1-2, 2-1, ...), so a change of load on
the shared machine hits both; the speed-up is median(1 worker) / median(2 workers) of the wall
times and also given per round. Target on 2 cores: >= 0.9 (parallel tuning not slower than one worker with both cores).

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.tuning_benchmark                      # 4 trials x 4 epochs x 30 steps, 3 rounds
    .venv/bin/python -m benchmarks.tuning_benchmark --rounds 1 --epochs 2 --steps 20 --diagnose

Results: ``data/08_reporting/benchmarks/tuning_benchmark.json`` and a table on stdout. On a
2-core CPU one round of the defaults takes about 4 minutes (``--diagnose`` doubles it).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import _common

PHANTOM_SEED = 4242
#: The fixed trials (dotted names of conf/base's search space); batch size 8 for all.
TRIALS = [
    {"learning_rate": 2e-3, "batch_size": 8, "loss": "dice_ce", "dice_smooth": 1.0, "model.dropout": 0.1,
     "model.l2_weight": 1e-4},
    {"learning_rate": 5e-3, "batch_size": 8, "loss": "soft_dice", "dice_smooth": 0.1, "model.dropout": 0.2,
     "model.l2_weight": 1e-5},
    {"learning_rate": 1e-3, "batch_size": 8, "loss": "dice_ce", "dice_smooth": 3.0, "model.dropout": 0.0,
     "model.l2_weight": 1e-3},
    {"learning_rate": 3e-3, "batch_size": 8, "loss": "soft_dice", "dice_smooth": 1.0, "model.dropout": 0.3,
     "model.l2_weight": 1e-6},
]


def base_parameters() -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from pancreas_seg.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    return OmegaConfigLoader(str(_common.REPO_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"})[
        "parameters"]


def build_data(folder: Path, params: dict[str, Any], n_cases: int) -> tuple[pd.DataFrame, dict[str, str], int]:
    """Phantoms -> shards; returns the manifest (case_id, split), the shard files and the slice count."""
    from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_case  # noqa: PLC0415
    from pancreas_seg.phantoms import PhantomConfig, write_synthetic_task07  # noqa: PLC0415

    phantom = dict(params["ingestion"]["synthetic"]["phantom"])
    config = PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in phantom.items()})
    raw = write_synthetic_task07(folder / "raw", n_train=n_cases, n_test=0, config=config, seed=PHANTOM_SEED)
    preprocessing = PreprocessingConfig.from_params(params["preprocessing"])
    rows, shards, n_slices = [], {}, 0
    for i, (image_path, label_path) in enumerate(_common.phantom_pairs(raw)):
        case_id = Path(image_path).name.removesuffix(".nii.gz")
        case = preprocess_case(image_path, label_path, preprocessing, None)
        case_dir = folder / "shards" / case_id
        case_dir.mkdir(parents=True)
        for kind, array in (("image", case.image), ("label", case.label)):
            np.save(case_dir / f"{kind}.npy", array)
            shards[f"{case_id}/{kind}"] = str(case_dir / f"{kind}.npy")
        rows.append({"case_id": case_id, "split": "train" if i < round(0.7 * n_cases) else "validation"})
        n_slices += case.image.shape[0]
    return pd.DataFrame(rows), shards, n_slices


def run_variant(workers: int, threads: int, pin: bool, folder: Path, context: Any, config: Any) -> dict[str, Any]:
    """One fresh study with the fixed trials, run by ``workers`` processes of ``threads`` threads
    (each pinned to its own cores if ``pin`` and there are several)."""
    import optuna  # noqa: PLC0415

    from pancreas_seg.tuning.storage import open_storage, open_study  # noqa: PLC0415
    from pancreas_seg.tuning.workers import run_study  # noqa: PLC0415

    name = f"{workers}x{threads}" + ("-pinned" if pin and workers > 1 else "")
    path = folder / f"study-{name}-{time.time_ns()}.optuna.log"
    study = open_study(open_storage(path), context.study_name, {"benchmark": workers})
    for params in TRIALS[:config.n_trials]:
        study.enqueue_trial(params)
    start_wall, start = time.time(), time.perf_counter()
    run_study(context, config, path, n_workers=workers, threads=threads, pin_cores=pin)
    wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=context.study_name, storage=open_storage(path)).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * config.n_trials, [t.state.name for t in trials]
    assert [t.params for t in trials] == TRIALS[:config.n_trials], "the enqueued trials ran, in order"
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    first_start: dict[int, float] = {}
    for t in trials:
        pid = t.user_attrs["worker_pid"]
        first_start[pid] = min(first_start.get(pid, np.inf), t.datetime_start.timestamp() - start_wall)
    return {"variant": name, "pinned": pin and workers > 1, "workers": workers, "threads_per_worker": threads, "wall_s": wall,
            "trial_s": durations, "median_trial_s": _common.median(durations),
            "worker_startup_s": sorted(first_start.values()), "values": [t.value for t in trials]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--trials", type=int, default=4, choices=range(1, len(TRIALS) + 1))
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: conf/base tuning.trial)")
    parser.add_argument("--steps", type=int, default=None, help="training batches per epoch (default: conf/base)")
    parser.add_argument("--cases", type=int, default=19, help="phantom cases (70 %% train, 30 %% validation)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of the variants")
    parser.add_argument("--diagnose", action="store_true", help="also run 1 worker x 1 thread")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pancreas_seg.tuning.config import TuningConfig, available_cores  # noqa: PLC0415
    from pancreas_seg.tuning.objective import TrialContext  # noqa: PLC0415

    t_start = time.perf_counter()
    params = base_parameters()
    args.epochs = args.epochs or int(params["tuning"]["trial"]["epochs"])
    args.steps = args.steps or int(params["tuning"]["trial"]["steps_per_epoch"])
    cores = available_cores()
    folder = Path(tempfile.mkdtemp(prefix="tuning_benchmark_"))
    try:
        manifest, shards, n_slices = build_data(folder, params, args.cases)
        config = TuningConfig.from_params({
            **params["tuning"], "n_trials": args.trials,
            "pruner": {"n_startup_trials": 10_000},           # never prune: every trial runs all epochs
            "trial": {**params["tuning"]["trial"], "epochs": args.epochs, "steps_per_epoch": args.steps},
        }, args.arch)
        settings = config.trial_settings(params["training"], params[args.arch]["architecture"])
        context = TrialContext(architecture=args.arch, study_name=args.arch, settings=settings,
                               search_space=config.search_space, preprocessing=params["preprocessing"],
                               case_manifest=manifest, shards=shards, mlflow=None)
        print(f"{args.cases} phantom cases ({n_slices} slices at 96 px; {(manifest['split'] == 'train').sum()} train), "
              f"{args.trials} trials x {args.epochs} epochs x {args.steps} steps of batch 8, {cores} cores, "
              f"load average {os.getloadavg()}", flush=True)
        half = max(1, cores // 2)
        pin = config.pin_cores
        variants = [(1, cores, pin), (2, half, pin)] + ([(1, 1, pin), (2, half, not pin)] if args.diagnose else [])
        runs: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            for workers, threads, pin in variants if round_index % 2 == 0 else variants[::-1]:
                result = run_variant(workers, threads, pin, folder, context, config)
                result["round"] = round_index
                runs.append(result)
                print(f"round {round_index + 1}: {result['variant']} (workers x threads): {result['wall_s']:.1f} s "
                      f"(median trial {result['median_trial_s']:.1f} s; load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def of(name: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["variant"] == name]

    one_name = f"1x{cores}"
    two_name = f"2x{max(1, cores // 2)}" + ("-pinned" if config.pin_cores else "")
    one, two = _common.median([r["wall_s"] for r in of(one_name)]), _common.median([r["wall_s"] for r in of(two_name)])
    round_ratios = [next(r["wall_s"] for r in of(one_name) if r["round"] == i)
                    / next(r["wall_s"] for r in of(two_name) if r["round"] == i) for i in range(args.rounds)]
    names = [f"{w}x{t}" + ("-pinned" if pinned and w > 1 else "") for w, t, pinned in variants]
    rows = [[f"{name} (workers x threads)", _common.median([r["wall_s"] for r in of(name)]),
             _common.median([r["median_trial_s"] for r in of(name)]),
             _common.median([max(r["worker_startup_s"]) for r in of(name)]),
             " ".join(f"{r['wall_s']:.0f}" for r in of(name))] for name in names]
    print()
    _common.print_table(["variant", "median wall s", "median trial s", "worker start-up s", "all walls s"], rows)
    print(f"\nspeed-up 2 workers vs 1: {one / two:.2f}x (median walls; per round "
          f"{', '.join(f'{r:.2f}' for r in round_ratios)}); target >= 0.9: {'PASS' if one / two >= 0.9 else 'FAIL'}")
    path = _common.write_report("tuning_benchmark", {
        "settings": {"arch": args.arch, "trials": TRIALS[:args.trials], "epochs": args.epochs, "steps": args.steps,
                     "batch_size": 8, "cases": args.cases, "slices": n_slices, "rounds": args.rounds, "cores": cores,
                     "variants": names},
        "summary": {"median_wall_s_1_worker": one, "median_wall_s_2_workers": two, "speedup": one / two,
                    "round_speedups": round_ratios, "pass_ge_0.9": one / two >= 0.9,
                    "median_trial_s": {name: _common.median([r["median_trial_s"] for r in of(name)]) for name in names}},
        "runs": runs, "total_wall_s": time.perf_counter() - t_start})
    print(f"wrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
