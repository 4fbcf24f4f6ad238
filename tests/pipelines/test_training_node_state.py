"""The training node leaves no process-wide state behind: the mixed-precision policy it trains one
architecture with is gone when the node returns, so the next architecture trains in float32.

Calls the real node function with a real sqlite MLflow store and tiny in-memory shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE, SLICES = 32, 6


@pytest.fixture
def node_inputs(tmp_path: Path) -> dict:
    import mlflow  # noqa: PLC0415
    from mlflow.tracking import fluent  # noqa: PLC0415

    previous_uri, previous_experiment = mlflow.get_tracking_uri(), fluent._active_experiment_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # an earlier in-process Kedro session may have left its experiment id active: use our own
    mlflow.set_experiment("training_node_state")
    rng = np.random.default_rng(0)
    shards, rows = {}, []
    for index, split in enumerate(("train", "train", "validation")):
        case_id = f"case_{index}"
        image = rng.random((SLICES, SIZE, SIZE), dtype=np.float32)
        label = np.zeros((SLICES, SIZE, SIZE), np.uint8)
        label[:, 10:20, 10:20] = 1
        shards[f"{case_id}/image"] = lambda a=image: a
        shards[f"{case_id}/label"] = lambda a=label: a
        rows.append({"case_id": case_id, "split": split, "source": "synthetic", "dataset": "tiny"})
    preprocessing = {"image_size_px": SIZE, "intensity": {"mode": "window", "window_hu": [-100, 240]}}
    training = {"checkpoint_root": str(tmp_path / "checkpoints"), "seed": 1, "epochs": 1, "batch_size": 2,
                "steps_per_epoch": 1, "learning_rate": 1e-3, "lr_schedule": "constant", "loss": "dice_ce",
                "dice_smooth": 1.0, "monitor": "val_dice_pancreas", "foreground_fraction": 0.5,
                "mixed_precision": True, "workers": 1, "retain_heap": False,
                "augmentation": {"enabled": False},
                "model": {"base_filters": 4, "depth": 2, "dropout": 0.0, "l2_weight": 0.0}}
    yield {"shards": shards, "manifest": pd.DataFrame(rows), "preprocessing": preprocessing,
           "training": training}
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous_uri)
    fluent._active_experiment_id = previous_experiment


def test_mixed_precision_is_scoped_to_the_node(node_inputs: dict) -> None:
    import keras  # noqa: PLC0415

    from pancreas_seg.tracking.training_run import train_model  # noqa: PLC0415

    assert keras.config.dtype_policy().name == "float32"
    model, history, _, card = train_model(
        node_inputs["shards"], node_inputs["manifest"], {"mode": "window", "window_hu": [-100, 240]},
        node_inputs["preprocessing"], node_inputs["training"],
        {"name": "unet_small", "overrides": {"model": {"depth": 2}}})
    # the model was built under mixed precision ...
    assert model.layers[1].dtype_policy.name == "mixed_float16"
    assert len(history["loss"]) == 1 and card.architecture == "unet_small"
    # ... and the process is back to float32 for whatever runs next (the next architecture)
    assert keras.config.dtype_policy().name == "float32"
