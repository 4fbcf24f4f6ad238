"""End-to-end fixtures: ONE real ``train`` run (``--env smoke``) in a throwaway project copy.

The copy (:func:`benchmarks.support.project_copy.copy_project`, the one the benchmarks make too)
holds ``conf/`` (without ``conf/local`` contents), ``pyproject.toml``, ``.telemetry``, an empty
``src/`` (Kedro checks that the source folder exists; the package itself is imported from this
checkout's ``src/``, see :func:`kedro_subprocess_env`, or the editable install) and the ``data/01_raw`` ..
``data/08_reporting`` skeleton. The train pipeline runs there once per test session as
``python -m kedro run`` in a NEW PROCESS, as a user would start it, so every test that reads its
models also checks that they load where nothing was built or trained before. It writes its own
``mlflow.db`` (sqlite store) and ``mlruns/`` artifact folder, so the repository stays untouched.
Later steps may run in-process (:func:`run_kedro_session`) or as further processes
(:func:`run_kedro_cli`).

Every test that uses it is marked ``slow``; the whole ``tests/pipelines`` set takes a few
minutes on 2 CPU cores (the train run dominates).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from benchmarks.support.project_copy import KEDRO_ENV_VARS, copy_project
from benchmarks.support.project_copy import subprocess_env as kedro_subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_ENV = "smoke"


def run_kedro_cli(project_path: Path, *args: str, env: str = SMOKE_ENV, check: bool = True,
                  timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``python -m kedro run --env <env> <args>`` in ``project_path`` as a NEW process.

    With ``check`` a non-zero exit fails the test with the end of the process' output.
    """
    command = [sys.executable, "-m", "kedro", "run", "--env", env, *args]
    result = subprocess.run(command, check=False, cwd=project_path, env=kedro_subprocess_env(COLUMNS="240"),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} failed (exit {result.returncode}):\n"
                    f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def rerun_evaluation(project_path: Path) -> subprocess.CompletedProcess[str]:
    """Delete a trained project's evaluation outputs and predictions, then run ``evaluation`` in a
    NEW process (:func:`run_kedro_cli`), so every output read afterwards was written by it."""
    import shutil  # noqa: PLC0415

    from pancreas_seg.models.names import MODEL_NAMES  # noqa: PLC0415

    shutil.rmtree(project_path / "data" / "08_reporting" / "evaluation")
    for name in MODEL_NAMES:
        shutil.rmtree(project_path / "data" / "07_model_output" / name)
    return run_kedro_cli(project_path, "--pipelines=evaluation")


def latest_model_card(project_path: Path, architecture: str) -> dict[str, Any]:
    """The newest ``data/06_models/<arch>/model_card.json/<version>/model_card.json`` (with its
    ``version``); the model file of that same version must exist."""
    root = project_path / "data" / "06_models" / architecture
    versions = sorted(p.parent.name for p in (root / "model_card.json").glob("*/model_card.json"))
    assert versions, f"no model card under {root / 'model_card.json'}"
    version = versions[-1]
    assert (root / "model.keras" / version / "model.keras").is_file(), f"no model of card version {version}"
    return {**json.loads((root / "model_card.json" / version / "model_card.json").read_text()), "version": version}


def _forget_mlflow_stores() -> None:
    """Forget MLflow's cached stores and sqlite engines for relative URIs (private API, best effort).

    MLflow caches stores per URI string and SQLAlchemy engines per database URI: after one
    in-process session, the relative ``sqlite:///mlflow.db`` of ``conf/base/mlflow.yml`` would keep
    writing to the first project's database even after a later session changed into another
    project copy. If these internals move, this does nothing and the cross-copy tests fail loudly.
    """
    import importlib  # noqa: PLC0415

    def module_vars(name: str) -> dict[str, Any]:
        try:
            return vars(importlib.import_module(name))
        except ImportError:  # pragma: no cover
            return {}

    for module, name in (("mlflow.tracking._tracking_service.registry", "TrackingStoreRegistry"),
                         ("mlflow.tracking._model_registry.registry", "ModelRegistryStoreRegistry")):
        cached = getattr(module_vars(module).get(name), "_get_store_with_resolved_uri", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    for module in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                   "mlflow.store.jobs.sqlalchemy_store"):
        for store in module_vars(module).values():
            engines = vars(store).get("_engine_map") if isinstance(store, type) else None
            for uri in [u for u in engines or {} if u.startswith("sqlite:///") and not u.startswith("sqlite:////")]:
                engines.pop(uri).dispose()


