"""Training throughput through the project's ``SliceLoader`` vs. plain in-memory NumPy arrays.

What it measures
----------------
A small preprocessed data set is built once per run in a temporary folder: the first 8 cases of
the cached SYNTHETIC 512 px phantom set (``data/01_raw/benchmark_phantoms_512/``, written by
``preprocessing_benchmark.py`` / ``_common.ensure_phantoms_512`` if missing) go through
``preprocess_case(..., PreprocessingConfig(image_size_px=(96, 96), crop_to_body=True))`` (the
conf/base geometry) and are saved as ``<case>/image.npy`` (float32) and ``<case>/label.npy``
(uint8) shards, like the pipeline does.

For each architecture (``unet``, ``unet_small``, ``fcn``, ``vnet2d``) with the CPU defaults of
``conf/base/parameters_training.yml`` (base_filters 16, dropout 0.1, l2 1e-4; depth 4 for unet,
2 for unet_small, 5 for fcn with batch_norm; vnet2d depth 4 with base_filters 8), batch 8,
label_mode multiclass, compiled like the training pipeline (Adam, ``make_loss("dice_ce", ...)``,
``dice_metrics(...)``),
with ``retained_heap`` on as the training node runs it (``--no-retain-heap`` turns it off):

* ``loader``: ``model.fit(SliceLoader(np.load(mmap_mode="r") shards, batch_size=8,
  label_mode="multiclass", training=True, augmentation=AugmentationConfig(enabled=False),
  steps_per_epoch=STEPS, workers=1), epochs=1, verbose=0)`` (``workers=1`` as the pipeline passes);
* ``memory``: ``model.fit(x, y, batch_size=8, epochs=1, shuffle=True, steps_per_epoch=STEPS,
  verbose=0)`` with every slice stacked in RAM (``y`` one-hot float32; the slice count is trimmed
  to a multiple of ``STEPS * 8`` so every epoch has exactly ``STEPS`` full batches).

Throughput (``--variant interleaved``, one subprocess per architecture): one compiled model, one
warm-up epoch of each variant (graph tracing excluded), then ``--epochs`` rounds of one loader
epoch and one in-memory epoch, alternating which goes first. The epoch time comes from
``on_epoch_begin``/``on_epoch_end`` callbacks. The ratio loader/memory (training slices/s) is
computed per round and the median is reported (target >= 0.9). Interleaving on the same model in
the same process cancels most of the noise of a shared 2-core machine, which separate processes
minutes apart do not.

Allocator (``--variant heap``): what ``training.retain_heap`` buys. Per architecture, two fresh
processes train ``model.fit(loader, epochs=3)`` once, as the training node does: one inside
``retained_heap`` for the whole process, one with glibc's default malloc (order alternating
between architectures). Each reports the median training-step time of epochs 2-3 (per-batch
callbacks; epoch 1 includes tracing) and the minor page faults per step (``getrusage``). The
speed-up is default / retained step time. It cannot be interleaved inside one process: leaving
the retained state hands the heap back (``malloc_trim``), which the next epoch pays for.

Peak memory (``--variant loader`` / ``--variant memory``): each variant of each architecture runs
in its own fresh subprocess (data set up, model compiled, ``--rss-steps`` training steps) and
reports its own ``ru_maxrss``, so the variants never share a peak.

A third mode, ``data``, times the loader alone (no model, no TensorFlow graph): ``loader[i]``
for STEPS batches over several epochs, without and with the default ``AugmentationConfig()``,
with a per-stage split (sampling indices, gathering images, gathering labels, augmentation,
one-hot encoding). It also times an equivalent vectorised gather (one fancy-index per case
instead of one ``context_stack`` call per slice) as a candidate fix.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.loader_benchmark                       # all 4 architectures
    .venv/bin/python -m benchmarks.loader_benchmark --archs unet fcn --steps 10 --epochs 5
    # a single child by hand (the parent passes --data-dir of the shards it built):
    .venv/bin/python -m benchmarks.loader_benchmark --variant interleaved --arch unet --data-dir /tmp/x

The defaults (12 steps of 8 slices per timed epoch, 3 rounds) keep the total near 15 minutes on
a 2-core CPU, where one U-Net training step at 96 px takes about half a second; the loader itself
needs milliseconds per batch.
Results: ``data/08_reporting/benchmarks/loader_benchmark.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import _common

ARCH_DEFAULTS = {  # conf/base/parameters_training.yml: training.model + per-architecture overrides
    "unet": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
    "unet_small": {"base_filters": 16, "depth": 2, "dropout": 0.1, "l2_weight": 1e-4},
    "fcn": {"base_filters": 16, "depth": 5, "dropout": 0.1, "l2_weight": 1e-4, "batch_norm": True},
    "vnet2d": {"base_filters": 8, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
}
SIZE = (96, 96)
BATCH = 8
N_CASES = 8


# ------------------------------------------------------------------------------------------------
# Data set
# ------------------------------------------------------------------------------------------------
def build_shards(folder: Path, n_cases: int) -> dict:
    from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_case  # noqa: PLC0415

    root = _common.ensure_phantoms_512()
    config = PreprocessingConfig(image_size_px=SIZE, crop_to_body=True)
    n_slices = 0
    for image_path, label_path in _common.phantom_pairs(root, n_cases):
        case = preprocess_case(image_path, label_path, config, None)
        case_dir = folder / Path(image_path).name.removesuffix(".nii.gz")
        case_dir.mkdir(parents=True)
        np.save(case_dir / "image.npy", case.image)
        np.save(case_dir / "label.npy", case.label)
        n_slices += case.image.shape[0]
    return {"n_cases": n_cases, "n_slices": n_slices}


def open_cases(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {d.name: (np.load(d / "image.npy", mmap_mode="r"), np.load(d / "label.npy", mmap_mode="r"))
            for d in sorted(folder.iterdir()) if d.is_dir()}


# ------------------------------------------------------------------------------------------------
# Children
# ------------------------------------------------------------------------------------------------
def _setup_fit(args: argparse.Namespace):
    """Imports, the compiled model, the SliceLoader and the in-memory arrays of one child."""
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.augmentation import AugmentationConfig  # noqa: PLC0415
    from pancreas_seg.learning.loader import SliceLoader, encode_targets  # noqa: PLC0415
    from pancreas_seg.learning.losses import make_loss  # noqa: PLC0415
    from pancreas_seg.learning.metrics import dice_metrics  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    info = {"rss_after_imports_mib": _common.peak_rss_mib()}
    keras.utils.set_random_seed(42)
    cases = open_cases(Path(args.data_dir))
    loader = arrays = None
    if args.variant in ("loader", "interleaved", "heap"):
        loader = SliceLoader(cases, batch_size=BATCH, label_mode="multiclass", training=True,
                             augmentation=AugmentationConfig(enabled=False), seed=42,
                             steps_per_epoch=args.steps, workers=args.workers)
        info["dataset_slices"] = loader.n_slices
    if args.variant in ("memory", "interleaved"):
        x = np.concatenate([np.asarray(img, dtype=np.float32) for img, _ in cases.values()])[..., None]
        y = encode_targets(np.concatenate([np.asarray(lab) for _, lab in cases.values()]), "multiclass")
        info["dataset_slices"] = len(x)
        keep = (len(x) // (args.steps * BATCH)) * args.steps * BATCH  # every epoch: STEPS full batches
        arrays = (x[:keep], y[:keep])
        info["memory_slices_used"] = keep
    info["rss_after_data_mib"] = _common.peak_rss_mib()
    model = build_model(args.arch, (*SIZE, 1), "multiclass", **ARCH_DEFAULTS[args.arch])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=2e-3),
                  loss=make_loss("dice_ce", "multiclass", 1.0), metrics=dice_metrics("multiclass"))
    info["params"] = int(model.count_params())
    return keras, model, loader, arrays, info


def _minor_faults() -> int:
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _fit_epoch(model, loader, arrays, steps: int) -> tuple[float, float, int]:
    """One ``model.fit(..., epochs=1)``: (epoch time from callbacks, wall time of fit, minor faults)."""
    t0, faults = time.perf_counter(), _minor_faults()
    if loader is not None:
        epoch_s = _common.fit_epoch_seconds(model, loader)
    else:
        epoch_s = _common.fit_epoch_seconds(model, *arrays, batch_size=BATCH, shuffle=True, steps_per_epoch=steps)
    return epoch_s, time.perf_counter() - t0, _minor_faults() - faults


def child_fit(args: argparse.Namespace) -> dict:
    """``loader`` / ``memory``: peak RSS of a short fit (compile + a few steps) in its own process."""
    keras, model, loader, arrays, info = _setup_fit(args)
    epoch_s, fit_s, _ = _fit_epoch(model, loader, arrays, args.steps)
    return {"variant": args.variant, "arch": args.arch, "steps": args.steps, **info,
            "first_epoch_s": epoch_s, "first_fit_wall_s": fit_s}


def child_interleaved(args: argparse.Namespace) -> dict:
    """Both variants on one model in one process, epochs alternating, so noise hits both alike."""
    keras, model, loader, arrays, info = _setup_fit(args)
    variants = {"loader": (loader, None), "memory": (None, arrays)}
    warm = {name: _fit_epoch(model, *variants[name], args.steps)[0] for name in variants}
    epochs: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[int]] = {name: [] for name in variants}
    ratios = []
    for r in range(args.epochs):
        for name in ("loader", "memory") if r % 2 == 0 else ("memory", "loader"):
            epoch_s, _, epoch_faults = _fit_epoch(model, *variants[name], args.steps)
            epochs[name].append(epoch_s)
            faults[name].append(epoch_faults)
        ratios.append(epochs["memory"][-1] / epochs["loader"][-1])  # = loader sl/s / memory sl/s
    slices = args.steps * BATCH
    return {"variant": "interleaved", "arch": args.arch, "steps_per_epoch": args.steps,
            "workers": args.workers, "retain_heap": args.retain_heap, **info, "warmup_epoch_s": warm,
            "epoch_s": epochs, "minor_faults_per_step": {k: _common.median(v) / args.steps
                                                         for k, v in faults.items()},
            "loader_slices_per_s": slices / _common.median(epochs["loader"]),
            "memory_slices_per_s": slices / _common.median(epochs["memory"]),
            "round_ratios": ratios, "ratio_loader_over_memory": _common.median(ratios)}


def child_heap(args: argparse.Namespace) -> dict:
    """One 3-epoch ``fit`` through the loader, as the training node runs it; step times and faults."""
    keras, model, loader, _, info = _setup_fit(args)
    steps: list[list[float]] = []
    faults: list[int] = []

    class StepTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            steps.append([])
            faults.append(_minor_faults())

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            steps[-1].append(time.perf_counter() - self.t0)

        def on_epoch_end(self, epoch, logs=None):
            faults[-1] = _minor_faults() - faults[-1]

    model.fit(loader, epochs=3, verbose=0, callbacks=[StepTimer()])
    timed = [t for epoch in steps[1:] for t in epoch]
    return {"variant": "heap", "arch": args.arch, "retain_heap": args.retain_heap, **info,
            "steps_per_epoch": args.steps, "median_step_s": _common.median(timed),
            "minor_faults_per_step": sum(faults[1:]) / len(timed), "step_s_per_epoch": steps}


def _vectorised_batch(images: list, labels: list, case_of: np.ndarray, z_of: np.ndarray,
                      slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate fix: one sorted fancy-index read per case, scattered into preallocated arrays."""
    h, w = images[0].shape[1:]
    out_x = np.empty((len(slices), h, w, 1), dtype=np.float32)
    out_y = np.empty((len(slices), h, w), dtype=np.uint8)
    cases = case_of[slices]
    for c in np.unique(cases):
        pos = np.flatnonzero(cases == c)
        zs = z_of[slices[pos]]
        out_x[pos, ..., 0] = images[c][zs]
        out_y[pos] = labels[c][zs]
    return out_x, out_y


