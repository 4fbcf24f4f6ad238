"""Augmentation on the device: the ``keras.ops`` version applies the same transforms as the NumPy/SciPy
one for the same random draws, the draws are those of earlier versions, and the loaders and
``fit_with_resume`` use it when ``augmentation.on_device`` is set.

Tolerances. SciPy computes each sampling coordinate in float64, the device in float32:
``A @ (o - c) + c`` with ``|o - c| <= max(H, W) / 2`` rounds to within ``delta = 2 eps32 max(H, W)``
px (a few roundings of magnitude ``max(H, W)``; 6e-5 px at 256 px). Away from ties:

* labels (nearest neighbour) are identical: only a coordinate within ``delta`` of a half pixel can
  round the other way;
* the image (bilinear) differs by at most ``G * delta`` plus float32 rounding of the interpolation,
  ``G`` the largest difference between neighbouring pixels (the slope of the interpolant);
* ties are the pixels whose float64 coordinate lies within ``TIE_PX = 1e-4`` px (> delta) of the
  edge of the slice (inside vs fill), or, for labels, of a half pixel. They are a tiny share
  (expected about 4 TIE_PX = 4e-4 of the pixels, asserted below 5e-3) and the label mismatches over ALL pixels stay below 1e-4.

Measured on random N(0, 1) images (the steepest case, G about 8): image max |diff| 7e-6 at 32 px,
1.3e-5 at 48 x 40 x 3 and 9e-5 at 256 px; no label mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pancreas_seg.learning.augmentation import (
    DRAW_COLUMNS,
    AugmentationConfig,
    AugmentationDraws,
    apply_augmentation_numpy,
    augment_batch,
    draw_augmentation,
)

EPS32 = float(np.finfo(np.float32).eps)
TIE_PX = 1e-4

FULL = AugmentationConfig(flip_probability=0.5, spatial_probability=1.0, rotation_deg=30.0,
                          scale_range=(0.8, 1.25), intensity_probability=0.5)
CONFIGS = {
    "default": AugmentationConfig(),
    "full": FULL,
    "flips_only": AugmentationConfig(flip_probability=1.0, spatial_probability=0.0, intensity_probability=0.0),
    "rotation_only": AugmentationConfig(flip_probability=0.0, spatial_probability=1.0, rotation_deg=45.0,
                                        scale_range=(1.0, 1.0), intensity_probability=0.0),
    "identity": AugmentationConfig(flip_probability=0.0, spatial_probability=0.0, intensity_probability=0.0),
}
SHAPES = [(32, 32, 1), (48, 40, 3), (96, 96, 1)]

#: sha256 of augment_batch's outputs in _digest(), computed with the code before the draw/apply split.
AUGMENT_BATCH_DIGEST = "dc7700a84df36fcb8fc91230a1cbb8da66e3e1d42890d1be15354ceef87e95f1"


def _digest() -> str:
    digest = hashlib.sha256()
    configs = [AugmentationConfig(),
               AugmentationConfig(flip_probability=0.7, spatial_probability=0.8, rotation_deg=30.0,
                                  scale_range=(0.8, 1.25), intensity_probability=0.6),
               AugmentationConfig(enabled=False)]
    for size, channels, config in zip((32, 40, 24), (1, 3, 1), configs, strict=True):
        gen = np.random.default_rng(2024)
        images = gen.normal(size=(6, size, size + 4, channels)).astype(np.float32)
        labels = gen.integers(0, 3, size=(6, size, size + 4)).astype(np.uint8)
        for seed in range(4):
            rng = np.random.default_rng([7, seed, 3, 1])
            out_images, out_labels = augment_batch(images, labels, config, rng)
            digest.update(out_images.tobytes())
            digest.update(out_labels.tobytes())
            digest.update(np.float64(rng.random()).tobytes())  # the generator is left where it was
    return digest.hexdigest()


def test_augment_batch_is_byte_identical_to_earlier_versions() -> None:
    """Splitting augmentation into draw + apply changed no host batch (and no draw order)."""
    assert _digest() == AUGMENT_BATCH_DIGEST


def test_draws_consume_the_generator_in_the_documented_order() -> None:
    config = AugmentationConfig(flip_probability=0.5, spatial_probability=0.5, intensity_probability=0.5)
    draws = draw_augmentation(config, np.random.default_rng(11), 16)
    rng = np.random.default_rng(11)
    for i in range(16):
        assert draws.flip[i] == (rng.random() < 0.5)
        if rng.random() < 0.5:
            assert draws.spatial[i]
            assert draws.angle_deg[i] == rng.uniform(-10.0, 10.0)
            assert draws.scale[i] == rng.uniform(0.9, 1.1)
        else:
            assert not draws.spatial[i] and draws.angle_deg[i] == 0.0 and draws.scale[i] == 1.0
        if rng.random() < 0.5:
            assert draws.intensity_multiplier[i] == np.float32(rng.uniform(0.9, 1.1))
            assert draws.intensity_shift[i] == np.float32(rng.uniform(-0.05, 0.05))
        else:
            assert draws.intensity_multiplier[i] == 1.0 and draws.intensity_shift[i] == 0.0
    assert 0 < draws.flip.sum() < 16 and 0 < draws.spatial.sum() < 16 and 0 < draws.intensity.sum() < 16


def test_disabled_config_draws_nothing_and_identity_encodes_as_unit_matrix() -> None:
    rng = np.random.default_rng(0)
    draws = draw_augmentation(AugmentationConfig(enabled=False), rng, 3)
    assert rng.random() == np.random.default_rng(0).random()
    encoded = draws.as_array()
    assert encoded.shape == (3, len(DRAW_COLUMNS)) and encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, np.tile([1, 0, 0, 1, 1, 0], (3, 1)))


def test_flip_and_rotation_fold_into_one_sampling_matrix() -> None:
    draws = AugmentationDraws.identity(2)
    draws.flip[:] = True
    draws.spatial[1], draws.angle_deg[1], draws.scale[1] = True, 90.0, 2.0
    matrices = draws.sampling_matrices()
    np.testing.assert_array_equal(matrices[0], [[1, 0], [0, -1]])
    np.testing.assert_allclose(matrices[1], [[0.0, -0.5], [-0.5, 0.0]], atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Equivalence: keras.ops (this process's backend, TensorFlow by default) vs NumPy/SciPy
# ------------------------------------------------------------------------------------------------
def _batch(shape: tuple[int, int, int], batch: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    images = gen.normal(size=(batch, *shape)).astype(np.float32)
    labels = gen.integers(0, 3, size=(batch, *shape[:2])).astype(np.uint8)
    return images, labels


def _ties(draws: AugmentationDraws, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) masks of the pixels whose float64 sampling coordinate is within TIE_PX of the slice
    edge (image and labels) or of a half pixel (labels). Without rotation/scaling the coordinates are
    integers, exact in float32 too: no ties."""
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    rows, cols = np.meshgrid(np.arange(height) - centre[0], np.arange(width) - centre[1], indexing="ij")
    matrices = draws.sampling_matrices()
    source = np.einsum("bij,jhw->bihw", matrices, np.stack([rows, cols])) + centre[None, :, None, None]
    edge = np.zeros(source.shape[:1] + source.shape[2:], bool)
    half = edge.copy()
    for axis, size in enumerate((height, width)):
        s = source[:, axis]
        edge |= (np.abs(s) < TIE_PX) | (np.abs(s - (size - 1)) < TIE_PX)
        half |= np.abs(s - np.floor(s) - 0.5) < TIE_PX
    edge[~draws.spatial], half[~draws.spatial] = False, False
    return edge, edge | half


