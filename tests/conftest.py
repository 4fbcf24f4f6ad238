"""Shared fixtures: a small, valid, SYNTHETIC Task07 folder written once per test session, the
REAL CT files (``../shared/realdata``) with the rule for when they are missing, and a runner for
Python scripts under ``KERAS_BACKEND=jax`` in a fresh interpreter (:class:`JaxScript`).

Tests that change files copy it first (:func:`fresh_task07`), so the pristine copy stays valid.

Test tiers: a test that is not ``slow`` may start another Python interpreter only when it is
marked ``subprocess`` (:func:`pytest_runtest_protocol` fails it otherwise), so the fast tier
``make test-fast`` (``-m "not slow and not subprocess"``) runs in this one process.
"""

from __future__ import annotations

import multiprocessing.process
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
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


# --------------------------------------------------------------------------------------------
# Test tiers: `make test-fast` runs -m "not slow and not subprocess", all in this one process
# --------------------------------------------------------------------------------------------
#: Fixtures that start another Python interpreter: every test using one (directly or through
#: another fixture) is marked ``subprocess``.
SUBPROCESS_FIXTURES = frozenset({"jax_script"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use a :data:`SUBPROCESS_FIXTURES` fixture ``subprocess``."""
    for item in items:
        if SUBPROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.subprocess)


def starts_python(program: object) -> bool:
    """True when ``program`` (a child's executable or ``argv[0]``) is a Python interpreter or a
    script run by one (``#!...python`` first line: kedro, mlflow, optuna-dashboard ...)."""
    if isinstance(program, bytes):
        program = os.fsdecode(program)
    if not isinstance(program, (str, os.PathLike)):
        return False
    path = shutil.which(os.fspath(program)) or os.fspath(program)
    if Path(path).name.startswith("python") or os.path.realpath(path) == os.path.realpath(sys.executable):
        return True
    try:
        with open(path, "rb") as file:
            first_line = file.readline(256)
    except OSError:
        return False
    return first_line.startswith(b"#!") and b"python" in first_line


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Fail a test (setup, call or teardown) that starts another Python process (``subprocess``
    or ``multiprocessing``) unless it is marked ``subprocess`` or ``slow``: the fast tier
    (``make test-fast``) must start none, so its 3-minute budget holds and no training runs in
    a child process. Other programs (``dcm2niix``, ``ldconfig`` ...) may still be started."""
    if item.get_closest_marker("subprocess") or item.get_closest_marker("slow"):
        return (yield)

    def refuse(what: str) -> None:
        pytest.fail(f"{item.nodeid} starts another Python process ({what}) but is marked neither "
                    "`subprocess` nor `slow`: add @pytest.mark.subprocess (or `pytestmark = "
                    "pytest.mark.subprocess` for the module) so that `make test-fast` leaves it out",
                    pytrace=True)

    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def guarded_execute_child(self, args, executable, *rest, **kwargs):
        first = args.split()[0] if isinstance(args, (str, bytes)) and args.split() else (
            args if isinstance(args, os.PathLike) else (list(args) or [None])[0])
        for program in (executable, first):
            if program is not None and starts_python(program):
                refuse(f"subprocess: {os.fsdecode(os.fspath(program))}")
        return execute_child(self, args, executable, *rest, **kwargs)

    def guarded_start(process: multiprocessing.process.BaseProcess) -> None:
        refuse(f"multiprocessing: {type(process).__name__}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", guarded_execute_child)
        patch.setattr(multiprocessing.process.BaseProcess, "start", guarded_start)
        return (yield)
