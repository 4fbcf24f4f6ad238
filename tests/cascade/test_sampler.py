"""``CropLoader``: tumour-guaranteed, jittered stage-2 training windows; complete validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pancreas_seg.cascade.sampler import CropLoader
from pancreas_seg.core.labels import PANCREAS, TUMOUR
from pancreas_seg.learning.augmentation import AugmentationConfig

WINDOW = (16, 24)


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three crops of 6 slices: a pancreas band everywhere, a tumour on 2 slices of one case only."""
    cases = {}
    for index, case_id in enumerate(("a", "b", "c")):
        image = np.random.default_rng(index).random((6, 28, 40), dtype=np.float32)
        label = np.zeros((6, 28, 40), np.uint8)
        label[:, 10:18, 8:32] = PANCREAS
        if case_id == "b":
            label[2:4, 12:15, 28:31] = TUMOUR   # near the crop's edge: a centred window misses it
        cases[case_id] = (image, label)
    return cases


def _loader(**kwargs) -> CropLoader:
    settings = {"window_hw": WINDOW, "batch_size": 8, "label_mode": "multiclass", "training": True,
                "tumour_fraction": 0.5, "seed": 3, "steps_per_epoch": 20} | kwargs
    return CropLoader(_cases(), **settings)


def test_every_training_batch_holds_the_guaranteed_share_of_tumour_windows() -> None:
    loader = _loader()
    assert loader.n_tumour_per_batch == 4 and loader.tumour_slices.size == 2
    for index in range(len(loader)):
        images, targets = loader[index]
        assert images.shape == (8, *WINDOW, 1) and targets.shape == (8, *WINDOW, 3)
        with_tumour = int((targets[..., TUMOUR].reshape(8, -1).max(axis=1) > 0).sum())
        assert with_tumour >= 4, f"batch {index}: {with_tumour} tumour windows"


def test_tumour_fraction_zero_leaves_tumours_to_chance() -> None:
    loader = _loader(tumour_fraction=0.0)
    seen = sum(int(loader[i][1][..., TUMOUR].any()) for i in range(len(loader)))
    assert loader.n_tumour_per_batch == 0 and seen < len(loader)


def test_window_positions_follow_the_jitter_and_are_reproducible() -> None:
    centred = _loader(tumour_fraction=0.0, jitter_std_px=(0.0, 0.0))
    _, corners = centred.window_positions(0)
    assert (corners == [(28 - 16) // 2, (40 - 24) // 2]).all()
    jittered = _loader(tumour_fraction=0.0, jitter_std_px=(3.0, 5.0))
    offsets = np.concatenate([jittered.window_positions(i)[1] for i in range(len(jittered))]) - [6, 8]
    std = offsets.std(axis=0)
    assert 2.0 < std[0] < 4.0 and 3.5 < std[1] < 6.5
    again = _loader(tumour_fraction=0.0, jitter_std_px=(3.0, 5.0))
    np.testing.assert_array_equal(again[5][0], jittered[5][0])      # batch i depends on (seed, epoch, i)
    jittered.on_epoch_end()
    assert not np.array_equal(jittered[5][0], again[5][0])


def test_slack_lets_windows_slide_across_a_wide_pancreas() -> None:
    loader = _loader(tumour_fraction=0.0, slack_px={"a": (0, 6), "b": (0, 6), "c": (0, 6)})
    columns = np.concatenate([loader.window_positions(i)[1][:, 1] for i in range(len(loader))])
    assert columns.min() <= 8 - 4 and columns.max() >= 8 + 4 and np.abs(columns - 8).max() <= 6


def test_validation_sees_every_slice_once_centred_and_unaugmented() -> None:
    loader = CropLoader(_cases(), WINDOW, batch_size=4, label_mode="multiclass", training=False,
                        augmentation=AugmentationConfig(enabled=True))
    assert len(loader) == math.ceil(18 / 4)
    images = np.concatenate([loader[i][0] for i in range(len(loader))])
    assert images.shape[0] == 18
    expected = _cases()["a"][0][:, 6:22, 8:32]
    np.testing.assert_array_equal(images[:6, ..., 0], expected)


def test_targets_follow_the_stage2_label_mode() -> None:
    _, tumour_targets = _loader(label_mode="tumour")[0]
    assert tumour_targets.shape[-1] == 1 and tumour_targets.max() == 1.0
    _, pancreas_targets = _loader(label_mode="pancreas")[0]
    assert pancreas_targets.sum() > tumour_targets.sum()


def test_crops_smaller_than_the_window_are_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the window"):
        CropLoader(_cases(), (32, 24), batch_size=2, label_mode="multiclass", training=True)