def check_equivalence(images: np.ndarray, labels: np.ndarray, draws: AugmentationDraws,
                      device_images: np.ndarray, device_labels: np.ndarray) -> dict[str, float]:
    """Assert the module docstring's tolerances; returns the measured differences."""
    host_images, host_labels = apply_augmentation_numpy(images, labels, draws)
    assert device_images.shape == host_images.shape and device_labels.shape == host_labels.shape
    _, height, width, _ = images.shape
    image_ties, label_ties = _ties(draws, height, width)
    assert image_ties.mean() < 5e-3 and label_ties.mean() < 5e-3  # expected about 4 TIE_PX per pixel
    slope = max(np.abs(np.diff(images, axis=1)).max(), np.abs(np.diff(images, axis=2)).max())
    delta = 2 * EPS32 * max(height, width)
    image_diff = np.abs(device_images - host_images)
    image_diff[image_ties] = 0.0
    tolerance = slope * delta + 8 * EPS32 * (np.abs(host_images).max() + 1)
    assert image_diff.max() <= tolerance, (image_diff.max(), tolerance)
    mismatch = device_labels != host_labels
    assert not mismatch[~label_ties].any()
    assert mismatch.mean() <= 1e-4
    return {"image_max_abs_diff": float(image_diff.max()), "label_mismatch": float(mismatch.mean())}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_keras_ops_apply_the_same_transforms_as_numpy(name: str, shape: tuple[int, int, int]) -> None:
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.device_augmentation import apply_augmentation  # noqa: PLC0415

    images, labels = _batch(shape)
    draws = draw_augmentation(CONFIGS[name], np.random.default_rng([42, 3, 5, 1]), len(images))
    device_images, device_labels = apply_augmentation(images, labels, draws.as_array())
    device_images = keras.ops.convert_to_numpy(device_images)
    device_labels = keras.ops.convert_to_numpy(device_labels)
    assert device_images.dtype == np.float32
    check_equivalence(images, labels, draws, device_images, device_labels)
    if name in ("flips_only", "identity"):  # integer sampling coordinates: exact
        host_images, host_labels = apply_augmentation_numpy(images, labels, draws)
        np.testing.assert_array_equal(device_images, host_images)
        np.testing.assert_array_equal(device_labels, host_labels)


