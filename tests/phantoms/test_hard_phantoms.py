"""Tests of the phantom presets: the easy preset is byte-identical to the generator before presets
existed, and the hard preset draws cancer-like tumours, duct dilation with atrophy, and cysts.

The digests below were taken from the generator before the presets were added (md5 of the int16 HU
bytes followed by the uint8 label bytes, C order); the phantoms persisted by this project and the
results computed from them depend on those arrays staying the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.phantoms import (
    PhantomConfig,
    dataset_fingerprint,
    make_phantom,
    tumour_indices,
    write_synthetic_task07,
)

EASY_A = {"shape_xy_px": 96, "spacing_xy_mm": (3.5, 4.0), "slice_thickness_mm": (5.0, 6.0),
          "z_extent_mm": (120.0, 140.0)}
EASY_B = {"shape_xy_px": 128, "spacing_xy_mm": (2.5, 3.0), "slice_thickness_mm": (4.0, 5.0),
          "z_extent_mm": (120.0, 130.0), "tumour_probability": 1.0, "noise_hu": 8.0}
#: (seed, config, make_phantom keywords) -> md5(hu bytes + label bytes), before presets existed
EASY_DIGESTS = [
    (0, EASY_A, {}, "897ecb948fab193fe78171bcf20c70b8"),
    (7, EASY_A, {"has_tumour": True}, "35b82a83dbcf22032196a48f44c1c576"),
    (7, EASY_A, {"has_tumour": False}, "be4a0d7158ca8b0f7eae4f0be6da8977"),
    (11, EASY_A, {"store_non_ras": True}, "a53510e88af0f7bd97bd001e3e98446f"),
    (3, EASY_B, {}, "500d109a14dfa0d9e751f75c46fbfb76"),
]

#: Small hard phantoms: 96 px at 3-3.5 mm, 4-5 mm slices; no noise, so HU can be read directly.
HARD = PhantomConfig(preset="hard", shape_xy_px=96, spacing_xy_mm=(3.0, 3.5),
                     slice_thickness_mm=(4.0, 5.0), z_extent_mm=(110.0, 120.0), noise_hu=0.0)
#: Finer, for the duct and the atrophy: 128 px at 2-2.2 mm, 3 mm slices.
HARD_FINE = dataclasses.replace(HARD, shape_xy_px=128, spacing_xy_mm=(2.0, 2.2),
                                slice_thickness_mm=(3.0, 3.0), z_extent_mm=(120.0, 120.0))


def _md5(*arrays: np.ndarray) -> str:
    digest = hashlib.md5()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _voxel(affine: np.ndarray, point_mm: list[float]) -> tuple[int, int, int]:
    """Nearest voxel index of a world point."""
    ijk = np.linalg.solve(affine, np.array([*point_mm, 1.0]))[:3]
    return tuple(int(v) for v in np.rint(ijk))  # type: ignore[return-value]


def _ball(shape: tuple[int, ...], affine: np.ndarray, centre_mm: list[float], radius_mm: float
          ) -> np.ndarray:
    """Bool mask of the voxels whose centres lie within ``radius_mm`` of a world point."""
    axes = [affine[a, a] * np.arange(shape[a]) + affine[a, 3] - centre_mm[a] for a in range(3)]
    d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return d2 <= radius_mm ** 2


@pytest.fixture(scope="module")
def hard_draws() -> list[dict]:
    """Meta of 48 hard tumour cases (and the label maps' tumour facts), drawn once."""
    out = []
    for seed in range(48):
        case = make_phantom(seed, HARD, has_tumour=True)
        out.append({**case.meta, "label2": int((case.label == 2).sum()),
                    "voxel_ml": float(np.prod(np.diag(case.affine)[:3])) / 1000.0})
    return out


# ------------------------------------------------------------------------------------ easy preset
@pytest.mark.parametrize(("seed", "config", "kwargs", "digest"), EASY_DIGESTS)
def test_easy_preset_arrays_are_byte_identical_to_before(seed: int, config: dict, kwargs: dict,
                                                         digest: str) -> None:
    default = make_phantom(seed, PhantomConfig(**config), **kwargs)
    assert _md5(default.hu, default.label) == digest
    named = make_phantom(seed, PhantomConfig(**config, preset="easy"), **kwargs)
    assert _md5(named.hu, named.label) == digest
    assert "lesions" not in default.meta and "preset" not in default.meta   # meta as before


def test_easy_dataset_folder_and_fingerprints_are_unchanged(tmp_path: Path) -> None:
    config = PhantomConfig(**EASY_A, tumour_fraction=0.5)
    root = write_synthetic_task07(tmp_path / "T", 3, 1, config, seed=2026)
    files = sorted(root.rglob("*.nii.gz"))
    assert len(files) == 7
    assert _md5(*[load_nifti(f).array for f in files]) == "54848bd2a44a5919eda8274fbf4c7e79"
    assert hashlib.md5((root / "dataset.json").read_bytes()).hexdigest() == (
        "ac2e10965e267e85531e193a62d78edd")
    assert dataset_fingerprint(3, 1, config, 2026) == (
        "2ba885dca620c022184b98ae80fdca5d32dd9dad32f9f436b53d2faded6a957f")
    assert dataset_fingerprint(24, 4, PhantomConfig(preset="easy"), 2026) == (
        "318f210ca7f1851eabe4db7a185dfa28e56ca6a9dd8be4021ffc50f221938aa8")


def test_fingerprint_and_dict_differ_for_hard_only() -> None:
    easy, hard = PhantomConfig(), PhantomConfig(preset="hard")
    assert easy.to_dict() == PhantomConfig(preset="easy").to_dict()
    assert "preset" not in easy.to_dict() and "cyst_probability" not in easy.to_dict()
    assert hard.to_dict()["preset"] == "hard" and hard.to_dict()["tumour_diameter_mm"] == [5.0, 40.0]
    assert set(hard.to_dict()) - set(easy.to_dict()) == {"preset", *PhantomConfig.hard_fields()}
    fingerprints = {dataset_fingerprint(24, 4, c, 2026)
                    for c in (easy, hard, dataclasses.replace(hard, cyst_probability=0.5))}
    assert len(fingerprints) == 3
    # dataset.json's config (lists) builds the same config again
    for config in (easy, hard, dataclasses.replace(hard, tumour_site_weights=(1.0, 0.0, 0.0))):
        assert PhantomConfig(**config.to_dict()) == config


def test_config_validation_of_presets() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        PhantomConfig(preset="medium")
    with pytest.raises(ValueError, match="cyst_probability: used by preset 'hard' only"):
        PhantomConfig(cyst_probability=0.5)
    with pytest.raises(ValueError, match="tumour_site_weights"):
        PhantomConfig(preset="hard", tumour_site_weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="tumour_diameter_mm"):
        PhantomConfig(preset="hard", tumour_diameter_mm=(30.0, 10.0))
    with pytest.raises(ValueError, match="atrophy_radius_factor"):
        PhantomConfig(preset="hard", atrophy_radius_factor=(0.5, 1.5))
    # lists (YAML) become the same tuples, so they equal the defaults
    from_yaml = PhantomConfig(preset="hard", tumour_site_weights=[0.6, 0.25, 0.15],
                              tumour_diameter_mm=[5, 40])
    assert from_yaml == PhantomConfig(preset="hard")


# ------------------------------------------------------------------------------------ hard preset
def test_hard_tumour_sizes_contrasts_sites_and_counts(hard_draws: list[dict]) -> None:
    lesions = [les for meta in hard_draws for les in meta["lesions"]]
    counts = [len(meta["lesions"]) for meta in hard_draws]
    assert set(counts) <= {1, 2} and 2 in counts and 1 in counts     # tumour cases: 1 or 2
    diameters = np.array([les["equivalent_diameter_mm"] for les in lesions])
    assert diameters.min() >= 5.0 and diameters.max() <= 40.0
    assert diameters.max() - diameters.min() > 25.0                    # the whole range is used
    # small_tumour_share 0.4: binomial sd over ~55 lesions is ~0.07
    assert abs(np.mean(diameters < 20.0) - 0.4) < 0.17
    contrasts = np.array([les["contrast_hu"] for les in lesions])
    assert contrasts.min() >= -60.0 and contrasts.max() <= -5.0
    assert contrasts.max() > -20.0 and contrasts.min() < -45.0         # near-iso and clearly dark
    assert {les["site"] for les in lesions} == {"head", "body", "tail"}
    assert {les["shape"] for les in lesions} == {"lobulated", "irregular"}
    for meta in hard_draws:
        assert meta["label2"] == meta["tumour_voxels"] > 0            # every tumour case has label 2
        json.dumps(meta)                                               # JSON-ready


def test_hard_tumour_volumes_match_their_equivalent_diameters(hard_draws: list[dict]) -> None:
    ratios = [les["voxels"] * meta["voxel_ml"] * 1000.0 / (math.pi / 6 * les["equivalent_diameter_mm"] ** 3)
              for meta in hard_draws if len(meta["lesions"]) == 1
              for les in meta["lesions"] if not les["touches_edge"] and les["equivalent_diameter_mm"] > 15]
    assert len(ratios) >= 8
    assert 0.85 < float(np.median(ratios)) < 1.15
    assert min(ratios) > 0.7 and max(ratios) < 1.35


def test_edge_tumours_breach_the_gland_and_inner_ones_do_not(hard_draws: list[dict]) -> None:
    lesions = [les for meta in hard_draws for les in meta["lesions"]]
    edge = [les for les in lesions if les["touches_edge"]]
    inner = [les for les in lesions if not les["touches_edge"]]
    assert 0.1 < len(edge) / len(lesions) < 0.5                        # edge_tumour_share 0.3
    assert all(les["voxels_outside_gland"] == 0 for les in inner if les["voxels"] > 1)
    outside = [les["voxels_outside_gland"] / les["voxels"] for les in edge]
    assert np.mean([f > 0 for f in outside]) > 0.7 and max(outside) < 0.9


def test_measured_contrast_matches_the_drawn_one() -> None:
    checked = 0
    for seed in range(24):
        case = make_phantom(seed, HARD, has_tumour=True)
        gland = ndimage.binary_erosion(case.label == 1, iterations=1)
        if len(case.meta["lesions"]) != 1 or case.meta["cysts"] or case.meta["dilated_duct"]:
            continue
        core = ndimage.binary_erosion(case.label == 2, structure=np.ones((3, 3, 3)))
        if core.sum() < 5 or gland.sum() < 20:
            continue
        measured = float(np.median(case.hu[core]) - np.median(case.hu[gland]))
        assert abs(measured - case.meta["lesions"][0]["contrast_hu"]) < 12.0, seed
        checked += 1
    assert checked >= 3


def test_tumour_free_hard_cases_have_no_label_2_and_the_easy_anatomy() -> None:
    no_cyst = dataclasses.replace(HARD, cyst_probability=0.0)
    easy = PhantomConfig(**{k: v for k, v in no_cyst.to_dict().items()
                            if k not in ("preset", *PhantomConfig.hard_fields())})
    for seed in (1, 2):
        hard = make_phantom(seed, no_cyst, has_tumour=False)
        assert not (hard.label == 2).any() and hard.meta["lesions"] == [] and hard.meta["tumour_voxels"] == 0
        # lesions come from a stream of their own: without any, the hard case is the easy one
        same = make_phantom(seed, easy, has_tumour=False)
        assert np.array_equal(hard.hu, same.hu) and np.array_equal(hard.label, same.label)


def test_hard_is_deterministic_per_seed_and_cysts_do_not_depend_on_the_tumour() -> None:
    config = dataclasses.replace(HARD, cyst_probability=1.0)
    a, b = make_phantom(5, config, has_tumour=True), make_phantom(5, config, has_tumour=True)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label) and a.meta == b.meta
    c = make_phantom(6, config, has_tumour=True)
    assert c.meta["lesions"] != a.meta["lesions"]
    free = make_phantom(5, config, has_tumour=False)
    assert free.meta["cysts"][0]["centre_mm"] == a.meta["cysts"][0]["centre_mm"]
    assert free.meta["cysts"][0]["diameter_mm"] == a.meta["cysts"][0]["diameter_mm"]


