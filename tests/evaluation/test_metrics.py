"""Tests of the 3D metrics against medpy, DeepMind surface-distance and hand-computed cases.

Reference implementations:
* ``medpy.metric.binary`` uses the same surface (face-connected border, outside = background) and
  the same voxel-centre distances, so Dice and directed distances must agree to 1e-9 / 1e-6 mm;
  its ``hd95`` pools both directions before the percentile, which we rebuild from our arrays.
* DeepMind ``surface_distance`` uses area-weighted surfels on the voxel-corner grid, a different
  definition: only the documented relationships are tested (identical -> NSD 1 / HD95 0, far apart
  -> NSD 0, and on large smooth ellipsoids NSD within 0.06 and HD95 within the largest voxel size
  when the tolerance is at least the largest voxel size).
"""

from __future__ import annotations

import time
import warnings

import medpy.metric.binary as medpy_binary
import numpy as np
import pytest
from scipy import ndimage

from pancreas_seg.evaluation.metrics import (
    CLASS_LABELS,
    case_metrics,
    dice,
    hd95_mm,
    nsd,
    slice_dice,
    summarise,
    surface_distances_mm,
    surfel_surface_metrics,
    surface_voxels,
)

ANISO = (0.7, 0.9, 2.5)
medpy_surface_distances = getattr(medpy_binary, "__surface_distances")  # module-private helper


def random_blobs(shape: tuple[int, ...], seed: int, fraction: float = 0.5,
                 sigma: float = 1.5) -> np.ndarray:
    """Random smooth blobs (thresholded Gaussian-filtered noise), boolean."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return noise > np.quantile(noise, 1.0 - fraction)


def ellipsoid(shape: tuple[int, int, int], centre_vox: tuple[float, float, float],
              radii_mm: tuple[float, float, float], spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean ellipsoid with radii in mm on an anisotropic grid."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    total = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grids, centre_vox, spacing, radii_mm,
                                                             strict=True))
    return total <= 1.0


def mask_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Random blob pairs (also touching the array border) and shifted ellipsoids."""
    pairs = []
    for seed in range(4):
        shape = (24 + seed, 20, 12)
        pairs.append((f"blobs{seed}", random_blobs(shape, seed, 0.3),
                      random_blobs(shape, seed + 100, 0.25)))
    pairs.append(("bernoulli", np.random.default_rng(7).random((10, 12, 8)) > 0.6,
                  np.random.default_rng(8).random((10, 12, 8)) > 0.7))
    shape = (60, 50, 24)
    truth = ellipsoid(shape, (30, 25, 12), (15, 12, 20), ANISO)
    for shift in [(0, 0, 0), (2, 1, 0), (0, 0, 1), (4, -3, 2)]:
        centre = (30 + shift[0], 25 + shift[1], 12 + shift[2])
        pairs.append((f"ellipsoid{shift}", ellipsoid(shape, centre, (13, 12, 18), ANISO), truth))
    return pairs


PAIRS = mask_pairs()
PAIR_IDS = [name for name, _, _ in PAIRS]


# --------------------------------------------------------------------------- against medpy
@pytest.mark.parametrize(("name", "pred", "truth"), PAIRS, ids=PAIR_IDS)
def test_dice_matches_medpy(name: str, pred: np.ndarray, truth: np.ndarray) -> None:
    assert dice(pred, truth) == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-9)
    assert dice(pred.astype(np.uint8), truth.astype(np.uint8)) == pytest.approx(
        medpy_binary.dc(pred, truth), abs=1e-9)


@pytest.mark.parametrize(("name", "pred", "truth"), PAIRS, ids=PAIR_IDS)
def test_directed_distances_match_medpy(name: str, pred: np.ndarray, truth: np.ndarray) -> None:
    d_pt, d_tp = surface_distances_mm(pred, truth, ANISO)
    ref_pt = medpy_surface_distances(pred, truth, voxelspacing=ANISO, connectivity=1)
    ref_tp = medpy_surface_distances(truth, pred, voxelspacing=ANISO, connectivity=1)
    # same surface voxels in the same (C) order, same distances
    np.testing.assert_allclose(d_pt, ref_pt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d_tp, ref_tp, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "pred", "truth"), PAIRS, ids=PAIR_IDS)
