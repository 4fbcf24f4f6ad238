"""The install extras: Keras' backend is an extra (``tf`` for the CPU default, ``gpu`` for JAX with
CUDA), and installing ``.[gpu]`` brings no TensorFlow.

The fast tests read ``pyproject.toml`` and the ``Makefile``; the slow one asks pip's resolver
(``pip install --dry-run --report``, which reaches the package index) what ``.[gpu]`` would install.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pancreas_seg.core.backend import INSTALL_HINTS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[Requirement]] = {name: [Requirement(r) for r in reqs]
                                        for name, reqs in PROJECT["optional-dependencies"].items()}
BASE = [Requirement(r) for r in PROJECT["dependencies"]]
JAX_CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")


def _pin(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned"
    return spec.version


def _named(requirements: list[Requirement], name: str) -> list[Requirement]:
    return [r for r in requirements if r.name.lower() == name]


def test_tensorflow_is_only_in_the_tf_extra() -> None:
    assert not [r for r in BASE if r.name.lower().startswith("tensorflow")]
    assert not [r for r in BASE if "tensorflow" in r.extras], "an extra that pulls TensorFlow"
    assert [str(r) for r in EXTRAS["tf"]] == ["tensorflow-cpu==2.21.0"]
    for name, requirements in EXTRAS.items():
        if name != "tf":
            assert not [r for r in requirements if r.name.lower().startswith("tensorflow")], name


def test_the_gpu_extra_is_jax_with_cuda_at_the_test_extras_pin() -> None:
    (gpu_jax,) = _named(EXTRAS["gpu"], "jax")
    (test_jax,) = _named(EXTRAS["test"], "jax")
    assert gpu_jax.extras & {"cuda12", "cuda13"}, gpu_jax
    assert test_jax.extras == {"cpu"}, test_jax
    assert _pin(gpu_jax) == _pin(test_jax), "`.[gpu,test]` must install together: one jax pin"
    (keras,) = _named(BASE, "keras")
    assert _pin(keras)


def test_the_makefile_installs_tf_by_default_and_gpu_on_request() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'^\t\$\(BIN\)/python -m pip install --quiet -e "\.\[tf,test\]"$', makefile, re.M)
    gpu_target = makefile.split("$(VENV)/.installed-gpu:", 1)[1].split("\n\n", 1)[0]
    assert '-e ".[gpu,test]"' in gpu_target and "tf" not in re.findall(r'"\.\[([^]]*)\]"', gpu_target)[0]
    assert re.search(r"^install-gpu: \$\(VENV\)/\.installed-gpu$", makefile, re.M)


def test_the_error_for_a_missing_backend_names_existing_extras() -> None:
    for hint in INSTALL_HINTS.values():
        for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', hint):
            assert extra in EXTRAS, hint


@pytest.mark.slow
@pytest.mark.subprocess
def test_pip_resolves_the_gpu_extra_to_jax_with_cuda_and_no_tensorflow(tmp_path: Path) -> None:
    # A copy of what pip builds the metadata from, so nothing is written into the checkout.
    source = tmp_path / "project"
    (source / "src" / "pancreas_seg").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copy2(ROOT / "src" / "pancreas_seg" / "__init__.py", source / "src" / "pancreas_seg" / "__init__.py")
    report = tmp_path / "report.json"
    process = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), f"{source}[gpu]"],
        capture_output=True, text=True, timeout=900, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert not [name for name in versions if name.startswith("tensorflow")], sorted(versions)
    (gpu_jax,) = _named(EXTRAS["gpu"], "jax")
    assert versions.get("jax") == _pin(gpu_jax)
    assert [name for name in JAX_CUDA_PLUGINS if name in versions], sorted(versions)
    assert "keras" in versions
