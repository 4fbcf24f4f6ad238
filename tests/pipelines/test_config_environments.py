"""The resolved parameters of each environment give every architecture the intended budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.learning.setup import merge_settings
from pancreas_seg.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[2] / "conf"
# every environment the project ships (conf/local is the user's own and empty in the repository)
ENVIRONMENTS = ["base", *sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in {"base", "local"})]


def _parameters(env: str) -> dict:
    args = {**CONFIG_LOADER_ARGS, "default_run_env": env}
    return OmegaConfigLoader(str(CONF), **args)["parameters"]


def _effective(params: dict, architecture: str) -> dict:
    return merge_settings(params["training"], params[architecture]["architecture"].get("overrides"))


@pytest.mark.parametrize(("env", "expected_epochs"), [
    ("smoke", {name: 1 for name in ARCHITECTURE_NAMES}),
    ("msd", {name: 30 for name in ARCHITECTURE_NAMES}),
])
def test_every_architecture_gets_the_environment_epochs(env: str, expected_epochs: dict) -> None:
    # an environment's training.epochs reaches every architecture: no per-model cap is inherited
    params = _parameters(env)
    assert {name: _effective(params, name)["epochs"] for name in ARCHITECTURE_NAMES} == expected_epochs


def _budget(settings: dict) -> tuple[int, int, int]:
    """(epochs, steps_per_epoch, batch_size) of merged training settings."""
    return settings["epochs"], settings["steps_per_epoch"], settings["batch_size"]


def test_the_shipped_environments_are_the_documented_ones() -> None:
    assert ENVIRONMENTS == ["base", "cv", "hard", "msd", "slurm", "smoke", "study", "team"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_model_gets_the_same_budget(env: str) -> None:
    """Equal budgets: every architecture and the cascade's stage 2 train the same number of optimizer
    steps on batches of the same size (the README's results table compares them on this)."""
    params = _parameters(env)
    budgets = {name: _budget(_effective(params, name)) for name in ARCHITECTURE_NAMES}
    budgets["cascade"] = _budget(merge_settings(params["training"], params["cascade"]["stage2"].get("overrides")))
    assert len(set(budgets.values())) == 1, f"unequal training budgets in conf/{env}: {budgets}"
    if env == "base":
        # a fixed number of steps: steps_per_epoch null would mean one pass over each model's own
        # training set (slices for the architectures, crops for the cascade), not an equal budget
        assert budgets["unet"] == (5, 60, 8)


def test_base_budgets_and_model_overrides() -> None:
    params = _parameters("base")
    effective = {name: _effective(params, name) for name in ARCHITECTURE_NAMES}
    assert {n: s["epochs"] for n, s in effective.items()} == {name: 5 for name in ARCHITECTURE_NAMES}
    assert {s["lr_schedule"] for s in effective.values()} == {"poly"}
    assert effective["unet_small"]["model"]["depth"] == 2 and effective["fcn"]["model"]["depth"] == 5
    assert effective["vnet2d"]["model"]["base_filters"] == 8
    assert effective["fcn"]["model"]["batch_norm"] is True and effective["fcn"]["learning_rate"] == pytest.approx(2e-4)
    assert [effective[n]["learning_rate"] for n in ("unet", "unet_small", "vnet2d")] == pytest.approx([2e-3] * 3)
    assert params["training"]["foreground_fraction"] == pytest.approx(1 / 3, abs=1e-3)  # nnU-Net
    assert params["preprocessing"]["crop_to_body"] is True
    assert _effective(_parameters("msd"), "vnet2d")["model"]["base_filters"] == 16


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_architecture_gets_a_valid_fit_config(env: str) -> None:
    # FitConfig validates its settings, e.g. a poly schedule cannot be combined with ReduceLROnPlateau
    from pancreas_seg.learning.training import FitConfig  # noqa: PLC0415

    params = _parameters(env)
    for name in ARCHITECTURE_NAMES:
        settings = _effective(params, name)
        config = FitConfig.from_settings(settings)
        assert config.epochs == settings["epochs"] and config.lr_schedule == settings["lr_schedule"]
    msd = _parameters("msd")
    msd_unet = _effective(msd, "unet")
    assert msd_unet["lr_schedule"] == "constant" and msd_unet["learning_rate"] == pytest.approx(2e-4)
    # the study's rate for every model on the GPU, not base's per-model CPU rates
    msd_rates = [_effective(msd, name)["learning_rate"] for name in ARCHITECTURE_NAMES]
    msd_rates.append(merge_settings(msd["training"], msd["cascade"]["stage2"]["overrides"])["learning_rate"])
    assert msd_rates == pytest.approx([2e-4] * (len(ARCHITECTURE_NAMES) + 1))


def test_resume_fingerprint_ignores_speed_only_settings() -> None:
    """Toggling retain_heap or the device placement resumes the same checkpoint; changing what is
    computed does not."""
    from pancreas_seg.learning.training import FitConfig  # noqa: PLC0415
    from pancreas_seg.learning.setup import resume_fingerprint  # noqa: PLC0415

    settings = _effective(_parameters("base"), "unet")
    parts = ({"image_size_px": 96}, {"mean": 1.0}, ["pancreas_001"])

    def fingerprint(**changes) -> str:
        changed = {**settings, **changes}
        return resume_fingerprint(FitConfig.from_settings(changed), "unet", changed, *parts)

    assert fingerprint(retain_heap=True) == fingerprint(retain_heap=False)
    assert settings["distribution"] is None  # conf/base: one device
    assert fingerprint(distribution="data_parallel") == fingerprint()   # resumes on another device count
    assert fingerprint(distribution={"type": "data_parallel", "devices": 2}) == fingerprint()
    assert fingerprint(learning_rate=1e-4) != fingerprint()
    assert fingerprint(foreground_fraction=0.5) != fingerprint()   # a loader setting outside FitConfig
    assert resume_fingerprint(FitConfig.from_settings(settings), "unet_small", settings, *parts) != fingerprint()
    # augmenting on the device is not bit-identical to the host: another checkpoint; the host path
    # keeps the fingerprint of the versions before the setting existed
    augmentation = settings["augmentation"]
    assert augmentation["on_device"] is False  # conf/base: on the host
    assert fingerprint(augmentation={**augmentation, "on_device": True}) != fingerprint()
    assert fingerprint(augmentation={k: v for k, v in augmentation.items() if k != "on_device"}) == fingerprint()


def test_the_study_environment_trains_as_base_on_a_sample_that_can_reach_significance() -> None:
    """conf/study changes the data and the folds, never the training: its models are the default
    run's, cross-validated on enough patients for Holm-corrected paired tests to mean something."""
    import pandas as pd  # noqa: PLC0415

    from pancreas_seg.task07.splits import make_split  # noqa: PLC0415

    base, study = _parameters("base"), _parameters("study")
    for name in ARCHITECTURE_NAMES:
        assert _effective(study, name) == _effective(base, name)
    assert study["cascade"] == base["cascade"]
    phantoms = study["ingestion"]["synthetic"]
    assert phantoms["path"] != base["ingestion"]["synthetic"]["path"]   # its own raw data and split file
    n_tumour = round(phantoms["n_train"] * phantoms["phantom"]["tumour_fraction"])
    cases = pd.DataFrame({"case_id": [f"pancreas_{i:03d}" for i in range(phantoms["n_train"])],
                          "voxels_tumour": [100 if i < n_tumour else 0 for i in range(phantoms["n_train"])]})
    record = make_split(cases, study["split"], "Task07_Pancreas_study")
    tumour = set(cases.loc[cases["voxels_tumour"] > 0, "case_id"])
    development = set(record["folds"])
    assert len(development) >= 30 and study["split"]["n_folds"] == 3
    assert len(development & tumour) >= 15
    assert len(set(record["test"]) & tumour) >= 3
    per_fold = [sum(1 for c, f in record["folds"].items() if f == k and c in tumour) for k in range(3)]
    assert max(per_fold) - min(per_fold) <= 1
