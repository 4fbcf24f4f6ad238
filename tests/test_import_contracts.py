"""The layering rules of ``[tool.importlinter]`` in pyproject.toml hold (import-linter, a real run).

Domain packages (core, imaging, learning, models, evaluation, cascade, phantoms, task07) import no
Kedro, no MLflow and none of the layers above them; inference and tracking import no Kedro and no
pipeline; the pipelines are independent of one another.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lint-imports is a Python program: left out of `make test-fast`.
pytestmark = pytest.mark.subprocess


def test_every_import_contract_is_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint_imports is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (import-linter is pinned there)")
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout, result.stdout
