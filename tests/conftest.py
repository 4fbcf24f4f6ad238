"""Shared fixtures: a small, valid, SYNTHETIC Task07 folder written once per test session, and
the REAL CT files (``../shared/realdata``) with the rule for when they are missing.

Tests that change files copy it first (:func:`fresh_task07`), so the pristine copy stays valid.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
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