@contextmanager
def inside_project(project_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[None]:
    """Run in ``project_path`` as ``kedro run`` would: cwd, telemetry off, clean MLflow state after.

    kedro-mlflow sets the global MLflow tracking URI to ``sqlite:///mlflow.db`` (relative to the
    cwd) and exports it as ``MLFLOW_TRACKING_URI``; both are restored on exit so nothing later in
    the test session can write to the repository's ``mlflow.db``. A run still active after the
    session is ended as KILLED (``kedro run`` would end it at interpreter exit), which the
    end-to-end test reports.
    """
    import mlflow  # noqa: PLC0415
    from mlflow.tracking._tracking_service import utils as tracking_utils  # noqa: PLC0415

    saved_cwd, saved_env, saved_path = Path.cwd(), dict(os.environ), list(sys.path)
    saved_uri = getattr(tracking_utils, "_tracking_uri", None)
    os.environ.update(KEDRO_ENV_VARS)
    os.environ.update(extra_env or {})
    os.chdir(project_path)
    _forget_mlflow_stores()
    try:
        yield
    finally:
        while mlflow.active_run() is not None:  # must not leak into the next session or test
            mlflow.end_run(status="KILLED")
        os.chdir(saved_cwd)
        mlflow.set_tracking_uri(saved_uri)
        _forget_mlflow_stores()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path


def run_kedro_session(project_path: Path, env: str = SMOKE_ENV, runtime_params: dict[str, Any] | None = None,
                      extra_env: dict[str, str] | None = None, **run_kwargs: Any) -> dict[str, Any]:
    """``kedro run --env <env> [--params ...] [run options]`` as a real in-process ``KedroSession``.

    ``run_kwargs`` go to ``KedroSession.run`` (``pipeline_name=``, ``namespaces=`` ...). Dotted
    ``runtime_params`` keys are nested exactly as ``kedro run --params a.b=c`` does it.
    """
    from kedro.framework.session import KedroSession  # noqa: PLC0415
    from kedro.framework.startup import bootstrap_project  # noqa: PLC0415

    params = nest_dotted(runtime_params) if runtime_params else None
    with inside_project(project_path, extra_env):
        bootstrap_project(project_path)
        with KedroSession.create(project_path=project_path, env=env, runtime_params=params) as session:
            return session.run(**run_kwargs)


def nest_dotted(params: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, the shape ``kedro run --params`` hands to the session.

    (The CLI uses ``OmegaConf.from_dotlist``; values here keep their Python types.)
    """
    nested: dict[str, Any] = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after one real ``kedro run --pipelines=train --env smoke`` (a new process).

    Treat it as read-only: tests that change training state work on a copy of it.
    """
    project = copy_project(REPO_ROOT, tmp_path_factory.mktemp("smoke_project") / "pancreas_seg")
    run_kedro_cli(project, "--pipelines=train")
    return project


@pytest.fixture(scope="session")
def smoke_tracking_uri(smoke_project: Path) -> str:
    """The copy's sqlite MLflow store (absolute URI)."""
    return f"sqlite:///{smoke_project / 'mlflow.db'}"


@pytest.fixture(scope="session")
def kedro_session_runner() -> Callable[..., dict[str, Any]]:
    """:func:`run_kedro_session`, for tests that start further in-process sessions."""
    return run_kedro_session


@pytest.fixture(scope="session")
def kedro_cli_runner() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_kedro_cli`, for tests that start ``kedro run`` as new processes."""
    return run_kedro_cli


@pytest.fixture(scope="session")
def evaluation_rerunner() -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """:func:`rerun_evaluation`: evaluation again, in a new process, over fresh outputs."""
    return rerun_evaluation


@pytest.fixture(scope="session")
def model_card_reader() -> Callable[[Path, str], dict[str, Any]]:
    """:func:`latest_model_card`, the newest model card of an architecture in a project copy."""
    return latest_model_card


@pytest.fixture(scope="session")
def project_copier() -> Callable[[Path], Path]:
    """``copier(destination)``: :func:`~benchmarks.support.project_copy.copy_project` of this checkout, for
    tests that need an empty project copy."""
    return functools.partial(copy_project, REPO_ROOT)


@pytest.fixture(scope="session")
def subprocess_env() -> Callable[..., dict[str, str]]:
    """:func:`kedro_subprocess_env`, the environment for ``kedro``/``mlflow`` subprocesses."""
    return kedro_subprocess_env


@pytest.fixture(scope="session")
def configured_learning_rates() -> dict[str, float]:
    """Each model's learning rate as the project's config resolves it for the smoke env
    (base + smoke, per-architecture overrides merged over ``training``; the cascade's stage 2)."""
    env = "smoke"
    from kedro.config import OmegaConfigLoader

    from pancreas_seg.models.names import ARCHITECTURE_NAMES
    from pancreas_seg.learning.setup import merge_settings

    loader = OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft"})
    params = loader["parameters"]
    overrides = {arch: params[arch]["architecture"].get("overrides") for arch in ARCHITECTURE_NAMES}
    overrides["cascade"] = params["cascade"]["stage2"].get("overrides")   # stage 2 is the cascade's trained model
    return {name: float(merge_settings(params["training"], extra)["learning_rate"])
            for name, extra in overrides.items()}
