"""Fixtures shared by the DICOM tests (``test_dicom.py``, ``test_dicom_hospital.py``).

The real CT (``../shared/realdata/ct_abdomen_3mm.nii.gz``) is the example CT of the
TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence); its
pancreas mask was derived from TotalSegmentator's own prediction. Used read-only; see the
folder's NOTICE.md. Without it the tests skip locally and FAIL under ``CI=true``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.imaging.dicom_builders import CT_NAME, MASK_NAME


@pytest.fixture(scope="module")
def ct(require_realdata: Callable[..., Path]) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 (X, Y, Z), affine) of the real CT, read by nibabel directly."""
    image = nib.load(str(require_realdata(CT_NAME) / CT_NAME))
    hu = np.asanyarray(image.dataobj)
    assert hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max
    return hu.astype(np.int16), image.affine


@pytest.fixture(scope="module")
def mask(require_realdata: Callable[..., Path]) -> np.ndarray:
    """The real CT's pancreas mask (uint8 0/1, same grid)."""
    return np.asanyarray(nib.load(str(require_realdata(MASK_NAME) / MASK_NAME)).dataobj).astype(np.uint8)


@pytest.fixture(scope="module")
def dcm2niix_bin() -> str:
    """The real dcm2niix binary from the ``dcm2niix`` wheel (test extra): skip locally, fail in CI."""
    try:
        import dcm2niix  # noqa: PLC0415
    except ImportError:
        message = "dcm2niix is not installed (pip install dcm2niix, the test extra)"
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:   # as tests/conftest.py
            pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    return dcm2niix.bin
