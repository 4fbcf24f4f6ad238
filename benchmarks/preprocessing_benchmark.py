"""Preprocessing throughput and peak memory: the project's per-case path vs the study's naive one.

What it measures
----------------
On SYNTHETIC 512 x 512 x ~100 phantoms (30 cases, written once and cached under
``data/01_raw/benchmark_phantoms_512/``; 0.7-0.9 mm pixels, 1.5-1.7 mm slices, 150-170 mm
coverage -> 88-113 slices), two variants preprocess the first N cases to 256 x 256:

* ``project`` - exactly what the preprocessing pipeline does per case:
  ``preprocess_case(image, label, PreprocessingConfig(image_size_px=(256, 256), crop_to_body=True),
  None)`` (the body framing of conf/base), then
  ``image.npy`` (float32) and ``label.npy`` (uint8) written atomically with
  ``pancreas_seg.datasets.NumpyDataset(...).save`` into a temporary folder, one case at a time.
* ``naive`` - what the original study did: ``nib.load(p).get_fdata()`` (float64) for image and
  label, ``image.astype(np.uint8)`` (the study's overflow bug), ``scipy.ndimage.zoom`` of each
  volume to 256 x 256 in-plane (order=1 image, order=0 label), every slice appended to Python
  lists, one ``np.stack`` + ``np.save`` at the end.

Each (variant, N, repeat) runs in its own fresh ``python`` subprocess, which reports its own
``ru_maxrss`` (peak RSS) and the timed loop's wall time (imports excluded). Variants are
interleaved within each repeat so machine noise hits both; medians over repeats are reported,
and every ratio compares numbers measured in the same run.

Targets (issue "preprocessing throughput and memory"): project peak RSS at 30 cases <= 1.15 x
its peak at 10 cases; at 30 cases the project is >= 2x faster (time ratio naive/project) and
uses >= 5x less peak memory (memory ratio naive/project).

``--profile`` additionally runs the project variant under cProfile (in a subprocess) and prints
/stores the top functions by cumulative and internal time, plus a per-stage timing split
(read image, preprocess image, read label, preprocess label, save).

How to run (from the repository root)
-------------------------------------
    .venv/bin/python -m benchmarks.preprocessing_benchmark                  # 10 and 30 cases, 3 repeats
    .venv/bin/python -m benchmarks.preprocessing_benchmark --repeats 5 --cases 10 30 --profile
    # one variant by hand (what the parent runs in each subprocess):
    .venv/bin/python -m benchmarks.preprocessing_benchmark --variant project --n-cases 10

Results: ``data/08_reporting/benchmarks/preprocessing_benchmark.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import _common

SIZE = (256, 256)


# ------------------------------------------------------------------------------------------------
# Variants (child side)
# ------------------------------------------------------------------------------------------------
def run_project(pairs: list[tuple[str, str]], out: Path) -> dict[str, float]:
    """The preprocessing pipeline's per-case work: preprocess_case + two atomic NumpyDataset saves."""
    from pancreas_seg.datasets import NumpyDataset  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_case  # noqa: PLC0415

    config = PreprocessingConfig(image_size_px=SIZE, crop_to_body=True)   # conf/base framing
    slices = 0
    start = time.perf_counter()
    for image_path, label_path in pairs:
        case = preprocess_case(image_path, label_path, config, None)
        case_id = Path(image_path).name.removesuffix(".nii.gz")
        NumpyDataset(filepath=str(out / case_id / "image.npy")).save(case.image)
        NumpyDataset(filepath=str(out / case_id / "label.npy")).save(case.label)
        slices += case.image.shape[0]
        del case
    return {"seconds": time.perf_counter() - start, "slices": slices}


def run_naive(pairs: list[tuple[str, str]], out: Path) -> dict[str, float]:
    """The study's approach: float64 volumes, uint8 cast, zoom, everything in lists, one stack/save."""
    import nibabel as nib  # noqa: PLC0415
    from scipy import ndimage  # noqa: PLC0415

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    start = time.perf_counter()
    for image_path, label_path in pairs:
        image = nib.load(image_path).get_fdata()          # float64 (X, Y, Z)
        label = nib.load(label_path).get_fdata()          # float64 (X, Y, Z)
        image = image.astype(np.uint8)                    # the study's bug: HU wrap around
        zoom = (SIZE[0] / image.shape[0], SIZE[1] / image.shape[1], 1.0)
        image = ndimage.zoom(image, zoom, order=1)
        label = ndimage.zoom(label, zoom, order=0)
        for z in range(image.shape[2]):
            images.append(image[:, :, z])
            labels.append(label[:, :, z])
    x = np.stack(images)
    y = np.stack(labels)
    np.save(out / "images.npy", x)
    np.save(out / "labels.npy", y)
    return {"seconds": time.perf_counter() - start, "slices": len(images)}


