"""``benchmarks.gpu_check``: the msd settings it reads, and a tiny CPU run end to end under JAX.

The GPU machines have JAX but neither TensorFlow nor Kedro/MLflow, so the tiny run blocks those
imports (a ``sitecustomize`` on the child's path) and the report must say none was imported.
"""

from __future__ import annotations

import importlib.util
import json
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
    assert (settings["epochs"], settings["steps_per_epoch"]) == (12, 80)


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


@pytest.mark.slow
def test_tiny_cpu_run_writes_the_report(tmp_path: Path) -> None:
    if importlib.util.find_spec("jax") is None:  # pragma: no cover - depends on the environment
        pytest.skip("JAX is not installed: the KERAS_BACKEND=jax check cannot run here")
    env = _env(tmp_path)
    output = tmp_path / "report" / "gpu_check.json"

    refused = subprocess.run([sys.executable, "-m", MODULE, "--output", str(output)], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "NO GPU" in refused.stderr and "--allow-cpu" in refused.stderr
    assert not output.exists()

    result = subprocess.run([sys.executable, "-m", MODULE, "--allow-cpu", "--output", str(output)], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NO GPU" in result.stdout
    report = json.loads(output.read_text())
    assert (report["mode"], report["passed"], report["failures"]) == ("cpu-tiny", True, [])
    assert report["device"]["platform"] == "cpu"
    assert report["versions"]["keras_backend"] == "jax"
    assert set(report["versions"]) >= {"jax", "jaxlib", "keras", "python"}
    assert report["modules_imported"] == {"tensorflow": False, "kedro": False, "mlflow": False}
    assert report["msd_settings"] == {"mixed_precision": True, "image_size_px": 256, "base_filters": 32,
                                      "batch_size": 16}
    settings = report["settings"]
    assert (settings["image_size_px"], settings["model"]["base_filters"], settings["batch_size"]) == ([64, 64], 4, 4)
    assert settings["dtype_policy"] == "mixed_float16" and report["model"]["compute_dtype"] == "float16"
    assert sorted(report["overridden"]) == ["base_filters", "batch_size", "image_size_px", "workers"]
    training = report["training"]
    assert len(training["history"]["val_dice_pancreas"]) == 1
    assert 0.0 <= training["best_val_dice_pancreas"] <= 1.0
    for rate in (training["fit_slices_per_s"], training["train_step_slices_per_s"],
                 report["inference"]["slices_per_s"]):
        assert rate > 0
    assert report["inference"]["batch_size"] == 4
    assert report["checkpoint_roundtrip"]["label_agreement"] == 1.0
    assert report["memory"]["peak_gib"] is None or report["memory"]["peak_gib"] >= 0
    assert report["wall_s"] > 0 and report["min_val_dice"] == 0.0
