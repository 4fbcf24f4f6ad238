"""Shared fixtures: a small, valid, SYNTHETIC Task07 folder written once per test session, the
REAL CT files (``../shared/realdata``) with the rule for when they are missing, and a runner for
Python scripts under ``KERAS_BACKEND=jax`` in a fresh interpreter (:class:`JaxScript`).

Tests that change files copy it first (:func:`fresh_task07`), so the pristine copy stays valid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pancreas_seg.phantoms import PhantomConfig, write_synthetic_task07

#: Small phantoms: 64 x 64 px at 5-5.5 mm, 6-8 mm slices over 100-120 mm (13-20 slices).
SMALL_PHANTOM = PhantomConfig(shape_xy_px=64, spacing_xy_mm=(5.0, 5.5),
                              slice_thickness_mm=(6.0, 8.0), z_extent_mm=(100.0, 120.0))
SMALL_N_TRAIN, SMALL_N_TEST, SMALL_SEED = 4, 1, 3

@pytest.fixture(scope="session")
def small_task07(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine Task07 folder (4 labelled cases pancreas_001..004, 1 test case pancreas_005).

    Read-only by convention: copy it with ``fresh_task07`` before changing anything.
    """
    root = tmp_path_factory.mktemp("small_task07") / "Task07_Pancreas"
    return write_synthetic_task07(root, SMALL_N_TRAIN, SMALL_N_TEST, SMALL_PHANTOM,
                                  seed=SMALL_SEED).resolve()


@pytest.fixture
def fresh_task07(small_task07: Path, tmp_path: Path) -> Path:
    """A private, writable copy of :func:`small_task07` under this test's ``tmp_path``."""
    copy = tmp_path / "raw" / "Task07_Pancreas"
    shutil.copytree(small_task07, copy)
    return copy.resolve()


# --------------------------------------------------------------------------------------------
# Real CT data: skipped locally when absent, a failure under CI
# --------------------------------------------------------------------------------------------
#: Overrides where the real CT files are looked for (default: ``../shared/realdata`` next to the
#: repository, read-only).
REALDATA_ENV_VAR = "PANCREAS_SEG_REALDATA"
REALDATA_FILES = ("ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz")
DEFAULT_REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to true (CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def realdata_dir() -> Path:
    """The folder holding the real CT files: ``$PANCREAS_SEG_REALDATA`` or ``../shared/realdata``."""
    override = os.environ.get(REALDATA_ENV_VAR)
    return Path(override).expanduser().resolve() if override else DEFAULT_REALDATA


@pytest.fixture(scope="session")
def require_realdata() -> Callable[..., Path]:
    """``require_realdata(*file_names)`` -> the real-data folder, once those files are there.

    If any is missing the calling test is skipped on a developer's machine, but FAILS under CI
    (``CI=true``): a CI run that silently skipped every real-CT test would claim more than it checked.
    """

    def require(*names: str) -> Path:
        folder = realdata_dir()
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            message = (f"real CT test data missing: {', '.join(missing)} not found in {folder} "
                       f"(copy shared/realdata next to the repository, or set {REALDATA_ENV_VAR})")
            if in_ci():
                pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
            pytest.skip(message)
        return folder

    return require


@pytest.fixture(scope="session")
def realdata(require_realdata: Callable[..., Path]) -> Path:
    """The real-data folder holding the CT and its pancreas mask (skip locally / fail under CI)."""
    return require_realdata(*REALDATA_FILES)


# --------------------------------------------------------------------------------------------
# Python scripts under KERAS_BACKEND=jax, each in a fresh interpreter
# --------------------------------------------------------------------------------------------
SRC = Path(__file__).resolve().parents[1] / "src"
#: Exit status of a JAX script whose ``import jax`` failed (it prints ``NOJAX <error>`` first).
NO_JAX_EXIT = 77
#: What :meth:`JaxScript.write` puts before every script: without JAX, exit with NO_JAX_EXIT.
JAX_SCRIPT_PREAMBLE = f"""import sys

try:
    import jax  # noqa: F401
except ImportError as error:
    print(f"NOJAX {{error}}", flush=True)
    sys.exit({NO_JAX_EXIT})

"""


class JaxScript:
    """Runs Python scripts in a NEW interpreter under ``KERAS_BACKEND=jax`` on CPU.

    Keras' backend and XLA's flags (``--xla_force_host_platform_device_count``) take effect only
    before Keras/JAX are imported, and this pytest process keeps its own backend (TensorFlow by
    default), so such code runs as a script in a subprocess. Without JAX installed the test skips.
    """

    @staticmethod
    def write(path: Path, body: str) -> Path:
        """Write :data:`JAX_SCRIPT_PREAMBLE` + ``body`` to ``path``; returns ``path``."""
        path.write_text(JAX_SCRIPT_PREAMBLE + body)
        return path

    @staticmethod
    def environment(xla_flags: Sequence[str] = (), **extra: str) -> dict[str, str]:
        """This process's environment for a JAX child, plus ``extra``.

        ``KERAS_BACKEND=jax``, ``JAX_PLATFORMS=cpu``, ``TF_CPP_MIN_LOG_LEVEL=2``, this checkout's
        ``src/`` first on ``PYTHONPATH`` (the code under test, not whatever checkout is installed)
        and ``XLA_FLAGS``: the inherited ones, then ``--xla_backend_optimization_level=0`` (XLA:CPU
        spends seconds optimising each small program; level 0 builds several times faster and
        computes the same thing: both sides of every comparison use it), then ``xla_flags``.
        """
        flags = [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", *xla_flags]
        return {
            **os.environ,
            "KERAS_BACKEND": "jax",
            "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "XLA_FLAGS": " ".join(flag for flag in flags if flag),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
            **extra,
        }

    @staticmethod
    def skip_without_jax(returncode: int, output: str) -> None:
        """Skip the test if a script ended through the preamble's ``import jax`` failure."""
        if returncode == NO_JAX_EXIT and "NOJAX" in output:  # pragma: no cover - depends on the environment
            pytest.skip(f"`import jax` fails in this environment: {output.strip()[-500:]}")

    def run(self, script: Path, body: str, *args: str, xla_flags: Sequence[str] = (), timeout: float = 300,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Write ``body`` to ``script`` and run ``python <script> <args>`` in :meth:`environment`.

        Skips without JAX; a non-zero exit fails the test with the end of the script's stderr.
        Returns the finished process (stdout and stderr as text).
        """
        self.write(script, body)
        process = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                                 env=self.environment(xla_flags, **extra_env), timeout=timeout, check=False)
        self.skip_without_jax(process.returncode, process.stdout)
        assert process.returncode == 0, process.stderr[-4000:]
        return process


@pytest.fixture(scope="session")
def jax_script() -> JaxScript:
    """:class:`JaxScript`: write and run Python scripts under ``KERAS_BACKEND=jax`` in a new process."""
    return JaxScript()