def _one_hot_fast(labels: np.ndarray) -> np.ndarray:
    """Candidate fix for encode_targets: compare against the class index instead of np.eye gather."""
    return (labels[..., None] == np.arange(3, dtype=labels.dtype)).astype(np.float32)


def child_data(args: argparse.Namespace) -> dict:
    from pancreas_seg.imaging.preprocess import context_stack  # noqa: PLC0415
    from pancreas_seg.learning.augmentation import AugmentationConfig, augment_batch  # noqa: PLC0415
    from pancreas_seg.learning.loader import SliceLoader, encode_targets  # noqa: PLC0415

    cases = open_cases(Path(args.data_dir))
    epochs = max(3, args.epochs)
    result: dict = {"variant": "data", "steps_per_epoch": args.steps, "epochs": epochs}
    for name, aug in (("no_aug", AugmentationConfig(enabled=False)), ("aug", AugmentationConfig())):
        loader = SliceLoader(cases, batch_size=BATCH, label_mode="multiclass", training=True,
                             augmentation=aug, seed=42, steps_per_epoch=args.steps)
        loader[0]  # touch pages once
        per_batch = []
        for _ in range(epochs):
            for i in range(len(loader)):
                t0 = time.perf_counter()
                loader[i]
                per_batch.append(time.perf_counter() - t0)
            loader.on_epoch_end()
        result[f"{name}_ms_per_batch"] = 1e3 * _common.median(per_batch)
        result[f"{name}_slices_per_s"] = BATCH / _common.median(per_batch)

    # stage split of __getitem__ (same calls, timed one by one), plus candidate fixes
    loader = SliceLoader(cases, batch_size=BATCH, label_mode="multiclass", training=True,
                         augmentation=AugmentationConfig(), seed=42, steps_per_epoch=args.steps)
    stages = {k: [] for k in ("batch_indices", "gather_images", "gather_labels", "augment",
                              "encode_targets", "vectorised_gather", "one_hot_fast")}
    for epoch in range(epochs):
        loader.epoch = epoch
        for i in range(len(loader)):
            t0 = time.perf_counter()
            slices = loader.batch_indices(i)
            t1 = time.perf_counter()
            images = np.stack([context_stack(loader._images[loader._case_of[s]],
                                             np.array([loader._z_of[s]]), 1)[0] for s in slices])
            t2 = time.perf_counter()
            labels = np.stack([np.asarray(loader._labels[loader._case_of[s]][loader._z_of[s]])
                               for s in slices])
            t3 = time.perf_counter()
            aug_images, aug_labels = augment_batch(images, labels, loader.augmentation,
                                                   np.random.default_rng([42, epoch, i, 1]))
            t4 = time.perf_counter()
            encoded = encode_targets(aug_labels, "multiclass")
            t5 = time.perf_counter()
            vx, vy = _vectorised_batch(loader._images, loader._labels, loader._case_of, loader._z_of, slices)
            t6 = time.perf_counter()
            fast = _one_hot_fast(aug_labels)
            t7 = time.perf_counter()
            assert np.array_equal(vx, images) and np.array_equal(vy, labels)
            assert np.array_equal(fast, encoded)
            for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6),
                               strict=True):
                stages[key].append(dt)
    result["stage_ms_per_batch"] = {k: 1e3 * _common.median(v) for k, v in stages.items()}
    return result


