"""``runtime.keras_backend``: the choice (pure), and applying it in fresh interpreters.

The kedro-run side (the hook, a real training under JAX, the error for a backend that is not
installed) is in tests/pipelines/test_keras_backend_run.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pancreas_seg.core.backend import (
    INSTALL_HINTS,
    BackendError,
    choose_backend,
    installed_backends,
    normalise_setting,
)

SRC = Path(__file__).resolve().parents[1] / "src"
BOTH = ("jax", "tensorflow")


def _no_probe() -> bool:
    raise AssertionError("JAX's devices must not be probed here")


@pytest.mark.parametrize(("accelerator", "expected"), [(True, "jax"), (False, "tensorflow")])
def test_auto_prefers_jax_on_a_gpu_else_tensorflow(accelerator: bool, expected: str) -> None:
    assert choose_backend("auto", {}, installed=BOTH, jax_accelerator=accelerator) == expected


def test_auto_takes_the_installed_backend() -> None:
    assert choose_backend("auto", {}, installed=["jax"], jax_accelerator=False) == "jax"
    assert choose_backend("auto", {}, installed=["tensorflow"], jax_accelerator=_no_probe) == "tensorflow"


def test_auto_probes_jax_only_when_jax_is_installed_and_there_is_no_explicit_choice() -> None:
    assert choose_backend("auto", {"KERAS_BACKEND": "tensorflow"}, installed=BOTH,
                          jax_accelerator=_no_probe) == "tensorflow"
    assert choose_backend("auto", {}, installed=["tensorflow"], jax_accelerator=_no_probe) == "tensorflow"


def test_auto_lets_an_explicit_keras_backend_variable_win() -> None:
    assert choose_backend("auto", {"KERAS_BACKEND": "jax"}, installed=BOTH, jax_accelerator=False) == "jax"
    assert choose_backend(None, {"KERAS_BACKEND": " JAX "}, installed=BOTH, jax_accelerator=False) == "jax"
    assert choose_backend("auto", {"KERAS_BACKEND": ""}, installed=BOTH, jax_accelerator=False) == "tensorflow"


def test_an_explicit_setting_wins_over_the_environment() -> None:
    assert choose_backend("jax", {"KERAS_BACKEND": "tensorflow"}, installed=BOTH, jax_accelerator=_no_probe) == "jax"
    assert choose_backend("tensorflow", {"KERAS_BACKEND": "jax"}, installed=BOTH, jax_accelerator=True) == "tensorflow"


def test_multi_process_runs_get_jax_without_touching_its_devices() -> None:
    environ = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    assert choose_backend("auto", environ, installed=BOTH, jax_accelerator=_no_probe) == "jax"


@pytest.mark.parametrize(("setting", "environ", "installed", "extra"), [
    ("tensorflow", {}, ["jax"], '.[tf]'),
    ("jax", {}, ["tensorflow"], '.[gpu]'),
    ("auto", {"KERAS_BACKEND": "jax"}, ["tensorflow"], '.[gpu]'),
    ("auto", {"KERAS_BACKEND": "tensorflow"}, ["jax"], '.[tf]'),
])
def test_a_backend_that_is_not_installed_names_the_extra(setting: str, environ: dict, installed: list,
                                                          extra: str) -> None:
    with pytest.raises(BackendError, match="is not installed") as error:
        choose_backend(setting, environ, installed=installed, jax_accelerator=False)
    assert f'pip install -e "{extra}"' in str(error.value)


def test_no_backend_at_all_names_both_extras() -> None:
    with pytest.raises(BackendError) as error:
        choose_backend("auto", {}, installed=[], jax_accelerator=False)
    assert '".[gpu]"' in str(error.value) and '".[tf]"' in str(error.value)


@pytest.mark.parametrize("bad", ["torch", "gpu", "", 3])
def test_the_setting_takes_three_values(bad: object) -> None:
    with pytest.raises(ValueError, match="runtime.keras_backend must be one of"):
        normalise_setting(bad)


def test_install_hints_name_the_extras_of_pyproject() -> None:
    assert '".[gpu]"' in INSTALL_HINTS["jax"] and '".[tf]"' in INSTALL_HINTS["tensorflow"]


def test_installed_backends_imports_nothing() -> None:
    before = set(sys.modules)
    found = installed_backends()
    assert set(found) <= {"jax", "tensorflow"}
    assert not {"jax", "tensorflow", "keras"} & (set(sys.modules) - before)


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_DISTRIBUTION_NUM_PROCESSES")}
    environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
                   JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, timeout=300, check=False)


@pytest.mark.subprocess
def test_apply_backend_sets_keras_backend_before_keras_and_refuses_to_switch_after() -> None:
    pytest.importorskip("jax")
    process = _fresh_python("""
        import os, sys
        from pancreas_seg.core.backend import BackendError, apply_backend, describe_devices, jax_has_accelerator
        assert not jax_has_accelerator()          # no GPU plugin here: answered without importing JAX
        assert "jax" not in sys.modules, "jax imported without a GPU plugin"
        assert apply_backend("jax") == "jax" and os.environ["KERAS_BACKEND"] == "jax"
        import keras
        print("BACKEND", keras.backend.backend())
        print("DEVICES", describe_devices())
        assert apply_backend("auto") == "jax"    # auto keeps what Keras runs on
        try:
            apply_backend("tensorflow")
        except BackendError as error:
            print("REFUSED", error)
    """, KERAS_BACKEND="tensorflow")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "BACKEND jax" in process.stdout
    assert "DEVICES ['cpu:0 cpu']" in process.stdout
    assert "REFUSED runtime.keras_backend is 'tensorflow' but Keras was already imported" in process.stdout


def test_dask_workers_started_elsewhere_get_the_drivers_backend(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import pickle  # noqa: PLC0415

    from pancreas_seg.runners.dask_runner import ProjectOnWorker  # noqa: PLC0415

    monkeypatch.setenv("KERAS_BACKEND", "jax")   # what KerasBackendHook leaves in the driver
    plugin = pickle.loads(pickle.dumps(ProjectOnWorker(None, str(tmp_path))))   # as the scheduler ships it
    assert plugin.keras_backend == "jax"