def test_hd95_relationship_to_medpy(name: str, pred: np.ndarray, truth: np.ndarray) -> None:
    d_pt, d_tp = surface_distances_mm(pred, truth, ANISO)
    # medpy's rule (pooled percentile) rebuilt from our arrays equals medpy.hd95
    pooled = float(np.percentile(np.hstack([d_pt, d_tp]), 95))
    assert pooled == pytest.approx(medpy_binary.hd95(pred, truth, voxelspacing=ANISO), abs=1e-6)
    # our definition: max of the directed percentiles of medpy's directed distances
    ref_pt = medpy_surface_distances(pred, truth, voxelspacing=ANISO)
    ref_tp = medpy_surface_distances(truth, pred, voxelspacing=ANISO)
    expected = max(np.percentile(ref_pt, 95), np.percentile(ref_tp, 95))
    assert hd95_mm(pred, truth, ANISO) == pytest.approx(expected, abs=1e-6)


def test_hd95_directed_max_exceeds_pooled_on_asymmetric_error() -> None:
    truth = ellipsoid((40, 40, 20), (15, 20, 10), (8, 8, 15), ANISO)
    pred = truth.copy()
    pred[34:38, 18:22, 8:12] = True  # a far false-positive blob: only d(P->T) grows
    ours = hd95_mm(pred, truth, ANISO)
    pooled = medpy_binary.hd95(pred, truth, voxelspacing=ANISO)
    assert ours > pooled
    d_pt, d_tp = surface_distances_mm(pred, truth, ANISO)
    assert np.all(d_tp == 0)
    assert ours == pytest.approx(np.percentile(d_pt, 95), abs=1e-12)


def test_cropping_is_exact_at_the_array_border() -> None:
    pred = random_blobs((16, 18, 10), 3, 0.6)
    truth = random_blobs((16, 18, 10), 4, 0.6)
    assert pred[0].any() and truth[:, :, -1].any()
    padded = [np.pad(m, 5) for m in (pred, truth)]
    for a, b in zip(surface_distances_mm(pred, truth, ANISO),
                    surface_distances_mm(*padded, ANISO), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_surface_definition() -> None:
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    surface = surface_voxels(cube)
    assert surface.sum() == 5**3 - 3**3
    full = np.ones((3, 3, 3), bool)  # outside the array is background
    assert surface_voxels(full).sum() == 26


# --------------------------------------------------------------------------- against surface-distance
def _deepmind(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict:
    surface_distance = pytest.importorskip("surface_distance")
    with warnings.catch_warnings():  # it imports from the deprecated scipy.ndimage.filters
        warnings.simplefilter("ignore", DeprecationWarning)
        return surface_distance.compute_surface_distances(truth, pred, spacing)


def test_surface_distance_identical_and_disjoint() -> None:
    surface_distance = pytest.importorskip("surface_distance")
    shape = (40, 36, 20)
    a = ellipsoid(shape, (12, 18, 10), (6, 8, 12), ANISO)
    dists = _deepmind(a, a, ANISO)
    assert nsd(a, a, ANISO, 0.0) == 1.0 == surface_distance.compute_surface_dice_at_tolerance(dists, 0.0)
    assert hd95_mm(a, a, ANISO) == 0.0 == surface_distance.compute_robust_hausdorff(dists, 95)
    b = ellipsoid(shape, (32, 18, 10), (4, 6, 10), ANISO)
    assert not (a & b).any()
    dists = _deepmind(b, a, ANISO)
    assert nsd(b, a, ANISO, 2.0) == 0.0 == surface_distance.compute_surface_dice_at_tolerance(dists, 2.0)


@pytest.mark.parametrize("shift", [(0, 0, 0), (2, 1, 0), (0, 0, 1), (3, 3, 1)])
@pytest.mark.parametrize("tolerance_mm", [2.5, 3.0, 5.0])
def test_surface_distance_agrees_on_smooth_shapes(shift: tuple[int, int, int],
                                                 tolerance_mm: float) -> None:
    surface_distance = pytest.importorskip("surface_distance")
    shape = (80, 70, 30)
    truth = ellipsoid(shape, (40, 35, 15), (20, 18, 25), ANISO)
    centre = (40 + shift[0], 35 + shift[1], 15 + shift[2])
    pred = ellipsoid(shape, centre, (19, 18, 24), ANISO)
    dists = _deepmind(pred, truth, ANISO)
    ref_nsd = surface_distance.compute_surface_dice_at_tolerance(dists, tolerance_mm)
    assert nsd(pred, truth, ANISO, tolerance_mm) == pytest.approx(ref_nsd, abs=0.06)
    ref_hd = surface_distance.compute_robust_hausdorff(dists, 95)
    assert hd95_mm(pred, truth, ANISO) == pytest.approx(ref_hd, abs=max(ANISO))


# --------------------------------------------------------------------------- empty masks
@pytest.mark.parametrize("fn", [dice, lambda p, t: hd95_mm(p, t, ANISO),
                                lambda p, t: nsd(p, t, ANISO, 1.0)])
def test_both_empty_is_nan(fn) -> None:
    empty = np.zeros((5, 6, 7), bool)
    assert np.isnan(fn(empty, empty))


def test_one_empty() -> None:
    empty = np.zeros((5, 6, 7), bool)
    full = empty.copy()
    full[1:3, 2:4, 3:6] = True
    for a, b in ((empty, full), (full, empty)):
        assert dice(a, b) == 0.0
        assert hd95_mm(a, b, ANISO) == np.inf
        assert nsd(a, b, ANISO, 100.0) == 0.0
    d_pt, d_tp = surface_distances_mm(full, empty, ANISO)
    assert d_pt.size == 12 and np.all(np.isinf(d_pt)) and d_tp.size == 0
    both = surface_distances_mm(empty, empty, ANISO)
    assert both[0].size == 0 and both[1].size == 0


def test_shape_and_spacing_validation() -> None:
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 5), bool))
    a[1, 1, 1] = True
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95_mm(a, a, (1.0, 0.0, 1.0))


