"""The cascade's stage-2 crop sources in ``cv``, compared case by case: out-of-fold stage-1 boxes
against jittered true crops (``cascade.stage2.crop_source``).

Both runs of ``cv_cascade`` score every development case out of fold with the same stage-1 fold
models (``data/08_reporting/cv/cascade/metrics_per_case.csv``); ``make study`` keeps the
``jittered_truth`` run's copy in ``data/08_reporting/study/cascade_jittered_truth/``. This script
sets the two per-case tables side by side and runs the project's paired statistics on them
(:func:`pancreas_seg.evaluation.statistics.paired_comparisons`, with ``conf/base``'s
``statistics`` settings: paired Wilcoxon, bootstrap CI of the mean difference).

How to run (from the repository root, after ``make study``)
---------------------------------------------------------
    .venv/bin/python -m benchmarks.crop_sources
    .venv/bin/python -m benchmarks.crop_sources --out-of-fold A.csv --jittered-truth B.csv --output C.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks._common import REPO_ROOT, conf
from pancreas_seg.evaluation.statistics import paired_comparisons

REPORTING = REPO_ROOT / "data" / "08_reporting"
OUT_OF_FOLD_CSV = REPORTING / "cv" / "cascade" / "metrics_per_case.csv"
JITTERED_CSV = REPORTING / "study" / "cascade_jittered_truth" / "metrics_per_case.csv"
OUTPUT_MD = REPORTING / "study" / "crop_sources.md"


def _read(path: Path, label: str) -> pd.DataFrame:
    if not path.is_file():
        raise SystemExit(f"{path}: no such per-case table (run `make study` first, or pass the path)")
    table = pd.read_csv(path)
    missing = {"case_id", "class", "dice"} - set(table.columns)
    if missing:
        raise SystemExit(f"{path}: not a per-case metrics table (missing columns {sorted(missing)})")
    return table.assign(architecture=label)


def compare_crop_sources(out_of_fold: pd.DataFrame, jittered: pd.DataFrame) -> str:
    """Markdown: per-class means of each variant over the same cases, then the paired tests."""
    cases = set(out_of_fold["case_id"]) & set(jittered["case_id"])
    if cases != set(out_of_fold["case_id"]) or cases != set(jittered["case_id"]):
        raise SystemExit("the two runs scored different cases: they are not the same cross-validation")
    both = pd.concat([out_of_fold, jittered], ignore_index=True)
    means = both.groupby(["architecture", "class"], sort=False)["dice"].mean().unstack("class")
    lines = ["| crops | " + " | ".join(means.columns) + " |", "|---|" + "---|" * len(means.columns)]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for name, row in means.iterrows()]
    _, markdown = paired_comparisons(both, conf("base", "parameters_evaluation.yml")["statistics"])
    return (f"Out-of-fold cases: {len(cases)}\n\nMean 3D Dice per case:\n\n" + "\n".join(lines)
            + f"\n\n{markdown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-of-fold", type=Path, default=OUT_OF_FOLD_CSV)
    parser.add_argument("--jittered-truth", type=Path, default=JITTERED_CSV)
    parser.add_argument("--output", type=Path, default=OUTPUT_MD)
    args = parser.parse_args()
    report = compare_crop_sources(_read(args.out_of_fold, "cascade (out_of_fold crops)"),
                                  _read(args.jittered_truth, "cascade (jittered_truth crops)"))
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.output.parent, suffix=".tmp", delete=False) as handle:
        handle.write(report)
    os.replace(handle.name, args.output)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
