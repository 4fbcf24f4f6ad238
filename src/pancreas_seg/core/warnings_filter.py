"""The one place where known-harmless third-party warnings are silenced, so any warning shown means something.

:func:`install` runs from ``settings.py``, i.e. for every ``kedro run``, ``kedro ipython``, the
notebook's ``%reload_kedro`` and ``python -m pancreas_seg``. Each filter is narrow: it matches one
message (regex), one category and only the third-party module that emits it. The same message
raised from anywhere else - our own code included - still shows. Add a filter here only for a
warning the project cannot fix, with the reason next to it (and a case in
``tests/test_warnings_filter.py``).

Not silenced on purpose: Kedro's deprecation of ``--pipeline`` (use ``--pipelines``) and every
warning of our own code.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_HARMLESS", "KnownWarning", "KnownWarningLogFilter", "install"]


@dataclass(frozen=True)
class KnownWarning:
    """One silenced warning: ``message`` and ``module`` are regexes as in :func:`warnings.filterwarnings`.

    ``message`` is matched at the start of the text (case-insensitive), ``module`` against the whole
    name of the module the warning is attributed to. ``category`` is the dotted name of the warning
    class (imported only when :func:`install` runs).

    ``file``: set it (a regex for the end of the path of the emitting file) for a warning that its
    library raises under its own ``warnings.catch_warnings()`` + ``simplefilter(...)``, which
    overrides every outer filter: it is then also dropped where Kedro shows warnings, in the
    ``py.warnings`` logger (``logging.captureWarnings``), by the same message, category and file.
    """

    message: str
    category: str
    module: str
    why: str
    file: str | None = None

    def log_pattern(self) -> re.Pattern[str] | None:
        """Regex for the text ``warnings.formatwarning`` makes of this warning (None without ``file``)."""
        if self.file is None:
            return None
        class_name = self.category.rpartition(".")[2]
        return re.compile(rf"(?:.*[/\\])?(?:{self.file}):\d+: {re.escape(class_name)}: "
                          rf"(?i:{self.message})")


KNOWN_HARMLESS: tuple[KnownWarning, ...] = (
    KnownWarning(
        message=r"register_new_resolver\(\) is deprecated",
        category="builtins.UserWarning",
        module=r"kedro\.config\.omegaconf_config|kedro_mlflow\.framework\.hooks\.mlflow_hook",
        why="OmegaConf deprecation raised inside Kedro's OmegaConfigLoader and kedro-mlflow's hook "
            "(their code, not ours); fixed upstream when they move to register_resolver()"),
    KnownWarning(
        message=r"(\x1b\[\d+m)?Add type hints to the `predict` method",
        category="builtins.UserWarning",
        module=r"mlflow\.pyfunc\.utils\.data_validation",
        file=r"mlflow[/\\]pyfunc[/\\]utils[/\\]data_validation\.py",
        why="MLflow checks every PythonModel subclass when it is defined; kedro-mlflow's "
            "KedroPipelineModel has no type hints and is defined when kedro-mlflow is imported. "
            "MLflow raises it under its own simplefilter('once'), so only the py.warnings log "
            "filter drops it (settings.py is loaded before Kedro imports plugin commands)"),
    KnownWarning(
        message=r"IProgress not found",
        category="tqdm.TqdmWarning",
        module=r"tqdm\.auto(notebook)?",
        why="tqdm.auto in a Jupyter kernel without ipywidgets (the notebook needs no progress "
            "widgets); it falls back to text progress bars"),
)

#: TensorFlow's C++ log level unless the user set one: 1 hides INFO lines (CPU feature guard, XLA
#: service start-up) and keeps TensorFlow's C++ warnings and errors.
TF_CPP_MIN_LOG_LEVEL = "1"


def _category(dotted: str) -> type[Warning] | None:
    module_name, _, class_name = dotted.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError:  # the package is not installed, so it cannot warn either
        return None
    category = getattr(module, class_name)
    if not (isinstance(category, type) and issubclass(category, Warning)):
        raise TypeError(f"{dotted} is not a Warning subclass")
    return category


class KnownWarningLogFilter(logging.Filter):
    """Drops ``py.warnings`` log records of the :data:`KNOWN_HARMLESS` entries that have a ``file``."""

    def __init__(self, known: tuple[KnownWarning, ...] = KNOWN_HARMLESS) -> None:
        super().__init__()
        self.patterns = [p for p in (k.log_pattern() for k in known) if p is not None]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.match(text) for p in self.patterns)


def install() -> None:
    """Silence exactly the warnings in :data:`KNOWN_HARMLESS` (idempotent); quiet TF's INFO logs."""
    for known in KNOWN_HARMLESS:
        category = _category(known.category)
        if category is not None:
            # append=False puts it first and drops an identical earlier filter: repeated calls
            # (%reload_kedro re-imports settings) do not pile up
            warnings.filterwarnings("ignore", message=known.message, category=category,
                                    module=rf"(?:{known.module})\Z")
    py_warnings = logging.getLogger("py.warnings")
    if not any(isinstance(f, KnownWarningLogFilter) for f in py_warnings.filters):
        py_warnings.addFilter(KnownWarningLogFilter())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_CPP_MIN_LOG_LEVEL)
