"""Inference seconds per volume: ``pancreas_seg.prediction.segment_volume`` end to end, per architecture.

What it measures
----------------
One SYNTHETIC 512 x 512 x ~100 phantom (case ``pancreas_001`` of the cached set under
``data/01_raw/benchmark_phantoms_512/``, written on first use) is segmented at 256 x 256 model
input, exactly as the inference pipeline does: ``load_nifti(path)`` (int16 HU in file order),
then ``segment_volume(model, hu, affine, PreprocessingConfig(image_size_px=(256, 256),
crop_to_body=True), None, batch_size=16)`` - preprocessing, slice-wise ``predict_on_batch`` and
mapping the labels back onto the 512 x 512 x Z grid. As in the inference pipeline the forward pass
is compiled with XLA (``prediction.use_xla``; ``--no-xla`` measures without it).

Models (untrained weights are fine for timing; label_mode multiclass): ``unet`` with
base_filters 32 and depth 4 (the study's setup), ``unet_b16`` (the U-Net width of
``conf/base/parameters_training.yml``: 16, depth 4); ``unet_small`` (16, depth 2), ``fcn`` (16,
depth 5) and ``vnet2d`` (16, depth 4). Each model is built, saved to a temporary ``.keras`` file
and loaded back with ``pancreas_seg.model_store.load_keras_model`` (safe mode), as inference does.

Each architecture runs in its own fresh subprocess (own peak RSS). A warm-up call on a short
volume with ``16 + Z % 16`` slices traces (and XLA-compiles) the one padded batch shape, so that
one-off cost is reported separately as ``warmup_s``; then ``--repeats`` full-volume calls are timed (median reported). The split between
preprocessing (``preprocess_image``), prediction (``predict_slices``) and restore
(``labels_from_probabilities``) is measured inside the same ``segment_volume`` calls by wrapping
those three module-level functions of ``pancreas_seg.prediction`` with timers.

Target (issue "inference seconds per volume"): U-Net at 256 x 256 <= 30 s per volume on 2 cores.

How to run (from the repository root)
-------------------------------------
    .venv/bin/python benchmarks/inference_benchmark.py                       # all 4, 3 repeats
    .venv/bin/python benchmarks/inference_benchmark.py --archs unet unet_b16 --repeats 5
    .venv/bin/python benchmarks/inference_benchmark.py --archs unet --no-xla   # without XLA
    .venv/bin/python benchmarks/inference_benchmark.py --archs unet --retain-heap   # allocator experiment
    .venv/bin/python benchmarks/inference_benchmark.py --variant unet        # one child by hand

Results: ``data/08_reporting/benchmarks/inference_benchmark.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import numpy as np  # noqa: E402

SIZE = (256, 256)
BATCH = 16
ARCHS = {  # the study's U-Net width; the others with their CPU defaults (dropout 0.1, l2 1e-4)
    "unet": {"base_filters": 32, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
    "unet_b16": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},  # conf/base width
    "unet_small": {"base_filters": 16, "depth": 2, "dropout": 0.1, "l2_weight": 1e-4},
    "fcn": {"base_filters": 16, "depth": 5, "dropout": 0.1, "l2_weight": 1e-4},
    "vnet2d": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
}


def child(arch: str, repeats: int, case_index: int, xla: bool, retain_heap: bool = False) -> None:
    import keras  # noqa: PLC0415

    import pancreas_seg.prediction as prediction  # noqa: PLC0415
    from pancreas_seg.imaging.nifti_io import load_nifti  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import PreprocessingConfig  # noqa: PLC0415
    from pancreas_seg.model_store import load_keras_model  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    rss_after_imports = _common.peak_rss_mib()
    keras.utils.set_random_seed(0)
    image_path, _ = _common.phantom_pairs(_common.PHANTOM_ROOT)[case_index]
    ct = load_nifti(image_path)
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        path = Path(tmp) / f"{arch}.keras"
        built = build_model(arch.removesuffix("_b16"), (*SIZE, 1), "multiclass", **ARCHS[arch])
        params = int(built.count_params())
        built.save(path)
        del built
        keras.backend.clear_session()
        t0 = time.perf_counter()
        model = load_keras_model(path)
        xla_on = prediction.use_xla(model, xla)   # as the inference pipeline does (inference.xla)
        load_s = time.perf_counter() - t0

    # time the three stages inside segment_volume by wrapping the names it looks up
    stage_times: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stage_times[name] = stage_times.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    prediction.preprocess_image = timed("preprocess", prediction.preprocess_image)
    prediction.predict_slices = timed("predict", prediction.predict_slices)
    prediction.labels_from_probabilities = timed("restore", prediction.labels_from_probabilities)

    config = PreprocessingConfig(image_size_px=SIZE, crop_to_body=True)  # conf/base framing
    n_z = ct.array.shape[2]
    warm_z = BATCH + n_z % BATCH
    t0 = time.perf_counter()
    prediction.segment_volume(model, ct.array[:, :, :warm_z], ct.affine, config, None, batch_size=BATCH)
    warmup_s = time.perf_counter() - t0

    from pancreas_seg.runtime import retained_heap  # noqa: PLC0415

    runs = []
    for _ in range(repeats):
        stage_times.clear()
        t0 = time.perf_counter()
        with retained_heap(retain_heap):
            labels = prediction.segment_volume(model, ct.array, ct.affine, config, None, batch_size=BATCH)
        total = time.perf_counter() - t0
        assert labels.shape == ct.array.shape and labels.dtype == np.uint8
        runs.append({"total_s": total, **dict(stage_times)})
    med = {k: _common.median([r[k] for r in runs]) for k in runs[0]}
    _common.emit_result({
        "arch": arch, "params": params, "model_settings": ARCHS[arch], "case": Path(image_path).name,
        "volume_shape": list(ct.array.shape), "slices": n_z, "load_model_s": load_s,
        "warmup_s": warmup_s, "warmup_slices": warm_z, "runs": runs, "median": med,
        "seconds_per_volume": med["total_s"], "slices_per_s": n_z / med["total_s"],
        "rss_after_imports_mib": rss_after_imports, "xla": xla_on, "retain_heap": retain_heap,
        "keras_backend": keras.backend.backend()})


def parent(args: argparse.Namespace) -> None:
    _common.ensure_phantoms_512()
    script = Path(__file__).resolve()
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    t_start = time.perf_counter()
    results = []
    for arch in args.archs:
        r = _common.run_variant(script, ["--variant", arch, "--repeats", str(args.repeats),
                                         "--case-index", str(args.case_index),
                                         *([] if args.xla else ["--no-xla"]),
                                         *(["--retain-heap"] if args.retain_heap else [])], env=env, timeout=3600)
        results.append(r)
        print(f"  {arch:<10}: {r['seconds_per_volume']:7.2f} s/volume ({r['slices_per_s']:.2f} slices/s), "
              f"runs {[round(x['total_s'], 1) for x in r['runs']]}, XLA {r['xla']}, warm-up (compile) "
              f"{r['warmup_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
              flush=True)
    rows = []
    for r in results:
        m = r["median"]
        rows.append([r["arch"], f"{r['params'] / 1e6:.2f}M", r["slices"], round(m["total_s"], 2),
                     round(r["slices_per_s"], 2), round(m["preprocess"], 2), round(m["predict"], 2),
                     round(m["restore"], 2), f"{100 * m['predict'] / m['total_s']:.0f}%",
                     round(r["peak_rss_mib"])])
    print()
    _common.print_table(["arch", "params", "slices", "s/volume", "slices/s", "preprocess s", "predict s",
                         "restore s", "predict %", "peak RSS MiB"], rows)
    checks = {}
    for key, label in (("unet", "U-Net, the study's width (base 32, depth 4)"),
                       ("unet_b16", "U-Net, conf/base width (base 16, depth 4)")):
        unet = next((r for r in results if r["arch"] == key), None)
        if unet is not None:
            checks[f"{key}_256_le_30s_per_volume"] = unet["seconds_per_volume"] <= 30.0
            print(f"\n{label} at 256 px: {unet['seconds_per_volume']:.1f} s per volume -> "
                  f"{'PASS' if checks[f'{key}_256_le_30s_per_volume'] else 'FAIL'} (target <= 30 s)")
    path = _common.write_report("inference_benchmark", {
        "settings": {"archs": args.archs, "repeats": args.repeats, "image_size_px": SIZE, "batch_size": BATCH,
                     "xla": args.xla, "retain_heap": args.retain_heap, "crop_to_body": True,
                     "case_index": args.case_index},
        "results": results, "checks": checks, "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=tuple(ARCHS), default=None, help="child mode: one architecture")
    parser.add_argument("--archs", nargs="+", choices=tuple(ARCHS), default=list(ARCHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case-index", type=int, default=0, help="which cached phantom (0 = pancreas_001)")
    parser.add_argument("--no-xla", dest="xla", action="store_false", help="predict without XLA (inference.xla: false)")
    parser.add_argument("--retain-heap", action="store_true",
                        help="run segment_volume inside pancreas_seg.runtime.retained_heap (not what inference does)")
    args = parser.parse_args()
    if args.variant is None:
        parent(args)
    else:
        child(args.variant, args.repeats, args.case_index, args.xla, args.retain_heap)


if __name__ == "__main__":
    main()
