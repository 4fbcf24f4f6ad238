"""The cascade under KERAS_BACKEND=jax (the GPU machines have JAX, not TensorFlow): stage-2
training through the CropLoader and fit_with_resume, then the cascade on a scan in any axis order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Run by the ``jax_script`` fixture (tests/conftest.py), which puts the ``import jax`` check first.
SCRIPT = r'''
import json, sys
from pathlib import Path

import keras
import numpy as np

from pancreas_seg.cascade.crops import CropConfig
from pancreas_seg.inference.model_card import CascadeSpec, CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.cascade.sampler import CropLoader
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.learning.training import FitConfig, fit_with_resume
from pancreas_seg.models.io import load_model, save_model, weights_sha256
from pancreas_seg.models.registry import build_model
from pancreas_seg.learning.setup import compile_model

workdir = Path(sys.argv[1])
rng = np.random.default_rng(0)
cases = {}
for case_id in ("a", "b", "c"):
    label = np.zeros((4, 24, 40), np.uint8)
    label[:, 8:16, 8:32] = 1
    label[1:3, 10:14, 24:28] = 2
    cases[case_id] = ((rng.normal(0, 0.2, label.shape) + label / 2).astype(np.float32), label)
train = CropLoader({k: cases[k] for k in ("a", "b")}, (16, 32), batch_size=4, label_mode="multiclass",
                   training=True, jitter_std_px=(2.0, 2.0), tumour_fraction=0.5, steps_per_epoch=3)
validation = CropLoader({"c": cases["c"]}, (16, 32), batch_size=4, label_mode="multiclass", training=False)
batch = train[0][1]
tumour_windows = int((batch[..., 2].reshape(len(batch), -1).max(axis=1) > 0).sum())

def build():
    model = build_model("unet", (16, 32, 1), "multiclass", base_filters=4, depth=2, dropout=0.0, l2_weight=0.0)
    return compile_model(model, {"learning_rate": 1e-3, "loss": "dice_ce", "dice_smooth": 1.0}, "multiclass")

result = fit_with_resume(build, train, validation, FitConfig(epochs=1, monitor="val_dice_tumour"),
                         workdir / "checkpoints", fingerprint="jax-cascade", label="cascade")
save_model(result.model, workdir / "stage2.keras")
stage2 = load_model(workdir / "stage2.keras", compile=False)

# stage 1: a 1x1 convolution calling pancreas above mid-window (an intensity oracle)
stage1 = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 1, activation="softmax")])
stage1.layers[-1].set_weights([np.array([[[[-40.0, 40.0, 0.0]]]], np.float32), np.array([20.0, -20.0, -50.0], np.float32)])
hu = rng.normal(20.0, 5.0, size=(20, 64, 56)).astype(np.float32)   # stored S, A, R: the cyclic order
hu[7:12, 20:40, 10:45] = 120.0
affine = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]], float)
crop = CropConfig(spacing_mm=0.8, size_px=(16, 32), margin_mm=4.0, z_margin_mm=2.5)
spec = CascadeSpec(stage1={"architecture": "oracle", "label_mode": "multiclass", "weights_sha256": weights_sha256(stage1)},
                   stage2={"architecture": "unet", "label_mode": "multiclass"}, crop=crop.to_dict())
card = ModelCard.for_trained_model("cascade", "multiclass", {"image_size_px": 32}, None, "Task07_Pancreas_synthetic",
                                   CaseSplit(("a", "b"), ("c",)), weights_sha256(stage2), cascade=spec)
predictor = Predictor.from_models([stage2], [card], PredictionSettings(batch_size=4, flip_tta=False), stage1=stage1)
labels, report = predictor.segment_with_report(hu, affine)
print("RESULT " + json.dumps({
    "backend": keras.backend.backend(), "tumour_windows": tumour_windows,
    "loss": result.history["loss"], "val_dice_tumour": result.history["val_dice_tumour"],
    "labels_shape": list(labels.shape), "labels_values": sorted(np.unique(labels).tolist()),
    "report": report}), flush=True)
'''


def test_cascade_trains_and_segments_under_jax(tmp_path: Path, jax_script) -> None:
    process = jax_script.run(tmp_path / "cascade_jax.py", SCRIPT, str(tmp_path))
    (line,) = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["backend"] == "jax"
    assert result["tumour_windows"] >= 2
    assert np.isfinite(result["loss"][0]) and 0.0 <= result["val_dice_tumour"][0] <= 1.0
    assert result["labels_shape"] == [20, 64, 56] and set(result["labels_values"]) <= {0, 1, 2}
    assert result["report"]["stage1_found"] and result["report"]["stage2_slices"] == 7   # 5 + 1 a side
    assert (tmp_path / "checkpoints" / "best.keras").is_file()
