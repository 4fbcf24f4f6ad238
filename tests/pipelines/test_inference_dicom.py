"""``kedro run --pipelines=inference`` on a folder of DICOM series, in a NEW process after ``train``.

The series are written with pydicom from the shared real CT (``../shared/realdata/ct_abdomen_3mm.nii.gz``,
TotalSegmentator's example CT, Apache-2.0, used read-only): one uncompressed, one JPEG 2000
lossless, and one bad series (MR modality). The masks must equal those of the same CT given as
NIfTI, and the DICOM-SEG must read back with highdicom, referencing its source series.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from pancreas_seg.imaging.dicom_series_writer import write_ct_series

pytestmark = pytest.mark.slow

CT_NAME = "ct_abdomen_3mm.nii.gz"


def test_dicom_folder_in_nifti_and_dicom_seg_out(smoke_project: Path, tmp_path: Path, require_realdata,
                                                 kedro_cli_runner) -> None:
    project = tmp_path / "pancreas_seg"
    shutil.copytree(smoke_project, project, ignore=shutil.ignore_patterns("mlruns", "notebooks"))
    ct = nib.load(require_realdata(CT_NAME) / CT_NAME)
    hu = np.asarray(ct.dataobj).astype(np.int16)
    series_folder = tmp_path / "scans"
    write_ct_series(hu, ct.affine, series_folder / "plain", series_uid="1.2.826.0.1.3680043.8.498.101",
                    description="abdomen plain")
    write_ct_series(hu, ct.affine, series_folder / "j2k", series_uid="1.2.826.0.1.3680043.8.498.102",
                    description="abdomen j2k", transfer_syntax=JPEG2000Lossless)
    write_ct_series(hu[:, :, :8], ct.affine, series_folder / "mr", series_uid="1.2.826.0.1.3680043.8.498.103",
                    description="not a CT", modality="MR")
    nifti_dir = tmp_path / "nifti_in"
    nifti_dir.mkdir()
    shutil.copy(require_realdata(CT_NAME) / CT_NAME, nifti_dir / CT_NAME)

    bad = kedro_cli_runner(project, "--pipelines=inference", "--params",
                           f"inference.input_path={series_folder},inference.output_dir={tmp_path / 'out_fail'}",
                           check=False)
    assert bad.returncode != 0
    assert "1.2.826.0.1.3680043.8.498.103" in bad.stdout + bad.stderr and "not CT" in bad.stdout + bad.stderr

    out = tmp_path / "out"
    kedro_cli_runner(project, "--pipelines=inference", "--params",
                     f"inference.input_path={series_folder},inference.output_dir={out},"
                     "inference.on_invalid=skip,inference.output_format=dicom_seg")
    report = json.loads((project / "data" / "08_reporting" / "inference_report.json").read_text())
    assert report["input_kind"] == "dicom" and len(report["outputs"]) == 2
    assert [s["series"] for s in report["skipped"]] == ["1.2.826.0.1.3680043.8.498.103"]

    kedro_cli_runner(project, "--pipelines=inference", "--params",
                     f"inference.input_path={nifti_dir},inference.output_dir={tmp_path / 'out_nifti'}")
    reference = np.asarray(nib.load(tmp_path / "out_nifti" / CT_NAME).dataobj)
    for row in report["outputs"]:
        mask = nib.load(row["mask"])
        assert mask.shape == ct.shape and np.allclose(mask.affine, ct.affine, atol=1e-4)
        assert np.array_equal(np.asarray(mask.dataobj), reference), row["case_id"]      # same as NIfTI input
        seg = hd.seg.segread(row["dicom_seg"])
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["case_id"]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Pancreas", "Tumour"]
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert len({r.ReferencedSOPInstanceUID for r in referenced}) == ct.shape[2]   # every source slice
