"""A server process on 127.0.0.1 (``mlflow server``, ``mlflow models serve``): start, wait, stop.

The one implementation the tests and benchmarks use: the server runs in a process group of its
own (so its uvicorn/gunicorn workers stop with it), logs to a file, and is ready when a URL
answers HTTP 200.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType


class ServerError(RuntimeError):
    """The server exited or did not answer in time (the message holds the end of its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """``command`` started in ``cwd`` with ``env``; stdout and stderr go to ``log_path``.

    Use as a context manager, or call :meth:`stop`. ``ready_url`` is polled by :meth:`wait_ready`.
    """

    def __init__(self, command: Sequence[str], ready_url: str, log_path: Path, cwd: Path,
                 env: Mapping[str, str]) -> None:
        self.ready_url = ready_url
        self.log_path = Path(log_path)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float, interval_s: float = 0.5) -> float:
        """Wait until ``ready_url`` answers 200; the seconds waited.

        Raises:
            ServerError: the process exited, or ``timeout_s`` passed (with the end of the log).
        """
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"{self.process.args[2:5]} exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > timeout_s:
                raise ServerError(f"no answer on {self.ready_url} after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(interval_s)

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the server's log."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers; close the log."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
