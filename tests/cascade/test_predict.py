"""The cascade on one scan, with real (tiny, hand-set) Keras models and real geometry.

Both stages are 1x1 convolutions with set weights that call a pixel pancreas when its windowed
intensity is above the middle of the window (70 HU): an intensity oracle on a volume whose
pancreas is the only tissue above 70 HU. The cascade must then return exactly the true pancreas on
the file's own grid, whatever the axis order, while stage 2 sees only the crop.
"""

from __future__ import annotations

import itertools
import logging

import keras
import numpy as np
import pytest
from nibabel import orientations as ornt_lib

from pancreas_seg.cascade.crops import CropConfig
from pancreas_seg.core.labels import PANCREAS
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.inference.cascade import Cascade, background_probabilities, predict_tiled
from pancreas_seg.inference.forward import predict_slices
from pancreas_seg.inference.model_card import CascadeSpec, CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.models.io import weights_sha256

PREPROCESSING_PARAMS = {"image_size_px": 32, "label_mode": "multiclass",
                        "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}
PREPROCESSING = PreprocessingConfig.from_params(PREPROCESSING_PARAMS)


def _threshold_model(channels: int = 3, always_background: bool = False) -> keras.Model:
    """(B, H, W, 1) in [0, 1] -> softmax over (background, pancreas, tumour): pancreas iff x > 0.5."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(channels, 1, activation="softmax")])
    slope = 0.0 if always_background else 40.0
    kernel = np.array([[[[-slope, slope, 0.0]]]], dtype=np.float32)
    bias = np.array([slope / 2, -slope / 2, -50.0], dtype=np.float32)
    if always_background:
        bias = np.array([10.0, -10.0, -10.0], dtype=np.float32)
    model.layers[-1].set_weights([kernel, bias])
    return model


def _scan(perm=(0, 1, 2), flips=(1, 1, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    hu = rng.normal(20.0, 5.0, size=(64, 56, 20)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    pancreas = ((x - 34) / 16) ** 2 + ((y - 30) / 7) ** 2 + ((z - 9) / 4) ** 2 <= 1
    hu[pancreas] = 120.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    ornt = np.array([[perm.index(axis), flips[axis]] for axis in range(3)], dtype=float)
    stored = [np.ascontiguousarray(ornt_lib.apply_orientation(a, ornt)) for a in (hu, pancreas)]
    return stored[0], stored[1], affine @ ornt_lib.inv_ornt_aff(ornt, hu.shape)


def _cascade(stage1: keras.Model, crop: CropConfig | None = None) -> Cascade:
    return Cascade(stage1=stage1, stage2=_threshold_model(), preprocessing=PREPROCESSING,
                   stage1_label_mode="multiclass", stage2_label_mode="multiclass",
                   crop=crop or CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=5.0))


def _segment(cascade: Cascade, hu: np.ndarray, affine: np.ndarray, batch_size: int = 4,
                    name: str = "scan") -> tuple[np.ndarray, dict]:
    """``cascade`` as users run it: a cascade card for its two models, the Predictor's segment."""
    spec = CascadeSpec(stage1={"architecture": "probe", "label_mode": cascade.stage1_label_mode,
                               "weights_sha256": weights_sha256(cascade.stage1)},
                       stage2={"architecture": "probe", "label_mode": cascade.stage2_label_mode},
                       crop=cascade.crop.to_dict(), min_tumour_volume_mm3=cascade.min_tumour_volume_mm3)
    card = ModelCard.for_trained_model("cascade", "multiclass", PREPROCESSING_PARAMS, None, "Task07_Pancreas_synthetic",
                                       CaseSplit(("case_001",), ("case_002",)), weights_sha256(cascade.stage2),
                                       cascade=spec)
    predictor = Predictor.from_models([cascade.stage2], [card], PredictionSettings(batch_size, flip_tta=False),
                                      stage1=cascade.stage1)
    assert predictor.cascade == cascade   # the card describes exactly this cascade
    return predictor.segment_with_report(hu, affine, name)


ORDERS = list(itertools.product(itertools.permutations(range(3)), [(1, 1, 1), (-1, 1, -1)]))


@pytest.mark.parametrize(("perm", "flips"), ORDERS, ids=lambda v: "".join(map(str, v)))
def test_cascade_returns_the_pancreas_on_the_file_grid_in_any_axis_order(perm, flips) -> None:
    hu, pancreas, affine = _scan(perm, flips)
    labels, report = _segment(_cascade(_threshold_model()), hu, affine, batch_size=4)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.where(pancreas, PANCREAS, 0))
    assert report["stage1_found"] and report["stage2_slices"] < hu.shape[int(np.argmax(np.abs(affine[2, :3])))]
    assert report["stage2_tiles"] > 1   # the 26 x 41 px region needs several 16 x 24 tiles


