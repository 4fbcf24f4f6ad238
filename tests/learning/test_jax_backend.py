"""Models, losses and metrics train under KERAS_BACKEND=jax (the GPU machines have no TensorFlow).

The backend is chosen when keras is first imported, so the check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SCRIPT = r"""
import json
import numpy as np
import keras
from pancreas_seg.learning.losses import DiceCrossEntropyLoss
from pancreas_seg.learning.metrics import dice_metrics
from pancreas_seg.models import build_model

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 32, 32, 1)).astype("float32")
y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(4, 32, 32))]
model = build_model("unet", (32, 32, 1), "multiclass", base_filters=4, depth=2)
model.compile(optimizer="adam", loss=DiceCrossEntropyLoss(), metrics=dice_metrics("multiclass"))
history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
print(json.dumps({"backend": keras.backend.backend(),
                  "loss": float(history.history["loss"][-1]),
                  "dice_tumour": float(history.history["dice_tumour"][-1])}))
"""


def test_training_runs_under_jax_backend(tmp_path: Path, jax_script) -> None:
    process = jax_script.run(tmp_path / "train_jax.py", SCRIPT)
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert math.isfinite(report["loss"]) and report["loss"] > 0
    assert 0.0 <= report["dice_tumour"] <= 1.0
