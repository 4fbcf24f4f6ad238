"""Slice-wise prediction with a real (tiny) Keras model: batching, padding and test-time flipping."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pancreas_seg.inference.forward import mean_probabilities, predict_slices, use_xla


class ShapeRecorder(keras.Model):
    """A fixed, deterministic convolution that remembers the batch sizes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3, padding="same", activation="softmax",
                                        kernel_initializer=keras.initializers.RandomNormal(seed=1))
        self.batch_sizes: list[int] = []

    def call(self, inputs):
        return self.conv(inputs)

    def predict_on_batch(self, x):
        self.batch_sizes.append(int(x.shape[0]))
        return super().predict_on_batch(x)


@pytest.mark.parametrize(("n_slices", "batch_size"), [(10, 4), (8, 4), (3, 16)])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_every_batch_has_one_shape_and_results_match_one_pass(n_slices: int, batch_size: int,
                                                             flip_tta: bool) -> None:
    rng = np.random.default_rng(0)
    slices = rng.random((n_slices, 16, 16), dtype=np.float32)
    model = ShapeRecorder()
    reference = np.asarray(model(slices[..., None]))  # all slices in one call (also builds it)
    if flip_tta:
        mirrored = np.asarray(model(slices[:, :, ::-1, None].copy()))[:, :, ::-1]
        reference = (reference + mirrored) / 2
    model.batch_sizes.clear()
    probs = predict_slices(model, slices, context_slices=1, batch_size=batch_size, flip_tta=flip_tta)
    assert probs.shape == (n_slices, 16, 16, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    # the last, partial batch was padded: one static shape for every forward pass
    assert set(model.batch_sizes) == {batch_size}
    assert len(model.batch_sizes) == (-(-n_slices // batch_size)) * (2 if flip_tta else 1)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="XLA switch is for the TensorFlow backend")
def test_use_xla_keeps_predictions() -> None:
    from pancreas_seg.models.registry import build_model

    model = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2)
    slices = np.random.default_rng(1).random((5, 32, 32), dtype=np.float32)
    eager = predict_slices(model, slices, context_slices=1, batch_size=4)
    assert use_xla(model) is True and model.jit_compile
    np.testing.assert_allclose(predict_slices(model, slices, context_slices=1, batch_size=4), eager, atol=1e-5)
    assert use_xla(model, enabled=False) is False


def test_mean_probabilities_is_the_mean_of_each_models_softmax() -> None:
    rng = np.random.default_rng(1)
    slices = rng.random((5, 16, 16), dtype=np.float32)
    first, second = ShapeRecorder(), ShapeRecorder()
    first(slices[..., None]), second(slices[..., None])          # build both
    second.conv.kernel.assign(np.asarray(second.conv.kernel) * -2.0)   # a different model
    expected = (np.asarray(first(slices[..., None])) + np.asarray(second(slices[..., None]))) / 2
    per_model = [predict_slices(model, slices, context_slices=1, batch_size=2) for model in (first, second)]
    originals = [p.copy() for p in per_model]
    mean = mean_probabilities(per_model)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    np.testing.assert_allclose(mean.sum(axis=-1), 1.0, atol=1e-5)
    for given, original in zip(per_model, originals, strict=True):   # the inputs are not modified
        np.testing.assert_array_equal(given, original)
    np.testing.assert_array_equal(mean_probabilities(iter(per_model[:1])), per_model[0])
    with pytest.raises(ValueError, match="at least one array"):
        mean_probabilities([])
