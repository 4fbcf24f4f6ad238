"""``benchmarks.support.project_copy.copy_project``: configuration without ``conf/local`` contents,
the data skeleton, an empty ``src/``, and the source project left as it was; and
``subprocess_env``, the environment of a process in such a copy."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks.support.project_copy import (
    CHECKOUT,
    DATA_LAYERS,
    KEDRO_ENV_VARS,
    copy_project,
    subprocess_env,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative, POSIX) -> file bytes, or None for a folder."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small project: conf/ with a local secret, code, data and run outputs that must not travel."""
    root = tmp_path / "source"
    files = {
        "pyproject.toml": "[tool.kedro]\npackage_name = 'p'\n",
        ".telemetry": "consent: false\n",
        "conf/base/parameters.yml": "seed: 1\n",
        "conf/smoke/parameters.yml": "seed: 2\n",
        "conf/base/nested/local/kept.yml": "only conf/local itself is left out\n",
        "conf/local/credentials.yml": "password: secret\n",
        "conf/local/.gitkeep": "",
        "src/p/__init__.py": "",
        "data/01_raw/scan.nii.gz": "raw",
        "data/06_models/model.keras": "weights",
        "mlflow.db": "runs",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_copy_has_conf_without_local_contents_and_the_data_skeleton(source: Path, tmp_path: Path) -> None:
    before = _tree(source)
    copy = copy_project(source, tmp_path / "copies" / "project")

    assert copy == (tmp_path / "copies" / "project").resolve()
    assert _tree(source) == before  # nothing in the source changed
    tree = _tree(copy)
    assert {name: tree[name] for name in tree if name.startswith("conf/") and tree[name] is not None} == {
        "conf/base/parameters.yml": b"seed: 1\n",
        "conf/smoke/parameters.yml": b"seed: 2\n",
        "conf/base/nested/local/kept.yml": b"only conf/local itself is left out\n",
    }
    assert (copy / "conf" / "local").is_dir() and not any((copy / "conf" / "local").iterdir())
    assert tree["pyproject.toml"] == before["pyproject.toml"] and tree[".telemetry"] == before[".telemetry"]
    assert (copy / "src").is_dir() and not any((copy / "src").iterdir())
    assert sorted(p.name for p in (copy / "data").iterdir()) == list(DATA_LAYERS)
    assert all(not any((copy / "data" / layer).iterdir()) for layer in DATA_LAYERS)
    assert not (copy / "mlflow.db").exists()


def test_optional_files_are_skipped_and_an_existing_conf_is_refused(source: Path, tmp_path: Path) -> None:
    (source / ".telemetry").unlink()
    copy = copy_project(source, tmp_path / "project")
    assert not (copy / ".telemetry").exists() and (copy / "pyproject.toml").is_file()
    with pytest.raises(FileExistsError):
        copy_project(source, copy)


def test_copy_of_this_checkout_reads_as_the_project(tmp_path: Path) -> None:
    """The real ``conf/``: every environment is there, and so is the ``[tool.kedro]`` table."""
    copy = copy_project(REPO_ROOT, tmp_path / "pancreas_seg")
    environments = sorted(p.name for p in (REPO_ROOT / "conf").iterdir() if p.is_dir())
    assert sorted(p.name for p in (copy / "conf").iterdir() if p.is_dir()) == environments
    catalog = Path("conf") / "base" / "catalog.yml"
    assert (copy / catalog).read_bytes() == (REPO_ROOT / catalog).read_bytes()
    assert not any((copy / "conf" / "local").iterdir())
    assert tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["kedro"]["package_name"] == "pancreas_seg"


@pytest.mark.subprocess
def test_a_process_in_a_copy_runs_this_checkouts_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``subprocess_env``: no telemetry, no inherited ``MLFLOW_TRACKING_URI``, this checkout's ``src/``
    first on ``PYTHONPATH``; ``extra`` wins."""
    assert CHECKOUT == REPO_ROOT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = subprocess_env(COLUMNS="240")
    assert "MLFLOW_TRACKING_URI" not in env and env["COLUMNS"] == "240"
    assert KEDRO_ENV_VARS.items() <= env.items()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT / "src"), "/elsewhere"]
    assert subprocess_env(MLFLOW_TRACKING_URI="sqlite:////x.db")["MLFLOW_TRACKING_URI"] == "sqlite:////x.db"
    copy = copy_project(CHECKOUT, tmp_path / "project")
    completed = subprocess.run([sys.executable, "-c", "import pancreas_seg; print(pancreas_seg.__file__)"],
                               cwd=copy, env=env, capture_output=True, text=True, check=True)
    assert completed.stdout.strip().startswith(str(REPO_ROOT / "src"))
