"""Helpers of the lab-tracking tests (tests/team): the PostgreSQL requirement (skip locally, fail
under ``CI=true``), project copies with ``conf/team_smoke``, ``kedro run`` in them as new processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from benchmarks.support.project_copy import copy_project
from benchmarks.support.team_stack import TeamStack
from pancreas_seg.tracking.postgres import missing_requirements
from pancreas_seg.tracking.team_env import compose_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
TEAM_SMOKE_ENV = "team_smoke"
SMOKE_EXPERIMENT = "pancreas_seg_smoke"


def _in_ci() -> bool:   # the rule of tests/conftest.py's in_ci
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


class TeamTrained(NamedTuple):
    """What :func:`team_trained` leaves: the project copy, its ``kedro run`` and when it started
    (ms since the epoch, as MLflow's ``start_time``)."""

    project: Path
    result: subprocess.CompletedProcess[str]
    started_ms: int


def require_postgres() -> None:
    """Skip (locally) or fail (``CI=true``) when this machine cannot run a PostgreSQL of its own."""
    missing = missing_requirements()
    if missing:
        message = f"PostgreSQL tests need {'; '.join(missing)}"
        if _in_ci():
            pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(message)


def make_team_project(destination: Path) -> Path:
    """A project copy (benchmarks.support.project_copy) with ``conf/team_smoke`` composed in it."""
    project = copy_project(REPO_ROOT, destination)
    compose_environment(project / "conf", ["smoke", "team"], TEAM_SMOKE_ENV)
    return project


def run_team_kedro(project: Path, stack: TeamStack, *args: str, env: str = TEAM_SMOKE_ENV,
                   check: bool = True, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``python -m kedro run --env <env> <args>`` in ``project`` as a NEW process recording into ``stack``."""
    command = [sys.executable, "-m", "kedro", "run", "--env", env, *args]
    result = subprocess.run(command, cwd=project, env=stack.environment(COLUMNS="240", **extra_env),
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} failed (exit {result.returncode}):\n"
                    f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


@contextmanager
def through(server_uri: str) -> Iterator[None]:
    """MLflow's global tracking AND registry URIs point at ``server_uri`` inside the block (a
    ``models:/<name>@<alias>`` is resolved in the registry URI, which defaults to this process'
    own), restored afterwards."""
    import mlflow  # noqa: PLC0415
    from mlflow.tracking._model_registry import utils as registry_utils  # noqa: PLC0415
    from mlflow.tracking._tracking_service import utils as tracking_utils  # noqa: PLC0415

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(server_uri)   # these also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI
    mlflow.set_registry_uri(server_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
