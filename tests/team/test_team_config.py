"""conf/team and its composition over another environment, as Kedro loads them (no server, no
database): the tracking URI left to ``MLFLOW_TRACKING_URI``, the study database named by an
environment variable, nothing secret in a committed file; ``tuning.storage``'s forms; the server
command's checks; passwords never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kedro.config import OmegaConfigLoader

from benchmarks.support.project_copy import copy_project
from pancreas_seg.settings import CONFIG_LOADER_ARGS
from pancreas_seg.tracking.postgres import redact
from pancreas_seg.tracking.server import check_backend, server_command
from pancreas_seg.tracking.team_env import compose_environment
from pancreas_seg.tuning.config import TuningConfig
from pancreas_seg.tuning.search_space import SearchSpaceError
from pancreas_seg.tuning.storage import claim_for, describe_storage, is_database_url

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(conf: Path, env: str, key: str) -> dict:
    return OmegaConfigLoader(str(conf), **{**CONFIG_LOADER_ARGS, "default_run_env": env})[key]


def test_the_team_environment_sets_only_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    mlflow_conf = _load(REPO_ROOT / "conf", "team", "mlflow")
    assert mlflow_conf["server"]["mlflow_tracking_uri"] == "http://127.0.0.1:5999"   # from the environment
    assert mlflow_conf["server"]["mlflow_registry_uri"] is None
    assert mlflow_conf["tracking"]["experiment"]["name"] == "pancreas_seg"
    params = _load(REPO_ROOT / "conf", "team", "parameters")
    base = _load(REPO_ROOT / "conf", "base", "parameters")
    assert params["tuning"]["storage"] == "env:PANCREAS_SEG_OPTUNA_STORAGE" and base["tuning"]["storage"] is None
    assert {k: v for k, v in params.items() if k != "tuning"} == {k: v for k, v in base.items() if k != "tuning"}
    # no committed secret: no key names one, no value is a URL, let alone one with credentials
    def leaves(node: object, key: str = "") -> list[tuple[str, object]]:
        if isinstance(node, dict):
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{key}.{k}")]
        return [(key, node)]
    for path in (REPO_ROOT / "conf" / "team").glob("*.yml"):
        for key, value in leaves(yaml.safe_load(path.read_text())):
            assert not any(word in key.lower() for word in ("password", "token", "secret")), (path, key)
            assert "://" not in str(value), (path, key, value)


def test_the_team_environment_without_its_server_stops_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(Exception, match=r"MLFLOW_TRACKING_URI is not set.*tracking server"):
        _load(REPO_ROOT / "conf", "team", "mlflow")


def test_team_over_smoke_is_smoke_tracked_on_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    project = copy_project(REPO_ROOT, tmp_path / "pancreas_seg")
    target = compose_environment(project / "conf", ["smoke", "team"], "team_smoke")
    assert sorted(p.name for p in target.iterdir()) == ["mlflow.yml", "parameters.yml"]
    assert "GENERATED" in (target / "mlflow.yml").read_text()
    params = _load(project / "conf", "team_smoke", "parameters")
    smoke = _load(project / "conf", "smoke", "parameters")
    assert params["tuning"]["storage"] == "env:PANCREAS_SEG_OPTUNA_STORAGE"
    assert {k: v for k, v in params["tuning"].items() if k != "storage"} == \
        {k: v for k, v in smoke["tuning"].items() if k != "storage"}
    assert {k: v for k, v in params.items() if k != "tuning"} == {k: v for k, v in smoke.items() if k != "tuning"}
    mlflow_conf = _load(project / "conf", "team_smoke", "mlflow")
    assert mlflow_conf["server"]["mlflow_tracking_uri"] == "http://127.0.0.1:5999"   # team's, not smoke's sqlite
    assert mlflow_conf["tracking"]["experiment"]["name"] == "pancreas_seg_smoke"   # smoke's
    # later sources win key by key; credentials files are never copied
    (project / "conf" / "team" / "credentials.yml").write_text("secret: {password: x}\n")
    compose_environment(project / "conf", ["smoke", "team"], "team_smoke")
    assert not (target / "credentials.yml").exists()


def test_a_file_of_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "spark.yml").write_text(yaml.safe_dump({"x": 1}))
    with pytest.raises(ValueError, match="spark.yml: not a parameters/mlflow/catalog/dask/globals file"):
        compose_environment(tmp_path, ["a"], "b")


def test_tuning_storage_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _load(REPO_ROOT / "conf", "base", "parameters")["tuning"]
    journal = TuningConfig.from_params(base, "unet")
    assert journal.storage is None and journal.storage_location().endswith("data/06_models/tuning/unet.optuna.log")
    monkeypatch.setenv("LAB_DB", "postgresql+psycopg://lab@db.example:5432/optuna")
    lab = TuningConfig.from_params({**base, "storage": "env:LAB_DB"}, "unet")
    assert lab.storage_location() == "postgresql+psycopg://lab@db.example:5432/optuna"
    with pytest.raises(SearchSpaceError, match="tuning.storage: expected null, a database URL"):
        TuningConfig.from_params({**base, "storage": "data/optuna.db"}, "unet")
    assert is_database_url("sqlite:///x.db") and not is_database_url("/x/unet.optuna.log")
    assert type(claim_for("postgresql+psycopg://u@h/db", "unet")).__name__ == "AdvisoryClaim"
    assert str(claim_for("/x/unet.optuna.log", "unet").path) == "/x/unet.optuna.log.claim.lock"


def test_passwords_are_never_shown() -> None:
    url = "postgresql+psycopg://lab:s3cret@db:5432/mlflow"
    assert redact(url) == describe_storage(url) == "postgresql+psycopg://lab:***@db:5432/mlflow"
    assert redact("postgresql+psycopg://lab@db/mlflow") == "postgresql+psycopg://lab@db/mlflow"
    assert "s3cret" not in (check_backend("postgresql://lab:s3cret@db/mlflow") or "")


def test_the_server_command_binds_loopback_and_proxies_artifacts(tmp_path: Path) -> None:
    command = server_command("postgresql+psycopg://lab@db/mlflow", tmp_path / "art", port=5077)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--serve-artifacts" in command and command[command.index("--artifacts-destination") + 1] == \
        str((tmp_path / "art").resolve())
    assert check_backend("sqlite:///mlflow.db") and check_backend("") and check_backend("postgresql://x/y")
    assert check_backend("postgresql+psycopg://lab@db/mlflow") is None
