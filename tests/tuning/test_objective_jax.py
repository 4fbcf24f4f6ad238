"""A study's objective end to end under KERAS_BACKEND=jax (the GPU machines have no TensorFlow), in
a fresh interpreter: two real trials of a tiny U-Net from in-memory arrays (shards that have no
file, the fallback the node uses for them), the second stopped by a pruner after its first epoch;
values are Dice scores, reports are per epoch. The augmentation runs in the training step, as
conf/msd (the GPU environment) sets it."""

from __future__ import annotations

import json
from pathlib import Path

SCRIPT = r"""
import json
import numpy as np
import optuna
import pandas as pd

from pancreas_seg.tuning.objective import KerasObjective, TrialContext
from pancreas_seg.tuning.search_space import SearchSpace

rng = np.random.default_rng(0)
shards, rows = {}, []
for i, split in enumerate(["train", "train", "validation"]):
    label = np.zeros((6, 32, 32), np.uint8)
    label[:, 10:20, 12:22] = 1
    image = (rng.normal(size=label.shape) * 0.1 + label).astype("float32")
    shards[f"case{i}/image"], shards[f"case{i}/label"] = image, label
    rows.append({"case_id": f"case{i}", "split": split})
settings = {"seed": 1, "epochs": 3, "batch_size": 4, "steps_per_epoch": 2, "learning_rate": 1e-3,
            "lr_schedule": "constant", "loss": "dice_ce", "dice_smooth": 1.0, "monitor": "val_dice_pancreas",
            "foreground_fraction": 0.5, "retain_heap": False, "augmentation": {"on_device": True},
            "model": {"base_filters": 4, "depth": 2, "dropout": 0.0, "l2_weight": 0.0}}
space = SearchSpace.from_config({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
context = TrialContext(architecture="unet", study_name="jax", settings=settings, search_space=space,
                       preprocessing={"image_size_px": 32}, case_manifest=pd.DataFrame(rows), shards=shards)

# trial 0 runs every epoch (no pruner); trial 1 meets a pruner that prunes any Dice below 2, i.e. always
study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
study.enqueue_trial({"learning_rate": 1e-3})
study.optimize(KerasObjective(context), n_trials=1)
study.pruner = optuna.pruners.ThresholdPruner(lower=2.0)
study.enqueue_trial({"learning_rate": 2e-3})
study.optimize(KerasObjective(context), n_trials=1)
import keras
print("RESULT " + json.dumps({"backend": keras.backend.backend(),
      "trials": [{"state": t.state.name, "value": t.value, "steps": sorted(t.intermediate_values),
                  "attrs": t.user_attrs} for t in study.trials]}))
"""


def test_trials_run_and_prune_under_jax(tmp_path: Path, jax_script) -> None:
    result = jax_script.run(tmp_path / "objective_jax.py", SCRIPT)
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    outcome = json.loads(line.removeprefix("RESULT "))
    assert outcome["backend"] == "jax"
    first, second = outcome["trials"]
    assert first["state"] == "COMPLETE" and 0.0 <= first["value"] <= 1.0
    assert first["steps"] == [0, 1, 2] and first["attrs"]["epochs_completed"] == 3
    assert second["state"] == "PRUNED" and second["steps"] == [0]
    assert second["attrs"]["pruned_at_epoch"] == 1 and second["attrs"]["epochs_completed"] == 1
