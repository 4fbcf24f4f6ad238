"""FCN-8s (Long et al. 2015) on a VGG16-shaped encoder.

Encoder: 5 blocks of (2, 2, 3, 3, 3) 3x3 Conv+ReLU layers with ``base_filters * (1, 2, 4, 8, 8)``
filters, each followed by 2x2 max-pooling; layer names match ``keras.applications.VGG16``
(``block1_conv1`` ... ``block5_pool``), so ``base_filters=64`` gives the true VGG16 widths.
Head: fc6 (7x7) and fc7 (1x1) as convolutions with dropout, 1x1 class scores from pool5, pool4 and
pool3 fused by addition after x2, x2 and finally x8 Conv2DTranspose upsampling.

Initialisation follows the paper where it can without ImageNet: the upsampling layers start as
bilinear interpolation (:class:`BilinearUpsampling`) and the class-score layers at zero, so the
untrained net outputs smooth, uniform scores instead of checkerboard noise; the encoder uses
He-normal kernels. From random weights the plain encoder did not learn the phantoms' pancreas in a
few hundred steps (pancreas probability collapsed to 0); ``batch_norm=True`` (VGG16-BN) with the
study's lr 2e-4 did, which is why conf/base turns it on.

Weights are randomly initialised. ``vgg16_weights_path`` optionally loads a *local* Keras VGG16
weights file (Keras 3 ``.weights.h5`` or legacy ``.h5``) into the encoder; nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers

from pancreas_seg.models.blocks import (
    BATCH_NORM_MOMENTUM,
    final_activation,
    l2_regulariser,
    output_channels,
    validate_input_shape,
    validate_label_mode,
)

#: Convolutions per VGG16 block and filter multipliers relative to ``base_filters``.
VGG16_BLOCK_CONVS: tuple[int, ...] = (2, 2, 3, 3, 3)
VGG16_BLOCK_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 8)
#: Names of the 13 encoder convolutions, in order (as in ``keras.applications.VGG16``).
VGG16_CONV_NAMES: tuple[str, ...] = tuple(
    f"block{b + 1}_conv{c + 1}" for b, n in enumerate(VGG16_BLOCK_CONVS) for c in range(n)
)


@keras.saving.register_keras_serializable(package="pancreas_seg")
class BilinearUpsampling(keras.initializers.Initializer):
    """Conv2DTranspose kernel that performs bilinear upsampling channel by channel (FCN, Sec. 3.3).

    Kernel shape (k, k, C, C): the k x k bilinear filter for stride ``ceil(k / 2)`` on the channel
    diagonal, zero elsewhere. Use ``kernel_size = 2 * stride``.
    """

    def __call__(self, shape, dtype=None):
        k_h, k_w, n_out, n_in = shape
        if k_h != k_w or n_out != n_in:
            raise ValueError(f"BilinearUpsampling needs a square kernel with as many output as input "
                             f"channels, got kernel shape {tuple(shape)}")
        factor = (k_h + 1) // 2
        center = factor - 1 if k_h % 2 == 1 else factor - 0.5
        taps = 1.0 - np.abs(np.arange(k_h) - center) / factor
        kernel = np.zeros(shape, dtype="float32")
        for c in range(n_in):
            kernel[:, :, c, c] = np.outer(taps, taps)
        return keras.ops.convert_to_tensor(kernel, dtype=dtype or "float32")

    def get_config(self) -> dict:
        return {}


def _vgg16_encoder(
    x: keras.KerasTensor, base_filters: int, l2_weight: float, batch_norm: bool = False
) -> list[keras.KerasTensor]:
    """VGG16 convolutional part; returns the 5 pooled outputs (strides 2, 4, 8, 16, 32).

    With ``batch_norm`` (the VGG16-BN variant) every convolution is followed by
    BatchNormalization before its ReLU; the convolutions keep their names and biases, so VGG16
    weight files still load into them.
    """
    pools = []
    for b, (n_convs, width) in enumerate(zip(VGG16_BLOCK_CONVS, VGG16_BLOCK_WIDTHS, strict=True)):
        for c in range(n_convs):
            name = f"block{b + 1}_conv{c + 1}"
            x = layers.Conv2D(
                base_filters * width,
                3,
                padding="same",
                activation=None if batch_norm else "relu",
                kernel_initializer="he_normal",
                kernel_regularizer=l2_regulariser(l2_weight),
                name=name,
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
                x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{b + 1}_pool")(x)
        pools.append(x)
    return pools


def build_vgg16_encoder(
    input_shape: tuple[int, int, int] = (224, 224, 3), *, base_filters: int = 64
) -> keras.Model:
    """The FCN encoder alone (model ``"vgg16"``): (B, H, W, C) -> pool5 (B, H/32, W/32, 8*base).

    With ``base_filters=64`` and 3 channels its weights are interchangeable with
    ``keras.applications.VGG16(include_top=False)``; useful to create or inspect weight files.
    """
    shape = validate_input_shape(input_shape, 32, "vgg16")
    inputs = keras.Input(shape=shape, name="image")
    return keras.Model(inputs, _vgg16_encoder(inputs, base_filters, 0.0)[-1], name="vgg16")


def _natural_key(text: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_weight_file(path: Path) -> list[tuple[str, list[np.ndarray]]]:
    """Read (layer name, [arrays]) pairs, in layer order, from a Keras weights HDF5 file.

    Supports the Keras 3 ``.weights.h5`` layout (``layers/<name>/vars/<i>``, ordered by the
    per-class auto names ``conv2d``, ``conv2d_1``, ...) and the legacy Keras 2 layout (root or
    ``model_weights`` group with ``layer_names`` / ``weight_names`` attributes).
    """
    entries: list[tuple[str, list[np.ndarray]]] = []
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(
            f"VGG16 weights file {str(path)!r} is not a readable HDF5 file: {exc}"
        ) from exc
    with handle as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                weight_names = [
                    w.decode() if isinstance(w, bytes) else str(w)
                    for w in group.attrs.get("weight_names", [])
                ]
                arrays = [np.asarray(group[w]) for w in weight_names]
                if arrays:
                    entries.append((name, arrays))
        else:
            var_groups: list[str] = []
            root.visititems(
                lambda p, obj: (
                    var_groups.append(p)
                    if isinstance(obj, h5py.Group) and p.rsplit("/", 1)[-1] == "vars"
                    else None
                )
            )
            for p in sorted(var_groups, key=_natural_key):
                group = root[p]
                arrays = [np.asarray(group[str(i)]) for i in range(len(group))]
                if arrays:
                    entries.append((p.rsplit("/", 2)[-2], arrays))
    return entries


def load_vgg16_weights(model: keras.Model, weights_path: str | Path) -> None:
    """Copy VGG16 conv kernels and biases from a local file into ``model``'s encoder layers.

    Layers are matched by name (``block1_conv1`` ...) when the file has all 13 names, otherwise by
    the order of the 4-D conv kernels in the file. Raises FileNotFoundError when the file is
    missing and ValueError (naming the file) when it holds fewer than 13 convolutions or a
    shape differs (the encoder must be built with ``base_filters=64`` and 3 input channels).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG16 weights file not found: {str(path)!r} (nothing is downloaded)."
        )
    if not path.name.endswith(".h5"):
        raise ValueError(
            f"VGG16 weights file {str(path)!r} must be a Keras '.weights.h5' or '.h5' file."
        )
    entries = _read_weight_file(path)
    convs = [(n, a) for n, a in entries if len(a) == 2 and a[0].ndim == 4 and a[1].ndim == 1]
    by_name = dict(convs)
    if all(n in by_name for n in VGG16_CONV_NAMES):
        source = [(n, by_name[n]) for n in VGG16_CONV_NAMES]
    elif len(convs) >= len(VGG16_CONV_NAMES):
        source = convs[: len(VGG16_CONV_NAMES)]
    else:
        raise ValueError(
            f"VGG16 weights file {str(path)!r} holds {len(convs)} convolution layers; "
            f"the VGG16 encoder needs {len(VGG16_CONV_NAMES)}."
        )
    new_weights = []
    for target_name, (source_name, arrays) in zip(VGG16_CONV_NAMES, source, strict=True):
        layer = model.get_layer(target_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        found = [tuple(a.shape) for a in arrays]
        if expected != found:
            raise ValueError(
                f"VGG16 weights file {str(path)!r}: layer {source_name!r} has shapes {found} but "
                f"encoder layer {target_name!r} expects {expected} (pretrained VGG16 weights need "
                "base_filters=64 and 3 input channels)."
            )
        new_weights.append((layer, arrays))
    for layer, arrays in new_weights:
        layer.set_weights(arrays)


def build_fcn(
    input_shape: tuple[int, int, int],
    label_mode: str = "multiclass",
    *,
    base_filters: int = 16,
    depth: int = 5,
    dropout: float = 0.5,
    l2_weight: float = 1e-4,
    fc_filters: int | None = None,
    batch_norm: bool = False,
    vgg16_weights_path: str | None = None,
) -> keras.Model:
    """Build FCN-8s (model name ``"fcn"``).

    Args:
        input_shape: (H, W, C) with H and W divisible by 32.
        label_mode: "multiclass" (3-channel softmax) or "pancreas"/"tumour" (1-channel sigmoid).
        base_filters: VGG16 first-block width (64 = original VGG16).
        depth: must be 5 (the VGG16 encoder has five pooling stages); kept for the common API.
        dropout: rate after fc6 and fc7 (0 disables).
        l2_weight: L2 kernel regularisation factor (0 disables).
        fc_filters: width of fc6/fc7; default ``16 * base_filters`` (original FCN: 4096).
        batch_norm: VGG16-BN encoder (BatchNormalization after every convolution); trains from
            random weights in a few hundred steps, which the plain VGG16 encoder does not.
        vgg16_weights_path: optional local Keras VGG16 weights file loaded into the encoder
            (see :func:`load_vgg16_weights`); ``None`` keeps the random initialisation.

    Returns:
        keras.Model mapping float32 (B, H, W, C) to float32 probabilities (B, H, W, 3 or 1).
    """
    validate_label_mode(label_mode)
    if depth != len(VGG16_BLOCK_CONVS):
        raise ValueError(f"fcn: depth is fixed at 5 by the VGG16 encoder, got depth={depth}.")
    shape = validate_input_shape(input_shape, 32, "fcn")
    n_out = output_channels(label_mode)
    fc_filters = fc_filters or 16 * base_filters
    reg = l2_regulariser(l2_weight)

    inputs = keras.Input(shape=shape, name="image")
    _, _, pool3, pool4, pool5 = _vgg16_encoder(inputs, base_filters, l2_weight, batch_norm)

    x = layers.Conv2D(
        fc_filters, 7, padding="same", activation="relu", kernel_initializer="he_normal",
        kernel_regularizer=reg, name="fc6",
    )(pool5)
    if dropout > 0:
        x = layers.Dropout(dropout, name="fc6_dropout")(x)
    x = layers.Conv2D(fc_filters, 1, activation="relu", kernel_initializer="he_normal",
                      kernel_regularizer=reg, name="fc7")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="fc7_dropout")(x)

    def class_scores(tensor: keras.KerasTensor, name: str) -> keras.KerasTensor:
        return layers.Conv2D(n_out, 1, kernel_initializer="zeros", kernel_regularizer=reg,
                             name=name)(tensor)

    def upsample(tensor: keras.KerasTensor, stride: int, name: str) -> keras.KerasTensor:
        return layers.Conv2DTranspose(n_out, 2 * stride, strides=stride, padding="same", use_bias=False,
                                      kernel_initializer=BilinearUpsampling(), name=name)(tensor)

    score = upsample(class_scores(x, "score_fr"), 2, "upscore2")
    score = layers.Add(name="fuse_pool4")([score, class_scores(pool4, "score_pool4")])
    score = upsample(score, 2, "upscore_pool4")
    score = layers.Add(name="fuse_pool3")([score, class_scores(pool3, "score_pool3")])
    logits = upsample(score, 8, "upscore8")

    model = keras.Model(inputs, final_activation(logits, label_mode), name="fcn")
    if vgg16_weights_path is not None:
        load_vgg16_weights(model, vgg16_weights_path)
    return model
