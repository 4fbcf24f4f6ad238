"""``benchmarks.gpu_check``: the msd settings it reads, the Task07 slice counts and projection, and a
tiny CPU run end to end under JAX through the project's ``fit_with_resume`` (run twice on one
checkpoint folder: the second run resumes the finished training and trains nothing).

The GPU machines have JAX but neither TensorFlow nor Kedro/MLflow, so the tiny run blocks those
imports (a ``sitecustomize`` on the child's path) and the report must say none was imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check as gpu_check_module

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Run as ``python -m benchmarks.gpu_check`` from the repository root, as on the GPU machines.
MODULE = gpu_check_module.__name__
SRC = REPO_ROOT / "src"

BLOCKER = '''
import sys

class _Blocked:
    """The GPU machine's environment: these packages are not installed there."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "kedro", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the gpu_check test)", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


@pytest.fixture(scope="module")
def gpu_check():
    """The benchmark module (``benchmarks.gpu_check``)."""
    return gpu_check_module


def test_msd_parameters_are_what_kedro_gives(gpu_check) -> None:
    config = pytest.importorskip("kedro.config")
    from pancreas_seg.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415 - imports Kedro

    for env in ("msd", "smoke"):
        kedro_params = config.OmegaConfigLoader(str(REPO_ROOT / "conf"),
                                                **{**CONFIG_LOADER_ARGS, "default_run_env": env})["parameters"]
        assert gpu_check.environment_parameters(REPO_ROOT / "conf", env) == kedro_params, env


def test_msd_key_values(gpu_check) -> None:
    params = gpu_check.environment_parameters(REPO_ROOT / "conf", "msd")
    assert gpu_check.msd_key_values(params) == gpu_check.EXPECTED_MSD == {
        "mixed_precision": True, "image_size_px": 256, "base_filters": 32, "batch_size": 16}


def test_command_line_overrides_are_listed(gpu_check) -> None:
    params = gpu_check.environment_parameters(REPO_ROOT / "conf", "msd")
    args = gpu_check.parse_args(["--batch-size", "8", "--base-filters", "32", "--no-mixed-precision"])
    gpu_check.apply_defaults(args, gpu_check.GPU_DEFAULTS)
    settings, preprocessing, overridden = gpu_check.resolve_settings(params, args)
    assert overridden == ["batch_size", "mixed_precision"]  # base 32 is msd's own value
    assert (settings["batch_size"], settings["mixed_precision"], preprocessing["image_size_px"]) == (8, False, 256)
    # the run's own epochs; msd's steps_per_epoch (null: one pass over the training slices)
    assert (settings["epochs"], settings["steps_per_epoch"]) == (10, None)
    assert (settings["reduce_lr_patience"], settings["early_stopping_patience"]) == (5, 10)  # msd's schedule


def test_augmentation_mode_follows_the_setting(gpu_check) -> None:
    assert gpu_check.augmentation_mode({"augmentation": {"enabled": True}})["mode"] == "host"  # key absent
    assert gpu_check.augmentation_mode({"augmentation": {"enabled": True, "on_device": True}})["mode"] == "device"
    assert gpu_check.augmentation_mode({"augmentation": {"enabled": False, "on_device": True}})["mode"] == "off"
    params = gpu_check.environment_parameters(REPO_ROOT / "conf", "msd")
    args = gpu_check.parse_args(["--no-augmentation-on-device"])
    gpu_check.apply_defaults(args, gpu_check.GPU_DEFAULTS)
    settings, _, overridden = gpu_check.resolve_settings(params, args)
    assert gpu_check.augmentation_mode(settings)["mode"] == "host"
    msd_on_device = bool((params["training"].get("augmentation") or {}).get("on_device", False))
    assert ("augmentation.on_device" in overridden) == msd_on_device  # listed only where msd says otherwise