def test_cysts_are_water_dense_pancreas_never_tumour() -> None:
    config = dataclasses.replace(HARD_FINE, cyst_probability=1.0, cyst_diameter_mm=(12.0, 25.0))
    for seed in range(3):
        case = make_phantom(seed, config, has_tumour=False)
        (cyst,) = case.meta["cysts"]
        assert not (case.label == 2).any()
        assert 0.0 <= cyst["hu"] <= 15.0 and 12.0 <= cyst["diameter_mm"] <= 25.0
        inner = _ball(case.label.shape, case.affine, cyst["centre_mm"], cyst["diameter_mm"] / 2 - 3.0)
        assert inner.sum() >= 3
        assert np.all(case.label[inner] == 1)
        assert np.median(case.hu[inner]) < 30.0                           # gland: 90-110 HU
        assert np.median(case.hu[case.label == 1]) > 60.0
    # with tumours: no water-dense voxel deep in a mass is labelled 2
    for seed in range(6):
        case = make_phantom(seed, dataclasses.replace(HARD, cyst_probability=1.0), has_tumour=True)
        core = ndimage.binary_erosion(case.label == 2, structure=np.ones((3, 3, 3)))
        assert case.meta["cysts"][0]["voxels"] > 0
        if core.any():
            assert case.hu[core].min() > 15


