"""The predictor keeps the tumour probability (issue 26): real (tiny) Keras models, real geometry,
real files. The probability map is the labels' own map-back, interpolated linearly; the cascade's is
stage 2's inside its crop and 0 outside; it is written as a NIfTI that ITK reads back in [0, 1]."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from scipy import ndimage

from pancreas_seg.cascade.crops import CropConfig, CropGeometry, PancreasBox
from pancreas_seg.core.labels import TUMOUR
from pancreas_seg.datasets import OptionalPartitionedDataset, PredictionDataset
from pancreas_seg.imaging.nifti_io import PROBABILITY_LEVELS, CasePrediction, NiftiVolume, load_nifti, save_nifti
from pancreas_seg.imaging.preprocess import preprocess_image
from pancreas_seg.inference.forward import predict_slices
from pancreas_seg.inference.model_card import CascadeSpec, CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.models.io import weights_sha256
from pancreas_seg.pipelines.inference import nodes as inference_nodes

SETTINGS = PredictionSettings(batch_size=4, flip_tta=False)


def _preprocessing(label_mode: str) -> dict:
    return {"image_size_px": 32, "crop_to_body": False, "label_mode": label_mode, "context_slices": 1,
            "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}


def _model(seed: int, channels: int = 3) -> keras.Model:
    """A 3x3 convolution with random weights: every class wins somewhere on a noisy scan."""
    inputs = keras.Input((None, None, 1), name="image")
    outputs = keras.layers.Conv2D(channels, 3, padding="same", activation="softmax" if channels > 1 else "sigmoid",
                                  name="classes", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0, seed=seed),
                                  bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 1))(inputs)
    return keras.Model(inputs, outputs, name=f"probe{seed}")


def _card(model: keras.Model, label_mode: str = "multiclass") -> ModelCard:
    return ModelCard.for_trained_model("unet", label_mode, _preprocessing(label_mode), None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("case_001",), ("case_002",)), weights_sha256(model))


def _scan() -> tuple[np.ndarray, np.ndarray]:
    hu = np.random.default_rng(0).normal(70.0, 120.0, size=(40, 36, 6)).astype(np.float32)
    return hu, np.diag([0.9, 0.9, 3.0, 1.0])


def test_single_model_probability_is_the_labels_map_back_interpolated_linearly() -> None:
    model = _model(1)
    predictor = Predictor.from_models([model], [_card(model)], SETTINGS)
    hu, affine = _scan()
    prediction = predictor.segment_with_probability(hu, affine, "scan")
    labels, probability = prediction.labels, prediction.tumour_probability
    np.testing.assert_array_equal(labels, predictor.segment(hu, affine))   # the labels do not change
    assert probability.shape == hu.shape and probability.dtype == np.float32
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    # the same geometry inverse as the labels, applied to the tumour channel, linear
    image, geometry = preprocess_image(hu, affine, predictor.preprocessing)
    model_grid = predict_slices(model, image, 1, 4)
    expected = geometry.from_slices(geometry.probabilities_to_slices(model_grid)[..., TUMOUR])
    np.testing.assert_allclose(probability, expected, atol=1e-6)
    # argmax-consistent: tumour above 1/2 is labelled tumour, a tumour label has more than 1/3
    tumour = labels == TUMOUR
    assert tumour.any() and (probability > 0.5).any() and not tumour.all()
    assert np.all(tumour[probability > 0.5]) and np.all(probability[tumour] > 1 / 3)
    assert len(np.unique(probability)) > 100   # interpolated, not nearest-neighbour copies of 32 x 32 values
    assert prediction.patient_tumour_score == pytest.approx(float(probability.max()))
    scored = predictor.segment_with_score(hu, affine)   # the served model's path: the same score, no map
    assert scored.tumour_probability is None and scored.patient_tumour_score == prediction.patient_tumour_score
    np.testing.assert_array_equal(scored.labels, labels)


def test_tumour_mode_labels_are_exactly_the_probability_at_one_half_and_pancreas_mode_has_none() -> None:
    model = _model(2, channels=1)
    kernel = np.zeros((3, 3, 1, 1), dtype=np.float32)
    kernel[1, 1] = 12.0
    model.get_layer("classes").set_weights([kernel, np.array([-6.0], dtype=np.float32)])   # tumour iff x > 0.5
    predictor = Predictor.from_models([model], [_card(model, "tumour")], SETTINGS)
    hu, affine = _scan()
    prediction = predictor.segment_with_probability(hu, affine)
    assert predictor.has_tumour_output
    np.testing.assert_array_equal(prediction.labels == TUMOUR, prediction.tumour_probability >= 0.5)
    assert 0 < np.count_nonzero(prediction.labels) < prediction.labels.size
    pancreas_model = _model(3, channels=1)
    pancreas = Predictor.from_models([pancreas_model], [_card(pancreas_model, "pancreas")], SETTINGS)
    only_labels = pancreas.segment_with_probability(hu, affine)
    assert not pancreas.has_tumour_output
    assert only_labels.tumour_probability is None and only_labels.patient_tumour_score is None
    assert pancreas.segment_with_score(hu, affine).patient_tumour_score is None
    np.testing.assert_array_equal(only_labels.labels, pancreas.segment(hu, affine))


def test_an_ensemble_maps_back_the_mean_tumour_probability() -> None:
    first, second = _model(4), _model(5)
    ensemble = Predictor.from_models([first, second], [_card(first), _card(second)], SETTINGS, name="pair")
    hu, affine = _scan()
    image, geometry = preprocess_image(hu, affine, ensemble.preprocessing)
    mean = (predict_slices(first, image, 1, 4) + predict_slices(second, image, 1, 4)) / 2
    prediction = ensemble.segment_slices_with_probability(image, geometry)
    np.testing.assert_allclose(prediction.tumour_probability,
                               geometry.from_slices(geometry.probabilities_to_slices(mean)[..., TUMOUR]), atol=1e-6)
    np.testing.assert_array_equal(prediction.labels, ensemble.segment_slices(image, geometry))


# --------------------------------------------------------------------------- the cascade
CASCADE_PREPROCESSING = {"image_size_px": 32, "label_mode": "multiclass",
                         "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}
CROP = CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=5.0)


def _pointwise(kernel: list[float], bias: list[float]) -> keras.Model:
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 1, activation="softmax")])
    model.layers[-1].set_weights([np.array([[[kernel]]], dtype=np.float32), np.array(bias, dtype=np.float32)])
    return model


def test_cascade_probability_is_stage2s_inside_the_crop_and_zero_outside() -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(20.0, 5.0, size=(64, 56, 20)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    hu[((x - 34) / 16) ** 2 + ((y - 30) / 7) ** 2 + ((z - 9) / 4) ** 2 <= 1] = 120.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    stage1 = _pointwise([-40.0, 40.0, 0.0], [20.0, -20.0, -50.0])   # pancreas iff windowed intensity > 0.5
    stage2 = _pointwise([0.0, 0.0, 0.0], list(np.log([0.5, 0.2, 0.3])))   # tumour 0.3 everywhere it looks
    spec = CascadeSpec(stage1={"architecture": "probe", "label_mode": "multiclass", "weights_sha256": weights_sha256(stage1)},
                       stage2={"architecture": "probe", "label_mode": "multiclass"}, crop=CROP.to_dict())
    card = ModelCard.for_trained_model("cascade", "multiclass", CASCADE_PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("case_001",), ("case_002",)), weights_sha256(stage2), cascade=spec)
    predictor = Predictor.from_models([stage2], [card], SETTINGS, stage1=stage1)
    prediction = predictor.segment_with_probability(hu, affine, "scan")
    np.testing.assert_array_equal(prediction.labels, predictor.segment(hu, affine))
    probability = prediction.tumour_probability
    assert probability.shape == hu.shape and prediction.report["stage1_found"]
    crop = CropGeometry.plan(hu.shape, affine, PancreasBox(*prediction.report["stage1_box"]), CROP)
    inside = crop.labels_to_volume(np.ones(crop.crop_shape, dtype=np.uint8)).astype(bool)
    assert 0 < inside.sum() < hu.size / 4
    # 0.3 inside the crop (the edge pixels blend with the 0 outside), exactly 0 beyond a 1-voxel fringe
    np.testing.assert_allclose(probability[ndimage.binary_erosion(inside, iterations=2)], 0.3, atol=1e-5)
    assert not probability[~ndimage.binary_dilation(inside)].any()
    assert prediction.patient_tumour_score == pytest.approx(0.3, abs=1e-5)
    scored = predictor.segment_with_score(hu, affine)
    assert scored.tumour_probability is None and scored.patient_tumour_score == prediction.patient_tumour_score


def test_cascade_without_a_pancreas_gives_a_zero_probability() -> None:
    hu, affine = _scan()
    stage1 = _pointwise([0.0, 0.0, 0.0], [10.0, -10.0, -10.0])   # background everywhere
    stage2 = _pointwise([0.0, 0.0, 0.0], [0.0, 0.0, 5.0])
    spec = CascadeSpec(stage1={"architecture": "probe", "label_mode": "multiclass", "weights_sha256": weights_sha256(stage1)},
                       stage2={"architecture": "probe", "label_mode": "multiclass"}, crop=CROP.to_dict())
    card = ModelCard.for_trained_model("cascade", "multiclass", CASCADE_PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("case_001",), ("case_002",)), weights_sha256(stage2), cascade=spec)
    prediction = Predictor.from_models([stage2], [card], SETTINGS, stage1=stage1).segment_with_probability(hu, affine)
    assert not prediction.labels.any() and prediction.tumour_probability.shape == hu.shape
    assert prediction.patient_tumour_score == 0.0 and not prediction.tumour_probability.any()


# --------------------------------------------------------------------------- written files
def test_a_written_probability_map_reads_back_in_0_1_with_the_inputs_geometry(tmp_path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    hu, _ = _scan()
    affine = np.array([[0.0, 0.0, -3.0, 40.0], [-0.9, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -8.0], [0, 0, 0, 1]])
    save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    ct = load_nifti(tmp_path / "ct.nii.gz")
    probability = np.random.default_rng(4).random(hu.shape, dtype=np.float32)
    probability.flat[:2] = (0.0, 1.0)
    labels = (probability > 0.7).astype(np.uint8) * TUMOUR
    PredictionDataset(filepath=str(tmp_path / "case_1.nii.gz")).save(
        CasePrediction(NiftiVolume(labels, ct.affine, ct.header), probability))

    written = tmp_path / "case_1_tumour_probability.nii.gz"
    image = sitk.ReadImage(str(written))
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)   # ITK arrays are (z, y, x)
    assert values.dtype == np.float32 and values.shape == hu.shape
    assert values.min() == 0.0 and values.max() == pytest.approx(1.0)
    np.testing.assert_allclose(values, probability, atol=0.5 / PROBABILITY_LEVELS + 1e-6)
    source = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    assert image.GetOrigin() == pytest.approx(source.GetOrigin())
    assert image.GetSpacing() == pytest.approx(source.GetSpacing())
    assert image.GetDirection() == pytest.approx(source.GetDirection())
    # the partitioned folder lists both files; the label map keeps its values, the map loads as float
    loaded = OptionalPartitionedDataset(path=str(tmp_path), dataset="pancreas_seg.datasets.PredictionDataset",
                                        filename_suffix=".nii.gz").load()
    assert {"case_1", "case_1_tumour_probability"} <= set(loaded)
    np.testing.assert_array_equal(loaded["case_1"]().array, labels)
    np.testing.assert_allclose(loaded["case_1_tumour_probability"]().array, probability,
                               atol=0.5 / PROBABILITY_LEVELS + 1e-6)
    # a later prediction without a probability map removes the stale one
    PredictionDataset(filepath=str(tmp_path / "case_1.nii.gz")).save(NiftiVolume(labels, ct.affine, ct.header))
    assert not written.exists() and (tmp_path / "case_1.nii.gz").exists()


def test_inference_writes_the_probability_map_and_reports_the_patient_score(tmp_path) -> None:
    model = _model(6)
    predictor = Predictor.from_models([model], [_card(model)], SETTINGS)
    hu, affine = _scan()
    save_nifti(tmp_path / "scan_7.nii.gz", hu.astype(np.int16), affine)
    scans = {"scan_7": inference_nodes.Scan(str(tmp_path / "scan_7.nii.gz"),
                                            lambda: load_nifti(tmp_path / "scan_7.nii.gz"))}
    output_dir = tmp_path / "out"
    masks = OptionalPartitionedDataset(path=str(output_dir), dataset="pancreas_seg.datasets.PredictionDataset",
                                       filename_suffix=".nii.gz")
    inference = {"write_tumour_probability": True, "output_dir": str(output_dir), "model": "unet"}
    masks.save(inference_nodes.segment_scans(predictor, scans, inference))
    written = output_dir / "scan_7_tumour_probability.nii.gz"
    assert written.is_file() and (output_dir / "scan_7.nii.gz").is_file()
    report = inference_nodes.report_inference(masks.load(), {}, {}, scans, [], predictor, inference)
    (row,) = report["outputs"]
    exact = predictor.segment_with_probability(hu.astype(np.int16).astype(np.float32), affine).patient_tumour_score
    assert row["tumour_probability"] == str(written)
    assert row["patient_tumour_score"] == pytest.approx(exact, abs=0.5 / PROBABILITY_LEVELS + 1e-6)
    assert 0.0 < row["patient_tumour_score"] <= 1.0
    # off by default: no map, no score, and the labels are the same
    masks.save(inference_nodes.segment_scans(predictor, scans, {}))
    assert not written.exists()
    report = inference_nodes.report_inference(masks.load(), {}, {}, scans, [], predictor,
                                              {"output_dir": str(output_dir), "model": "unet"})
    assert report["outputs"][0]["patient_tumour_score"] is None and report["outputs"][0]["tumour_probability"] is None
