"""The project's data-feeding and checkpointing path under the JAX backend (what the GPU machines
run, where TensorFlow is absent): SliceLoader over memory-mapped .npy shards -> U-Net with the
Dice + cross-entropy loss and per-class Dice metrics -> fit_with_resume with .keras checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r'''
import json, sys
from pathlib import Path

import keras
import numpy as np

from pancreas_seg.learning.loader import SliceLoader
from pancreas_seg.learning.training import FitConfig, fit_with_resume
from pancreas_seg.models.registry import build_model
from pancreas_seg.learning.setup import compile_model

data_dir, checkpoint_dir = Path(sys.argv[1]), Path(sys.argv[2])


def cases(split):
    ids = sorted(p.name[:-len("_image.npy")] for p in data_dir.glob(f"{split}*_image.npy"))
    return {c: (np.load(data_dir / f"{c}_image.npy", mmap_mode="r"),
                np.load(data_dir / f"{c}_label.npy", mmap_mode="r")) for c in ids}


train_cases = cases("train")
assert all(isinstance(image, np.memmap) for image, _ in train_cases.values())
train = SliceLoader(train_cases, 4, "multiclass", training=True, foreground_fraction=1 / 3,
                    seed=0, steps_per_epoch=3)
validation = SliceLoader(cases("val"), 4, "multiclass", training=False)


def build():
    model = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2, dropout=0.0,
                        l2_weight=0.0)
    return compile_model(model, {"learning_rate": 1e-3, "loss": "dice_ce", "dice_smooth": 1.0}, "multiclass")


result = fit_with_resume(build, train, validation,
                         FitConfig(epochs=1, batch_size=4, steps_per_epoch=3, monitor="val_dice_pancreas"),
                         checkpoint_dir, fingerprint="jax-smoke", label="unet")
probabilities = result.model.predict(validation[0][0], verbose=0)
print("RESULT " + json.dumps({
    "backend": keras.backend.backend(), "history": result.history,
    "resumed_from_epoch": result.resumed_from_epoch, "best_value": result.best_value,
    "model_name": result.model.name, "loss_class": type(result.model.loss).__name__,
    "prediction_shape": list(probabilities.shape),
    "prediction_sums_to_one": bool(np.allclose(np.asarray(probabilities).sum(-1), 1.0, atol=1e-4))}), flush=True)
'''


def test_one_epoch_through_loader_and_checkpoints_under_jax(tmp_path: Path, jax_script) -> None:
    rng = np.random.default_rng(0)
    for case_id, n_slices in (("train_a", 8), ("train_b", 6), ("val_a", 5)):
        label = np.zeros((n_slices, 32, 32), np.uint8)
        label[1, 8:20, 8:20] = 1
        label[1, 11:15, 11:15] = 2
        image = (rng.normal(0.0, 0.3, label.shape) + label).astype(np.float32)
        np.save(tmp_path / f"{case_id}_image.npy", image)
        np.save(tmp_path / f"{case_id}_label.npy", label)
    checkpoint_dir = tmp_path / "checkpoints"
    process = jax_script.run(tmp_path / "fit_jax.py", SCRIPT, str(tmp_path), str(checkpoint_dir))
    (line,) = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])

    assert result["backend"] == "jax"
    assert result["resumed_from_epoch"] == 0
    assert len(result["history"]["loss"]) == 1
    assert np.isfinite(result["history"]["loss"][0]) and result["history"]["loss"][0] > 0
    assert 0.0 <= result["history"]["val_dice_pancreas"][0] <= 1.0
    assert 0.0 <= result["history"]["val_dice_tumour"][0] <= 1.0
    # the learning-curve record (optimizer steps, training seconds) works without TensorFlow
    assert result["history"]["optimizer_step"] == [3.0]
    assert result["history"]["training_seconds"][0] > 0.0
    # best.keras was written under JAX and read back by fit_with_resume (safe_mode=True).
    assert (checkpoint_dir / "best.keras").is_file() and (checkpoint_dir / "last-epoch-0001.keras").is_file()
    assert result["model_name"] == "unet" and result["loss_class"] == "DiceCrossEntropyLoss"
    assert result["best_value"] == pytest.approx(result["history"]["val_dice_pancreas"][0])
    state = json.loads((checkpoint_dir / "state.json").read_text())
    assert state["completed_epochs"] == 1 and state["fingerprint"] == "jax-smoke"
    # Validation batches from the sequential loader: the first holds 4 slices, softmax output.
    assert result["prediction_shape"] == [4, 32, 32, 3] and result["prediction_sums_to_one"]
