"""The lab's MLflow tracking server (no Kedro): ``mlflow server`` on a PostgreSQL store, with the
artifacts in one shared folder that the server proxies (clients upload and download them over
HTTP, ``mlflow-artifacts:/``, so they need no access to that folder).

::

    PGPASSWORD=... python -m pancreas_seg.tracking.server \\
        --backend-store-uri postgresql+psycopg://pancreas_seg@127.0.0.1:5433/mlflow \\
        --artifacts-destination /srv/pancreas_seg/mlartifacts --port 5000

or ``make mlflow-server`` with ``MLFLOW_BACKEND_STORE_URI`` and ``MLFLOW_ARTIFACTS_DESTINATION``
set. It binds to 127.0.0.1 unless ``--host`` says otherwise (then it warns: MLflow's server has no
authentication; put it behind a proxy that authenticates). The password goes in ``PGPASSWORD``
(libpq reads it), not in the URI, so it never shows in ``ps`` or in logs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pancreas_seg.tracking.postgres import redact

#: Environment variables read when the options are not given (the ``mlflow server`` CLI's own names).
BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"
ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"
#: Server settings applied unless the environment sets them: MLflow 3's job runner (huey consumers
#: for GenAI online scoring and trace archival, 7 extra processes) is off: this project logs no traces.
SERVER_ENV_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`SERVER_ENV_DEFAULTS` where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in SERVER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def server_command(backend_store_uri: str, artifacts_destination: str | Path, host: str = "127.0.0.1",
                   port: int = 5000, workers: int = 2, python: str = sys.executable) -> list[str]:
    """The ``mlflow server`` command line (proxied artifacts in ``artifacts_destination``)."""
    destination = str(artifacts_destination)
    if "://" not in destination:
        destination = str(Path(destination).expanduser().resolve())
    return [python, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_backend(uri: str) -> str | None:
    """Why ``uri`` is not a usable shared backend store, or None."""
    if not uri:
        return f"no backend store: pass --backend-store-uri or set {BACKEND_ENV}"
    if uri.startswith("postgresql://"):
        return (f"{redact(uri)}: plain postgresql:// makes SQLAlchemy use psycopg2, which is not installed; "
                f"write postgresql+psycopg://...")
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return f"{redact(uri)}: a team server needs a database server (postgresql+psycopg://...), not {uri.split(':')[0]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pancreas_seg.tracking.server",
                                     description="The lab's MLflow tracking server on PostgreSQL (docs/team.md).")
    parser.add_argument("--backend-store-uri", default=os.environ.get(BACKEND_ENV, ""),
                        help=f"postgresql+psycopg://user@host:port/db (default: ${BACKEND_ENV}); password in PGPASSWORD")
    parser.add_argument("--artifacts-destination", default=os.environ.get(ARTIFACTS_ENV, ""),
                        help=f"shared artifact folder or URI the server proxies (default: ${ARTIFACTS_ENV})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the command (password redacted) and exit")
    args = parser.parse_args(argv)
    problem = check_backend(args.backend_store_uri)
    if problem is None and not args.artifacts_destination:
        problem = f"no artifact folder: pass --artifacts-destination or set {ARTIFACTS_ENV}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)  # noqa: T201
        return 2
    if not is_loopback(args.host):
        print(f"warning: binding to {args.host}: MLflow's server has no authentication; anyone who reaches this "  # noqa: T201
              "port can read and delete runs. Put it behind a proxy that authenticates (docs/team.md).",
              file=sys.stderr)
    command = server_command(args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.workers)
    print(" ".join(redact(part) for part in command[1:]), file=sys.stderr)  # noqa: T201
    if args.dry_run:
        return 0
    if "://" not in str(args.artifacts_destination):
        Path(command[command.index("--artifacts-destination") + 1]).mkdir(parents=True, exist_ok=True)
    os.execve(command[0], command, server_environment())   # the server replaces this process
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
