"""Environment variables that a Kedro environment requires: the ``${required_env:NAME}`` resolver.

Cheap to import and Kedro-free (``settings.py`` imports it, and so does every process that
configures the project, Dask workers included: nothing here may pull in MLflow or Keras).
"""

from __future__ import annotations

import os

#: The variables a team environment reads, and what each must hold (for the error when unset).
REQUIRED_VARIABLES = {
    "MLFLOW_TRACKING_URI": "the lab's MLflow tracking server, e.g. http://127.0.0.1:5000 (`make mlflow-server`)",
}


def required_env(name: str) -> str:
    """The value of the environment variable ``name``; a clear error when it is unset or empty.

    Kedro's config loader calls it for ``${required_env:NAME}`` (settings.py registers it), so an
    environment that needs a server says so before kedro-mlflow falls back to a local store.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        meaning = REQUIRED_VARIABLES.get(name, "a value this environment needs")
        raise ValueError(f"the environment variable {name} is not set: this Kedro environment reads "
                         f"{meaning} from it. Export it before `kedro run` (docs/team.md).")
    return value
