"""Models, losses and metrics train under KERAS_BACKEND=jax (the GPU machines have no TensorFlow).

The backend is chosen when keras is first imported, so the check runs in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

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


def test_training_runs_under_jax_backend() -> None:
    if importlib.util.find_spec("jax") is None:  # pragma: no cover - depends on the environment
        pytest.skip("JAX is not installed: the KERAS_BACKEND=jax check cannot run here")
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        # XLA:CPU spends seconds optimising each tiny weight-initialiser program (a fresh one per
        # kernel shape); optimisation level 0 cuts the build of this model several-fold and does
        # not change results. Only this test subprocess uses it.
        "XLA_FLAGS": " ".join(
            filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])
        ),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert report["loss"] == pytest.approx(report["loss"])  # not NaN
    assert abs(report["loss"]) < float("inf")
    assert 0.0 <= report["dice_tumour"] <= 1.0
