"""Inference seconds per volume: the inference node's per-case code end to end, per architecture.

What it measures
----------------
One SYNTHETIC 512 x 512 x ~100 phantom (case ``pancreas_001`` of the cached set under
``data/01_raw/benchmark_phantoms_512/``, written on first use) is segmented at 256 x 256 model
input by ``pancreas_seg.pipelines.inference.nodes.segment_case``, the function
``kedro run --pipeline=inference`` calls for every scan: read the NIfTI, ``segment_volume``
(preprocessing with ``crop_to_body``, slice-wise ``predict_on_batch``, mapping the labels back onto
the 512 x 512 x Z grid), write ``<case>.nii.gz`` and the overlay PNG. The ``inference`` settings
(batch size, XLA, TTA, postprocessing) are those of ``conf/base/parameters_inference.yml``;
``--batch-size`` and ``--no-xla`` override them.

Models (untrained weights are fine for timing; label_mode multiclass): ``unet`` with
base_filters 32 and depth 4 (the study's setup), ``unet_b16`` (the U-Net width of
``conf/base/parameters_training.yml``: 16, depth 4); ``unet_small`` (16, depth 2), ``fcn`` (16,
depth 5) and ``vnet2d`` (16, depth 4). Each model is built, saved to a temporary ``.keras`` file
and loaded back with ``pancreas_seg.models.io.load_model`` (safe mode), as inference does.
Untrained weights predict foreground on every slice, so the restore step interpolates every slice:
a worst case (a trained model skips the slices that are background everywhere).

Each architecture runs in its own fresh subprocess (own peak RSS). A warm-up call on a short
volume with ``batch + Z % batch`` slices traces (and XLA-compiles) the one padded batch shape, so
that one-off cost is reported separately as ``compile``; then ``--repeats`` whole cases are timed
(median reported). The stages (``read``, ``preprocess``, ``predict``, ``restore``, ``write_mask``,
``overlay_png``) are timed inside the same calls by wrapping the module-level functions the node
and ``segment_volume`` look up; ``segment`` is preprocess + predict + restore.

Target (issue "inference seconds per volume"): U-Net at 256 x 256 <= 30 s per volume on 2 cores,
checked on the end-to-end time (file in, files out).

How to run (from the repository root)
-------------------------------------
    .venv/bin/python benchmarks/inference_benchmark.py                       # all 5, 3 repeats
    .venv/bin/python benchmarks/inference_benchmark.py --archs unet unet_b16 --repeats 5
    .venv/bin/python benchmarks/inference_benchmark.py --archs unet --batch-size 16   # padding cost
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

SIZE = (256, 256)
STAGES = ("read", "preprocess", "predict", "restore", "write_mask", "overlay_png")  # in order
ARCHS = {  # the study's U-Net width; the others at their conf/base widths, V-Net at conf/msd's 16 (base: 8)
    "unet": {"base_filters": 32, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
    "unet_b16": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},  # conf/base width
    "unet_small": {"base_filters": 16, "depth": 2, "dropout": 0.1, "l2_weight": 1e-4},
    "fcn": {"base_filters": 16, "depth": 5, "dropout": 0.1, "l2_weight": 1e-4},
    "vnet2d": {"base_filters": 16, "depth": 4, "dropout": 0.1, "l2_weight": 1e-4},
}


def inference_settings(batch_size: int | None, xla: bool) -> dict:
    """``conf/base/parameters_inference.yml``'s ``inference`` block, as the pipeline gets it."""
    import yaml  # noqa: PLC0415

    settings = yaml.safe_load((_common.REPO_ROOT / "conf" / "base" / "parameters_inference.yml").read_text())
    settings = dict(settings["inference"])
    if batch_size is not None:
        settings["batch_size"] = batch_size
    settings["xla"] = bool(settings.get("xla", True)) and xla
    return settings