# --------------------------------------------------------------------------- hand-computed
def test_cubes_shifted_one_slice_hand_computed() -> None:
    """Two 3x3x3 cubes, shifted by one voxel along axis 2, spacing (1, 1, 3) mm.

    Each cube has 26 surface voxels. From A to B: the 9 voxels of A's lower face are 3 mm from B
    (one slice), the 8 ring voxels of each shared layer lie on B's surface (0 mm), and A's top-face
    centre is B's interior centre, 1 mm (one in-plane voxel) from B's surface. So each direction is
    16 x 0 mm, 1 x 1 mm, 9 x 3 mm.
    """
    a = np.zeros((7, 7, 8), bool)
    a[2:5, 2:5, 2:5] = True
    b = np.roll(a, 1, axis=2)
    spacing = (1.0, 1.0, 3.0)
    d_ab, d_ba = surface_distances_mm(a, b, spacing)
    for d in (d_ab, d_ba):
        assert sorted(d.tolist()) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert hd95_mm(a, b, spacing) == pytest.approx(3.0)
    assert nsd(a, b, spacing, 0.0) == pytest.approx(32 / 52)
    assert nsd(a, b, spacing, 1.0) == pytest.approx(34 / 52)
    assert nsd(a, b, spacing, 2.99) == pytest.approx(34 / 52)
    assert nsd(a, b, spacing, 3.0) == 1.0
    assert nsd(a, b, spacing, 100.0) == 1.0
    assert dice(a, b) == pytest.approx(2 * 18 / 54)


def test_single_voxels_anisotropic_distance() -> None:
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    a[1, 1, 1] = True
    b[2, 3, 2] = True
    expected = float(np.sqrt(0.7**2 + (2 * 0.9) ** 2 + 2.5**2))
    assert hd95_mm(a, b, ANISO) == pytest.approx(expected, abs=1e-12)
    assert nsd(a, b, ANISO, expected - 1e-9) == 0.0
    assert nsd(a, b, ANISO, expected + 1e-9) == 1.0


