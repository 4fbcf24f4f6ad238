"""``kedro dask-cluster``: a LocalCluster that outlives runs, used as a user would.

In a throwaway project copy, the command starts in a NEW process; ``kedro run --pipelines=data
--env smoke --runner=pancreas_seg.runners.DaskRunner --runner-params address=...`` then runs on it
as another new process, twice; SIGTERM (what Ctrl-C's KeyboardInterrupt also ends in) stops it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_runs_connect_to_a_running_cluster_started_by_the_command(
        tmp_path: Path, project_copier: Callable[[Path], Path], kedro_cli_runner: Callable[..., subprocess.CompletedProcess[str]],
        subprocess_env: Callable[..., dict[str, str]]) -> None:
    from distributed import Client  # noqa: PLC0415

    project = project_copier(tmp_path / "project")
    address_file = tmp_path / "scheduler.address"
    log_path = tmp_path / "dask_cluster.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "kedro", "dask-cluster", "--env", "smoke", "--port", "0",
                                   "--address-file", str(address_file)], cwd=project, env=subprocess_env(),
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not address_file.is_file():
            assert server.poll() is None, f"kedro dask-cluster exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no address after 180 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.2)
        address = address_file.read_text().strip()
        assert address.startswith("tcp://127.0.0.1:")
        assert f"ready at {address}" in log_path.read_text()
        with Client(address) as client:
            workers = client.run(lambda dask_worker: (dask_worker.state.total_resources, dask_worker.state.nthreads))
        # conf/base/dask.yml: 2 workers of 1 thread, each offering one accelerator
        assert sorted(workers.values()) == [({"accelerator": 1.0}, 1)] * 2

        geometry = project / "data" / "04_feature" / "slice_geometry.json"
        for _ in range(2):
            geometry.unlink(missing_ok=True)
            result = kedro_cli_runner(project, "--pipelines=data", "--runner=pancreas_seg.runners.DaskRunner",
                                      f"--runner-params=address={address}")
            assert f"connecting to the scheduler at {address}" in result.stdout + result.stderr
            assert "starting a LocalCluster" not in result.stdout + result.stderr
            assert geometry.is_file()   # the preprocessing node's output, written by a worker
        shards = sorted(p.name for p in (project / "data" / "05_model_input" / "slices").iterdir())
        assert len(shards) == 8     # the smoke env's 8 labelled cases
        with Client(address) as client:   # the runs left the cluster and its workers up
            assert set(client.run(lambda: 1)) == set(workers)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    assert code == 0, log_path.read_text()[-4000:]
    with pytest.raises(OSError):
        with Client(address, timeout=3):
            pass
