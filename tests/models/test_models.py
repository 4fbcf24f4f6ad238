"""Architecture builders: shapes, validation, training steps, .keras round trip, VGG16 weights."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pancreas_seg.learning.losses import DiceCrossEntropyLoss, SoftDiceLoss
from pancreas_seg.learning.metrics import dice_metrics
from pancreas_seg.models import ARCHITECTURES, build_model, output_activation, output_channels
from pancreas_seg.models.fcn import VGG16_CONV_NAMES, build_fcn, build_vgg16_encoder
from pancreas_seg.models.io import load_model
from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.models.vnet2d import build_vnet2d

ARCHS = ["unet", "unet_small", "fcn", "vnet2d"]
TINY = {"base_filters": 4}
SHAPE_CASES = [
    ((32, 32, 1), "multiclass"),
    ((32, 32, 3), "pancreas"),
    ((64, 32, 3), "tumour"),
]


def _batch(shape: tuple[int, int, int], label_mode: str, n: int = 2, seed: int = 0):
    """A fixed random batch with a blob-shaped target: x (n,H,W,C), y (n,H,W,K) float32."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((n, h, w), dtype=np.int64)
    for i in range(n):
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        labels[i][r2 < (h // 4) ** 2] = 1
        labels[i][r2 < (h // 8) ** 2] = 2
    x = rng.normal(0.0, 0.3, size=(n, h, w, c)).astype("float32") + labels[..., None] * 0.5
    if label_mode == "multiclass":
        y = np.eye(3, dtype="float32")[labels]
    elif label_mode == "pancreas":
        y = (labels >= 1).astype("float32")[..., None]
    else:
        y = (labels == 2).astype("float32")[..., None]
    return x.astype("float32"), y


def test_registry_lists_all_architectures() -> None:
    assert sorted(ARCHITECTURES) == sorted(ARCHS)
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES  # the Keras-free name list agrees


@pytest.mark.subprocess
def test_models_package_imports_without_keras() -> None:
    code = (
        "import sys; import pancreas_seg.models.names; import pancreas_seg.models; "
        "assert 'keras' not in sys.modules, 'keras imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_output_conventions() -> None:
    assert output_channels("multiclass") == 3 and output_activation("multiclass") == "softmax"
    for mode in ("pancreas", "tumour"):
        assert output_channels(mode) == 1 and output_activation(mode) == "sigmoid"
    with pytest.raises(ValueError, match="label_mode"):
        output_channels("liver")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("shape", "label_mode"), SHAPE_CASES)
def test_output_shape_and_activation(arch: str, shape: tuple, label_mode: str) -> None:
    model = build_model(arch, shape, label_mode, **TINY)
    assert model.name == arch
    x, _ = _batch(shape, label_mode)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (2, *shape[:2], output_channels(label_mode))
    assert y.dtype == np.float32
    if label_mode == "multiclass":
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all((y >= 0) & (y <= 1))


@pytest.mark.parametrize(
    ("arch", "shape", "params"),
    [
        ("unet", (48, 40, 1), {"depth": 4}),  # 40 not divisible by 16
        ("unet_small", (30, 32, 1), {}),  # 30 not divisible by 4
        ("fcn", (48, 48, 1), {}),  # not divisible by 32
        ("vnet2d", (32, 36, 1), {"depth": 3}),  # 36 not divisible by 8
    ],
)
def test_bad_spatial_size_raises(arch: str, shape: tuple, params: dict) -> None:
    with pytest.raises(ValueError, match="divisible by"):
        build_model(arch, shape, "multiclass", **TINY, **params)


def test_unknown_architecture_and_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"Unknown architecture 'resnet'.*fcn.*unet.*vnet2d"):
        build_model("resnet", (32, 32, 1), "multiclass")
    with pytest.raises(ValueError, match="label_mode"):
        build_model("unet", (32, 32, 1), "kidney", **TINY)
    with pytest.raises(ValueError, match="depth"):
        build_model("fcn", (32, 32, 1), "multiclass", depth=4, **TINY)
    with pytest.raises(ValueError, match="stage_convs"):
        build_vnet2d((32, 32, 1), "multiclass", base_filters=4, depth=2, stage_convs=(1, 2))
    with pytest.raises(ValueError, match="activation"):
        build_model("unet", (32, 32, 1), "multiclass", activation="gelu", **TINY)


def test_vnet2d_uses_prelu_and_strided_downsampling() -> None:
    model = build_vnet2d((32, 32, 1), "multiclass", base_filters=4, depth=2)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "PReLU" in kinds and "MaxPooling2D" not in kinds
    assert model.get_layer("down1_conv").strides == (2, 2)
    assert model.get_layer("enc1_1_conv").kernel_size == (5, 5)


@pytest.mark.parametrize(
    ("arch", "label_mode", "params"),
    [
        ("unet", "multiclass", {"depth": 3}),
        ("unet_small", "pancreas", {}),
        ("fcn", "multiclass", {}),
        ("vnet2d", "tumour", {"depth": 2}),  # shallower variants keep this test fast
    ],
)
def test_training_steps_lower_the_loss(arch: str, label_mode: str, params: dict) -> None:
    keras.utils.set_random_seed(1)
    shape = (32, 32, 1)
    model = build_model(
        arch, shape, label_mode, base_filters=4, dropout=0.0, l2_weight=0.0, **params
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=DiceCrossEntropyLoss(),
        metrics=dice_metrics(label_mode),
        run_eagerly=True,
    )
    x, y = _batch(shape, label_mode, n=2)
    losses = [float(model.train_on_batch(x, y)[0]) for _ in range(5)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize(
    ("arch", "label_mode", "params"),
    [
        ("unet", "multiclass", {}),
        ("unet_small", "tumour", {}),
        ("fcn", "pancreas", {}),
        ("fcn", "multiclass", {"batch_norm": True}),
        ("vnet2d", "multiclass", {}),
    ],
)
def test_keras_round_trip_safe_mode(arch: str, label_mode: str, params: dict, tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    model = build_model(arch, (32, 32, 2), label_mode, **TINY, **params)
    rng = np.random.default_rng(2)
    for layer in model.layers:  # FCN's class scores start at zero: make the outputs depend on weights
        if isinstance(layer, keras.layers.Conv2D) and not np.any(layer.get_weights()[0]):
            layer.set_weights([rng.normal(0.0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    model.compile(optimizer="adam", loss=SoftDiceLoss(smooth=0.5), metrics=dice_metrics(label_mode))
    x, _ = _batch((32, 32, 2), label_mode)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.ptp(expected) > 1e-3, "outputs must depend on the weights for the comparison to mean anything"
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_model(path)
    got = keras.ops.convert_to_numpy(loaded(x, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert loaded.name == arch
    assert isinstance(loaded.loss, SoftDiceLoss) and loaded.loss.smooth == 0.5
    if arch == "vnet2d":
        assert any(isinstance(layer, keras.layers.PReLU) for layer in loaded.layers)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_loaded_model_keeps_compiled_metrics(tmp_path: Path) -> None:
    model = build_model("unet_small", (32, 32, 1), "multiclass", **TINY)
    model.compile(optimizer="adam", loss=DiceCrossEntropyLoss(), metrics=dice_metrics("multiclass"))
    model.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    x, y = _batch((32, 32, 1), "multiclass")
    logs = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert {"loss", "dice_pancreas", "dice_tumour"} <= set(logs)
    assert all(0.0 <= logs[k] <= 1.0 for k in ("dice_pancreas", "dice_tumour"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keras.Model]:
    keras.utils.set_random_seed(3)
    encoder = build_vgg16_encoder((32, 32, 3), base_filters=64)
    path = tmp_path_factory.mktemp("vgg") / "vgg16_encoder.weights.h5"
    with warnings.catch_warnings():  # Keras-internal NumPy 2 copy-keyword notice while saving
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        encoder.save_weights(path)
    return path, encoder


def _assert_encoder_equal(model: keras.Model, encoder: keras.Model) -> None:
    for name in VGG16_CONV_NAMES:
        for got, want in zip(
            model.get_layer(name).get_weights(), encoder.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_fcn_loads_local_vgg16_weights(vgg_file: tuple[Path, keras.Model]) -> None:
    path, encoder = vgg_file
    model = build_fcn(
        (32, 32, 3), "multiclass", base_filters=64, fc_filters=8, vgg16_weights_path=str(path)
    )
    _assert_encoder_equal(model, encoder)


def test_fcn_batch_norm_variant_loads_vgg16_weights(vgg_file: tuple[Path, keras.Model]) -> None:
    """VGG16-BN: BatchNormalization after each encoder convolution; the convolutions keep their
    names, kernels and biases, so the same VGG16 file loads into them."""
    path, encoder = vgg_file
    model = build_fcn((32, 32, 3), "multiclass", base_filters=64, fc_filters=8, batch_norm=True,
                      vgg16_weights_path=str(path))
    _assert_encoder_equal(model, encoder)
    bn_layers = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn_layers == [f"{name}_bn" for name in VGG16_CONV_NAMES]
    plain = build_fcn((32, 32, 3), "multiclass", base_filters=64, fc_filters=8)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in plain.layers)


def test_fcn_loads_legacy_h5_layout(vgg_file: tuple[Path, keras.Model], tmp_path: Path) -> None:
    """The Keras 2 / keras.applications layout: layer_names and weight_names attributes."""
    _, encoder = vgg_file
    legacy = tmp_path / "vgg16_notop.h5"
    with h5py.File(legacy, "w") as f:
        names = ["input_1", *VGG16_CONV_NAMES]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.create_group("input_1").attrs["weight_names"] = []
        for name in VGG16_CONV_NAMES:
            group = f.create_group(name)
            kernel, bias = encoder.get_layer(name).get_weights()
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=bias)
    model = build_fcn(
        (32, 32, 3), "pancreas", base_filters=64, fc_filters=8, vgg16_weights_path=str(legacy)
    )
    _assert_encoder_equal(model, encoder)


def test_fcn_weights_mismatch_and_missing_file(
    vgg_file: tuple[Path, keras.Model], tmp_path: Path
) -> None:
    path, _ = vgg_file
    with pytest.raises(ValueError, match=r"vgg16_encoder\.weights\.h5.*block1_conv1"):
        build_fcn(
            (32, 32, 1), "multiclass", base_filters=64, fc_filters=8, vgg16_weights_path=str(path)
        )
    with pytest.raises(ValueError, match=r"vgg16_encoder\.weights\.h5"):
        build_fcn((32, 32, 3), "multiclass", base_filters=8, vgg16_weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_fcn((32, 32, 3), "multiclass", vgg16_weights_path=str(tmp_path / "absent.h5"))


@pytest.mark.parametrize("stride", [2, 8])
def test_bilinear_upsampling_init_interpolates(stride: int) -> None:
    """FCN's upsampling starts as bilinear interpolation: a constant map stays constant inside
    the border and a ramp stays a ramp (linear interpolation reproduces linear functions)."""
    from pancreas_seg.models.fcn import BilinearUpsampling  # noqa: PLC0415

    layer = keras.layers.Conv2DTranspose(2, 2 * stride, strides=stride, padding="same", use_bias=False,
                                         kernel_initializer=BilinearUpsampling())
    ramp = np.tile(np.arange(8, dtype=np.float32)[None, :], (8, 1))           # x-coordinate, (8, 8)
    inputs = np.stack([np.ones((8, 8), np.float32), ramp], axis=-1)[None]      # (1, 8, 8, 2)
    out = keras.ops.convert_to_numpy(layer(inputs))[0]
    assert out.shape == (8 * stride, 8 * stride, 2)
    inner = slice(stride, -stride)                                              # away from the zero padding
    np.testing.assert_allclose(out[inner, inner, 0], 1.0, atol=1e-6)
    steps = np.diff(out[inner, inner, 1], axis=1)
    np.testing.assert_allclose(steps, 1.0 / stride, atol=1e-5)                # one input pixel = stride outputs
    np.testing.assert_allclose(np.diff(out[inner, inner, 1], axis=0), 0.0, atol=1e-6)


def test_bilinear_upsampling_rejects_mixed_channels() -> None:
    from pancreas_seg.models.fcn import BilinearUpsampling  # noqa: PLC0415

    with pytest.raises(ValueError, match="as many output as input channels"):
        BilinearUpsampling()((4, 4, 3, 2))


def test_untrained_fcn_outputs_uniform_scores() -> None:
    # Zero-initialised class scores + bilinear upsampling: every class starts equally likely
    model = build_fcn((64, 64, 1), "multiclass", base_filters=4, dropout=0.0, l2_weight=0.0)
    probabilities = model.predict(np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32"),
                                  verbose=0)
    np.testing.assert_allclose(probabilities, 1.0 / 3.0, atol=1e-6)


@pytest.mark.parametrize(("stride", "use_bias"), [(2, True), ((2, 3), False), (4, True)])
def test_patch_conv_transpose_equals_conv2d_transpose(stride, use_bias: bool) -> None:
    """The matmul + pixel-shuffle upsampling computes exactly what Conv2DTranspose computes."""
    from pancreas_seg.models.blocks import PatchConv2DTranspose  # noqa: PLC0415

    rng = np.random.default_rng(5)
    inputs = rng.normal(size=(3, 6, 5, 7)).astype("float32")
    settings = {"filters": 4, "kernel_size": stride, "strides": stride, "padding": "same", "use_bias": use_bias}
    reference = keras.layers.Conv2DTranspose(**settings)
    patch = PatchConv2DTranspose(**settings)
    reference.build(inputs.shape)
    patch.build(inputs.shape)
    weights = [rng.normal(size=w.shape).astype("float32") for w in reference.get_weights()]
    reference.set_weights(weights)
    patch.set_weights(weights)
    expected = keras.ops.convert_to_numpy(reference(inputs))
    result = keras.ops.convert_to_numpy(patch(inputs))
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    assert result.shape == expected.shape == (3, 6 * sh, 5 * sw, 4)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 1.0                                     # a non-trivial comparison


def test_patch_conv_transpose_falls_back_for_overlapping_kernels() -> None:
    from pancreas_seg.models.blocks import PatchConv2DTranspose  # noqa: PLC0415

    inputs = np.random.default_rng(6).normal(size=(1, 4, 4, 2)).astype("float32")
    settings = {"filters": 3, "kernel_size": 4, "strides": 2, "padding": "same"}
    reference, patch = keras.layers.Conv2DTranspose(**settings), PatchConv2DTranspose(**settings)
    reference.build(inputs.shape)
    patch.build(inputs.shape)
    patch.set_weights(reference.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(patch(inputs)),
                               keras.ops.convert_to_numpy(reference(inputs)), atol=1e-6)


def test_unet_and_vnet_upsample_with_patch_conv_transpose() -> None:
    from pancreas_seg.models.blocks import PatchConv2DTranspose  # noqa: PLC0415

    for arch in ("unet", "vnet2d"):
        model = build_model(arch, (32, 32, 1), "multiclass", base_filters=4, depth=2)
        ups = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
        assert ups and all(isinstance(layer, PatchConv2DTranspose) for layer in ups), arch
