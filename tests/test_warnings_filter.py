"""warnings_filter: each known-harmless warning is silenced from its own module only."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from pancreas_seg.core import warnings_filter
from pancreas_seg.core.warnings_filter import KNOWN_HARMLESS, KnownWarningLogFilter, install

#: message regex of a KNOWN_HARMLESS entry -> the real warnings it stands for (text, module)
SAMPLES: dict[str, list[tuple[str, str]]] = {
    KNOWN_HARMLESS[0].message: [
        ("register_new_resolver() is deprecated and will be removed in a future release.\n"
         "Use register_resolver() instead.", "kedro.config.omegaconf_config"),
        ("register_new_resolver() is deprecated and will be removed in a future release.",
         "kedro_mlflow.framework.hooks.mlflow_hook")],
    KNOWN_HARMLESS[1].message: [
        ("\x1b[33mAdd type hints to the `predict` method to enable data validation and automatic "
         "signature inference during model logging.\x1b[0m", "mlflow.pyfunc.utils.data_validation")],
    KNOWN_HARMLESS[2].message: [
        ("IProgress not found. Please update jupyter and ipywidgets.", "tqdm.auto")],
}


@pytest.fixture
def clean_warnings() -> Iterator[None]:
    """Every warning shown (no filters but ours), filters and py.warnings restored afterwards."""
    py_warnings = logging.getLogger("py.warnings")
    saved_log_filters = list(py_warnings.filters)
    # a KedroSession earlier in this pytest process (settings.py) may have installed ours already
    py_warnings.filters[:] = [f for f in saved_log_filters if not isinstance(f, KnownWarningLogFilter)]
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("always")
        yield
    py_warnings.filters[:] = saved_log_filters


def _category(dotted: str) -> type[Warning]:
    category = warnings_filter._category(dotted)
    if category is None:
        pytest.skip(f"{dotted} is not installed, so it cannot warn")
    return category


def _shown(text: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(text, category, f"/site-packages/{module.replace('.', '/')}.py", 10,
                               module=module)
    return bool(caught)


def test_every_known_warning_has_a_sample_and_a_reason() -> None:
    assert set(SAMPLES) == {k.message for k in KNOWN_HARMLESS}
    assert all(len(k.why) > 40 for k in KNOWN_HARMLESS)


@pytest.mark.parametrize("known", KNOWN_HARMLESS, ids=lambda k: k.category)
def test_known_warning_is_silenced_only_from_its_module(known, clean_warnings) -> None:
    category = _category(known.category)
    for text, module in SAMPLES[known.message]:
        assert _shown(text, category, module)  # visible before install(): the sample is real
        install()
        assert not _shown(text, category, module)
        # the same text from our own code, or from a module whose name merely starts alike, shows
        assert _shown(text, category, "pancreas_seg.tracking")
        assert _shown(text, category, module + "_extra")
        # other messages from that module still show
        assert _shown("something else went wrong", category, module)
        warnings.resetwarnings()
        warnings.simplefilter("always")


def test_install_is_idempotent(clean_warnings) -> None:
    install()
    filters, log_filters = list(warnings.filters), list(logging.getLogger("py.warnings").filters)
    install()
    assert warnings.filters == filters
    assert logging.getLogger("py.warnings").filters == log_filters


def test_tf_log_level_is_only_a_default(monkeypatch: pytest.MonkeyPatch, clean_warnings) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    install()
    import os  # noqa: PLC0415

    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    install()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


def test_log_filter_drops_only_the_mlflow_type_hint_record() -> None:
    log_filter = KnownWarningLogFilter()
    text = SAMPLES[KNOWN_HARMLESS[1].message][0][0]
    path = "/venv/lib/python3.11/site-packages/mlflow/pyfunc/utils/data_validation.py"

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("py.warnings", logging.WARNING, "warnings.py", 109, message,
                                 None, None)

    assert not log_filter.filter(record(f"{path}:187: UserWarning: {text}\n  color_warning(\n"))
    assert log_filter.filter(record(f"/src/pancreas_seg/x.py:187: UserWarning: {text}\n"))
    assert log_filter.filter(record(f"{path}:187: UserWarning: another message\n"))
    assert log_filter.filter(record(f"{path}:187: FutureWarning: {text}\n"))


def test_mlflow_type_hint_warning_is_gone_from_kedro_log_but_was_there(
        clean_warnings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real warning: MLflow raises it under its own simplefilter('once'), so only the
    py.warnings log filter (Kedro logs warnings via logging.captureWarnings) can drop it."""
    pyfunc = pytest.importorskip("mlflow.pyfunc")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    py_warnings = logging.getLogger("py.warnings")

    def to_log(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: PLR0917
        # what logging.captureWarnings(True) installs (set here directly: pytest and an earlier
        # KedroSession in this process may each have swapped showwarning already)
        py_warnings.warning("%s", warnings.formatwarning(message, category, filename, lineno, line))

    def define_model() -> None:
        # MLflow shows it "once" per text: forget earlier ones (other tests may import kedro-mlflow)
        warnings.onceregistry.clear()

        class NoHints(pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):  # no type hints on purpose
                return model_input

    monkeypatch.setattr(warnings, "showwarning", to_log)
    py_warnings.addHandler(handler)
    try:
        define_model()
        shown_without = [r for r in records if "Add type hints" in r.getMessage()]
        records.clear()
        install()
        define_model()
        shown_with = [r for r in records if "Add type hints" in r.getMessage()]
    finally:
        py_warnings.removeHandler(handler)
    assert shown_without, "MLflow no longer warns: drop this entry from KNOWN_HARMLESS"
    assert not shown_with