def test_fill_outside_the_slice_is_the_sample_minimum_before_jitter() -> None:
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.device_augmentation import apply_augmentation  # noqa: PLC0415

    images = np.full((2, 16, 16, 2), 5.0, np.float32)
    images[0, 3, 4, 1], images[1, 7, 7, 0] = -3.0, -7.0
    labels = np.ones((2, 16, 16), np.uint8)
    draws = AugmentationDraws.identity(2)
    draws.spatial[:], draws.angle_deg[:], draws.scale[:] = True, 37.0, 0.7  # zoom out: corners fall outside
    draws.intensity[1], draws.intensity_multiplier[1], draws.intensity_shift[1] = True, np.float32(2), np.float32(1)
    out_images, out_labels = (keras.ops.convert_to_numpy(a) for a in apply_augmentation(images, labels, draws.as_array()))
    assert out_labels[:, 0, 0].tolist() == [0, 0] and out_labels[:, 8, 8].tolist() == [1, 1]
    np.testing.assert_array_equal(out_images[0, 0, 0], [-3.0, -3.0])
    np.testing.assert_array_equal(out_images[1, 0, 0], [-7.0 * 2 + 1, -7.0 * 2 + 1])
    check_equivalence(images, labels, draws, out_images, out_labels)


@pytest.mark.parametrize("label_mode", ["multiclass", "pancreas"])
def test_targets_are_encoded_as_the_loader_encodes_them(label_mode: str) -> None:
    import keras  # noqa: PLC0415

    from pancreas_seg.learning import device_augmentation  # noqa: PLC0415
    from pancreas_seg.learning.loader import encode_targets  # noqa: PLC0415

    labels = np.random.default_rng(0).integers(0, 3, size=(3, 8, 8)).astype(np.uint8)
    encoded = keras.ops.convert_to_numpy(device_augmentation.encode_targets(labels, label_mode))
    np.testing.assert_array_equal(encoded, encode_targets(labels, label_mode))


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------
def _cases(n_cases: int = 2, slices: int = 6, size: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    gen = np.random.default_rng(5)
    cases = {}
    for c in range(n_cases):
        labels = np.zeros((slices, size, size), np.uint8)
        labels[:, 8:20, 6 + c:22 + c] = 1
        labels[::2, 12:16, 10:14] = 2
        cases[f"case_{c}"] = ((gen.normal(size=labels.shape) + labels).astype(np.float32), labels)
    return cases


def test_slice_loader_on_device_sends_images_labels_and_the_host_draws() -> None:
    from pancreas_seg.learning.loader import SliceLoader, encode_targets  # noqa: PLC0415

    cases = _cases()
    common = {"batch_size": 4, "label_mode": "multiclass", "context_slices": 3, "seed": 9, "steps_per_epoch": 3}
    host = SliceLoader(cases, training=True, augmentation=FULL, **common)
    device = SliceLoader(cases, training=True, augmentation=AugmentationConfig(**{**FULL.__dict__, "on_device": True}),
                         **common)
    assert device.augments_on_device and not host.augments_on_device and host.device_augmentation() is None
    assert device.device_augmentation().label_mode == "multiclass"
    for epoch in (0, 2):
        host.epoch = device.epoch = epoch
        for index in range(len(device)):
            batch = device[index]
            assert len(batch) == 3
            images, labels, draws = batch
            assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
            assert labels.shape == (4, 32, 32) and labels.dtype == np.uint8
            assert draws.shape == (4, len(DRAW_COLUMNS)) and draws.dtype == np.float32
            expected = draw_augmentation(FULL, np.random.default_rng([9, epoch, index, 1]), 4)
            np.testing.assert_array_equal(draws, expected.as_array())
            # the host loader's batch is these images and labels with these draws applied on the host
            host_images, host_targets = host[index]
            augmented, augmented_labels = apply_augmentation_numpy(images, labels, expected)
            np.testing.assert_array_equal(host_images, augmented)
            np.testing.assert_array_equal(host_targets, encode_targets(augmented_labels, "multiclass"))
    validation = SliceLoader(cases, training=False, augmentation=AugmentationConfig(on_device=True),
                             batch_size=4, label_mode="multiclass")
    assert not validation.augments_on_device and len(validation[0]) == 2
    disabled = SliceLoader(cases, training=True, augmentation=AugmentationConfig(enabled=False, on_device=True),
                           **common)
    assert not disabled.augments_on_device and len(disabled[0]) == 2


def test_crop_loader_on_device_sends_the_training_targets_and_the_host_draws() -> None:
    from pancreas_seg.cascade.sampler import CropLoader  # noqa: PLC0415
    from pancreas_seg.learning.loader import encode_targets  # noqa: PLC0415

    cases = _cases(size=40)
    common = {"window_hw": (24, 32), "batch_size": 4, "label_mode": "tumour", "seed": 3, "steps_per_epoch": 2,
              "jitter_std_px": (2.0, 2.0), "tumour_fraction": 0.5}
    config = AugmentationConfig(flip_probability=0.0, spatial_probability=1.0, intensity_probability=1.0)
    host = CropLoader(cases, training=True, augmentation=config, **common)
    device = CropLoader(cases, training=True, augmentation=AugmentationConfig(**{**config.__dict__, "on_device": True}),
                        **common)
    for index in range(len(device)):
        images, labels, draws = device[index]
        assert images.shape == (4, 24, 32, 1) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        expected = draw_augmentation(config, np.random.default_rng([3, 0, index, 1]), 4)
        np.testing.assert_array_equal(draws, expected.as_array())
        augmented, augmented_labels = apply_augmentation_numpy(images, labels, expected)
        host_images, host_targets = host[index]
        np.testing.assert_array_equal(host_images, augmented)
        np.testing.assert_array_equal(host_targets, encode_targets(augmented_labels, "tumour"))
    assert len(CropLoader(cases, training=False, augmentation=AugmentationConfig(on_device=True),
                          **{**common, "steps_per_epoch": None})[0]) == 2


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def test_fit_with_resume_augments_in_the_training_step_and_saves_plain_models(tmp_path: Path) -> None:
    """Trains (TensorFlow in this process) with on_device; the first epoch's loss matches the host
    path's to float32 noise (same draws, same batches), the checkpoint is a plain model and the
    fingerprint tells the two modes apart."""
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.loader import SliceLoader  # noqa: PLC0415
    from pancreas_seg.learning.setup import compile_model, resume_fingerprint  # noqa: PLC0415
    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415
    from pancreas_seg.models.io import load_model  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    cases = _cases()
    config = FitConfig(epochs=2, batch_size=4, steps_per_epoch=2, learning_rate=1e-3, seed=42)
    settings = {"learning_rate": 1e-3, "lr_schedule": "constant", "loss": "dice_ce", "dice_smooth": 1.0}
    built = []

    def build():
        model = build_model("unet_small", (32, 32, 1), "multiclass", base_filters=4, depth=2, dropout=0.0,
                            l2_weight=0.0)
        built.append(model)
        return compile_model(model, settings, "multiclass")

    histories = {}
    for on_device in (False, True):
        augmentation = AugmentationConfig(on_device=on_device)
        train = SliceLoader(cases, 4, "multiclass", training=True, augmentation=augmentation, seed=1,
                            steps_per_epoch=2)
        validation = SliceLoader(cases, 4, "multiclass", training=False)
        result = fit_with_resume(build, train, validation, config, tmp_path / str(on_device), f"fp-{on_device}")
        histories[on_device] = result.history
        assert np.all(np.isfinite(result.history["loss"])) and len(result.history["loss"]) == 2
        assert "train_step" not in vars(built[-1])  # the wrapper is gone after fit
    np.testing.assert_allclose(histories[True]["loss"][0], histories[False]["loss"][0], rtol=1e-3)
    saved = load_model(tmp_path / "True" / "best.keras")
    assert "train_step" not in vars(saved) and saved.input_shape == (None, 32, 32, 1)
    assert "augment" not in json.dumps(saved.get_config()).lower()
    assert keras.backend.backend() in ("tensorflow", "jax")

    def fingerprint(**on_device: bool) -> str:
        merged = {"augmentation": {"enabled": True, **on_device}, "retain_heap": True}
        return resume_fingerprint(config, "unet", merged, "preprocessing")

    # the device path's checkpoints are not resumed by the host path (nor the reverse); the host
    # path keeps the fingerprint of the versions before the setting
    assert fingerprint(on_device=True) != fingerprint(on_device=False) == fingerprint()


def test_the_gpu_environment_augments_on_the_device_and_base_on_the_host() -> None:
    import yaml  # noqa: PLC0415

    conf = Path(__file__).resolve().parents[2] / "conf"
    base = yaml.safe_load((conf / "base" / "parameters_training.yml").read_text())
    msd = yaml.safe_load((conf / "msd" / "parameters.yml").read_text())
    assert base["training"]["augmentation"]["on_device"] is False
    assert msd["training"]["augmentation"]["on_device"] is True
    assert AugmentationConfig.from_params(base["training"]["augmentation"]) == AugmentationConfig()


# ------------------------------------------------------------------------------------------------
# JAX, in a fresh interpreter: jit-compiled, and data parallel over 2 CPU devices
# ------------------------------------------------------------------------------------------------
JAX_EQUIVALENCE = r'''
import json, sys
import numpy as np
import jax, keras
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, sys.argv[1])
from test_device_augmentation import CONFIGS, SHAPES, _batch, check_equivalence
from pancreas_seg.learning.augmentation import draw_augmentation
from pancreas_seg.learning.device_augmentation import DeviceAugmentation, apply_augmentation

assert keras.backend.backend() == "jax" and len(jax.devices()) == 2
jitted = jax.jit(apply_augmentation)
mesh = Mesh(np.array(jax.devices()), ("batch",))
shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("batch")))
measured = {}
for name, config in sorted(CONFIGS.items()):
    for shape in SHAPES:
        images, labels = _batch(shape)
        draws = draw_augmentation(config, np.random.default_rng([42, 3, 5, 1]), len(images))
        out = jitted(images, labels, draws.as_array())
        measured[f"{name}/{shape}"] = check_equivalence(images, labels, draws, *(np.asarray(a) for a in out))
        sharded = jitted(shard(images), shard(labels), shard(draws.as_array()))
        assert sharded[0].sharding.spec == PartitionSpec("batch")
        np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(out[0]), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(sharded[1]), np.asarray(out[1]))

# The batch stays where it lies: no collective in the compiled, batch-sharded augmentation.
images, labels = _batch((64, 64, 3), batch=8)
draws = draw_augmentation(CONFIGS["full"], np.random.default_rng(0), 8).as_array()
step = jax.jit(lambda i, l, d: DeviceAugmentation("multiclass")((i, l, d)))
hlo = step.lower(shard(images), shard(labels), shard(draws)).compile().as_text()
collectives = {op: hlo.count(op) for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce")}
assert not any(collectives.values()), collectives

# fit_with_resume with the augmentation in the jitted train step: one device, then data parallel
# over the 2 devices (each augments its half of every batch): the same training up to float
# summation order.
import tempfile
from pathlib import Path
from test_device_augmentation import _cases
from pancreas_seg.learning.augmentation import AugmentationConfig
from pancreas_seg.learning.loader import SliceLoader
from pancreas_seg.learning.setup import compile_model
from pancreas_seg.learning.training import FitConfig, fit_with_resume
from pancreas_seg.models.registry import build_model

settings = {"learning_rate": 1e-3, "lr_schedule": "constant", "loss": "dice_ce", "dice_smooth": 1.0}
build = lambda: compile_model(build_model("unet_small", (32, 32, 1), "multiclass", base_filters=4, depth=2,
                                          dropout=0.0, l2_weight=0.0), settings, "multiclass")
histories = []
for distribution in (None, "data_parallel"):
    config = FitConfig(epochs=2, batch_size=4, steps_per_epoch=2, learning_rate=1e-3, seed=42, distribution=distribution)
    train = SliceLoader(_cases(), 4, "multiclass", training=True, seed=1, steps_per_epoch=2,
                        augmentation=AugmentationConfig(on_device=True))
    with tempfile.TemporaryDirectory() as folder:
        result = fit_with_resume(build, train, SliceLoader(_cases(), 4, "multiclass", training=False), config,
                                 Path(folder), "fp")
    histories.append(result.history)
for key in ("loss", "val_loss"):
    assert np.all(np.isfinite(histories[0][key])), histories
    np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=1e-4, err_msg=key)
print("MEASURED " + json.dumps(measured))
'''


@pytest.mark.subprocess
def test_keras_ops_match_numpy_under_jax_jit_and_data_parallel(jax_script, tmp_path: Path) -> None:
    """Under KERAS_BACKEND=jax: the jitted augmentation meets the same tolerances, a batch sharded
    over 2 devices is augmented in place (no collective), and fit_with_resume trains with it in the
    jitted step on one device and data parallel alike."""
    process = jax_script.run(tmp_path / "jax_equivalence.py", JAX_EQUIVALENCE, str(Path(__file__).parent),
                             xla_flags=["--xla_force_host_platform_device_count=2"])
    assert "MEASURED" in process.stdout