def test_some_cases_have_a_cyst_and_no_tumour() -> None:
    config = dataclasses.replace(HARD, cyst_probability=0.5, tumour_probability=0.5)
    metas = [make_phantom(seed, config).meta for seed in range(16)]
    kinds = {(bool(m["lesions"]), bool(m["cysts"])) for m in metas}
    assert (False, True) in kinds and (True, False) in kinds


def _tumour_and_upstream(case, lesion: dict) -> tuple[np.ndarray, np.ndarray]:
    """World x of every voxel, and the gland (label 1) tail-ward (patient's left, smaller x) of
    the lesion's far edge."""
    xs = case.affine[0, 0] * np.arange(case.label.shape[0]) + case.affine[0, 3]
    tailward = xs < lesion["centre_mm"][0] - lesion["equivalent_diameter_mm"]
    return xs, (case.label == 1) & tailward[:, None, None]


def _obstructing_seed(config: PhantomConfig) -> int:
    for seed in range(40):
        meta = make_phantom(seed, config, has_tumour=True).meta
        if (meta["dilated_duct"] and len(meta["lesions"]) == 1 and not meta["cysts"]
                and meta["lesions"][0]["site"] == "head"):
            return seed
    raise AssertionError("no head tumour with duct dilation in 40 seeds")