def child(args: argparse.Namespace) -> None:
    from pancreas_seg.core.runtime import retained_heap  # noqa: PLC0415

    if args.variant == "data":
        result = child_data(args)
    else:
        run = {"interleaved": child_interleaved, "heap": child_heap}.get(args.variant, child_fit)
        with retained_heap(args.retain_heap):  # for the whole child, as the training node around fit
            result = run(args)
    _common.emit_result(result)


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------
def parent(args: argparse.Namespace) -> None:
    module = __spec__.name   # this module (also as __main__): each variant runs it with python -m
    folder = Path(tempfile.mkdtemp(prefix="bench_loader_shards_"))
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    t_start = time.perf_counter()
    try:
        print(f"Building {args.n_cases} preprocessed {SIZE[0]} px cases in {folder} ...", flush=True)
        dataset = build_shards(folder, args.n_cases)
        print(f"  {dataset['n_slices']} slices", flush=True)
        base = ["--data-dir", str(folder), "--workers", str(args.workers)]
        common = [*base, *([] if args.retain_heap else ["--no-retain-heap"])]
        data = _common.run_variant(module, ["--variant", "data", *common, "--steps", "20",
                                            "--epochs", "3"], env=env)
        print(f"  data only: {data['no_aug_ms_per_batch']:.1f} ms/batch (no aug), "
              f"{data['aug_ms_per_batch']:.1f} ms/batch (aug)", flush=True)
        timing, rss, heap = [], [], []
        for k, arch in enumerate(args.archs):
            result = _common.run_variant(module, ["--variant", "interleaved", "--arch", arch, *common,
                                                  "--steps", str(args.steps), "--epochs", str(args.epochs)],
                                         env=env)
            timing.append(result)
            print(f"  {arch:<10} interleaved: loader {result['loader_slices_per_s']:6.2f} sl/s, memory "
                  f"{result['memory_slices_per_s']:6.2f} sl/s, ratio {result['ratio_loader_over_memory']:.3f} "
                  f"(rounds {[round(x, 3) for x in result['round_ratios']]})", flush=True)
            for retain in (True, False) if k % 2 == 0 else (False, True):
                r = _common.run_variant(module, ["--variant", "heap", "--arch", arch, *base,
                                                 "--steps", str(args.steps),
                                                 *([] if retain else ["--no-retain-heap"])], env=env)
                heap.append(r)
                print(f"  {arch:<10} heap {'retained' if retain else 'default':<8}: median step "
                      f"{r['median_step_s']:.3f} s, {r['minor_faults_per_step']:.0f} minor faults/step", flush=True)
            order = ("loader", "memory") if k % 2 == 0 else ("memory", "loader")
            for variant in order:
                r = _common.run_variant(module, ["--variant", variant, "--arch", arch, *common,
                                                 "--steps", str(args.rss_steps)], env=env)
                rss.append(r)
                print(f"  {arch:<10} {variant:<7} own process: peak RSS {r['peak_rss_mib']:.0f} MiB "
                      f"(after imports {r['rss_after_imports_mib']:.0f}, after data {r['rss_after_data_mib']:.0f})",
                      flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows, summary = [], {}
    for arch in args.archs:
        t = next(r for r in timing if r["arch"] == arch)
        lo = next(r for r in rss if r["arch"] == arch and r["variant"] == "loader")
        me = next(r for r in rss if r["arch"] == arch and r["variant"] == "memory")
        ratio = t["ratio_loader_over_memory"]
        he = next(r for r in heap if r["arch"] == arch and r["retain_heap"])
        hd = next(r for r in heap if r["arch"] == arch and not r["retain_heap"])
        heap_speedup = hd["median_step_s"] / he["median_step_s"]
        rss_ratio = lo["peak_rss_mib"] / me["peak_rss_mib"]
        summary[arch] = {"loader_slices_per_s": t["loader_slices_per_s"],
                         "memory_slices_per_s": t["memory_slices_per_s"],
                         "throughput_ratio_loader_over_memory": ratio, "pass_ge_0.9": ratio >= 0.9,
                         "round_ratios": t["round_ratios"],
                         "median_step_s_retained_heap": he["median_step_s"],
                         "median_step_s_default_heap": hd["median_step_s"],
                         "retain_heap_speedup": heap_speedup,
                         "minor_faults_per_step_retained_heap": he["minor_faults_per_step"],
                         "minor_faults_per_step_default_heap": hd["minor_faults_per_step"],
                         "loader_peak_rss_mib": lo["peak_rss_mib"], "memory_peak_rss_mib": me["peak_rss_mib"],
                         "peak_rss_ratio_loader_over_memory": rss_ratio,
                         "loader_data_rss_mib": lo["rss_after_data_mib"] - lo["rss_after_imports_mib"],
                         "memory_data_rss_mib": me["rss_after_data_mib"] - me["rss_after_imports_mib"]}
        rows.append([arch, t["loader_slices_per_s"], t["memory_slices_per_s"], round(ratio, 3),
                     "PASS" if ratio >= 0.9 else "FAIL", round(lo["peak_rss_mib"]), round(me["peak_rss_mib"]),
                     round(rss_ratio, 3), round(hd["median_step_s"], 3), round(he["median_step_s"], 3),
                     round(heap_speedup, 2)])
    print()
    _common.print_table(["arch", "loader sl/s", "memory sl/s", "ratio", ">=0.9", "loader RSS MiB",
                         "memory RSS MiB", "RSS ratio", "step s (default heap)", "step s (retained)",
                         "heap speed-up"], rows)
    print(f"\nLoader alone (median ms per batch of {BATCH}): no augmentation "
          f"{data['no_aug_ms_per_batch']:.2f} ms ({data['no_aug_slices_per_s']:.0f} slices/s), "
          f"default augmentation {data['aug_ms_per_batch']:.2f} ms ({data['aug_slices_per_s']:.0f} slices/s)")
    print("Stage split (ms per batch):", {k: round(v, 3) for k, v in data["stage_ms_per_batch"].items()})
    path = _common.write_report("loader_benchmark", {
        "settings": {"archs": args.archs, "steps_per_epoch": args.steps, "timed_rounds": args.epochs,
                     "rss_steps": args.rss_steps, "batch_size": BATCH, "image_size_px": SIZE,
                     "retain_heap": args.retain_heap,
                     "loader_workers": args.workers,
                     "arch_params": {a: ARCH_DEFAULTS[a] for a in args.archs}, **dataset},
        "summary": summary, "data_only": data, "timing_runs": timing, "rss_runs": rss, "heap_runs": heap,
        "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("interleaved", "loader", "memory", "data", "heap"), default=None,
                        help="child mode (the parent runs these in subprocesses)")
    parser.add_argument("--arch", choices=tuple(ARCH_DEFAULTS), default="unet")
    parser.add_argument("--archs", nargs="+", choices=tuple(ARCH_DEFAULTS), default=list(ARCH_DEFAULTS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n-cases", type=int, default=N_CASES)
    parser.add_argument("--steps", type=int, default=12, help="training batches per timed epoch")
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed rounds (one loader + one in-memory epoch each) after the warm-up")
    parser.add_argument("--rss-steps", type=int, default=2, help="steps of the peak-RSS children")
    parser.add_argument("--workers", type=int, default=1, help="SliceLoader workers (pipeline: 1)")
    parser.add_argument("--no-retain-heap", dest="retain_heap", action="store_false",
                        help="glibc default malloc in the throughput and RSS children (pipeline: retained)")
    args = parser.parse_args()
    if args.variant is None:
        parent(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
