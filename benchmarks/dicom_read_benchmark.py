"""How long reading a DICOM CT series takes: ``find_series`` + ``read_series``.

Writes a SYNTHETIC 100-slice 512 x 512 CT series (a noisy body ellipse with organs and a spine,
int16 HU; 0.7 mm pixels, 1.5 mm slices) to a temporary folder, once uncompressed and once JPEG 2000
lossless, and times finding and reading it (headers, pixel decoding, rescale to HU, geometry).
Prints the median and range of ``--repeats`` runs per transfer syntax (target: uncompressed
<= 2 s on 2 cores) and writes ``data/08_reporting/benchmarks/dicom_read_benchmark.json``.

From the repository root:

    .venv/bin/python -m benchmarks.dicom_read_benchmark                # 5 repeats
    .venv/bin/python -m benchmarks.dicom_read_benchmark --repeats 3 --slices 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from benchmarks import _common
from pancreas_seg.imaging.dicom_io import find_series, read_series
from pancreas_seg.imaging.dicom_series_writer import write_ct_series

TARGET_S = 2.0
SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "jpeg2000_lossless": JPEG2000Lossless}


def synthetic_ct(n_slices: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """(X, Y, Z) int16 HU: air, a body ellipse of soft tissue, two organs, a spine; CT-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 <= 1
    liver = ((x + 0.15) / 0.14) ** 2 + ((y + 0.02) / 0.12) ** 2 <= 1
    kidney = ((x - 0.18) / 0.05) ** 2 + ((y - 0.1) / 0.07) ** 2 <= 1
    spine = (x / 0.05) ** 2 + ((y - 0.2) / 0.05) ** 2 <= 1
    plane = np.full((size, size), -1000.0, dtype=np.float32)
    plane[body], plane[liver], plane[kidney], plane[spine] = 40.0, 60.0, 150.0, 700.0
    volume = np.empty((size, size, n_slices), dtype=np.int16)
    for k in range(n_slices):
        noise = rng.normal(0.0, 12.0, (size, size)).astype(np.float32)
        volume[:, :, k] = np.rint(plane + noise * body).T.astype(np.int16)
    return volume


def time_read(folder: Path, repeats: int) -> tuple[list[float], tuple[int, ...]]:
    times, shape = [], ()
    for _ in range(repeats):
        start = time.perf_counter()
        series = find_series(folder)
        volume = read_series(series[0])
        times.append(time.perf_counter() - start)
        shape = volume.array.shape
    return times, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    volume = synthetic_ct(args.slices)
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    affine[:3, 3] = (-180.0, -180.0, -100.0)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="dicom_read_benchmark_") as tmp:
        for name, syntax in SYNTAXES.items():
            folder = Path(tmp) / name
            start = time.perf_counter()
            paths = write_ct_series(volume, affine, folder, transfer_syntax=syntax,
                                    description=f"SYNTHETIC benchmark {name}")
            write_s = time.perf_counter() - start
            size_mib = sum(p.stat().st_size for p in paths) / 2 ** 20
            times, shape = time_read(folder, args.repeats)
            median = _common.median(times)
            results[name] = {"transfer_syntax": str(syntax), "shape": list(shape), "files_mib": size_mib,
                             "write_s": write_s, "read_s": times, "read_s_median": median}
            rows.append([name, "x".join(map(str, shape)), f"{size_mib:.1f}", f"{median:.3f}",
                         f"{min(times):.3f}-{max(times):.3f}", f"{args.slices / median:.0f}"])
    _common.print_table(["transfer syntax", "shape", "MiB", "median s", "range s", "slices/s"], rows)
    print(f"target: uncompressed <= {TARGET_S} s for 100 slices of 512x512 "
          f"({'met' if results['uncompressed']['read_s_median'] <= TARGET_S else 'NOT met'})")
    path = _common.write_report("dicom_read_benchmark", {"slices": args.slices, "repeats": args.repeats,
                                                         "synthetic": True, "results": results})
    print(f"report: {path}")


if __name__ == "__main__":
    main()
