"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from pancreas_seg.core.environment import required_env
from pancreas_seg.core.warnings_filter import install as install_warning_filters

install_warning_filters()  # known-harmless third-party warnings off, in one place

from pancreas_seg.hooks import (  # noqa: E402
    DaskConfigHook,
    KerasBackendHook,
    MlflowExperimentsHook,
    MultiProcessHook,
)

# KerasBackendHook's after_context_created is `tryfirst`: KERAS_BACKEND is set before any other hook
# (MultiProcessHook imports Keras) and before any node runs.
HOOKS = (KerasBackendHook(), MultiProcessHook(), MlflowExperimentsHook(), DaskConfigHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"], "dask": ["dask*", "dask*/**"]},
    # Environments (smoke, msd, local) override single keys, not whole top-level sections.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft", "catalog": "soft", "dask": "soft"},
    # ${required_env:NAME}: an environment variable that must be set (conf/team's tracking server).
    "custom_resolvers": {"required_env": required_env},
}
