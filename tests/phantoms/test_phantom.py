"""Tests of the synthetic Task07 phantom generator, on small real NIfTI files (no mocks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pancreas_seg.imaging.nifti_io import load_nifti, orientation_code
from pancreas_seg.phantoms import (
    DATASET_NAME,
    PhantomCase,
    PhantomConfig,
    case_seed,
    dataset_case,
    dataset_fingerprint,
    make_phantom,
    non_ras_indices,
    tumour_indices,
    write_synthetic_task07,
)

SMALL = PhantomConfig(shape_xy_px=64, spacing_xy_mm=(5.0, 6.0), slice_thickness_mm=(4.0, 6.0),
                      z_extent_mm=(120.0, 140.0))
N_TRAIN, N_TEST, SEED = 6, 2, 1234


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "Task07_Pancreas"
    calls: list[tuple[int, int, str]] = []
    out = write_synthetic_task07(root, N_TRAIN, N_TEST, SMALL, seed=SEED,
                                 progress=lambda i, n, cid: calls.append((i, n, cid)))
    assert out == root
    assert [c[0] for c in calls] == list(range(1, N_TRAIN + N_TEST + 1))
    assert {c[1] for c in calls} == {N_TRAIN + N_TEST}
    return root


def _training_cases(root: Path) -> list[tuple[Path, Path]]:
    meta = json.loads((root / "dataset.json").read_text())
    return [(root / e["image"], root / e["label"]) for e in meta["training"]]


# ---------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_case_and_other_seed_differs() -> None:
    a, b = make_phantom(7, SMALL), make_phantom(7, SMALL)
    assert isinstance(a, PhantomCase)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    c = make_phantom(8, SMALL)
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_written_files_are_byte_identical_and_case_seeds_are_order_independent(
        dataset: Path, tmp_path: Path) -> None:
    other = write_synthetic_task07(tmp_path / "again", N_TRAIN, N_TEST, SMALL, seed=SEED)
    for rel in ("imagesTr/pancreas_002.nii.gz", "labelsTr/pancreas_005.nii.gz",
                "imagesTs/pancreas_008.nii.gz"):
        assert (dataset / rel).read_bytes() == (other / rel).read_bytes()
    # case 2 (index 1, stored RAS) regenerated on its own equals the file
    case = make_phantom(case_seed(SEED, 1), SMALL)
    assert np.array_equal(load_nifti(dataset / "imagesTr/pancreas_002.nii.gz").array, case.hu)


@pytest.mark.subprocess
def test_two_processes_write_the_same_files(dataset: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    other = write_synthetic_task07(tmp_path / "Task07_Pancreas", N_TRAIN, N_TEST, SMALL, seed=SEED,
                                   progress=lambda i, n, cid: calls.append((i, n, cid)), processes=2)
    assert (other / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.nii.gz"))
    assert len(files) == 2 * N_TRAIN + N_TEST
    for rel in files:
        assert (dataset / rel).read_bytes() == (other / rel).read_bytes(), rel
    assert [c[0] for c in calls] == list(range(1, N_TRAIN + N_TEST + 1))
    assert sorted(c[2] for c in calls) == [f"pancreas_{i:03d}" for i in range(1, N_TRAIN + N_TEST + 1)]
    assert [p.name for p in tmp_path.iterdir()] == ["Task07_Pancreas"]  # no temp folders


# --------------------------------------------------------------------------------------- validity
def test_case_arrays_have_the_documented_types_and_plausible_hu() -> None:
    case = make_phantom(3, PhantomConfig(shape_xy_px=128, spacing_xy_mm=(2.5, 3.0),
                                         slice_thickness_mm=(3.0, 4.0), z_extent_mm=(120, 130)))
    assert case.hu.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.affine.dtype == np.float64 and case.affine.shape == (4, 4)
    assert case.hu.shape == case.label.shape and case.hu.ndim == 3
    assert case.hu.min() >= -1024 and case.hu.max() <= 3071
    assert case.hu.min() < -900                       # air outside the body
    assert case.hu.max() > 400                        # bone
    body = case.hu > -500
    assert -150 < np.median(case.hu[body]) < 120
    panc = case.label == 1
    assert 60 < np.median(case.hu[panc]) < 130


def test_training_cases_are_valid(dataset: Path) -> None:
    n_tumour = 0
    orientations = []
    for image_path, label_path in _training_cases(dataset):
        img, lab = load_nifti(image_path), load_nifti(label_path)
        assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
        assert img.array.shape == lab.array.shape
        np.testing.assert_array_equal(img.affine, lab.affine)
        assert set(np.unique(lab.array)) <= {0, 1, 2}
        assert (lab.array == 1).sum() > 20, f"{label_path.name}: no pancreas"
        assert img.array.min() >= -1024 and img.array.max() <= 3071
        sx, sy, sz = img.spacing_mm
        assert 5.0 - 1e-4 <= sx <= 6.0 + 1e-4 and abs(sx - sy) < 1e-4
        assert 4.0 - 1e-4 <= sz <= 6.0 + 1e-4
        assert 120.0 - sz <= img.array.shape[2] * sz <= 140.0 + sz
        assert img.array.shape[:2] == (64, 64)
        orientations.append(orientation_code(img.affine))
        tumour = lab.array == 2
        if tumour.any():
            n_tumour += 1
            # every tumour component lies in the pancreas: it touches pancreas voxels and the
            # mass is darker than the gland around it
            comps, n = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
            for i in range(1, n + 1):
                grown = ndimage.binary_dilation(comps == i, structure=np.ones((3, 3, 3)))
                assert (lab.array[grown] == 1).any()
            assert tumour.sum() < (lab.array > 0).sum()
            assert img.array[tumour].mean() < img.array[lab.array == 1].mean()
    assert n_tumour > 0
    assert any(o != "RAS" for o in orientations)
    assert "RAS" in orientations


def test_pancreas_cannot_be_segmented_by_a_threshold(dataset: Path) -> None:
    for image_path, label_path in _training_cases(dataset)[:3]:
        hu = load_nifti(image_path).array
        panc = load_nifti(label_path).array > 0
        lo, hi = np.percentile(hu[panc], [5, 95])
        in_window = (hu > -500) & (hu >= lo) & (hu <= hi)
        not_pancreas = (in_window & ~panc).sum() / in_window.sum()
        assert not_pancreas > 0.5, f"{image_path.name}: only {not_pancreas:.2f} non-pancreas"
        dice = 2 * (in_window & panc).sum() / (in_window.sum() + panc.sum())
        assert dice < 0.3


def test_lps_storage_has_the_same_world_anatomy_as_ras() -> None:
    ras = make_phantom(11, SMALL)
    lps = make_phantom(11, SMALL, store_non_ras=True)
    assert orientation_code(ras.affine) == "RAS" and orientation_code(lps.affine) == "LPS"
    for ras_arr, lps_arr in ((ras.hu, lps.hu), (ras.label, lps.label)):
        canonical = nib.as_closest_canonical(nib.Nifti1Image(lps_arr, lps.affine))
        assert np.array_equal(np.asanyarray(canonical.dataobj), ras_arr)
        np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-6)


def test_lps_case_on_disk_matches_ras_generation(dataset: Path) -> None:
    lps_index = sorted(non_ras_indices(N_TRAIN, N_TEST, SMALL.non_ras_every))[0]
    case_id = f"pancreas_{lps_index + 1:03d}"
    image = nib.load(dataset / "imagesTr" / f"{case_id}.nii.gz")
    label = nib.load(dataset / "labelsTr" / f"{case_id}.nii.gz")
    assert orientation_code(image.affine) != "RAS"
    ras = make_phantom(case_seed(SEED, lps_index), SMALL)
    for img, expected in ((image, ras.hu), (label, ras.label)):
        canonical = nib.as_closest_canonical(img)
        assert np.array_equal(np.asanyarray(canonical.dataobj), expected)
        np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-3)


def test_non_ras_selection_rules() -> None:
    assert non_ras_indices(6, 2, 3) == {2, 5}
    assert non_ras_indices(2, 0, 3) == {1}
    assert non_ras_indices(1, 1, 5) == {1}
    assert non_ras_indices(1, 0, 3) == set()
    assert non_ras_indices(6, 0, 0) == set()


def test_anatomy_size_does_not_depend_on_spacing() -> None:
    fine = PhantomConfig(shape_xy_px=128, spacing_xy_mm=(2.5, 2.5), slice_thickness_mm=(3.0, 3.0),
                         z_extent_mm=(150.0, 150.0), tumour_probability=0.0)
    coarse = PhantomConfig(shape_xy_px=64, spacing_xy_mm=(5.0, 5.0), slice_thickness_mm=(6.0, 6.0),
                           z_extent_mm=(150.0, 150.0), tumour_probability=0.0)
    vols = []
    for cfg in (fine, coarse):
        case = make_phantom(21, cfg)
        voxel_ml = float(np.prod(np.linalg.norm(case.affine[:3, :3], axis=0))) / 1000.0
        vols.append((case.label > 0).sum() * voxel_ml)
    assert 20.0 < vols[0] < 150.0
    assert abs(vols[0] - vols[1]) / vols[0] < 0.25


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="spacing_xy_mm"):
        PhantomConfig(spacing_xy_mm=(2.0, 1.0))
    with pytest.raises(ValueError, match="tumour_probability"):
        PhantomConfig(tumour_probability=1.5)
    with pytest.raises(ValueError, match="tumour_fraction"):
        PhantomConfig(tumour_fraction=-0.1)


# ---------------------------------------------------------------------------------- exact tumour share
def test_tumour_fraction_gives_exactly_that_share_chosen_by_the_seed(tmp_path: Path) -> None:
    exact = dataclasses.replace(SMALL, tumour_fraction=0.5, tumour_probability=0.0)
    root = write_synthetic_task07(tmp_path / "Task07_Pancreas", N_TRAIN, N_TEST, exact, seed=SEED)
    meta = json.loads((root / "dataset.json").read_text())
    picked = tumour_indices(N_TRAIN, N_TEST, exact, SEED)
    # 3 of the 6 labelled cases and 1 of the 2 unlabelled ones, though tumour_probability is 0
    assert len({i for i in picked if i < N_TRAIN}) == 3 and len({i for i in picked if i >= N_TRAIN}) == 1
    flags = [c["tumour"] for c in meta["synthetic"]["cases"][:N_TRAIN]]
    assert flags == [i in picked for i in range(N_TRAIN)]
    for index, entry in enumerate(meta["training"]):
        label = load_nifti(root / entry["label"]).array
        assert bool((label == 2).any()) is (index in picked), entry["label"]
    assert meta["synthetic"]["config"]["tumour_fraction"] == 0.5
    # the files are those of dataset_case; other seeds pick other cases
    assert np.array_equal(load_nifti(root / "imagesTr/pancreas_003.nii.gz").array,
                          dataset_case(2, N_TRAIN, N_TEST, exact, SEED).hu)
    assert len({frozenset(tumour_indices(N_TRAIN, N_TEST, exact, s)) for s in range(6)}) > 1
    assert tumour_indices(N_TRAIN, N_TEST, SMALL, SEED) is None   # no tumour_fraction: drawn


def test_a_fixed_tumour_changes_nothing_else_of_the_case() -> None:
    drawn = make_phantom(5, SMALL)
    same = make_phantom(5, SMALL, has_tumour=drawn.meta["tumour_drawn"])
    assert np.array_equal(drawn.hu, same.hu) and np.array_equal(drawn.label, same.label)
    flipped = make_phantom(5, SMALL, has_tumour=not drawn.meta["tumour_drawn"])
    assert flipped.meta["tumour_drawn"] is not drawn.meta["tumour_drawn"]
    assert flipped.meta["spacing_mm"] == drawn.meta["spacing_mm"] and flipped.hu.shape == drawn.hu.shape
    outside = (drawn.label == 0) & (flipped.label == 0)
    assert abs(flipped.meta["pancreas_voxels"] - drawn.meta["pancreas_voxels"]) < 0.5 * drawn.meta["pancreas_voxels"]
    assert np.mean(drawn.hu[outside] == flipped.hu[outside]) > 0.9   # same body, organs and noise stream


def test_fingerprints_of_drawn_tumour_data_sets_are_unchanged() -> None:
    """Data sets written before tumour_fraction existed (drawn tumours) keep their fingerprint, so
    their folders are reused: this is the fingerprint of the old default phantoms (24 + 4, seed 2026)."""
    assert "tumour_fraction" not in PhantomConfig().to_dict()
    assert dataset_fingerprint(24, 4, PhantomConfig(), 2026) == (
        "318f210ca7f1851eabe4db7a185dfa28e56ca6a9dd8be4021ffc50f221938aa8")
    assert dataset_fingerprint(24, 4, PhantomConfig(tumour_fraction=0.5), 2026) != dataset_fingerprint(
        24, 4, PhantomConfig(), 2026)


# ---------------------------------------------------------------------------------- the folder
def test_dataset_json_matches_the_files(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["name"] == DATASET_NAME and "SYNTHETIC" in meta["name"]
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}
    assert meta["numTraining"] == N_TRAIN == len(meta["training"])
    assert meta["numTest"] == N_TEST == len(meta["test"])
    for key in ("description", "reference", "licence", "release"):
        assert meta[key]
    syn = meta["synthetic"]
    assert syn["generator"] == "pancreas_seg.imaging.phantom" and syn["seed"] == SEED
    assert len(syn["fingerprint"]) == 64 and syn["config"]["shape_xy_px"] == 64
    listed = {e["image"] for e in meta["training"]} | {e["label"] for e in meta["training"]}
    listed |= set(meta["test"])
    on_disk = {f"./{p.relative_to(dataset).as_posix()}" for p in dataset.rglob("*.nii.gz")}
    assert listed == on_disk
    assert meta["training"][0] == {"image": "./imagesTr/pancreas_001.nii.gz",
                                   "label": "./labelsTr/pancreas_001.nii.gz"}
    assert not (dataset / "labelsTs").exists()
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs",
                                                         "labelsTr"]
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]  # no temp folders


def test_reuse_with_same_fingerprint_does_not_rewrite(dataset: Path) -> None:
    files = [dataset / "dataset.json", dataset / "imagesTr" / "pancreas_001.nii.gz"]
    before = [f.stat().st_mtime_ns for f in files]
    assert write_synthetic_task07(dataset, N_TRAIN, N_TEST, SMALL, seed=SEED) == dataset
    assert [f.stat().st_mtime_ns for f in files] == before


def test_refuses_to_overwrite_a_different_dataset(dataset: Path, tmp_path: Path) -> None:
    other = PhantomConfig(shape_xy_px=48, spacing_xy_mm=(6.0, 7.0), slice_thickness_mm=(5.0, 6.0),
                          z_extent_mm=(120.0, 130.0))
    with pytest.raises(FileExistsError, match="Task07_Pancreas"):
        write_synthetic_task07(dataset, N_TRAIN, N_TEST, other, seed=SEED)
    with pytest.raises(FileExistsError):
        write_synthetic_task07(dataset, N_TRAIN, N_TEST, SMALL, seed=SEED + 1)
    real = tmp_path / "Task07_real"
    (real / "imagesTr").mkdir(parents=True)
    (real / "dataset.json").write_text('{"name": "Task07_Pancreas"}')
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_task07(real, 1, 0, SMALL, seed=0)
    assert (real / "dataset.json").read_text() == '{"name": "Task07_Pancreas"}'


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.subprocess)])
def test_interrupted_run_leaves_nothing(tmp_path: Path, processes: int) -> None:
    def stop(i: int, n: int, case_id: str) -> None:
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic_task07(tmp_path / "Task07_Pancreas", 3 * processes, 0, SMALL, seed=0, progress=stop,
                               processes=processes)
    assert list(tmp_path.iterdir()) == []
    root = write_synthetic_task07(tmp_path / "Task07_Pancreas", 1, 1, SMALL, seed=0)
    assert (root / "dataset.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["Task07_Pancreas"]
