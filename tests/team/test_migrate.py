"""``pancreas_seg.tracking.migrate`` between two real sqlite stores, in this process (fast tier; the
copy into the PostgreSQL-backed server after a real smoke train is in test_team_heavy.py): nested
runs with params, full metric histories and artifacts, a logged model, a registered version with
its alias; a second call copies nothing."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.logged_model_output import LoggedModelOutput

from pancreas_seg.tracking.migrate import MIGRATED_TAG, migrate
from tests.team.team_support import through


def _source(folder: Path) -> tuple[str, dict[str, str]]:
    uri = f"sqlite:///{folder / 'src.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("exp", artifact_location=str(folder / "src_artifacts"),
                                          tags={"mlflow.experimentKind": "custom_model_development"})
    parent = client.create_run(experiment, run_name="train", start_time=1_000)
    client.log_batch(parent.info.run_id, params=[Param("training.epochs", "2")])
    child = client.create_run(experiment, run_name="unet", tags={"mlflow.parentRunId": parent.info.run_id,
                                                                  "architecture": "unet"})
    child_id = child.info.run_id
    client.log_batch(child_id, metrics=[Metric("val_dice", v, 5_000 + step, step) for step, v in
                                        ((1, 0.2), (2, 0.4), (2, 0.45))])   # two values at step 2
    client.log_dict(child_id, {"card": 1}, "model_card.json")
    model_dir = folder / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    model = client.create_logged_model(experiment, name="segmenter", source_run_id=child_id, params={"a": "1"})
    client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(child_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_terminated(child_id, end_time=9_000)
    client.set_terminated(parent.info.run_id, status="FAILED", end_time=9_500)
    with through(uri):
        client.create_registered_model("pancreas_seg")
        version = client.create_model_version("pancreas_seg", f"models:/{model.model_id}", run_id=child_id,
                                              tags={"selection_score": "0.5"}, model_id=model.model_id)
        client.set_registered_model_alias("pancreas_seg", "champion", version.version)
    return uri, {"parent": parent.info.run_id, "child": child_id, "model": model.model_id}


def test_migrate_copies_runs_histories_artifacts_models_and_aliases(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)   # a sqlite destination's new experiment keeps its artifacts in ./mlruns
    source_uri, ids = _source(tmp_path)
    target_uri = f"sqlite:///{tmp_path / 'dst.db'}"
    with through(target_uri):
        report = migrate(source_uri, target_uri, experiments=["exp"])
    assert (report.runs, report.metric_steps, report.logged_models, report.model_versions, report.aliases) == \
        (2, 3, 1, 1, 1)
    target = MlflowClient(tracking_uri=target_uri, registry_uri=target_uri)
    runs = {r.data.tags[MIGRATED_TAG]: r for r in target.search_runs(
        [target.get_experiment_by_name("exp").experiment_id])}
    parent, child = runs[ids["parent"]], runs[ids["child"]]
    assert (parent.info.status, parent.info.start_time, parent.info.end_time) == ("FAILED", 1_000, 9_500)
    assert parent.data.params == {"training.epochs": "2"}
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    history = sorted((m.step, m.timestamp, m.value) for m in target.get_metric_history(child.info.run_id, "val_dice"))
    assert history == [(1, 5_001, 0.2), (2, 5_002, 0.4), (2, 5_002, 0.45)]
    card = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="model_card.json",
                                               tracking_uri=target_uri, dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(card).read_text()) == {"card": 1}
    assert target.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"
    champion = target.get_model_version_by_alias("pancreas_seg", "champion")
    assert champion.run_id == child.info.run_id and champion.tags["selection_score"] == "0.5"
    copied_model = champion.source.removeprefix("models:/")
    assert copied_model != ids["model"] and target.get_logged_model(copied_model).tags[MIGRATED_TAG] == ids["model"]
    assert [o.model_id for o in child.outputs.model_outputs] == [copied_model]
    assert {f.path for f in target.list_logged_model_artifacts(copied_model)} == {"MLmodel"}

    with through(target_uri):
        again = migrate(source_uri, target_uri, experiments=["exp"])
    assert (again.runs, again.runs_skipped, again.model_versions) == (0, 2, 0)
    assert len(target.search_model_versions("name = 'pancreas_seg'")) == 1

    # the lab's own champion (another version) is kept unless asked
    with through(target_uri):
        lab = target.create_model_version("pancreas_seg", champion.source, run_id=champion.run_id)
        target.set_registered_model_alias("pancreas_seg", "champion", lab.version)
        kept = migrate(source_uri, target_uri, experiments=["exp"])
        assert (kept.aliases, kept.aliases_kept) == (0, 1)
        assert target.get_model_version_by_alias("pancreas_seg", "champion").version == lab.version
        moved = migrate(source_uri, target_uri, experiments=["exp"], overwrite_aliases=True)
    assert (moved.aliases, moved.aliases_kept) == (1, 0)
    assert target.get_model_version_by_alias("pancreas_seg", "champion").version == champion.version
