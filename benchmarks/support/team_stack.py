"""A lab's tracking stack on this machine, for tests and benchmarks: a throwaway PostgreSQL
(:class:`pancreas_seg.tracking.postgres.LocalPostgres`) and a real ``mlflow server`` on it
(:mod:`pancreas_seg.tracking.server`'s command: proxied artifacts in a folder of its own), both on
127.0.0.1 and free ports, both stopped at the end.

``TeamStack.environment()`` is what a ``kedro run --env team...`` process needs:
``MLFLOW_TRACKING_URI`` (the server), ``PANCREAS_SEG_OPTUNA_STORAGE`` (the ``optuna`` database)
and libpq's ``PG*`` variables (the password).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.support.local_server import LocalServer, free_port
from benchmarks.support.project_copy import subprocess_env
from pancreas_seg.tracking.postgres import LocalPostgres
from pancreas_seg.tracking.server import server_command, server_environment

#: Environment variable conf/team reads the Optuna database URL from.
OPTUNA_STORAGE_ENV = "PANCREAS_SEG_OPTUNA_STORAGE"
STARTUP_TIMEOUT_S = 180


@dataclass
class TeamStack:
    postgres: LocalPostgres
    server: LocalServer
    tracking_uri: str          # http://127.0.0.1:<port>
    artifacts: Path            # the server's --artifacts-destination

    @property
    def optuna_url(self) -> str:
        return self.postgres.url("optuna")

    def environment(self, **extra: str) -> dict[str, str]:
        """Environment of a ``kedro``/worker process that records into this stack."""
        return subprocess_env(MLFLOW_TRACKING_URI=self.tracking_uri, **{OPTUNA_STORAGE_ENV: self.optuna_url},
                              **self.postgres.environment(), **extra)


@contextmanager
def team_stack(folder: Path, server_workers: int = 2) -> Iterator[TeamStack]:
    """Start PostgreSQL and ``mlflow server``; the server's log and artifacts go under ``folder``.

    The cluster itself lives in a fresh ``/tmp/pancreas_seg_pg_*`` folder (removed at the end):
    when the tests run as root, PostgreSQL runs as the ``postgres`` user, which cannot enter
    pytest's mode-0700 temporary folders.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pg_root = Path(tempfile.mkdtemp(prefix="pancreas_seg_pg_"))
    postgres = LocalPostgres(pg_root, databases=("mlflow", "optuna"))
    try:
        postgres.start()
        port = free_port()
        artifacts = folder / "mlartifacts"
        command = server_command(postgres.url("mlflow"), artifacts, port=port, workers=server_workers)
        artifacts.mkdir(exist_ok=True)
        tracking_uri = f"http://127.0.0.1:{port}"
        env = server_environment(subprocess_env(**postgres.environment()))
        with LocalServer(command, f"{tracking_uri}/health", folder / "mlflow_server.log", folder, env) as server:
            server.wait_ready(STARTUP_TIMEOUT_S)
            yield TeamStack(postgres, server, tracking_uri, artifacts)
    finally:
        postgres.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