def child(arch: str, repeats: int, case_index: int, settings: dict, retain_heap: bool = False) -> None:
    import keras  # noqa: PLC0415

    import pancreas_seg.pipelines.inference.nodes as nodes  # noqa: PLC0415
    import pancreas_seg.prediction as prediction  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import PreprocessingConfig  # noqa: PLC0415
    from pancreas_seg.models.io import load_model  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415
    from pancreas_seg.runtime import retained_heap  # noqa: PLC0415

    rss_after_imports = _common.peak_rss_mib()
    keras.utils.set_random_seed(0)
    image_path = Path(_common.phantom_pairs(_common.PHANTOM_ROOT)[case_index][0])
    batch = int(settings["batch_size"])
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        path = Path(tmp) / f"{arch}.keras"
        built = build_model(arch.removesuffix("_b16"), (*SIZE, 1), "multiclass", **ARCHS[arch])
        params = int(built.count_params())
        built.save(path)
        del built
        keras.backend.clear_session()
        t0 = time.perf_counter()
        model = load_model(path, compile=False)
        xla_on = prediction.use_xla(model, settings["xla"])   # as the inference node does
        load_s = time.perf_counter() - t0

    # time the stages of the node's own per-case code by wrapping the names it looks up
    stage_times: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stage_times[name] = stage_times.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    nodes.load_nifti = timed("read", nodes.load_nifti)
    prediction.preprocess_image = timed("preprocess", prediction.preprocess_image)
    prediction.predict_slices = timed("predict", prediction.predict_slices)
    prediction.labels_from_probabilities = timed("restore", prediction.labels_from_probabilities)
    nodes.save_nifti = timed("write_mask", nodes.save_nifti)
    nodes.save_overlay = timed("overlay_png", nodes.save_overlay)

    config = PreprocessingConfig(image_size_px=SIZE, crop_to_body=True)  # conf/base framing at 256 px
    ct = nodes.load_nifti(image_path)
    n_z = ct.array.shape[2]
    warm_z = batch + n_z % batch
    t0 = time.perf_counter()
    prediction.segment_volume(model, ct.array[:, :, :warm_z], ct.affine, config, None, batch_size=batch)
    warmup_s = time.perf_counter() - t0
    del ct

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_out_") as out_dir:
        for _ in range(repeats):
            stage_times.clear()
            t0 = time.perf_counter()
            with retained_heap(retain_heap):
                row = nodes.segment_case(model, image_path, Path(out_dir), config, None, settings, arch)
            total = time.perf_counter() - t0
            assert row["shape"][2] == n_z
            segment = stage_times["preprocess"] + stage_times["predict"] + stage_times["restore"]
            runs.append({"total_s": total, "segment_s": segment, **dict(stage_times)})
    med = {k: _common.median([r[k] for r in runs]) for k in runs[0]}
    _common.emit_result({
        "arch": arch, "params": params, "model_settings": ARCHS[arch], "case": image_path.name,
        "volume_shape": [*row["shape"]], "slices": n_z, "batch_size": batch,
        "padded_slices": -n_z % batch, "load_model_s": load_s,
        "warmup_s": warmup_s, "warmup_slices": warm_z, "runs": runs, "median": med,
        "seconds_per_volume": med["total_s"], "slices_per_s": n_z / med["total_s"],
        "rss_after_imports_mib": rss_after_imports, "xla": xla_on, "retain_heap": retain_heap,
        "keras_backend": keras.backend.backend()})


def parent(args: argparse.Namespace) -> None:
    _common.ensure_phantoms_512()
    script = Path(__file__).resolve()
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    settings = inference_settings(args.batch_size, args.xla)
    t_start = time.perf_counter()
    results = []
    for arch in args.archs:
        r = _common.run_variant(script, ["--variant", arch, "--repeats", str(args.repeats),
                                         "--case-index", str(args.case_index),
                                         "--batch-size", str(settings["batch_size"]),
                                         *([] if args.xla else ["--no-xla"]),
                                         *(["--retain-heap"] if args.retain_heap else [])], env=env, timeout=3600)
        results.append(r)
        print(f"  {arch:<10}: {r['seconds_per_volume']:7.2f} s/volume end to end ({r['slices_per_s']:.2f} slices/s), "
              f"runs {[round(x['total_s'], 1) for x in r['runs']]}, XLA {r['xla']}, warm-up (compile) "
              f"{r['warmup_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
              flush=True)
    rows = []
    for r in results:
        m = r["median"]
        rows.append([r["arch"], f"{r['params'] / 1e6:.2f}M", f"{r['slices']}+{r['padded_slices']}",
                     round(m["total_s"], 2), round(r["slices_per_s"], 2), round(m["segment_s"], 2),
                     *(round(m[k], 2) for k in STAGES), round(r["warmup_s"], 1), round(r["peak_rss_mib"])])
    print()
    _common.print_table(["arch", "params", "slices+padding", "s/volume", "slices/s", "segment s",
                         *(f"{k} s" for k in STAGES), "compile s", "peak RSS MiB"], rows)
    checks = {}
    for key, label in (("unet", "U-Net, the study's width (base 32, depth 4)"),
                       ("unet_b16", "U-Net, conf/base width (base 16, depth 4)")):
        unet = next((r for r in results if r["arch"] == key), None)
        if unet is not None:
            checks[f"{key}_256_le_30s_per_volume"] = unet["seconds_per_volume"] <= 30.0
            print(f"\n{label} at 256 px: {unet['seconds_per_volume']:.1f} s per volume, read to files "
                  f"-> {'PASS' if checks[f'{key}_256_le_30s_per_volume'] else 'FAIL'} (target <= 30 s)")
    path = _common.write_report("inference_benchmark", {
        "settings": {"archs": args.archs, "repeats": args.repeats, "image_size_px": SIZE, "inference": settings,
                     "retain_heap": args.retain_heap, "crop_to_body": True, "case_index": args.case_index},
        "results": results, "checks": checks, "total_wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path}  (total {time.perf_counter() - t_start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=tuple(ARCHS), default=None, help="child mode: one architecture")
    parser.add_argument("--archs", nargs="+", choices=tuple(ARCHS), default=list(ARCHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case-index", type=int, default=0, help="which cached phantom (0 = pancreas_001)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices per forward pass (default: inference.batch_size of conf/base)")
    parser.add_argument("--no-xla", dest="xla", action="store_false", help="predict without XLA (inference.xla: false)")
    parser.add_argument("--retain-heap", action="store_true",
                        help="run each case inside pancreas_seg.runtime.retained_heap (not what inference does)")
    args = parser.parse_args()
    if args.variant is None:
        parent(args)
    else:
        child(args.variant, args.repeats, args.case_index, inference_settings(args.batch_size, args.xla),
              args.retain_heap)


if __name__ == "__main__":
    main()
