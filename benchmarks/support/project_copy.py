"""A throwaway copy of this Kedro project (its configuration and an empty data skeleton), and the
environment of a process that runs in it.

The end-to-end tests (``tests/pipelines/conftest.py``) and the MSD-scale benchmarks
(``benchmarks/_scale.py``) run ``kedro run`` in such a copy, so the checkout's ``data/``,
``mlflow.db`` and ``mlruns/`` stay untouched. The copy holds no code: its ``src/`` is empty (Kedro
only checks that the source folder exists); the package is imported from this checkout's ``src/``
(:func:`subprocess_env` puts it first on ``PYTHONPATH``) or the editable install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The project's data layers, the folders under ``data/`` (Kedro's data-engineering convention).
DATA_LAYERS: tuple[str, ...] = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
                                "06_models", "07_model_output", "08_reporting")
#: Top-level files copied when the source project has them (``.telemetry``: Kedro's consent answer).
PROJECT_FILES: tuple[str, ...] = ("pyproject.toml", ".telemetry")
#: The root of this checkout (the project the tests and benchmarks copy and import).
CHECKOUT: Path = Path(__file__).resolve().parents[2]
#: Environment of every Kedro call in a copy (in-process sessions and subprocesses): no telemetry.
KEDRO_ENV_VARS: dict[str, str] = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}


def copy_project(source: Path, destination: Path) -> Path:
    """Copy the project at ``source`` into ``destination`` (created if missing) and return it, resolved.

    Copies ``conf/`` except what ``conf/local/`` holds (machine settings and credentials: the copy
    gets an empty ``conf/local/``) and :data:`PROJECT_FILES`; creates an empty ``src/`` and
    ``data/<layer>/`` for each of :data:`DATA_LAYERS`. Nothing in ``source`` changes. Fails with
    ``FileExistsError`` if ``destination`` already has a ``conf/``.
    """
    source, destination = Path(source), Path(destination)
    local = source / "conf" / "local"
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "conf", destination / "conf",
                    ignore=lambda folder, names: names if Path(folder) == local else [])
    (destination / "conf" / "local").mkdir(exist_ok=True)
    for name in PROJECT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    (destination / "src").mkdir(exist_ok=True)
    for layer in DATA_LAYERS:
        (destination / "data" / layer).mkdir(parents=True, exist_ok=True)
    return destination.resolve()


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus :data:`KEDRO_ENV_VARS` and ``extra``, for ``kedro``/``mlflow`` processes.

    ``MLFLOW_TRACKING_URI`` is dropped (unless ``extra`` sets it): a relative ``sqlite:///mlflow.db``
    exported by an in-process kedro-mlflow setup would otherwise resolve against the subprocess'
    working directory. This checkout's ``src/`` goes first on ``PYTHONPATH``: project copies have an
    empty ``src/``, and the subprocess must run the code under test, not whatever checkout is
    installed.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(KEDRO_ENV_VARS)
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT / "src"),
                                         *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(extra)
    return env
