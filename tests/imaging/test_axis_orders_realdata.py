"""The REAL CT stored in all 48 axis orders: identical shards, identical masks, identical slice Dice.

Data (``../shared/realdata`` next to the repository, read-only; see its NOTICE.md):
``ct_abdomen_3mm.nii.gz``, one real abdominal CT (122 x 101 x 112 voxels, 3 mm, RAS, int32 HU),
the example CT from the TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``,
Apache-2.0 licence), and ``ct_abdomen_3mm_pancreas.nii.gz``, a pancreas mask derived from
TotalSegmentator's own prediction for it (a model's output, not a radiologist's annotation).

Every copy is the same scan (same world geometry, a correct affine) stored with another
permutation and flip of the voxel axes, written as real NIfTI files: most ``.nii.gz``, some
uncompressed ``.nii``, and a few odd-but-legal headers (qform only, sform only with code 2, int16
with scl_slope 0.5 / scl_inter -1024, float32 voxels). Nothing is written next to the source files.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.evaluation.metrics import slice_dice
from pancreas_seg.imaging.geometry import ScanGeometry, axial_axis
from pancreas_seg.imaging.nifti_io import load_nifti, save_nifti
from pancreas_seg.imaging.preprocess import PreprocessingConfig, plan_case_geometry
from pancreas_seg.pipelines.preprocessing.nodes import preprocess_cases
from pancreas_seg.inference.model_card import CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor

CT_NAME, MASK_NAME = "ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz"
REFERENCE = "ref"   # case id of the untouched RAS source files
#: Odd-but-legal storage for a few orders (the cyclic ones crashed inference before).
ODD_HEADERS = {"ASR": "qform_only", "SRA": "sform_code_2", "PSL": "scaled_int16",
               "ILA": "float32_nii", "LIP": "qform_only"}
WINDOW = {"mode": "window", "window_hu": [-100.0, 240.0]}
CONFIGS = {
    "whole_slice": {"image_size_px": 64},
    "crop_to_body": {"image_size_px": 64, "crop_to_body": True},
    "target_spacing": {"image_size_px": 64, "target_spacing_mm": 5.0},   # crops W, pads H
}


def _reorient(ras: np.ndarray, ras_affine: np.ndarray, perm: tuple[int, ...],
              flips: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same world-space volume stored in another voxel order, with its affine (pure NumPy)."""
    array = np.transpose(ras, perm)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis)
    index_map = np.eye(4)   # file voxel index -> RAS voxel index
    index_map[:3, :3] = 0.0
    for axis, (source, flip) in enumerate(zip(perm, flips, strict=True)):
        index_map[source, axis] = -1.0 if flip else 1.0
        index_map[source, 3] = array.shape[axis] - 1 if flip else 0.0
    return np.ascontiguousarray(array), ras_affine @ index_map