def test_task07_slice_counts_and_subsets(gpu_check) -> None:
    counts = gpu_check.task07_slice_counts()
    assert len(counts) == gpu_check.TASK07_CASES == 281
    assert (min(counts), sorted(counts)[140], max(counts)) == (37, 93, 751)
    assert counts == sorted(counts)
    assert gpu_check.subset_slice_counts(281) == counts
    subset = gpu_check.subset_slice_counts(gpu_check.DEFAULT_GPU_CASES)
    assert len(subset) == gpu_check.DEFAULT_GPU_CASES and subset == sorted(subset)
    assert abs(sorted(subset)[len(subset) // 2] - 93) <= 5  # the subset keeps Task07's median
    with pytest.raises(ValueError):
        gpu_check.subset_slice_counts(282)
    phantom = gpu_check.case_phantom(gpu_check.phantom_kwargs("msd"), 751)
    assert round(phantom["z_extent_mm"][0] / phantom["slice_thickness_mm"][0]) == 751
    assert phantom["z_extent_mm"][0] == pytest.approx(gpu_check.MAX_EXTENT_MM)


def test_msd_split_of_task07(gpu_check) -> None:
    # as task07.splits.assign_splits counts: round(0.2 * 281) test, round(0.3 * 225) validation
    assert gpu_check.split_sizes(281, 0.2, 0.3) == {"test": 56, "validation": 68, "train": 157}
    full = gpu_check.task07_split_slices(0.2, 0.3)
    mean = sum(gpu_check.task07_slice_counts()) / 281
    assert full["train_slices"] == round(157 * mean) and full["validation_slices"] == round(68 * mean)
    splits = gpu_check.assign_case_splits(48, 0.2, 0.3, seed=512)
    assert {s: splits.count(s) for s in set(splits)} == {"test": 10, "validation": 11, "train": 27}
    assert splits == gpu_check.assign_case_splits(48, 0.2, 0.3, seed=512)


def test_projection_formula(gpu_check) -> None:
    projection = gpu_check.project_msd_training(
        train_slices=1000, validation_slices=500, batch_size=16, epochs=30, fit_slices_per_s=100.0,
        validation_slices_per_s=250.0, epoch_overhead_s=1.0, first_epoch_extra_s=40.0, step_slices_per_s=200.0)
    # 63 steps of 16 = 1008 slices / 100 + 500 / 250 + 1 = 13.08 s an epoch; x 30 + 40 s
    assert projection["steps_per_epoch"] == 63
    assert projection["at_fit_rate"]["epoch_s"] == pytest.approx(13.08)
    assert projection["at_fit_rate"]["total_s"] == pytest.approx(30 * 13.08 + 40, abs=0.1)
    assert projection["at_step_rate"]["epoch_s"] == pytest.approx(1008 / 200 + 2 + 1)
    missing = gpu_check.project_msd_training(
        train_slices=1000, validation_slices=500, batch_size=16, epochs=30, fit_slices_per_s=None,
        validation_slices_per_s=None, epoch_overhead_s=0.0, first_epoch_extra_s=0.0)
    assert missing["at_fit_rate"] is None and missing["at_step_rate"] is None


def _env(tmp_path: Path) -> dict[str, str]:
    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir()
    (blocker_dir / "sitecustomize.py").write_text(BLOCKER)
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",  # the tiny run also where a GPU is present
        # XLA:CPU optimises every tiny program for seconds; level 0 only changes compile time here
        "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker_dir), str(SRC), os.environ.get("PYTHONPATH")])),
    }


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_tiny_cpu_run_trains_through_fit_with_resume(tmp_path: Path) -> None:
    if importlib.util.find_spec("jax") is None:  # pragma: no cover - depends on the environment
        pytest.skip("JAX is not installed: the KERAS_BACKEND=jax check cannot run here")
    from benchmarks import gpu_check  # noqa: PLC0415

    env = _env(tmp_path)
    output = tmp_path / "report" / "gpu_check.json"
    checkpoints = tmp_path / "checkpoints"

    refused = _run(["--output", str(output)], env, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "NO GPU" in refused.stderr and "--allow-cpu" in refused.stderr
    assert not output.exists()

    args = ["--allow-cpu", "--output", str(output), "--checkpoint-dir", str(checkpoints)]
    result = _run(args, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NO GPU" in result.stdout and "epoch 2/2" in result.stdout  # progress per epoch
    report = json.loads(output.read_text())
    assert (report["mode"], report["passed"], report["failures"]) == ("cpu-tiny", True, [])
    assert report["device"]["platform"] == "cpu"
    assert report["versions"]["keras_backend"] == "jax"
    assert set(report["versions"]) >= {"jax", "jaxlib", "keras", "python"}
    # neither the training chain nor anything later imported TensorFlow, Kedro or MLflow
    assert report["import_chain"]["blocked_imported"] == {"tensorflow": False, "kedro": False, "mlflow": False}
    assert report["modules_imported"] == {"tensorflow": False, "kedro": False, "mlflow": False}
    assert report["msd_settings"] == {"mixed_precision": True, "image_size_px": 256, "base_filters": 32,
                                      "batch_size": 16}
    assert report["msd_schedule"]["epochs"] == 30 and report["msd_schedule"]["steps_per_epoch"] is None
    settings = report["settings"]
    assert (settings["image_size_px"], settings["model"]["base_filters"], settings["batch_size"]) == ([64, 64], 4, 4)
    assert settings["dtype_policy"] == "mixed_float16" and report["model"]["compute_dtype"] == "float16"
    assert sorted(report["overridden"]) == ["base_filters", "batch_size", "image_size_px", "workers"]
    assert report["augmentation"]["mode"] in {"host", "device"}
    data = report["data"]
    assert data["split_cases"] == {"train": 1, "validation": 1, "test": 1} and len(data["cases"]) == 2
    # steps_per_epoch null: one pass over the training slices
    assert settings["steps_per_epoch_setting"] is None
    assert settings["steps_per_epoch"] == math.ceil(data["train_slices"] / 4)

    training = report["training"]
    assert training["function"] == "pancreas_seg.learning.training.fit_with_resume"
    assert (training["resumed_from_epoch"], training["epochs_trained"]) == (0, 2)
    assert len(training["history"]["val_dice_pancreas"]) == 2 and len(training["epoch_train_s"]) == 2
    assert 0.0 <= training["best_val_dice_pancreas"] <= 1.0
    for rate in (training["fit_slices_per_s"], training["train_step_slices_per_s"],
                 training["validation_slices_per_s"], report["inference"]["slices_per_s"]):
        assert rate > 0
    assert training["fit_to_step_ratio"] == pytest.approx(
        training["fit_slices_per_s"] / training["train_step_slices_per_s"], abs=2e-3)
    assert not training["fit_slices_per_s_includes_compile"]
    assert training["epoch_overhead_s"] > 0  # the checkpoint of every epoch
    checkpoint = training["checkpoint"]
    assert checkpoint["state_json"] and checkpoint["completed_epochs"] == 2 and checkpoint["finished"]
    assert {"state.json", "best.keras"} <= set(checkpoint["files"])
    state_file = checkpoints / "unet" / "state.json"
    state = json.loads(state_file.read_text())
    assert (state["completed_epochs"], state["finished"]) == (2, True)
    assert report["resume_check"] == {**report["resume_check"], "epochs_trained": 0, "resumed_from_epoch": 2}

    projection = report["projection"]
    full = gpu_check.task07_split_slices(0.2, 0.3)
    assert (projection["epochs"], projection["train_slices"], projection["validation_slices"]) == (
        30, full["train_slices"], full["validation_slices"])
    assert projection["steps_per_epoch"] == math.ceil(full["train_slices"] / 4)
    assert projection["fit_slices_per_s"] == training["fit_slices_per_s"]
    assert projection["at_fit_rate"]["total_min"] > 0 and projection["at_step_rate"]["total_min"] > 0
    targets = report["targets"]
    assert targets["applies"] is False  # a CPU run of a tiny model says nothing about the targets
    assert targets["fit_to_step_ratio"]["passed"] == (training["fit_to_step_ratio"] >= 0.9)
    assert targets["projected_msd_minutes"]["passed"] == (projection["at_fit_rate"]["total_min"] <= 20)
    assert report["task07"]["cases"] == {"test": 56, "validation": 68, "train": 157}
    assert report["inference"]["batch_size"] == 4
    assert report["checkpoint_roundtrip"]["label_agreement"] == 1.0
    assert report["memory"]["peak_gib"] is None or report["memory"]["peak_gib"] >= 0
    assert report["wall_s"] > 0 and report["min_val_dice"] == 0.0

    # the same command again: fit_with_resume finds the finished checkpoint and trains nothing
    again = _run(args, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    second = json.loads(output.read_text())
    assert (second["passed"], second["training"]["resumed_from_epoch"], second["training"]["epochs_trained"]) == (
        True, 2, 0)
    assert second["training"]["history"] == training["history"]
    assert second["training"].get("fit_slices_per_s") is None and "nothing trained" in second["training"]["note"]
    assert json.loads(state_file.read_text()) == state
    assert second["projection"]["at_fit_rate"] is None and second["targets"]["fit_to_step_ratio"]["passed"] is None
    assert second["modules_imported"] == {"tensorflow": False, "kedro": False, "mlflow": False}
