"""The search space and tuning settings from configuration: parsing, sampling ranges, merging
into the training settings, and errors that name the configuration key."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from kedro.config import OmegaConfigLoader

from pancreas_seg.learning.setup import architecture_settings
from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.settings import CONFIG_LOADER_ARGS
from pancreas_seg.tuning.config import TuningConfig
from pancreas_seg.tuning.search_space import SearchSpace, SearchSpaceError

CONF = Path(__file__).resolve().parents[2] / "conf"


def _parameters(env: str) -> dict:
    return OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": env})["parameters"]


@pytest.mark.parametrize("env", ["base", "smoke"])
def test_configured_search_space_samples_inside_its_ranges(env: str) -> None:
    params = _parameters(env)
    config = TuningConfig.from_params(params["tuning"], "unet")
    space = config.search_space
    assert set(space.names) == {"learning_rate", "batch_size", "loss", "dice_smooth", "model.dropout",
                                "model.l2_weight"}
    by_name = {p.name: p for p in space}
    assert by_name["learning_rate"].log and by_name["model.l2_weight"].log and by_name["dice_smooth"].log
    assert not by_name["model.dropout"].log
    assert set(by_name["loss"].choices) == {"dice_ce", "soft_dice"}

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(200):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        assert space.contains(values), values
        samples.append(values)
    lr = by_name["learning_rate"]
    assert all(lr.low <= s["learning_rate"] <= lr.high for s in samples)
    # log-uniform: about half the draws below the geometric mean of the range
    geometric_mean = math.sqrt(lr.low * lr.high)
    below = sum(s["learning_rate"] < geometric_mean for s in samples) / len(samples)
    assert 0.35 < below < 0.65, below
    assert {s["batch_size"] for s in samples} == set(by_name["batch_size"].choices)
    assert {s["loss"] for s in samples} == {"dice_ce", "soft_dice"}

    # every parameter is a real training setting of every architecture
    settings = {name: config.trial_settings(params["training"], params[name]["architecture"])
                for name in ARCHITECTURE_NAMES}
    for name, merged in settings.items():
        TuningConfig.from_params(params["tuning"], name).search_space.check_settings(merged, name)


def test_sampled_values_deep_merge_over_the_architecture_settings() -> None:
    params = _parameters("base")
    config = TuningConfig.from_params(params["tuning"], "unet_small")
    base = config.trial_settings(params["training"], params["unet_small"]["architecture"])
    assert base["epochs"] == params["tuning"]["trial"]["epochs"]   # tuning.trial over the training budget's epochs
    assert base["model"]["depth"] == 2                              # the architecture's override stays
    values = {"learning_rate": 1e-3, "batch_size": 4, "loss": "soft_dice", "dice_smooth": 0.5,
              "model.dropout": 0.2, "model.l2_weight": 1e-5}
    overrides = config.search_space.to_overrides(values)
    assert overrides["model"] == {"dropout": 0.2, "l2_weight": 1e-5}
    from pancreas_seg.learning.setup import merge_settings  # noqa: PLC0415

    merged = merge_settings(base, overrides)
    assert merged["model"] == {**base["model"], "dropout": 0.2, "l2_weight": 1e-5}
    assert merged["model"]["depth"] == 2 and merged["model"]["base_filters"] == base["model"]["base_filters"]
    assert (merged["learning_rate"], merged["batch_size"], merged["loss"]) == (1e-3, 4, "soft_dice")
    # outside tuning, unet_small trains the shared budget (equal budgets), not the trial's epochs
    assert architecture_settings(params["training"], params["unet_small"]["architecture"])["epochs"] == \
        params["training"]["epochs"] != base["epochs"]


def test_per_architecture_overrides_and_worker_threads() -> None:
    params = _parameters("base")
    fcn = TuningConfig.from_params(params["tuning"], "fcn")
    unet = TuningConfig.from_params(params["tuning"], "unet")
    fcn_lr = next(p for p in fcn.search_space if p.name == "learning_rate")
    unet_lr = next(p for p in unet.search_space if p.name == "learning_rate")
    assert fcn_lr.high < unet_lr.high and fcn_lr.log and fcn_lr.kind == "float"
    assert unet.storage_path == Path("data/06_models/tuning/unet.optuna.log")
    assert TuningConfig.from_params({**params["tuning"], "n_workers": 2}, "unet").threads(cores=2) == 1
    assert TuningConfig.from_params({**params["tuning"], "n_workers": 2}, "unet").threads(cores=16) == 8
    assert TuningConfig.from_params({**params["tuning"], "n_workers": 4}, "unet").threads(cores=2) == 1
    assert TuningConfig.from_params({**params["tuning"], "threads_per_worker": 3}, "unet").threads(cores=2) == 3


GOOD = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


@pytest.mark.parametrize(("space", "message"), [
    ({"lr": {"type": "uniform", "low": 0, "high": 1}}, "tuning.search_space.lr: unknown type 'uniform'"),
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "tuning.search_space.lr: 'low' (0.01) must be smaller"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "tuning.search_space.lr: a log-uniform range needs 'low' > 0"),
    ({"lr": {"type": "float", "high": 1.0}}, "tuning.search_space.lr: 'low' is required"),
    ({"lr": {"type": "float", "low": "a", "high": 1.0}}, "tuning.search_space.lr: 'low' must be a finite number"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1.0, "log": "yes"}}, "tuning.search_space.lr: 'log' must be true or false"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}}, "'step' cannot be combined"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1.0, "choices": [1]}}, "tuning.search_space.lr: unknown key(s) ['choices']"),
    ({"n": {"type": "int", "low": 1.5, "high": 4}}, "tuning.search_space.n: 'low' must be an integer"),
    ({"model": {"dropout": {"type": "categorical", "choices": []}}},
     "tuning.search_space.model.dropout: 'choices' must be a non-empty list"),
    ({"model": {"dropout": {"type": "categorical", "choices": [[0.1]]}}}, "tuning.search_space.model.dropout: choices must be"),
    ({"batch_size": {"type": "categorical", "choices": [4, 4]}}, "tuning.search_space.batch_size: 'choices' has duplicates"),
    ({"model": {"dropout": 0.1}}, "tuning.search_space.model.dropout: expected a mapping with 'type'"),
    ({"model": {}}, "tuning.search_space.model: empty group"),
    ({}, "the search space is empty"),
])
def test_bad_search_space_errors_name_the_key(space: dict, message: str) -> None:
    with pytest.raises(SearchSpaceError) as error:
        SearchSpace.from_config(space)
    assert message in str(error.value)


@pytest.mark.parametrize(("tuning", "message"), [
    ({"search_space": GOOD, "n_trails": 3}, "tuning: unknown key(s) ['n_trails']"),
    ({"search_space": GOOD, "n_workers": 0}, "tuning.n_workers: expected an integer >= 1"),
    ({"search_space": GOOD, "heartbeat_interval_s": 30, "grace_period_s": 20}, "tuning.grace_period_s (20) must be larger"),
    ({"search_space": GOOD, "pruner": {"n_warmup_step": 1}}, "tuning.pruner: unknown key(s) ['n_warmup_step']"),
    ({"search_space": GOOD, "architectures": {"unet": {"search_space": {"lr": {"high": -1.0}}}}},
     "tuning.architectures.unet.search_space.lr: 'low' (0.0001) must be smaller than 'high' (-1.0)"),
    ({"search_space": GOOD, "architectures": {"unet": {"n_workers": "two"}}}, "tuning.architectures.unet.n_workers"),
])
def test_bad_tuning_settings_errors_name_the_key(tuning: dict, message: str) -> None:
    with pytest.raises(SearchSpaceError) as error:
        TuningConfig.from_params(tuning, "unet")
    assert message in str(error.value)


def test_a_parameter_that_is_no_training_setting_is_refused() -> None:
    params = _parameters("base")
    settings = architecture_settings(params["training"], params["unet"]["architecture"])
    space = SearchSpace.from_config({"learning_rat": GOOD["lr"], "model": {"dropout": {"type": "float", "low": 0, "high": 0.5}}})
    with pytest.raises(SearchSpaceError, match=r"tuning\.search_space\.learning_rat: unet has no setting 'learning_rat'"):
        space.check_settings(settings, "unet")
    space = SearchSpace.from_config({"model": {"drop": {"type": "float", "low": 0, "high": 0.5}}})
    with pytest.raises(SearchSpaceError, match=r"tuning\.search_space\.model\.drop: unet has no setting 'model\.drop' "
                                               r"\(known under model: .*dropout"):
        space.check_settings(settings, "unet")