def test_stage2_only_sees_the_crop() -> None:
    hu, pancreas, affine = _scan()
    hu[2:6, 2:6, 8:10] = 200.0   # bright, far from the pancreas: a small component for stage 1
    cascade = _cascade(_threshold_model())
    labels, _ = _segment(cascade, hu, affine, batch_size=4)
    np.testing.assert_array_equal(labels, np.where(pancreas, PANCREAS, 0))   # outside every crop
    everything = Cascade(**{**cascade.__dict__, "crop": CropConfig(spacing_mm=0.8, size_px=(16, 24),
                                                                   min_component_fraction=0.0)})
    stretched, _ = _segment(everything, hu, affine, batch_size=4)
    assert stretched[2:6, 2:6, 8:10].all()   # kept as a component, the box (and stage 2) reaches it


def test_an_empty_stage1_gives_an_empty_mask_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    hu, _, affine = _scan()
    with caplog.at_level(logging.WARNING, logger="pancreas_seg.inference.cascade"):
        labels, report = _segment(_cascade(_threshold_model(always_background=True)), hu, affine,
                                         name="case_x")
    assert labels.shape == hu.shape and not labels.any() and report["stage1_found"] is False
    assert any("case_x" in r.getMessage() and "no pancreas" in r.getMessage() for r in caplog.records)


def test_tiled_prediction_equals_whole_crop_prediction_for_a_pointwise_model() -> None:
    image = np.random.default_rng(2).random((5, 40, 70), dtype=np.float32)
    model = _threshold_model()
    whole = predict_slices(model, image, 1, batch_size=2)
    tiled = predict_tiled(model, image, (16, 24), overlap=0.25, context_slices=1, batch_size=2)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the stage-2 input"):
        predict_tiled(model, image[:, :10], (16, 24), 0.25, 1)


def test_a_tumour_only_stage1_is_refused() -> None:
    with pytest.raises(ValueError, match="localise the pancreas"):
        Cascade(stage1=None, stage2=None, preprocessing=PREPROCESSING, stage1_label_mode="tumour",
                stage2_label_mode="multiclass", crop=CropConfig())


def test_background_probabilities_per_label_mode() -> None:
    np.testing.assert_array_equal(background_probabilities("multiclass"), [1, 0, 0])
    np.testing.assert_array_equal(background_probabilities("tumour"), [0])


def test_small_predicted_tumours_become_pancreas() -> None:
    hu, pancreas, affine = _scan()
    tumour_model = _threshold_model()
    # stage 2 calls everything above 70 HU tumour: the pancreas becomes one big "tumour"
    tumour_model.layers[-1].set_weights([np.array([[[[-40.0, 0.0, 40.0]]]], np.float32),
                                         np.array([20.0, -50.0, -20.0], np.float32)])
    hu[20, 30, 18] = 200.0   # plus a lone bright voxel inside the crop's slices: a 1.6 mm³ "tumour"
    cascade = Cascade(stage1=_threshold_model(), stage2=tumour_model, preprocessing=PREPROCESSING,
                      stage1_label_mode="multiclass", stage2_label_mode="multiclass",
                      crop=CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=50.0),
                      min_tumour_volume_mm3=50.0)
    labels, report = _segment(cascade, hu, affine, batch_size=4)
    assert report["small_tumour_components_removed"] == 1
    assert (labels[pancreas] == 2).all() and labels[20, 30, 18] == PANCREAS


def test_a_tumour_stage2_adds_its_tumour_to_stage1s_pancreas() -> None:
    """Stage 2 in ``tumour`` mode (one sigmoid channel): the pancreas is stage 1's, the tumour stage 2's."""
    hu, pancreas, affine = _scan()
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    tumour = pancreas & (((x - 38) / 5) ** 2 + ((y - 30) / 4) ** 2 + ((z - 9) / 2) ** 2 <= 1)
    hu[tumour] = 220.0   # the only tissue above 200 HU (0.94 of the -100..240 HU window)
    tumour_model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    tumour_model.layers[-1].set_weights([np.array([[[[60.0]]]], np.float32), np.array([-60.0 * 0.88], np.float32)])
    cascade = Cascade(stage1=_threshold_model(), stage2=tumour_model, preprocessing=PREPROCESSING,
                      stage1_label_mode="multiclass", stage2_label_mode="tumour",
                      crop=CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=5.0))
    labels, report = _segment(cascade, hu, affine)
    assert tumour.sum() > 50 and report["small_tumour_components_removed"] == 0
    np.testing.assert_array_equal(labels == 2, tumour)   # stage 2 at the source's 0.8 mm: exact
    # the pancreas is stage 1's, predicted on 32 x 32 px whole slices: right up to its boundary
    dice = 2 * np.sum((labels > 0) & pancreas) / (np.sum(labels > 0) + pancreas.sum())
    assert dice > 0.95 and np.isin(labels, [0, PANCREAS, 2]).all()