# --------------------------------------------------------------------------- case_metrics
def test_case_metrics_union_semantics() -> None:
    truth = np.zeros((20, 20, 10), np.uint8)
    truth[4:14, 4:14, 2:8] = 1
    truth[6:9, 6:9, 3:6] = 2
    pred = (truth > 0).astype(np.uint8)  # whole organ right, tumour called pancreas
    rows = case_metrics(pred, truth, ANISO, tolerance_mm=1.0)
    assert [r["class"] for r in rows] == list(CLASS_LABELS) == ["pancreas", "tumour"]
    assert set(rows[0]) == {"class", "dice", "hd95_mm", "nsd", "hd95_surfel_mm", "nsd_surfel"}
    pancreas, tumour = rows
    assert pancreas["dice"] == 1.0 and pancreas["hd95_mm"] == 0.0 and pancreas["nsd"] == 1.0
    assert tumour["dice"] == 0.0 and tumour["hd95_mm"] == np.inf and tumour["nsd"] == 0.0

    pred2 = truth.copy()
    pred2[truth == 2] = 0  # tumour left as background: the pancreas (1 ∪ 2) has a hole
    p = np.isin(pred2, (1, 2))
    t = np.isin(truth, (1, 2))
    pancreas2 = case_metrics(pred2, truth, ANISO, 1.0)[0]
    assert pancreas2["dice"] == pytest.approx(medpy_binary.dc(p, t), abs=1e-12)
    assert pancreas2["hd95_mm"] == pytest.approx(hd95_mm(p, t, ANISO))
    assert pancreas2["nsd"] == pytest.approx(nsd(p, t, ANISO, 1.0))

    no_tumour = (truth > 0).astype(np.uint8)
    tumour3 = case_metrics(no_tumour, no_tumour, ANISO, 1.0)[1]
    assert np.isnan(tumour3["dice"]) and np.isnan(tumour3["hd95_mm"]) and np.isnan(tumour3["nsd"])


