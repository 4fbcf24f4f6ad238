"""Shared fixtures: a small, valid, SYNTHETIC Task07 folder written once per test session.

Tests that change files copy it first (:func:`fresh_task07`), so the pristine copy stays valid.
"""

from __future__ import annotations

import shutil
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
