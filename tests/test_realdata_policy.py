"""Real-CT tests are skipped locally without ``../shared/realdata`` but FAIL under ``CI=true``.

Each case runs one real-data test in a pytest subprocess with ``PANCREAS_SEG_REALDATA`` pointing
at a folder that does not exist (a few seconds each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every test here starts another Python interpreter: left out of `make test-fast`.
pytestmark = pytest.mark.subprocess
ONE_REALDATA_TEST = "tests/imaging/test_realdata.py::test_validate_case_accepts_the_real_case"


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PANCREAS_SEG_REALDATA"] = str(tmp_path / "no_such_realdata")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", ONE_REALDATA_TEST, "-p", "no:cacheprovider", "-q",
         "-rfEs", "--no-header"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_realdata_fails_under_ci(tmp_path: Path, ci: str) -> None:
    result = _pytest(tmp_path, ci)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "real CT test data missing: ct_abdomen_3mm.nii.gz" in output, output
    assert str(tmp_path / "no_such_realdata") in output and "CI=true" in output, output
    assert "skipped" not in output, output


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_realdata_is_skipped_outside_ci(tmp_path: Path, ci: str | None) -> None:
    result = _pytest(tmp_path, ci)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 skipped" in output and "real CT test data missing" in output, output
