"""Fixtures of the lab-tracking tests: a REAL PostgreSQL (initdb/pg_ctl, throwaway) and a REAL
``mlflow server`` on it, once per session (:mod:`benchmarks.support.team_stack`); project copies
whose ``conf/team_smoke`` is ``conf/smoke`` + ``conf/team`` (:mod:`pancreas_seg.tracking.team_env`,
the command docs/team.md gives labs); ``kedro run --env team_smoke`` as new processes
(:mod:`tests.team.team_support`).

No mocks and no SQLite stand-in. Without PostgreSQL (``initdb``/``pg_ctl``) or psycopg the tests
are skipped on a developer's machine and FAIL under ``CI=true``, as the real-CT tests do
(tests/conftest.py): a CI run that skipped them would claim more than it checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.support.local_server import ServerError
from benchmarks.support.team_stack import TeamStack, team_stack
from tests.team.team_support import TeamTrained, make_team_project, require_postgres, run_team_kedro


@pytest.fixture(scope="session")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamStack]:
    """PostgreSQL + ``mlflow server`` on 127.0.0.1 for the whole session; stopped at the end."""
    require_postgres()
    try:
        with team_stack(tmp_path_factory.mktemp("team_stack")) as stack:
            yield stack
    except ServerError as error:
        pytest.fail(f"mlflow server on PostgreSQL did not start: {error}")


@pytest.fixture(scope="session")
def fresh_team_stack(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], object]:
    """``with fresh_team_stack() as stack:`` a stack of its own (tests that stop its database)."""
    require_postgres()
    return lambda: team_stack(tmp_path_factory.mktemp("own_team_stack"))


@pytest.fixture(scope="session")
def team_trained(team: TeamStack, tmp_path_factory: pytest.TempPathFactory) -> TeamTrained:
    """A project copy after ``kedro run --pipelines=train --env team_smoke`` into the session's server.

    The session's server also holds the runs of other tests (the heavy ones use the same
    experiment): select this training's runs with ``started_ms``.
    """
    project = make_team_project(tmp_path_factory.mktemp("team_project") / "pancreas_seg")
    started_ms = int(time.time() * 1000)
    return TeamTrained(project, run_team_kedro(project, team, "--pipelines=train"), started_ms)
