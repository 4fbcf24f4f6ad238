"""A PostgreSQL server of one's own (no Kedro, no MLflow): ``initdb`` into a folder, ``pg_ctl start``
on a loopback port, databases created, ``pg_ctl stop`` at the end.

The tests start a throwaway one per session (``tests/team``); a lab without a database
administrator can run a lasting one with the CLI::

    python -m pancreas_seg.tracking.postgres start --root /srv/pancreas_seg/pg --port 5433
    python -m pancreas_seg.tracking.postgres stop --root /srv/pancreas_seg/pg

Layout of ``root``: ``data/`` (the cluster, ``PGDATA``), ``password`` (the superuser's password,
generated, mode 0600), ``postgres.log`` (the server's log). The server listens on ``127.0.0.1``
only (TCP; no Unix socket, so no path-length limits), and every connection needs the password
(``scram-sha-256``): never ``trust``, since a lab machine has other users.

PostgreSQL refuses to run as root: when this process is root, the server runs as an unprivileged
OS user (``postgres`` by default) that owns ``root``, which must therefore be reachable by it
(e.g. under ``/srv`` or ``/tmp``, not under a mode-0700 home).

Connection strings never carry the password here unless asked: libpq reads ``PGPASSWORD`` (see
:meth:`LocalPostgres.environment`), so ``postgresql+psycopg://user@127.0.0.1:port/db`` is enough
for MLflow, SQLAlchemy and Optuna.
"""

from __future__ import annotations

import argparse
import glob
import grp
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

#: The SQLAlchemy driver name of psycopg 3 (``postgresql://`` alone means psycopg2, not installed).
DRIVER = "postgresql+psycopg"
DEFAULT_USER = "pancreas_seg"
DEFAULT_DATABASES = ("mlflow", "optuna")
#: OS user the server runs as when this process is root (initdb and postgres refuse root).
DEFAULT_OS_USER = "postgres"


class PostgresError(RuntimeError):
    """PostgreSQL is missing, did not start, or refused something (the message says which)."""