def _write(path: Path, array: np.ndarray, affine: np.ndarray, style: str) -> None:
    """Write a real NIfTI-1 file in one of several legal header styles."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    if style == "qform_only":
        image.set_sform(None, code=0)
        image.set_qform(affine, code=1)
    elif style == "sform_code_2":
        image.set_qform(None, code=0)
        image.set_sform(affine, code=2)
    if style != "scaled_int16":
        nib.save(image, path)
        return
    # int16 on disk, HU = raw * 0.5 - 1024: nibabel would reset the scaling on save, so the
    # file is assembled by hand (348-byte header, 4-byte extension flag, voxels in Fortran order)
    raw = ((array.astype(np.float64) + 1024.0) * 2.0).astype(np.int16)
    header = image.header
    header.set_data_dtype(np.int16)
    header["scl_slope"], header["scl_inter"], header["vox_offset"] = 0.5, -1024.0, 352
    data = header.binaryblock + b"\x00" * 4 + raw.tobytes(order="F")
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)


@pytest.fixture(scope="module")
def copies(realdata: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """One row per axis order (48) plus the RAS source files: case_id, axcodes, paths, style."""
    ct, mask = nib.load(realdata / CT_NAME), nib.load(realdata / MASK_NAME)
    hu, labels = np.asanyarray(ct.dataobj), np.asanyarray(mask.dataobj)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    folder = tmp_path_factory.mktemp("axis_orders")
    rows = [{"case_id": REFERENCE, "axcodes": "RAS", "style": "source",
             "image_path": str(realdata / CT_NAME), "label_path": str(realdata / MASK_NAME)}]
    for index, (perm, flips) in enumerate(itertools.product(itertools.permutations(range(3)),
                                                            itertools.product((False, True), repeat=3))):
        array, affine = _reorient(hu, ct.affine, perm, flips)
        label, label_affine = _reorient(labels, mask.affine, perm, flips)
        axcodes = "".join(nib.aff2axcodes(affine))
        style = ODD_HEADERS.get(axcodes, "nii" if index % 4 == 1 else "nii.gz")
        suffix = ".nii" if style in ("nii", "float32_nii", "scaled_int16") else ".nii.gz"
        if style == "float32_nii":
            array = array.astype(np.float32)
        image_path, label_path = folder / f"ct_{axcodes}{suffix}", folder / f"mask_{axcodes}{suffix}"
        _write(image_path, array, affine, style)
        _write(label_path, label, label_affine, "qform_only" if style == "qform_only" else "nii.gz")
        rows.append({"case_id": f"case_{axcodes}", "axcodes": axcodes, "style": style,
                     "image_path": str(image_path), "label_path": str(label_path)})
    table = pd.DataFrame(rows)
    assert table["axcodes"].nunique() == 48 and len(table) == 49
    assert set(ODD_HEADERS) <= set(table["axcodes"])
    # the inputs themselves are right: every file is the RAS scan once reoriented (independent
    # of the project's code: nibabel's as_closest_canonical), HU and labels exactly
    for row in table.itertuples():
        for path, expected in ((row.image_path, hu), (row.label_path, labels)):
            image = nib.load(path)
            assert "".join(nib.aff2axcodes(image.affine)) == row.axcodes
            canonical = nib.as_closest_canonical(image)
            assert np.array_equal(np.asanyarray(canonical.dataobj), expected), row.axcodes
            assert np.allclose(canonical.affine, ct.affine, atol=1e-4), row.axcodes
    scaled = nib.load(table.set_index("axcodes").loc["PSL", "image_path"])
    assert scaled.get_data_dtype() == np.int16
    assert (scaled.dataobj.slope, scaled.dataobj.inter) == (0.5, -1024.0)
    assert nib.load(table.set_index("axcodes").loc["ASR", "image_path"]).header["sform_code"] == 0
    return table


def _manifest(copies: pd.DataFrame) -> pd.DataFrame:
    """The case-manifest columns the preprocessing node reads (the file's array shape, as ingestion records it)."""
    shapes = pd.DataFrame([nib.load(path).shape for path in copies["image_path"]],
                          columns=["shape_x", "shape_y", "shape_z"], index=copies.index)
    return copies.assign(split="train").join(shapes)[["case_id", "split", "image_path", "label_path",
                                                      "shape_x", "shape_y", "shape_z"]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_preprocessing_shards_are_identical_in_every_axis_order(copies, name: str) -> None:
    """Through the preprocessing node: one geometry per case, shards equal to the RAS file's."""
    params = {**CONFIGS[name], "intensity": WINDOW, "label_mode": "multiclass"}
    partitions, geometry = preprocess_cases(_manifest(copies), {**WINDOW, "foreground": None}, params)
    stored = json.loads(json.dumps(geometry))   # as slice_geometry.json
    reference = ScanGeometry.from_dict(stored[REFERENCE])
    ref_image, ref_label = partitions[f"{REFERENCE}/image"](), partitions[f"{REFERENCE}/label"]()
    assert ref_image.shape == ref_label.shape == (112, 64, 64)
    assert ref_image.dtype == np.float32 and ref_label.dtype == np.uint8
    assert 0 < np.count_nonzero(ref_label) and 0.0 < ref_image.mean() < 1.0
    for row in copies.itertuples():
        scan = ScanGeometry.from_dict(stored[row.case_id])
        assert scan.axcodes == row.axcodes and scan.model_shape == (112, 64, 64)
        assert scan.grid == reference.grid and scan.body_box_hw == reference.body_box_hw, row.axcodes
        assert row.axcodes[scan.axial_axis] in "SI"
        image, label = partitions[f"{row.case_id}/image"](), partitions[f"{row.case_id}/label"]()
        assert np.array_equal(image, ref_image), (name, row.axcodes, row.style)
        assert np.array_equal(label, ref_label), (name, row.axcodes, row.style)
    if name == "crop_to_body":
        assert reference.body_box_hw is not None
    if name == "target_spacing":
        assert reference.grid.resampled_hw == (61, 73)   # 303 x 366 mm at 5 mm


def _intensity_model():
    """A fixed, non-learned Keras model with real structure: classes by local mean intensity.

    Input: window-normalised CT in [0, 1] (window -100..240 HU). A 3 x 3 box mean m, then logits
    (0, 20 m - 4, 60 m - 36) and a softmax: background below m = 0.2 (~ -30 HU: fat, air),
    "pancreas" for soft tissue, "tumour" above m = 0.8 (~ 170 HU: contrast, bone).
    """
    import keras  # noqa: PLC0415

    inputs = keras.Input((None, None, 1))
    mean = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, name="box_mean")(inputs)
    logits = keras.layers.Conv2D(3, 1, name="classes")(mean)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    model.get_layer("box_mean").set_weights([np.full((3, 3, 1, 1), 1 / 9, np.float32)])
    model.get_layer("classes").set_weights([np.array([0.0, 20.0, 60.0], np.float32).reshape(1, 1, 1, 3),
                                            np.array([0.0, -4.0, -36.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def masks(copies: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The predictor on every copy (crop_to_body on): ``{case_id: saved mask path}``."""
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415

    model = _intensity_model()
    preprocessing = {**CONFIGS["crop_to_body"], "intensity": WINDOW}
    card = ModelCard.for_trained_model("probe", PreprocessingConfig.from_params(preprocessing).label_mode,
                                       preprocessing, None, "realdata", CaseSplit((), ()), weights_sha256(model))
    predictor = Predictor.from_models([model], [card], PredictionSettings(batch_size=16, flip_tta=False, xla=False))
    folder = tmp_path_factory.mktemp("axis_order_masks")
    paths = {}
    for row in copies.itertuples():
        ct = load_nifti(row.image_path)
        labels = predictor.segment(ct.array, ct.affine, row.case_id)
        assert labels.shape == ct.array.shape and labels.dtype == np.uint8, row.axcodes
        paths[row.case_id] = folder / f"{row.case_id}.nii.gz"
        save_nifti(paths[row.case_id], labels, ct.affine, ct.header)   # as the inference node does
    return paths


def test_inference_masks_match_in_every_axis_order(copies, masks) -> None:
    reference = nib.load(masks[REFERENCE])
    ref_labels = np.asanyarray(reference.dataobj)
    counts = np.bincount(ref_labels.ravel(), minlength=3)
    assert counts[1] > 10_000 and counts[2] > 1_000 and counts[0] > counts[1]   # real structure
    source = nib.load(copies.iloc[0]["image_path"])
    assert np.array_equal(reference.affine, source.affine)
    for row in copies.iloc[1:].itertuples():
        ct, mask = nib.load(row.image_path), nib.load(masks[row.case_id])
        assert mask.shape == ct.shape, row.axcodes
        # the mask keeps the input's own qform/sform, so even a qform-only input's affine is exact
        assert np.array_equal(mask.affine, ct.affine), (row.axcodes, row.style)
        assert (mask.header["qform_code"], mask.header["sform_code"]) == \
            (ct.header["qform_code"], ct.header["sform_code"]), (row.axcodes, row.style)
        canonical = nib.as_closest_canonical(mask)
        assert np.array_equal(np.asanyarray(canonical.dataobj), ref_labels), (row.axcodes, row.style)


#: Orders also scored through the evaluation node (its surface metrics take ~1 s a case).
SCORED_ORDERS = ("RAS", "LPS", "SAR", "IPL", *ODD_HEADERS)


def test_slice_dice_along_the_axial_axis_is_the_same_in_every_axis_order(copies, masks) -> None:
    """Slice Dice over the geometry's axial axis is order-independent, as are the node's metrics."""
    from pancreas_seg.evaluation.scoring import score_cases  # noqa: PLC0415

    config = PreprocessingConfig(image_size_px=(64, 64))
    values, fixed_axis_2 = {}, []
    for row in copies.itertuples():
        geometry = plan_case_geometry(row.image_path, config)
        truth, pred = load_nifti(row.label_path), load_nifti(masks[row.case_id])
        assert geometry.axial_axis == axial_axis(truth.affine) == axial_axis(pred.affine)
        assert row.axcodes[geometry.axial_axis] in "SI"
        values[row.case_id] = slice_dice(pred.array, truth.array, "pancreas", axis=geometry.axial_axis)
        fixed_axis_2.append(slice_dice(pred.array, truth.array, "pancreas", axis=2))
    reference = values[REFERENCE]
    assert 0.0 < reference < 1.0
    for case_id, value in values.items():
        assert value == pytest.approx(reference, rel=1e-12), case_id
    # the old fixed axis=2 scores sagittal or coronal slices for 32 of the 48 orders
    assert len({round(v, 9) for v in fixed_axis_2}) > 1

    scored = copies[copies["case_id"].eq(REFERENCE) | copies["axcodes"].isin(SCORED_ORDERS[1:])]
    predictions = {case_id: (lambda p=masks[case_id]: load_nifti(p)) for case_id in scored["case_id"]}
    # 4 mm: no surface distance (0, 3, 4.24, ... mm on this 3 mm grid) sits on the tolerance, so
    # float32 rounding of a quaternion affine's spacing cannot tip the NSD
    geometries = {row.case_id: plan_case_geometry(row.image_path, config).to_dict() for row in scored.itertuples()}
    scores = score_cases(predictions, sorted(scored["case_id"]), scored.assign(split="test"), geometries, "probe",
                         4.0).set_index(["case_id", "class"])
    assert scores.loc[(REFERENCE, "pancreas"), "slice_dice"] == pytest.approx(reference, rel=1e-12)
    for case_id in scored["case_id"]:
        for class_name in ("pancreas", "tumour"):
            got, want = scores.loc[(case_id, class_name)], scores.loc[(REFERENCE, class_name)]
            for metric in ("slice_dice", "dice", "dice_lcc", "nsd"):
                assert got[metric] == pytest.approx(want[metric], rel=1e-12, nan_ok=True), \
                    (case_id, class_name, metric)
            # mm: the spacing of a qform-only file is recomputed from its quaternion
            assert got["hd95_mm"] == pytest.approx(want["hd95_mm"], rel=1e-6, nan_ok=True)
