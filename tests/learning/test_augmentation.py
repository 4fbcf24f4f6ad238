"""Training-time augmentation: spatial transforms move image and label together, labels stay
categorical, intensity jitter touches only the image, and a seeded generator is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_seg.learning.augmentation import AugmentationConfig, augment_batch

SIZE = 32
PANCREAS_VALUE, TUMOUR_VALUE = 10.0, 20.0

SPATIAL_ONLY = AugmentationConfig(flip_probability=1.0, spatial_probability=1.0, rotation_deg=30.0,
                                  scale_range=(0.8, 1.25), intensity_probability=0.0)
FLIP_ONLY = AugmentationConfig(flip_probability=1.0, spatial_probability=0.0, intensity_probability=0.0)
INTENSITY_ONLY = AugmentationConfig(flip_probability=0.0, spatial_probability=0.0,
                                    intensity_probability=1.0, intensity_scale=0.1, intensity_shift=0.05)


def _phantom_batch(batch: int = 6, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Off-centre bright squares (image 10 / 20 on 0) with labels 1 / 2 at exactly those pixels.

    Channel k is (k + 1) times channel 0, so a transform shared by all channels keeps that ratio.
    Each slice has its squares at a different place, so flips and rotations are not symmetric.
    """
    images = np.zeros((batch, SIZE, SIZE, channels), np.float32)
    labels = np.zeros((batch, SIZE, SIZE), np.uint8)
    for b in range(batch):
        r, c = 4 + b, 17 + (b % 3)
        labels[b, r:r + 9, c:c + 9] = 1
        labels[b, r + 2:r + 5, c + 2:c + 5] = 2
    base = np.where(labels == 2, TUMOUR_VALUE, np.where(labels == 1, PANCREAS_VALUE, 0.0))
    for k in range(channels):
        images[..., k] = (k + 1) * base
    return images, labels


def test_spatial_transforms_keep_image_and_label_aligned() -> None:
    images, labels = _phantom_batch()
    changed = 0
    for seed in range(5):
        out_images, out_labels = augment_batch(images, labels, SPATIAL_ONLY, np.random.default_rng(seed))
        assert out_images.shape == images.shape and out_labels.shape == labels.shape
        assert out_images.dtype == np.float32 and out_labels.dtype == np.uint8
        # Nearest-neighbour labels: no interpolated values appear.
        assert set(np.unique(out_labels)) <= {0, 1, 2}
        image = out_images[..., 0]
        for b in range(len(images)):
            assert (out_labels[b] > 0).any(), "the squares must stay in the field of view"
            # Where the image is (almost) fully inside a square, the label is that square's class
            # (linear interpolation reaches > 95 % of the value only within 0.05 px of the square).
            assert np.all(out_labels[b][image[b] > 0.95 * TUMOUR_VALUE] == 2)
            assert np.all(out_labels[b][image[b] > 0.95 * PANCREAS_VALUE] >= 1)
            # Every labelled pixel lies on the bright square (worst case: a corner pixel that
            # nearest-neighbour rounds inside while the linear image is at 1/4 of the value).
            assert np.all(image[b][out_labels[b] >= 1] > 0.2 * PANCREAS_VALUE)
            assert np.all(image[b][out_labels[b] == 0] < 0.8 * PANCREAS_VALUE)
            changed += int(not np.array_equal(out_labels[b], labels[b]))
    assert changed >= 25, "rotation + scaling + flip with probability 1 must move the squares"


def test_spatial_transform_is_identical_on_every_context_channel() -> None:
    images, labels = _phantom_batch(channels=3)
    out_images, _ = augment_batch(images, labels, SPATIAL_ONLY, np.random.default_rng(7))
    assert not np.array_equal(out_images, images)
    for k in range(3):
        np.testing.assert_allclose(out_images[..., k], (k + 1) * out_images[..., 0], rtol=1e-5, atol=1e-4)


def test_flip_is_an_exact_left_right_mirror_of_image_and_label() -> None:
    images, labels = _phantom_batch(channels=3)
    out_images, out_labels = augment_batch(images, labels, FLIP_ONLY, np.random.default_rng(0))
    np.testing.assert_array_equal(out_images, images[:, :, ::-1, :])
    np.testing.assert_array_equal(out_labels, labels[:, :, ::-1])


def test_augmentation_returns_copies_and_leaves_its_inputs_alone() -> None:
    images, labels = _phantom_batch()
    before_images, before_labels = images.copy(), labels.copy()
    config = AugmentationConfig(flip_probability=1.0, spatial_probability=1.0, intensity_probability=1.0)
    out_images, out_labels = augment_batch(images, labels, config, np.random.default_rng(3))
    np.testing.assert_array_equal(images, before_images)
    np.testing.assert_array_equal(labels, before_labels)
    assert not np.shares_memory(out_images, images) and not np.shares_memory(out_labels, labels)


def test_disabled_config_returns_inputs_unchanged() -> None:
    images, labels = _phantom_batch()
    rng = np.random.default_rng(0)
    out_images, out_labels = augment_batch(images, labels, AugmentationConfig(enabled=False), rng)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)
    # Nothing was drawn from the generator either.
    assert rng.random() == np.random.default_rng(0).random()


def test_intensity_jitter_changes_only_the_image_by_an_affine_map_in_range() -> None:
    images, labels = _phantom_batch()
    images += np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
    out_images, out_labels = augment_batch(images, labels, INTENSITY_ONLY, np.random.default_rng(5))
    np.testing.assert_array_equal(out_labels, labels)
    assert not np.allclose(out_images, images)
    for b in range(len(images)):
        scale, shift = np.polyfit(images[b].ravel(), out_images[b].ravel(), 1)
        assert 0.9 - 1e-4 <= scale <= 1.1 + 1e-4
        assert -0.05 - 1e-3 <= shift <= 0.05 + 1e-3
        np.testing.assert_allclose(out_images[b], scale * images[b] + shift, rtol=1e-5, atol=1e-4)


def test_same_seed_same_result_other_seed_other_result() -> None:
    images, labels = _phantom_batch(batch=8)
    config = AugmentationConfig()  # the defaults: every transform with probability 0.5
    first = augment_batch(images, labels, config, np.random.default_rng(123))
    second = augment_batch(images, labels, config, np.random.default_rng(123))
    other = augment_batch(images, labels, config, np.random.default_rng(124))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_config_from_params_accepts_yaml_lists_and_rejects_unknown_keys() -> None:
    config = AugmentationConfig.from_params({"scale_range": [0.8, 1.2], "rotation_deg": 5})
    assert config.scale_range == (0.8, 1.2) and config.rotation_deg == 5 and config.enabled
    assert AugmentationConfig.from_params(None) == AugmentationConfig()
    with pytest.raises(TypeError):
        AugmentationConfig.from_params({"rotation_degrees": 5})
