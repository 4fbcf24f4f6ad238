"""``benchmarks/lr_sweep.py``: the parameters it sets reach each model's learning rate, and the
choice per model (the run itself is a benchmark, not a test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from benchmarks.lr_sweep import choose_learning_rates, lr_params
from pancreas_seg.learning.setup import merge_settings
from pancreas_seg.models.names import ARCHITECTURE_NAMES, MODEL_NAMES
from pancreas_seg.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_the_sweep_parameters_set_every_models_learning_rate() -> None:
    """``--params`` as the sweep passes it, resolved as Kedro resolves runtime params: each model's
    merged training settings get the rate (fails if a parameter path is wrong)."""
    from kedro.framework.cli.utils import _split_params  # noqa: PLC0415

    runtime = _split_params(None, None, lr_params(MODEL_NAMES, 6e-4))
    loader = OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"},
                               runtime_params=runtime)
    params = loader["parameters"]
    rates = {name: merge_settings(params["training"], params[name]["architecture"]["overrides"])["learning_rate"]
             for name in ARCHITECTURE_NAMES}
    rates["cascade"] = merge_settings(params["training"], params["cascade"]["stage2"]["overrides"])["learning_rate"]
    assert rates == pytest.approx({name: 6e-4 for name in MODEL_NAMES})


def test_choice_is_the_best_finite_value_ties_to_the_smaller_rate() -> None:
    rows = [
        {"model": "unet", "learning_rate": 2e-3, "final_val_dice_pancreas": 0.80},
        {"model": "unet", "learning_rate": 6e-4, "final_val_dice_pancreas": 0.85},
        {"model": "unet", "learning_rate": 2e-4, "final_val_dice_pancreas": 0.70},
        {"model": "fcn", "learning_rate": 2e-3, "final_val_dice_pancreas": math.nan},   # diverged
        {"model": "fcn", "learning_rate": 2e-4, "final_val_dice_pancreas": 0.30},
        {"model": "vnet2d", "learning_rate": 2e-3, "final_val_dice_pancreas": 0.5},
        {"model": "vnet2d", "learning_rate": 6e-4, "final_val_dice_pancreas": 0.5},
        {"model": "cascade", "learning_rate": 2e-3, "final_val_dice_pancreas": None},
    ]
    chosen = choose_learning_rates(rows)
    assert {model: c["learning_rate"] for model, c in chosen.items()} == {"unet": 6e-4, "fcn": 2e-4, "vnet2d": 6e-4}
    assert chosen["unet"]["final_val_dice_pancreas"] == pytest.approx(0.85)
