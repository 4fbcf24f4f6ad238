"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


class ArchitectureSelectionHook:
    """Builds the pipelines for the architectures enabled in ``params:training.architectures``.

    Kedro's ``register_pipelines`` takes no arguments, so this hook passes the enabled list from
    the run's configuration (including ``--env`` and ``--params`` overrides) to the registry
    before the session first reads the pipelines.
    """

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        from kedro.framework.project import PACKAGE_NAME, pipelines  # noqa: PLC0415

        from pancreas_seg import pipeline_registry  # noqa: PLC0415

        enabled = context.params.get("training", {}).get("architectures")
        if enabled is not None and pipeline_registry.set_enabled_architectures(enabled):
            logger.info("Enabled architectures: %s", ", ".join(enabled))
            pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")  # rebuild with the new list
