"""Project commands for the ``kedro`` CLI (Kedro adds a package's ``cli`` group to its own).

``kedro dask-cluster [--env E] [--port 8786] [--address-file F]``: a LocalCluster with the
``local_cluster`` settings of ``conf/<env>/dask.yml`` that stays up for many runs
(``kedro run --runner=pancreas_seg.runners.DaskRunner --runner-params address=tcp://127.0.0.1:8786``);
see docs/dask.md.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click
from kedro.framework.cli.project import run  # noqa: F401 - `python -m pancreas_seg` runs this project's `run`
from kedro.framework.cli.utils import env_option


@click.group(name="pancreas_seg")
def cli() -> None:
    """pancreas_seg's project commands."""


@cli.command("dask-cluster")
@env_option
@click.option("--port", type=int, default=8786, show_default=True,
              help="scheduler port on 127.0.0.1 (0: any free port)")
@click.option("--address-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the scheduler address here once the workers are ready")
def dask_cluster(env: str | None, port: int, address_file: Path | None) -> None:
    """Start a LocalCluster from dask.yml for many runs; stop it with Ctrl-C (or SIGTERM)."""
    from kedro.framework.session import KedroSession  # noqa: PLC0415

    from pancreas_seg.core.atomic import atomic_write_text  # noqa: PLC0415
    from pancreas_seg.runners.cluster import ClusterSettings, project_config  # noqa: PLC0415
    from pancreas_seg.runners.dask_runner import serve_local_cluster  # noqa: PLC0415

    with KedroSession.create(env=env) as session:
        session.load_context()  # the project hook hands conf/<env>/dask.yml to project_config()
    settings = ClusterSettings.from_config(project_config())
    if settings.scheduler_address or settings.cluster_class:
        raise click.UsageError(f"dask.yml (env {env or 'local'}) names a scheduler or a cluster class; "
                               "`kedro dask-cluster` starts a LocalCluster from its local_cluster settings only")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def ready(address: str) -> None:
        if address_file is not None:
            atomic_write_text(address_file, address + "\n")
        click.echo(f"Dask LocalCluster of {settings.n_workers} worker(s) ready at {address}\n"
                   f"  kedro run --runner=pancreas_seg.runners.DaskRunner --runner-params address={address}\n"
                   "Ctrl-C stops it.")

    try:
        serve_local_cluster(settings, port, ready, stop)
    except KeyboardInterrupt:
        pass
