"""End-to-end ``kedro run --pipelines=train --env smoke``, started as a new process (conftest).

Checks what one run leaves behind: the sqlite MLflow store (one parent run, one nested run per
architecture with params, per-epoch metrics, validation/test metrics, tags and artifacts), the
held-out test predictions in each raw file's geometry, and the evaluation reports. Finally a
``--namespaces=unet`` re-run (second in-process session, on a copy of the project) runs the unet
nodes only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.models.names import MODEL_NAMES

pytestmark = pytest.mark.slow

ARCHITECTURES = MODEL_NAMES   # the four architectures and the cascade
EXPERIMENT = "pancreas_seg_smoke"
EPOCH_METRICS = ("loss", "val_loss", "dice_pancreas", "val_dice_pancreas", "val_dice_tumour",
                 "optimizer_step", "training_seconds")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _runs(client: mlflow.MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"experiment {EXPERIMENT!r} missing from the sqlite store"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _train_parents(runs: list) -> list:
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "train"]


def _nested(runs: list, parent_id: str) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, f"{path} is not a non-empty PNG"


def _model_versions(project: Path, arch: str) -> set[str]:
    return {p.name for p in (project / "data" / "06_models" / arch / "model.keras").iterdir()}


def test_mlflow_parent_and_nested_runs(configured_learning_rates: dict[str, float], smoke_project: Path,
                                       model_card_reader) -> None:
    client = _client(smoke_project)
    runs = _runs(client)
    parents = _train_parents(runs)
    assert len(parents) == 1, f"expected one parent run for train, got {[r.info.run_id for r in parents]}"
    parent = parents[0]
    assert "train" in parent.data.tags.get("pipeline_names", ""), parent.data.tags
    # KILLED: the run was still active after KedroSession.run returned (see conftest.inside_project);
    # kedro-mlflow re-enters its run in before_node_run, nested on top of itself when mlflow.yml
    # has tracking.run.nested: True, and after_pipeline_run closes only one level
    assert parent.info.status == "FINISHED", \
        f"train parent run is {parent.info.status}: left active after the session (mlflow.yml tracking.run.nested?)"

    # the learning curves of every model in one figure, an artifact of the parent run
    parent_artifacts = _artifact_paths(client, parent.info.run_id)
    assert "plots/learning_curves.png" in parent_artifacts, sorted(parent_artifacts)
    curves = Path(client.download_artifacts(parent.info.run_id, "plots/learning_curves.png"))
    _assert_png(curves)

    nested = _nested(runs, parent.info.run_id)
    by_arch = {r.data.tags.get("architecture"): r for r in nested}
    assert len(nested) == len(ARCHITECTURES) and set(by_arch) == set(ARCHITECTURES), \
        f"nested runs: {[(r.info.run_name, r.data.tags.get('architecture')) for r in nested]}"
    # equal budgets: every model, the cascade's stage 2 included, took the same optimizer steps
    final_steps = {arch: client.get_metric_history(run.info.run_id, "optimizer_step")[-1].value
                   for arch, run in by_arch.items()}
    assert set(final_steps.values()) == {2.0}, final_steps   # conf/smoke: 1 epoch x 2 steps

    for arch, run in by_arch.items():
        run_id = run.info.run_id
        assert run.info.status == "FINISHED", (arch, run.info.status)
        assert run.info.run_name == arch
        # params: flattened training settings (with the per-architecture overrides merged in)
        assert float(run.data.params["training.learning_rate"]) == pytest.approx(configured_learning_rates[arch])
        assert run.data.params["architecture"] == arch
        assert run.data.params["training.epochs"] == "1"  # conf/smoke
        # tags
        tags = run.data.tags
        assert tags["data_source"] == "synthetic"
        assert tags["keras_backend"] in {"tensorflow", "jax", "torch"}
        assert tags["git_commit"]  # a commit hash, or "unknown" outside a git checkout (this copy)
        # per-epoch history: one point per completed epoch, steps 1..n
        card = model_card_reader(smoke_project, arch)
        assert card["mlflow_run_id"] == run_id
        epochs = card["epochs_completed"]
        assert epochs >= 1
        for key in EPOCH_METRICS:
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (arch, key, history)
            assert all(np.isfinite(m.value) for m in history), (arch, key)
        for key in ("dice_pancreas", "val_dice_pancreas", "val_dice_tumour"):
            assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run_id, key)), (arch, key)
        # final validation Dice (validate_model) and held-out test metrics (summarise_model)
        metrics = run.data.metrics
        assert 0.0 <= metrics["final_val_dice_pancreas"] <= 1.0, arch
        assert "final_val_dice_tumour" in metrics, arch
        assert 0.0 <= metrics["test_dice_pancreas_mean"] <= 1.0, arch
        assert "test_nsd_pancreas_mean" in metrics, arch
        # lesion counts are always defined (sensitivity only when a test case has a tumour)
        assert metrics["test_lesions_true_tumour"] >= metrics["test_lesions_found_tumour"] >= 0, arch
        assert metrics["test_fp_components_per_case_tumour"] >= 0, arch
        assert 0.0 <= metrics["test_tumour_froc_cpm"] <= 1.0 or "test_tumour_froc_cpm" not in metrics, arch
        assert metrics["test_tumour_n_patients_with_tumour"] >= 0, arch   # detection is logged (NaN values are not)
        # artifacts, stored inside the project copy (sqlite store + local ./mlruns artifact root)
        artifacts = _artifact_paths(client, run_id)
        for expected in ("plots/training_curves.png", "model_card.json",
                         "training_history.json", "evaluation/summary.json"):
            assert expected in artifacts, (arch, expected, sorted(artifacts))
        assert run.info.artifact_uri.startswith(str(smoke_project)), run.info.artifact_uri
        logged_card = json.loads(Path(client.download_artifacts(run_id, "model_card.json")).read_text())
        assert logged_card["architecture"] == arch and logged_card["mlflow_run_id"] == run_id
        # the run's MLflow model: the pyfunc "segmenter" with a bundle of this model and its card
        assert len(run.outputs.model_outputs) == 1, arch
        logged_model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
        assert logged_model.name == "segmenter" and logged_model.source_run_id == run_id, arch
        logged = Path(logged_model.artifact_location.removeprefix("file://"))
        bundle = json.loads((logged / "artifacts" / "bundle" / "bundle.json").read_text())
        member_card = json.loads((logged / "artifacts" / "bundle" / bundle["members"][0]["card"]).read_text())
        assert member_card["weights_sha256"] == logged_card["weights_sha256"] == card["weights_sha256"], arch
        assert (logged / "MLmodel").is_file(), arch


def test_test_predictions_keep_raw_geometry(smoke_project: Path) -> None:
    manifest = pd.read_csv(smoke_project / "data" / "03_primary" / "case_manifest.csv")
    test_cases = manifest[manifest["split"] == "test"]
    assert len(test_cases) >= 1
    for arch in ARCHITECTURES:
        folder = smoke_project / "data" / "07_model_output" / arch
        labels_files = [p.name for p in folder.glob("*.nii.gz") if not p.name.endswith("_tumour_probability.nii.gz")]
        assert sorted(labels_files) == sorted(f"{c}.nii.gz" for c in test_cases["case_id"])
        # every smoke model has a tumour output: its probability map lies next to each label map
        assert sorted(p.name for p in folder.glob("*_tumour_probability.nii.gz")) == sorted(
            f"{c}_tumour_probability.nii.gz" for c in test_cases["case_id"])
        for case in test_cases.itertuples():
            raw = nib.load(case.image_path)
            prediction = nib.load(folder / f"{case.case_id}.nii.gz")
            assert prediction.shape == raw.shape, (arch, case.case_id)
            assert np.array_equal(prediction.affine, raw.affine), (arch, case.case_id)
            assert nib.aff2axcodes(prediction.affine) == nib.aff2axcodes(raw.affine)
            labels = np.asanyarray(prediction.dataobj)
            assert np.issubdtype(labels.dtype, np.integer)
            assert set(np.unique(labels)) <= {0, 1, 2}
            probability = nib.load(folder / f"{case.case_id}_tumour_probability.nii.gz")
            assert probability.shape == raw.shape and np.array_equal(probability.affine, raw.affine)
            values = probability.get_fdata()
            assert 0.0 <= values.min() and values.max() <= 1.0


def test_evaluation_reports(smoke_project: Path) -> None:
    reporting = smoke_project / "data" / "08_reporting"
    manifest = pd.read_csv(smoke_project / "data" / "03_primary" / "case_manifest.csv")
    test_ids = set(manifest.loc[manifest["split"] == "test", "case_id"])

    per_case = pd.read_csv(reporting / "evaluation" / "metrics_per_case.csv")
    assert {"case_id", "architecture", "class", "dice", "hd95_mm", "nsd"} <= set(per_case.columns)
    assert set(per_case["class"]) == {"pancreas", "tumour"}
    assert set(per_case["architecture"]) == set(ARCHITECTURES)
    assert set(per_case["case_id"]) == test_ids
    assert len(per_case) == len(ARCHITECTURES) * 2 * len(test_ids)
    dice = per_case["dice"].dropna()
    assert ((dice >= 0) & (dice <= 1)).all()
    # truth_present agrees with the manifest's tumour voxel counts; lesion columns on tumour rows only
    tumour = per_case[per_case["class"] == "tumour"]
    has_tumour = manifest.set_index("case_id")["voxels_tumour"].gt(0)
    assert (tumour["truth_present"] == tumour["case_id"].map(has_tumour)).all()
    assert (tumour["truth_present"] == (tumour["lesions_true"] > 0)).all()
    assert (tumour["lesions_found"] <= tumour["lesions_true"]).all() and (tumour["fp_components"] >= 0).all()
    lesion_columns = ["lesions_true", "lesions_found", "lesions_predicted", "fp_components", "lesion_sensitivity"]
    assert per_case.loc[per_case["class"] == "pancreas", lesion_columns].isna().all().all()
    # detection (issue 26): a patient score on every tumour row, in [0, 1]; nothing on pancreas rows
    assert tumour["patient_tumour_score"].between(0.0, 1.0).all()
    assert per_case.loc[per_case["class"] == "pancreas", "patient_tumour_score"].isna().all()

    comparison = pd.read_csv(reporting / "evaluation" / "model_comparison.csv")
    assert set(comparison["architecture"]) == set(ARCHITECTURES)
    assert {"dice_mean", "hd95_mm_mean", "nsd_mean"} <= set(comparison.columns)
    assert {"dice_truth_present_mean", "lesion_sensitivity", "fp_components_per_case"} <= set(comparison.columns)
    assert comparison.loc[comparison["class"] == "tumour", "fp_components_per_case"].notna().all()
    markdown = (reporting / "evaluation" / "model_comparison.md").read_text()
    assert markdown.startswith("| architecture |")
    assert "| lesion sensitivity (found/true) | FP components / case |" in markdown.splitlines()[0]
    assert all(f"| {arch} |" in markdown for arch in ARCHITECTURES)
    detection_columns = {"auroc", "auroc_ci_low", "auroc_ci_high", "ap", "froc_cpm", "froc_sensitivity_at_1_fp",
                         "sensitivity_lt10mm", "sensitivity_10to20mm", "sensitivity_gt20mm"}
    assert detection_columns <= set(comparison.columns)
    tumour_rows = comparison[comparison["class"] == "tumour"]
    assert (tumour_rows["n_patients_with_tumour"] == tumour["truth_present"].sum() / len(ARCHITECTURES)).all()
    assert "### Tumour detection" in markdown and "FROC CPM" in markdown

    for name in ("dice_boxplots.png", "test_overlays.png", "froc.png"):
        _assert_png(reporting / "evaluation" / name)
    _assert_png(reporting / "training" / "learning_curves.png")
    for arch in ARCHITECTURES:
        _assert_png(reporting / "training" / f"{arch}_training_curves.png")
        summary = json.loads((reporting / "evaluation" / arch / "summary.json").read_text())
        assert summary["architecture"] == arch and summary["n_cases"] == len(test_ids)
        detection = summary["detection"]["tumour"]
        assert detection["available"] and detection["patient"]["n_patients"] == len(test_ids)
        assert len(detection["froc"]["sensitivity_at_rates"]) == 7 and len(detection["size_sensitivity"]) == 3
        scores = tumour[tumour["architecture"] == arch]
        if scores["truth_present"].nunique() == 2:   # both classes among the test cases: AUROC is defined
            from sklearn.metrics import roc_auc_score  # noqa: PLC0415

            assert detection["patient"]["auroc"] == pytest.approx(
                roc_auc_score(scores["truth_present"].astype(bool), scores["patient_tumour_score"]))


def test_champion_is_chosen_on_3d_validation_dice(smoke_project: Path) -> None:
    """Every model, the cascade included, was scored in 3D on the manifest's validation cases; the
    registry's versions carry the score's name and those cases, and ``champion`` is the best."""
    manifest = pd.read_csv(smoke_project / "data" / "03_primary" / "case_manifest.csv")
    validation = sorted(manifest.loc[manifest["split"] == "validation", "case_id"])
    assert validation and not set(validation) & set(manifest.loc[manifest["split"] == "test", "case_id"])
    reporting = smoke_project / "data" / "08_reporting" / "training"
    means = {}
    for arch in ARCHITECTURES:
        scores = pd.read_csv(reporting / f"{arch}_validation_metrics_per_case.csv")
        assert sorted(scores["case_id"].unique()) == validation and set(scores["architecture"]) == {arch}
        means[arch] = scores.loc[scores["class"] == "pancreas", "dice"].mean()
    best = sorted(means, key=lambda a: (-means[a], a))[0]   # ties: the alphabetically first
    registration = json.loads((reporting / "model_registration.json").read_text())
    assert registration["champion"] == best and registration["cases"] == validation
    uri = f"sqlite:///{smoke_project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = [v for v in client.search_model_versions("name = 'pancreas_seg'") if v.tags.get("source") == "train"]
    assert sorted(v.tags["architecture"] for v in versions) == sorted(ARCHITECTURES)
    for version in versions:
        assert version.tags["selection_score"] == "validation_dice_pancreas_mean"
        assert version.tags["selection_cases"] == ",".join(validation), version.tags
        assert float(version.tags["selection_score_value"]) == pytest.approx(means[version.tags["architecture"]],
                                                                             abs=1e-4)
    champion = client.get_model_version_by_alias("pancreas_seg", "champion")
    assert champion.tags["architecture"] == best


def test_namespace_rerun_trains_only_unet(smoke_project: Path, tmp_path: Path, kedro_session_runner,
                                         model_card_reader) -> None:
    """``kedro run --pipeline=train --namespaces=unet --env smoke`` as a second in-process session.

    Runs on a copy of the trained project so the shared fixture keeps exactly one train run (the
    copied store's experiment still stores new artifacts under the original copy's ``mlruns/``).
    """
    project = tmp_path / "pancreas_seg"
    shutil.copytree(smoke_project, project, ignore=shutil.ignore_patterns("mlruns", "build", "notebooks"))
    client = _client(project)
    before = {r.info.run_id for r in _runs(client)}
    versions_before = {arch: _model_versions(project, arch) for arch in ARCHITECTURES}

    kedro_session_runner(project, pipeline_name="train", namespaces=["unet"])

    new_runs = [r for r in _runs(client) if r.info.run_id not in before]
    new_parents = _train_parents(new_runs)
    assert len(new_parents) == 1, [(r.info.run_name, r.data.tags) for r in new_runs]
    new_nested = [r for r in new_runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.data.tags.get("architecture") for r in new_nested] == ["unet"]
    assert new_nested[0].data.tags["mlflow.parentRunId"] == new_parents[0].info.run_id
    assert len(new_runs) == 2  # the parent and unet's nested run, nothing else
    unet_run = new_nested[0]
    assert "final_val_dice_pancreas" in unet_run.data.metrics
    assert "test_dice_pancreas_mean" in unet_run.data.metrics

    versions_after = {arch: _model_versions(project, arch) for arch in ARCHITECTURES}
    assert len(versions_after["unet"] - versions_before["unet"]) == 1
    for arch in ARCHITECTURES[1:]:
        assert versions_after[arch] == versions_before[arch], arch
    card = model_card_reader(project, "unet")
    assert card["mlflow_run_id"] == unet_run.info.run_id
    assert card["version"] in versions_after["unet"] - versions_before["unet"]


def test_cli_rerun_of_one_namespace_resumes_in_a_fresh_process(smoke_project: Path, tmp_path: Path,
                                                              subprocess_env) -> None:
    """``kedro run --pipeline=train --namespaces=unet --env smoke`` from the shell, after training.

    A new process resumes unet from its finished checkpoint (``data/06_models/checkpoints``): the
    checkpoint's custom loss and metrics must be loadable before anything has built a model.

    Kedro 1.7's ``--namespaces=unet`` keeps only the nodes whose namespace is ``unet`` (or starts
    with ``unet.``): the non-namespaced data nodes and the cross-model comparison do not run, and
    the data, the persisted split and the comparison of the first run are used as they are.
    (``--pipelines=train_unet`` would also re-run ingestion, preprocessing and a unet-only comparison.)
    """
    project = tmp_path / "pancreas_seg"
    shutil.copytree(smoke_project, project, ignore=shutil.ignore_patterns("mlruns", "build", "notebooks"))
    client = _client(project)
    before = {r.info.run_id for r in _runs(client)}
    untouched = [project / "data" / "03_primary" / "case_manifest.csv",
                 *(project / "data" / "03_primary" / "splits").glob("*.json"),
                 project / "data" / "08_reporting" / "evaluation" / "model_comparison.csv",
                 project / "data" / "08_reporting" / "evaluation" / "fcn" / "model_check.json"]
    stamps = {path: path.stat().st_mtime_ns for path in untouched}
    assert len(stamps) == 4
    unet_check = project / "data" / "08_reporting" / "evaluation" / "unet" / "model_check.json"
    unet_check.unlink()

    result = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipeline=train", "--namespaces=unet",
                             "--env", "smoke"], check=False, cwd=project, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"kedro run failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"

    new_runs = [r for r in _runs(client) if r.info.run_id not in before]
    nested = [r for r in new_runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.data.tags.get("architecture") for r in nested] == ["unet"]
    assert nested[0].data.tags.get("resumed_from_epoch") == "1"  # all smoke epochs were done already
    assert len(_train_parents(new_runs)) == 1 and len(new_runs) == 2
    assert {path: path.stat().st_mtime_ns for path in untouched} == stamps  # no data or comparison node ran
    assert json.loads(unet_check.read_text())["architecture"] == "unet"  # unet's evaluation did