def find_binary(name: str) -> str | None:
    """``name`` (``initdb``, ``pg_ctl``) on ``PATH``, else in the newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def missing_requirements() -> list[str]:
    """What a :class:`LocalPostgres` needs and this machine lacks (empty when it can run one)."""
    missing = [f"the PostgreSQL program `{name}`" for name in ("initdb", "pg_ctl") if find_binary(name) is None]
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        missing.append("the Python package psycopg (pip install 'psycopg[binary]==3.3.6', extra `team`)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(DEFAULT_OS_USER)
        except KeyError:
            missing.append(f"an unprivileged OS user `{DEFAULT_OS_USER}` to run PostgreSQL as (this process is root)")
    return missing


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, tags and messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, location = rest.partition("@")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{location}"


class LocalPostgres:
    """A PostgreSQL cluster in ``root`` (created on first start), served on ``host:port``.

    Args:
        root: the folder holding ``data/``, ``password`` and ``postgres.log`` (created if missing).
        port: TCP port; None = the one the cluster was created with, else a free one.
        user: the cluster's superuser (all connections use it).
        databases: created at start when missing.
        os_user: OS user the server runs as; None = this process's user, or ``postgres`` if root.
        host: the address it listens on (loopback by default).
    """

    def __init__(self, root: Path | str, port: int | None = None, user: str = DEFAULT_USER,
                 databases: Iterable[str] = DEFAULT_DATABASES, os_user: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.root = Path(root).resolve()
        self.data_dir = self.root / "data"
        self.password_file = self.root / "password"
        self.log_file = self.root / "postgres.log"
        self.port_file = self.root / "port"
        self.user = user
        self.databases = tuple(databases)
        self.host = host
        if os_user is None and os.geteuid() == 0:
            os_user = DEFAULT_OS_USER
        self.os_user = os_user
        if port is None and self.port_file.is_file():
            port = int(self.port_file.read_text().strip())
        self.port = port or free_port(host)

    # ---- processes
    def _run(self, program: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        binary = find_binary(program)
        if binary is None:
            raise PostgresError(f"PostgreSQL's `{program}` was not found on PATH or in /usr/lib/postgresql/*/bin")
        kwargs: dict = {}
        if self.os_user is not None and self.os_user != pwd.getpwuid(os.geteuid()).pw_name:
            entry = pwd.getpwnam(self.os_user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.root), "PGPASSWORD": self.password}
        result = subprocess.run([binary, *args], capture_output=True, text=True, env=env, cwd=self.root,
                                timeout=timeout, check=False, **kwargs)
        if check and result.returncode != 0:
            raise PostgresError(f"`{program} {' '.join(args)}` failed (exit {result.returncode}): "
                                f"{(result.stderr or result.stdout).strip()[-2000:]}\n{self.log_tail()}")
        return result

    def _own(self, path: Path) -> None:
        """Give ``path`` to the OS user the server runs as (when that is not us)."""
        if self.os_user is None or os.geteuid() != 0:
            return
        entry = pwd.getpwnam(self.os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _check_reachable(self) -> None:
        if self.os_user is None or os.geteuid() != 0:
            return
        entry = pwd.getpwnam(self.os_user)
        groups = {g.gr_gid for g in grp.getgrall() if self.os_user in g.gr_mem} | {entry.pw_gid}
        for parent in self.root.parents:
            info = parent.stat()
            mode = info.st_mode
            allowed = (mode & 0o001) or (info.st_uid == entry.pw_uid and mode & 0o100) or \
                (info.st_gid in groups and mode & 0o010)
            if not allowed:
                raise PostgresError(
                    f"PostgreSQL runs as OS user {self.os_user!r} (it refuses root), which cannot enter "
                    f"{parent} (mode {oct(mode & 0o777)}): put the root folder {self.root} somewhere it can "
                    f"reach, e.g. under /tmp or /srv")

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip() if self.password_file.is_file() else ""

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        """``initdb``: a new cluster in ``root/data`` with a generated superuser password."""
        if self.initialized:
            return
        self._check_reachable()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._own(self.root)
        if not self.password_file.is_file():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.password_file.chmod(0o600)
        self._own(self.password_file)
        self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--pwfile", str(self.password_file),
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pancreas_seg.tracking.postgres: loopback TCP only, no Unix socket\n"
                       f"listen_addresses = '{self.host}'\nunix_socket_directories = ''\n")
        self.port_file.write_text(f"{self.port}\n")
        self._own(self.port_file)

    @property
    def running(self) -> bool:
        return self.initialized and self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self, timeout_s: float = 60) -> LocalPostgres:
        """Create the cluster if needed, start it (waiting until it accepts connections), create the
        missing databases. Starting a running cluster only creates the databases."""
        self.init()
        if not self.running:
            self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                      "-t", str(int(timeout_s)), "-o", f"-p {self.port}", timeout=timeout_s + 30)
        self.port_file.write_text(f"{self.port}\n")
        self.create_databases(self.databases)
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (``smart``, ``fast``: sessions ended cleanly; ``immediate``: like a
        crash, recovered from the WAL at the next start). Stopping a stopped cluster does nothing."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60")

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        """Stop (``mode``), stay down ``down_s`` seconds, start again on the same port."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def connect(self, database: str = "postgres", **kwargs: object):  # noqa: ANN201 - psycopg.Connection
        import psycopg  # noqa: PLC0415

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database, connect_timeout=10, **kwargs)

    def create_databases(self, names: Iterable[str]) -> None:
        with self.connect(autocommit=True) as connection:
            existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in existing:
                    connection.execute(f'CREATE DATABASE "{name}"')

    # ---- what clients need
    def url(self, database: str, with_password: bool = False, driver: str = DRIVER) -> str:
        """SQLAlchemy URL of ``database`` (without the password unless asked: libpq reads ``PGPASSWORD``)."""
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"

    def environment(self) -> dict[str, str]:
        """libpq's variables for clients of this server (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``)."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user, "PGPASSWORD": self.password}

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _print_environment(server: LocalPostgres) -> None:
    print(f"PostgreSQL {server.host}:{server.port} (cluster {server.data_dir}, log {server.log_file})")  # noqa: T201
    print("For clients (the password is in", server.password_file, "- keep it private):")  # noqa: T201
    print(f"  export PGHOST={server.host} PGPORT={server.port} PGUSER={server.user} "  # noqa: T201
          f"PGPASSWORD=\"$(cat {server.password_file})\"")
    for name in server.databases:
        print(f"  {name}: {server.url(name)}")  # noqa: T201


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pancreas_seg.tracking.postgres",
                                     description="A lab's own PostgreSQL for MLflow and Optuna (docs/team.md).")
    parser.add_argument("command", choices=["start", "stop", "status", "url"])
    parser.add_argument("--root", required=True, help="folder holding data/, password and postgres.log")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: the cluster's, else a free one)")
    parser.add_argument("--user", default=DEFAULT_USER, help="superuser name (default: %(default)s)")
    parser.add_argument("--databases", default=",".join(DEFAULT_DATABASES),
                        help="comma-separated databases to create (default: %(default)s)")
    args = parser.parse_args(argv)
    server = LocalPostgres(args.root, args.port, args.user, [d for d in args.databases.split(",") if d])
    try:
        if args.command == "start":
            server.start()
            _print_environment(server)
        elif args.command == "stop":
            server.stop()
            print(f"stopped {server.data_dir}")  # noqa: T201
        elif args.command == "status":
            print("running" if server.running else "stopped", server.host, server.port)  # noqa: T201
            return 0 if server.running else 3
        else:
            _print_environment(server)
    except PostgresError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