def test_obstructing_tumour_dilates_the_duct_upstream_with_fluid() -> None:
    base = dataclasses.replace(HARD_FINE, cyst_probability=0.0, second_tumour_probability=0.0)
    dilated = dataclasses.replace(base, duct_dilation_probability=1.0, dilated_duct_diameter_mm=(6.0, 8.0))
    seed = _obstructing_seed(dilated)
    case = make_phantom(seed, dilated, has_tumour=True)
    plain = make_phantom(seed, dataclasses.replace(dilated, duct_dilation_probability=0.0), has_tumour=True)
    assert plain.meta["dilated_duct"] is None and case.meta["dilated_duct"]["voxels"] > 0
    lesion = case.meta["lesions"][0]
    assert lesion["obstructs_duct"] and lesion == {**plain.meta["lesions"][0], "obstructs_duct": True}

    def fluid(c) -> np.ndarray:   # fluid-density voxels (0-20 HU duct) deep in the label-1 gland
        inner = ndimage.binary_erosion(c.label == 1, structure=np.ones((3, 3, 3)))
        return inner & (c.hu < 40)

    xs, _ = _tumour_and_upstream(case, lesion)
    found = fluid(case)
    assert found.sum() >= 5 * max(1, int(fluid(plain).sum()))
    assert np.all(case.label[found] == 1)
    # the dilated duct runs from the mass towards the tail (the patient's left: smaller x)
    x_fluid = np.broadcast_to(xs[:, None, None], found.shape)[found]
    assert np.median(x_fluid) < lesion["centre_mm"][0]


def test_gland_atrophies_behind_an_obstructing_tumour() -> None:
    base = dataclasses.replace(HARD_FINE, cyst_probability=0.0, second_tumour_probability=0.0,
                               duct_dilation_probability=1.0, dilated_duct_diameter_mm=(3.0, 3.0))
    seed = _obstructing_seed(base)
    atrophic = make_phantom(seed, dataclasses.replace(base, atrophy_radius_factor=(0.5, 0.5)), has_tumour=True)
    intact = make_phantom(seed, dataclasses.replace(base, atrophy_radius_factor=(1.0, 1.0)), has_tumour=True)
    assert atrophic.meta["dilated_duct"]["atrophy_radius_factor"] == 0.5
    _, behind_a = _tumour_and_upstream(atrophic, atrophic.meta["lesions"][0])
    _, behind_i = _tumour_and_upstream(intact, intact.meta["lesions"][0])
    assert behind_i.sum() > 50
    assert behind_a.sum() < 0.75 * behind_i.sum()


def test_hard_dataset_keeps_the_exact_tumour_share_and_records_lesions(tmp_path: Path) -> None:
    config = dataclasses.replace(HARD, tumour_fraction=0.5, tumour_probability=0.0, cyst_probability=0.5)
    root = write_synthetic_task07(tmp_path / "T", 4, 2, config, seed=11)
    meta = json.loads((root / "dataset.json").read_text())
    picked = tumour_indices(4, 2, config, 11)
    assert len([i for i in picked if i < 4]) == 2
    assert meta["synthetic"]["config"]["preset"] == "hard"
    assert meta["synthetic"]["fingerprint"] == dataset_fingerprint(4, 2, config, 11)
    for index, (entry, case) in enumerate(zip(meta["training"], meta["synthetic"]["cases"], strict=False)):
        label = load_nifti(root / entry["label"]).array
        assert bool((label == 2).any()) is (index in picked) is case["tumour"]
        assert (len(case["lesions"]) > 0) is (index in picked)
        assert "cysts" in case
    assert "lesions" not in meta["synthetic"]["cases"][4]                # test cases keep theirs
