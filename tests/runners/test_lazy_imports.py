"""Only a Dask run loads ``dask.distributed``: the project hook that reads ``dask.yml`` and the
per-case helpers run in every ``kedro run``, and a sequential run should not pay for the import
(about 0.4 s). Checked in a fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Every test here starts another Python interpreter: left out of `make test-fast`.
pytestmark = pytest.mark.subprocess

SEQUENTIAL = """
import sys
from pancreas_seg.hooks import DaskConfigHook
from pancreas_seg.runners.cluster import project_config, use_project_config
from pancreas_seg.runners.parallel import map_over_cases, on_dask_worker

use_project_config({"local_cluster": {"n_workers": 3}})
assert project_config()["local_cluster"]["n_workers"] == 3
assert not on_dask_worker()
assert map_over_cases(abs, [-1, 2, -3], what="Absolute", costs=[1, 3, 2]) == [1, 2, 3]
print("distributed" in sys.modules)
"""

RUNNER = """
import sys
from kedro.utils import load_obj
runner = load_obj("pancreas_seg.runners.DaskRunner")   # how `kedro run --runner=...` finds it
print(runner.__module__, "distributed" in sys.modules)
"""


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                             check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout.strip().splitlines()[-1]


def test_sequential_work_does_not_import_distributed() -> None:
    assert _run(SEQUENTIAL) == "False"


def test_the_runner_is_still_found_by_its_dotted_path() -> None:
    assert _run(RUNNER) == "pancreas_seg.runners.dask_runner True"


SETTINGS = """
import sys
import pancreas_seg.settings   # what every process that configures the project imports (Dask workers too)
print(sorted(name for name in ("mlflow", "keras", "tensorflow", "jax", "distributed") if name in sys.modules))
"""


def test_the_project_settings_import_no_mlflow_and_no_keras() -> None:
    """Dask workers configure the project (settings.py) before any node runs: a node tagged
    ``no_mlflow_run`` must find MLflow unloaded there, and the backend must still be choosable."""
    assert _run(SETTINGS) == "[]"
