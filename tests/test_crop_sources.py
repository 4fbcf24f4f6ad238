"""benchmarks/crop_sources.py: the two cascade crop sources compared on the same out-of-fold cases."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.crop_sources import compare_crop_sources


def _table(label: str, dice: list[float]) -> pd.DataFrame:
    rows = [{"case_id": f"pancreas_{i:03d}", "architecture": label, "class": cls,
             "dice": value if cls == "pancreas" else value / 2, "hd95_surfel_mm": 10.0 - value}
            for i, value in enumerate(dice) for cls in ("pancreas", "tumour")]
    return pd.DataFrame(rows)


def test_the_better_crop_source_is_found_significantly_better_on_enough_cases() -> None:
    better = _table("oof", [0.8 + 0.01 * i for i in range(12)])
    worse = _table("jittered", [0.6 + 0.011 * i for i in range(12)])
    report = compare_crop_sources(better, worse)
    assert "Out-of-fold cases: 12" in report
    assert "| oof | 0.855 |" in report            # mean pancreas Dice of the first variant
    pancreas = report.split("### dice, pancreas")[1].split("###")[0]
    assert "| oof | jittered | 12 | 0.855 | 0.660 | +0.195" in pancreas
    assert "**oof better than jittered**" in pancreas


def test_runs_over_different_cases_are_refused() -> None:
    with pytest.raises(SystemExit, match="different cases"):
        compare_crop_sources(_table("oof", [0.8, 0.7, 0.6]), _table("jittered", [0.8, 0.7]))
