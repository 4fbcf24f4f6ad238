"""``runtime.keras_backend`` through a real ``kedro run`` (new processes, a throwaway project copy).

* ``--params runtime.keras_backend=jax`` with ``KERAS_BACKEND=tensorflow`` in the environment trains
  under JAX: the setting wins over the environment, and since Keras cannot switch backends once
  imported, a successful JAX training also proves nothing imported Keras before the project hook
  (:class:`pancreas_seg.hooks.KerasBackendHook`). The backend and its devices are logged and
  recorded in MLflow (the kedro-mlflow parent run and the model's training run) and in the model card.
* Asking for a backend whose package is absent (made absent in that process by a ``sitecustomize``
  meta-path finder on ``PYTHONPATH``) stops the run with the extra to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from benchmarks.support.project_copy import copy_project
from benchmarks.support.project_copy import subprocess_env as kedro_subprocess_env

from .conftest import REPO_ROOT, SMOKE_ENV, latest_model_card

EXPERIMENT = "pancreas_seg_smoke"
ARCHITECTURE = "unet_small"

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _kedro_run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kedro", "run", "--env", SMOKE_ENV, *args]
    return subprocess.run(command, cwd=project, env=kedro_subprocess_env(COLUMNS="240", **env),
                          capture_output=True, text=True, timeout=900, check=False)


def test_the_setting_trains_under_jax_and_records_backend_and_devices(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    project = copy_project(REPO_ROOT, tmp_path / "pancreas_seg")
    process = _kedro_run(project, f"--pipelines=train_{ARCHITECTURE}", "--params", "runtime.keras_backend=jax",
                         KERAS_BACKEND="tensorflow", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                         XLA_FLAGS="--xla_backend_optimization_level=0")
    log = process.stdout + process.stderr
    assert process.returncode == 0, log[-6000:]
    assert "runtime.keras_backend=jax overrides KERAS_BACKEND=tensorflow from the environment" in log
    assert "Keras backend: jax; devices: cpu:0 cpu" in log

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    training = [r for r in runs if r.data.tags.get("architecture") == ARCHITECTURE]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert training and parents, [r.data.tags for r in runs]
    for run in (*training, *parents):
        assert run.data.tags.get("keras_backend") == "jax", run.data.tags
        assert run.data.tags.get("keras_devices") == "cpu:0 cpu", run.data.tags
    assert latest_model_card(project, ARCHITECTURE)["keras_backend"] == "jax"


BLOCKER = '''
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    """{blocked} is not installed, as far as this process can tell."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


@pytest.mark.parametrize(("backend", "module", "extra"), [("tensorflow", "tensorflow", ".[tf]"),
                                                          ("jax", "jax", ".[gpu]")])
def test_a_backend_that_is_not_installed_stops_the_run_naming_the_extra(tmp_path: Path, backend: str,
                                                                         module: str, extra: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=module)))
    project = copy_project(REPO_ROOT, tmp_path / "pancreas_seg")
    pythonpath = os.pathsep.join([str(REPO_ROOT / "src"), str(site), os.environ.get("PYTHONPATH", "")])
    process = _kedro_run(project, "--pipelines=ingestion", "--params", f"runtime.keras_backend={backend}",
                         PYTHONPATH=pythonpath.rstrip(os.pathsep))
    log = process.stdout + process.stderr
    assert process.returncode != 0, log[-4000:]
    assert f"Keras backend '{backend}' (runtime.keras_backend) is not installed" in log, log[-4000:]
    assert f'pip install -e "{extra}"' in log
    assert not any((project / "data" / "01_raw").iterdir()), "the run went on after the error"