def test_case_metrics_fast_on_full_size_case() -> None:
    shape, spacing = (512, 512, 100), (0.8, 0.8, 2.5)
    truth = np.zeros(shape, np.uint8)
    truth[ellipsoid(shape, (260, 280, 50), (75, 20, 15), spacing)] = 1
    truth[ellipsoid(shape, (230, 280, 52), (10, 8, 8), spacing)] = 2
    pred = np.zeros(shape, np.uint8)
    pred[ellipsoid(shape, (263, 278, 51), (70, 22, 14), spacing)] = 1
    start = time.perf_counter()
    rows = case_metrics(pred, truth, spacing, 2.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # about 0.2 s on a 2-core CPU; generous for slow CI machines
    assert 0.5 < rows[0]["dice"] < 1.0 and np.isfinite(rows[0]["hd95_mm"])
    assert rows[1]["hd95_mm"] == np.inf


# --------------------------------------------------------------------------- slice_dice
def test_slice_dice_hand_example() -> None:
    truth = np.zeros((4, 4, 5), np.uint8)
    pred = np.zeros_like(truth)
    # slice 0: both empty -> skipped
    truth[0:2, 0:2, 1] = 1
    pred[0:2, 0:2, 1] = 1  # slice 1: Dice 1
    truth[0:2, 0:2, 2] = 1
    pred[0:2, 0:1, 2] = 2  # slice 2: pancreas 1 ∪ 2 -> 2*2/(4+2) = 2/3
    truth[0, 0, 3] = 2  # slice 3: missed -> 0
    pred[3, 3, 4] = 1  # slice 4: false positive -> 0
    expected = (1.0 + 2 / 3 + 0.0 + 0.0) / 4
    assert slice_dice(pred, truth, "pancreas", axis=2) == pytest.approx(expected)
    # tumour: slice 2 (pred only) -> 0, slice 3 (truth only) -> 0
    assert slice_dice(pred, truth, "tumour", axis=2) == 0.0
    # along another axis, and NaN with no class anywhere
    assert slice_dice(truth, truth, "pancreas", axis=0) == 1.0
    empty = np.zeros_like(truth)
    assert np.isnan(slice_dice(empty, empty, "tumour", axis=2))
    with pytest.raises(TypeError):  # no silent default: the axial axis depends on the file
        slice_dice(pred, truth, "pancreas")


# --------------------------------------------------------------------------- summarise
def test_summarise_counts_nan_and_inf() -> None:
    result = summarise([1.0, 3.0, np.nan, np.inf, 2.0, np.inf])
    assert result["n"] == 6 and result["n_finite"] == 3
    assert result["n_nan"] == 1 and result["n_inf"] == 2
    assert result["mean"] == pytest.approx(2.0) and result["median"] == pytest.approx(2.0)
    assert result["std"] == pytest.approx(1.0)  # ddof=1
    assert result["min"] == 1.0 and result["max"] == 3.0
    nothing = summarise([np.nan, np.inf])
    assert np.isnan(nothing["mean"]) and np.isnan(nothing["std"]) and nothing["n_finite"] == 0
    assert np.isnan(summarise([4.0])["std"])


# --------------------------------------------------------------------------- surfel-weighted variant
def test_surfel_metrics_are_deepmind_surface_distance_on_the_same_masks() -> None:
    from surface_distance import metrics as deepmind  # noqa: PLC0415

    rng = np.random.default_rng(3)
    truth = np.zeros((40, 36, 16), bool)
    truth[8:30, 6:28, 3:12] = True
    pred = np.roll(truth, 2, axis=0) | (rng.random(truth.shape) > 0.995)   # shifted + speckles
    hd95_surfel, nsd_surfel = surfel_surface_metrics(pred, truth, ANISO, 2.0)
    distances = deepmind.compute_surface_distances(truth, pred, ANISO)
    assert hd95_surfel == pytest.approx(deepmind.compute_robust_hausdorff(distances, 95))
    assert nsd_surfel == pytest.approx(deepmind.compute_surface_dice_at_tolerance(distances, 2.0))
    row = case_metrics(pred.astype(np.uint8), truth.astype(np.uint8), ANISO, 2.0)[0]
    assert (row["hd95_surfel_mm"], row["nsd_surfel"]) == (hd95_surfel, nsd_surfel)
    # the speckles make the two definitions disagree: they are different columns for a reason
    assert row["hd95_surfel_mm"] != pytest.approx(row["hd95_mm"], abs=1e-6)


def test_surfel_metrics_follow_the_empty_mask_conventions() -> None:
    box = np.zeros((10, 10, 6), bool)
    box[2:7, 3:8, 1:5] = True
    empty = np.zeros_like(box)
    assert surfel_surface_metrics(box, box, ANISO, 1.0) == (0.0, 1.0)
    assert surfel_surface_metrics(box, empty, ANISO, 1.0) == (float("inf"), 0.0)
    assert surfel_surface_metrics(empty, box, ANISO, 1.0) == (float("inf"), 0.0)
    assert all(np.isnan(v) for v in surfel_surface_metrics(empty, empty, ANISO, 1.0))
    with pytest.raises(ValueError, match="tolerance_mm"):
        surfel_surface_metrics(box, box, ANISO, -1.0)
    with pytest.raises(ValueError, match="3D"):
        surfel_surface_metrics(box[..., 0], box[..., 0], (1.0, 1.0), 1.0)


def test_surfel_nsd_weights_surface_by_area_unlike_voxel_count() -> None:
    """A thin slab: its two large faces lie in thick-slice planes (5 mm spacing across them). Moving
    the prediction by one slice puts every large-face element 5 mm off; with a 2 mm tolerance the
    area-weighted NSD counts only the thin side walls, the voxel count sees most voxels unchanged."""
    spacing = (1.0, 1.0, 5.0)
    truth = np.zeros((30, 30, 6), bool)
    truth[2:28, 2:28, 2:4] = True
    pred = np.roll(truth, 1, axis=2)
    _, nsd_surfel = surfel_surface_metrics(pred, truth, spacing, 2.0)
    # side walls: 4 walls x 26 px x 1 slice overlap (of 2) area-weighted vs the 2 large faces
    large_faces, side_walls = 2 * 26 * 26 * 1.0, 4 * 26 * 2 * 5.0
    assert nsd_surfel < (side_walls + large_faces * 0.5) / (side_walls + large_faces)
    assert nsd(pred, truth, spacing, 2.0) > nsd_surfel