def run_stages(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Per-stage wall time of the project path (same calls as preprocess_case, split apart)."""
    from pancreas_seg.datasets import NumpyDataset  # noqa: PLC0415
    from pancreas_seg.imaging.nifti_io import load_nifti  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import (  # noqa: PLC0415
        PreprocessingConfig,
        preprocess_image,
        preprocess_label,
    )

    config = PreprocessingConfig(image_size_px=SIZE, crop_to_body=True)   # conf/base framing
    totals = dict.fromkeys(("read_image", "preprocess_image", "read_label", "preprocess_label",
                            "save_npy"), 0.0)
    with tempfile.TemporaryDirectory(prefix="bench_pre_stages_") as tmp:
        for image_path, label_path in pairs:
            t0 = time.perf_counter()
            ct = load_nifti(image_path)
            t1 = time.perf_counter()
            image, geometry = preprocess_image(ct.array, ct.affine, config, None)
            t2 = time.perf_counter()
            raw_label = load_nifti(label_path).array
            t3 = time.perf_counter()
            label = preprocess_label(raw_label, geometry, config.label_mode)
            t4 = time.perf_counter()
            NumpyDataset(filepath=f"{tmp}/c/image.npy").save(image)
            NumpyDataset(filepath=f"{tmp}/c/label.npy").save(label)
            t5 = time.perf_counter()
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                totals[key] += dt
    return {k: v / len(pairs) for k, v in totals.items()}


def child(args: argparse.Namespace) -> None:
    pairs = _common.phantom_pairs(_common.PHANTOM_ROOT, args.n_cases)
    if len(pairs) < args.n_cases:
        raise SystemExit(f"only {len(pairs)} cached cases; run without --variant first")
    baseline_rss = _common.peak_rss_mib()
    out = Path(tempfile.mkdtemp(prefix=f"bench_pre_{args.variant}_"))
    try:
        if args.variant == "project":
            # import before timing so both variants time only the work
            import pancreas_seg.datasets  # noqa: F401, PLC0415
            import pancreas_seg.imaging.preprocess  # noqa: F401, PLC0415
        else:
            import nibabel  # noqa: F401, PLC0415
            import scipy.ndimage  # noqa: F401, PLC0415
        rss_after_imports = _common.peak_rss_mib()
        if args.variant == "profile":
            import pancreas_seg.datasets  # noqa: F401, PLC0415
            import pancreas_seg.imaging.preprocess  # noqa: F401, PLC0415

            stages = run_stages(pairs)
            profiler = cProfile.Profile()
            profiler.enable()
            result = run_project(pairs, out)
            profiler.disable()
            tables = {}
            for key in ("cumulative", "tottime"):
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).sort_stats(key).print_stats(25)
                tables[key] = buffer.getvalue()
            result = {**result, "stages_s_per_case": stages, "profile": tables}
        elif args.variant == "project":
            result = run_project(pairs, out)
        else:
            result = run_naive(pairs, out)
        out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    _common.emit_result({"variant": args.variant, "n_cases": len(pairs),
                         "rss_at_start_mib": baseline_rss, "rss_after_imports_mib": rss_after_imports,
                         "output_mib": out_bytes / 2**20, **result})


# ------------------------------------------------------------------------------------------------
# Parent: orchestrate subprocesses, aggregate, report
# ------------------------------------------------------------------------------------------------
def parent(args: argparse.Namespace) -> None:
    print("Ensuring the cached 512 px SYNTHETIC phantom set (first run: a few minutes)...",
          flush=True)
    root = _common.ensure_phantoms_512()
    import json  # noqa: PLC0415

    shapes = [c["shape"] for c in json.loads((root / "dataset.json").read_text())["synthetic"]["cases"]]
    print(f"  {len(shapes)} cases, slices per case: min {min(s[2] for s in shapes)}, "
          f"median {int(np.median([s[2] for s in shapes]))}, max {max(s[2] for s in shapes)}")
    module = __spec__.name   # this module (also as __main__): each variant runs it with python -m
    runs: list[dict] = []
    # warm the page cache once so the first timed run is not penalised by a cold disk
    for image_path, label_path in _common.phantom_pairs(root, max(args.cases)):
        Path(image_path).read_bytes()
        Path(label_path).read_bytes()
    for repeat in range(args.repeats):
        for n in args.cases:
            order = ("project", "naive") if repeat % 2 == 0 else ("naive", "project")
            for variant in order:
                result = _common.run_variant(module, ["--variant", variant, "--n-cases", str(n)])
                result["repeat"] = repeat
                runs.append(result)
                print(f"  repeat {repeat} n={n:>2} {variant:<7}: {result['seconds']:7.2f} s, "
                      f"{n / result['seconds']:.3f} cases/s, peak RSS {result['peak_rss_mib']:8.1f} MiB",
                      flush=True)

    summary: dict[str, dict] = {}
    rows = []
    for n in args.cases:
        for variant in ("project", "naive"):
            sel = [r for r in runs if r["n_cases"] == n and r["variant"] == variant]
            s = {"n_cases": n, "variant": variant, "repeats": len(sel),
                 "median_seconds": _common.median([r["seconds"] for r in sel]),
                 "median_cases_per_s": _common.median([n / r["seconds"] for r in sel]),
                 "median_slices_per_s": _common.median([r["slices"] / r["seconds"] for r in sel]),
                 "median_peak_rss_mib": _common.median([r["peak_rss_mib"] for r in sel]),
                 "median_rss_after_imports_mib": _common.median([r["rss_after_imports_mib"] for r in sel]),
                 "all_seconds": [r["seconds"] for r in sel],
                 "all_peak_rss_mib": [r["peak_rss_mib"] for r in sel]}
            summary[f"{variant}@{n}"] = s
            rows.append([variant, n, s["median_seconds"], s["median_cases_per_s"],
                         s["median_slices_per_s"], s["median_peak_rss_mib"],
                         s["median_peak_rss_mib"] - s["median_rss_after_imports_mib"]])

    # ratios: per repeat (same run, adjacent subprocesses), then median
    ratios: dict[str, float] = {}
    for n in args.cases:
        t_ratio, m_ratio = [], []
        for repeat in range(args.repeats):
            p = next(r for r in runs if r["n_cases"] == n and r["variant"] == "project" and r["repeat"] == repeat)
            q = next(r for r in runs if r["n_cases"] == n and r["variant"] == "naive" and r["repeat"] == repeat)
            t_ratio.append(q["seconds"] / p["seconds"])
            m_ratio.append(q["peak_rss_mib"] / p["peak_rss_mib"])
        ratios[f"time_naive_over_project@{n}"] = _common.median(t_ratio)
        ratios[f"peak_rss_naive_over_project@{n}"] = _common.median(m_ratio)
    lo, hi = min(args.cases), max(args.cases)
    growth = [next(r for r in runs if r["n_cases"] == hi and r["variant"] == "project" and r["repeat"] == k)["peak_rss_mib"]
              / next(r for r in runs if r["n_cases"] == lo and r["variant"] == "project" and r["repeat"] == k)["peak_rss_mib"]
              for k in range(args.repeats)]
    ratios[f"project_peak_rss_{hi}_over_{lo}"] = _common.median(growth)
    checks = {
        f"project_rss_growth_{lo}_to_{hi}_le_1.15": ratios[f"project_peak_rss_{hi}_over_{lo}"] <= 1.15,
        f"time_ratio_ge_2@{hi}": ratios[f"time_naive_over_project@{hi}"] >= 2.0,
        f"memory_ratio_ge_5@{hi}": ratios[f"peak_rss_naive_over_project@{hi}"] >= 5.0,
    }

    profile = None
    if args.profile:
        print("Profiling the project variant (cProfile, separate subprocess)...", flush=True)
        profile = _common.run_variant(module, ["--variant", "profile", "--n-cases", str(args.profile_cases)])

    print()
    _common.print_table(["variant", "cases", "median s", "cases/s", "slices/s", "peak RSS MiB",
                         "peak - imports MiB"], rows)
    print()
    for key, value in ratios.items():
        print(f"{key:<40} {value:8.3f}")
    for key, ok in checks.items():
        print(f"{key:<40} {'PASS' if ok else 'FAIL'}")
    if profile is not None:
        print("\nProject path, mean seconds per case by stage:")
        for key, value in profile["stages_s_per_case"].items():
            print(f"  {key:<18} {value:7.3f}")
        print("\ncProfile (tottime, top 25):")
        print(profile["profile"]["tottime"])
    path = _common.write_report("preprocessing_benchmark", {
        "settings": {"cases": args.cases, "repeats": args.repeats, "image_size_px": SIZE,
                     "phantom_root": str(root), "phantom_seed": _common.PHANTOM_SEED,
                     "slices_per_case": [s[2] for s in shapes]},
        "summary": summary, "ratios": ratios, "checks": checks, "runs": runs, "profile": profile})
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("project", "naive", "profile"), default=None,
                        help="child mode: run one variant once and print its JSON result")
    parser.add_argument("--n-cases", type=int, default=10, help="child mode: number of cases")
    parser.add_argument("--cases", type=int, nargs="+", default=[10, 30],
                        help="parent mode: case counts to compare (max 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also cProfile the project variant")
    parser.add_argument("--profile-cases", type=int, default=5)
    args = parser.parse_args()
    if args.variant is None:
        parent(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
