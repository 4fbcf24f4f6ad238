"""``models.io.weights_sha256``: identifies a trained model's parameters across save and load."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pancreas_seg.learning.losses import make_loss
from pancreas_seg.learning.metrics import dice_metrics
from pancreas_seg.models import build_model
from pancreas_seg.models.io import (
    load_model,
    load_model_bytes,
    model_bytes,
    save_model,
    weights_sha256,
)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(2, 32, 32))]
    return x, y


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=make_loss("dice_ce", "multiclass"),
                  metrics=dice_metrics("multiclass"))
    return model


def test_weights_hash_survives_save_load_and_predict(tmp_path: Path, batch) -> None:
    model = _model()
    digest = weights_sha256(model)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert weights_sha256(model) == digest  # deterministic
    model.predict(batch[0], verbose=0)
    assert weights_sha256(model) == digest  # inference does not change the weights

    path = tmp_path / "model.keras"
    save_model(model, path)
    for compile_ in (True, False):
        loaded = load_model(path, compile=compile_)
        assert weights_sha256(loaded) == digest, f"compile={compile_}"
    assert weights_sha256(load_model_bytes(model_bytes(model))) == digest


def test_weights_hash_changes_with_one_training_step(batch) -> None:
    model = _model()
    before = weights_sha256(model)
    model.train_on_batch(*batch)
    after = weights_sha256(model)
    assert after != before
    # and another model of the same architecture (other initial weights) has another hash
    keras.utils.set_random_seed(1)
    other = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2)
    assert weights_sha256(other) not in {before, after}
