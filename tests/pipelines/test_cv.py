"""Cross-validation end to end (``--env smoke``, 2 folds), each pipeline a NEW process after the others:
``cv`` (all four architectures and the cascade) after ``train``, then ``evaluation``, then inference
with a fold ensemble and with the registry's ``champion``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.evaluation.statistics import bootstrap_mean_ci

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cv_project(smoke_project: Path, tmp_path_factory: pytest.TempPathFactory, kedro_cli_runner) -> Path:
    project = tmp_path_factory.mktemp("cv") / "pancreas_seg"
    shutil.copytree(smoke_project, project, ignore=shutil.ignore_patterns("mlruns", "notebooks"))
    kedro_cli_runner(project, "--pipelines=cv")
    return project


def _development(manifest: pd.DataFrame) -> set[str]:
    return set(manifest.loc[manifest["split"].isin(["train", "validation"]), "case_id"])


def test_fold_models_partition_the_development_cases(cv_project: Path, smoke_project: Path) -> None:
    manifest = pd.read_csv(cv_project / "data" / "03_primary" / "case_manifest.csv")
    before = pd.read_csv(smoke_project / "data" / "03_primary" / "case_manifest.csv")
    assert manifest.set_index("case_id")["split"].equals(before.set_index("case_id")["split"])   # nothing moved
    development, test = _development(manifest), set(manifest.loc[manifest["split"] == "test", "case_id"])
    assert sorted(set(manifest.loc[manifest["case_id"].isin(development), "fold"])) == [0, 1]
    cards_dir = cv_project / "data" / "06_models" / "unet" / "folds" / "cards"
    cards = [json.loads((cards_dir / f"fold{k}.json").read_text()) for k in (0, 1)]
    assert [c["fold"] for c in cards] == [0, 1] and {c["n_folds"] for c in cards} == {2}
    validation = [set(c["cases"]["validation"]) for c in cards]
    assert not validation[0] & validation[1] and validation[0] | validation[1] == development
    for card, held_out in zip(cards, validation, strict=True):
        assert set(card["cases"]["train"]) == development - held_out
        assert not (set(card["cases"]["train"]) | held_out) & test
        fold_cases = set(manifest.loc[manifest["fold"] == card["fold"], "case_id"])
        assert held_out == fold_cases
    assert (cv_project / "data" / "06_models" / "unet" / "folds" / "models" / "fold1.keras").is_file()


def test_out_of_fold_and_test_scores(cv_project: Path) -> None:
    manifest = pd.read_csv(cv_project / "data" / "03_primary" / "case_manifest.csv")
    report = cv_project / "data" / "08_reporting" / "cv"
    oof = pd.read_csv(report / "unet" / "metrics_per_case.csv")
    for class_name, frame in oof.groupby("class"):
        assert sorted(frame["case_id"]) == sorted(_development(manifest)), class_name   # each case once
    fold_of = manifest.set_index("case_id")["fold"]
    assert (oof["fold"] == oof["case_id"].map(fold_of)).all()
    assert {"hd95_surfel_mm", "nsd_surfel"} <= set(oof.columns)
    out_of_fold = cv_project / "data" / "07_model_output" / "cv" / "unet" / "out_of_fold"
    assert len([p for p in out_of_fold.glob("*.nii.gz") if not p.name.endswith("_tumour_probability.nii.gz")]) \
        == len(_development(manifest))
    # detection out of fold (issue 26): each case's probability map, its patient score, the pooled summary
    assert len(list(out_of_fold.glob("*_tumour_probability.nii.gz"))) == len(_development(manifest))
    assert oof.loc[oof["class"] == "tumour", "patient_tumour_score"].between(0.0, 1.0).all()

    test = pd.read_csv(report / "unet" / "test_metrics_per_case.csv")
    test_cases = sorted(manifest.loc[manifest["split"] == "test", "case_id"])
    assert set(test["architecture"]) == {"unet.fold0", "unet.fold1", "unet.ensemble"}
    for _, frame in test.groupby("architecture"):
        assert sorted(frame.loc[frame["class"] == "pancreas", "case_id"]) == test_cases

    summary = json.loads((report / "unet" / "summary.json").read_text())
    pancreas = test[test["class"] == "pancreas"].groupby("architecture")["dice"].mean()
    versus = summary["ensemble_vs_folds"]["pancreas"]
    assert versus["ensemble_dice"] == pytest.approx(pancreas["unet.ensemble"])
    assert versus["fold_mean_dice"] == pytest.approx((pancreas["unet.fold0"] + pancreas["unet.fold1"]) / 2)
    assert versus["ensemble_at_least_fold_mean"] == bool(versus["ensemble_dice"] >= versus["fold_mean_dice"])
    oof_pancreas = oof[oof["class"] == "pancreas"]
    assert summary["cv"]["classes"]["pancreas"]["dice"]["mean"] == pytest.approx(oof_pancreas["dice"].mean())
    assert summary["cv"]["n_cases"] == len(_development(manifest))
    comparison = pd.read_csv(report / "cv_comparison.csv")
    assert set(comparison["architecture"]) == {"unet", "unet_small", "fcn", "vnet2d", "cascade"}
    # the CI of each mean is the bootstrap of its own out-of-fold cases (the statistics settings)
    unet_pancreas = comparison[(comparison["architecture"] == "unet") & (comparison["class"] == "pancreas")].iloc[0]
    assert (unet_pancreas["cv_dice_ci_low"], unet_pancreas["cv_dice_ci_high"]) == pytest.approx(
        bootstrap_mean_ci(oof_pancreas["dice"].dropna().to_numpy(), 10000, 0.95, 0))
    assert (comparison["cv_dice_ci_low"] <= comparison["cv_dice_mean"] + 1e-12).all()
    paired = pd.read_csv(report / "paired_comparison.csv")
    pancreas_pairs = paired[(paired["metric"] == "dice") & (paired["class"] == "pancreas")]
    assert len(pancreas_pairs) == 10 and (pancreas_pairs["n_cases"] == len(_development(manifest))).all()
    assert (report / "paired_comparison.png").is_file()
    assert summary["cv"]["detection"]["tumour"]["patient"]["n_patients"] == len(_development(manifest))
    tumour_rows = comparison[comparison["class"] == "tumour"]
    assert {"cv_auroc", "cv_auroc_ci_low", "cv_ap", "cv_froc_cpm"} <= set(comparison.columns)
    assert (tumour_rows["cv_n_patients_with_tumour"] >= 0).all()
    assert comparison.loc[comparison["class"] == "pancreas", "cv_froc_cpm"].isna().all()
    assert "### Tumour detection, out of fold" in (report / "cv_comparison.md").read_text()
    assert (report / "froc.png").is_file()


def test_mlflow_has_nested_fold_runs_and_the_registered_champion(cv_project: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cv_project / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{cv_project / 'mlflow.db'}")
    selection = json.loads((cv_project / "data" / "08_reporting" / "cv" / "selection.json").read_text())
    comparison = pd.read_csv(cv_project / "data" / "08_reporting" / "cv" / "cv_comparison.csv")
    scores = comparison.groupby("architecture")["cv_dice_mean"].mean().sort_index()   # over pancreas, tumour
    assert selection["architecture"] == scores.idxmax() and selection["score"] == pytest.approx(scores.max())
    assert selection["selected"] == f"{scores.idxmax()}.ensemble" and selection["alias"] == "champion"
    assert [r["configuration"] for r in selection["ranking"]] == [f"{a}.ensemble" for a in scores.sort_values(ascending=False, kind="stable").index]
    unet_run = comparison.loc[comparison["architecture"] == "unet", "mlflow_run_id"].iloc[0]
    cv_run = client.get_run(unet_run)
    assert cv_run.info.run_name == "unet.cv" and cv_run.data.tags["n_folds"] == "2"
    assert "cv_dice_pancreas_mean" in cv_run.data.metrics and "test_ensemble_dice_pancreas_mean" in cv_run.data.metrics
    children = client.search_runs([cv_run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{cv_run.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["unet.fold0", "unet.fold1"]
    for child in children:
        assert child.data.tags["fold"] in {"0", "1"} and "val_dice_pancreas" in child.data.metrics
    version = client.get_model_version_by_alias("pancreas_seg", "champion")
    assert version.run_id == selection["cv_run_id"] and version.tags["architecture"] == selection["architecture"]
    assert str(version.version) == selection["version"]
    # chosen on the out-of-fold Dice of the development cases, which its tags name
    assert version.tags["selection_score"] == selection["score_name"] == "cv_dice_pancreas_tumour_mean"
    assert version.tags["selection_cases"] == ",".join(sorted(_development(pd.read_csv(
        cv_project / "data" / "03_primary" / "case_manifest.csv")))) and version.tags["selection_split"] == "cv"
    versions = client.search_model_versions("name = 'pancreas_seg'")
    from_cv = sorted(v.tags["architecture"] for v in versions if v.tags.get("source") == "cv")
    assert from_cv == ["cascade", "fcn", "unet", "unet_small", "vnet2d"]
    assert {v.tags.get("source") for v in versions} == {"cv", "train"}      # train registered its models first


def test_the_cascade_is_cross_validated_on_out_of_fold_stage1_predictions(cv_project: Path) -> None:
    """Stage 2 of fold k trained on crops placed by stage-1 fold models that held those cases out;
    the cascade's out-of-fold cases and its fold ensemble scored like every architecture's."""
    manifest = pd.read_csv(cv_project / "data" / "03_primary" / "case_manifest.csv")
    fold_of = manifest.set_index("case_id")["fold"].to_dict()
    development = _development(manifest)
    models = cv_project / "data" / "06_models"
    stage1 = {k: json.loads((models / "unet" / "folds" / "cards" / f"fold{k}.json").read_text()) for k in (0, 1)}
    cascades = {k: json.loads((models / "cascade" / "folds" / "cards" / f"fold{k}.json").read_text()) for k in (0, 1)}
    index = json.loads((cv_project / "data" / "04_feature" / "cascade_cv_crop_index.json").read_text())
    assert set(index) <= development and len(index) >= len(development) - 1   # a missed case has no crop
    for case_id, record in index.items():
        assert record["source"] == "out_of_fold" and record["stage1_fold"] == fold_of[case_id]
        placed_by = stage1[record["stage1_fold"]]
        assert case_id in placed_by["cases"]["validation"] and case_id not in placed_by["cases"]["train"]
        assert record["stage1_weights_sha256"] == placed_by["weights_sha256"]
    for k, card in cascades.items():
        assert card["fold"] == k and card["cascade"]["stage1"]["fold"] == k
        assert card["cascade"]["stage1"]["weights_sha256"] == stage1[k]["weights_sha256"]
        assert card["cascade"]["stage2_crops"] == "out_of_fold"
        assert set(card["cases"]["train"]) == development - {c for c in development if fold_of[c] == k}
        # every training crop of fold k's stage 2 was placed by another fold's stage 1, which never trained on it
        for case_id in set(card["cases"]["train"]) & set(index):
            assert index[case_id]["stage1_fold"] != k
            assert case_id not in stage1[index[case_id]["stage1_fold"]]["cases"]["train"]
    report = cv_project / "data" / "08_reporting" / "cv" / "cascade"
    oof = pd.read_csv(report / "metrics_per_case.csv")
    assert sorted(oof.loc[oof["class"] == "pancreas", "case_id"]) == sorted(development)
    assert (oof["fold"] == oof["case_id"].map(fold_of)).all() and set(oof["architecture"]) == {"cascade"}
    test = pd.read_csv(report / "test_metrics_per_case.csv")
    assert set(test["architecture"]) == {"cascade.fold0", "cascade.fold1", "cascade.ensemble"}
    located = json.loads((report / "stage1_out_of_fold.json").read_text())
    assert set(located["cases"]) == development and located["summary"]["n_cases"] >= 1


def test_evaluation_then_ensemble_and_champion_inference_in_new_processes(cv_project: Path, kedro_cli_runner) -> None:
    kedro_cli_runner(cv_project, "--pipelines=evaluation")           # the trained models still bind
    selected = json.loads((cv_project / "data" / "08_reporting" / "cv" / "selection.json").read_text())["selected"]
    outputs = {}
    for name, reference in (("ensemble", selected), ("champion", "models:/pancreas_seg@champion")):
        out = cv_project / "data" / "07_model_output" / f"inference_{name}"
        kedro_cli_runner(cv_project, "--pipelines=inference", "--params",
                         f"inference.model={reference},inference.output_dir={out.relative_to(cv_project)}")
        outputs[name] = out
        report = json.loads((cv_project / "data" / "08_reporting" / "inference_report.json").read_text())
        assert report["architecture"] == selected and len(report["model_file"]) == 2
    masks = sorted(outputs["ensemble"].glob("*.nii.gz"))
    assert masks
    for mask in masks:
        ensemble, champion = nib.load(mask), nib.load(outputs["champion"] / mask.name)
        assert np.array_equal(np.asarray(ensemble.dataobj), np.asarray(champion.dataobj))
        assert np.allclose(ensemble.affine, champion.affine)
    if selected != "cascade.ensemble":   # the cascade's fold ensemble: tests/cascade/test_out_of_fold.py
        _check_ensemble_is_mean_softmax(cv_project, outputs["ensemble"], selected.removesuffix(".ensemble"))


def _check_ensemble_is_mean_softmax(cv_project: Path, output_dir: Path, architecture: str) -> None:
    """Recompute one scan's ensemble from the two fold models and compare with inference's output."""
    from pancreas_seg.imaging.nifti_io import load_nifti  # noqa: PLC0415
    from pancreas_seg.imaging.preprocess import (  # noqa: PLC0415
        PreprocessingConfig,
        intensity_stats_from_dict,
        preprocess_image,
    )
    from pancreas_seg.models.io import load_model  # noqa: PLC0415
    from pancreas_seg.inference.forward import predict_slices, to_file_grid  # noqa: PLC0415

    folds = cv_project / "data" / "06_models" / architecture / "folds"
    card = json.loads((folds / "cards" / "fold0.json").read_text())
    config = PreprocessingConfig.from_params(card["preprocessing"])
    scan = sorted((cv_project / "data" / "01_raw" / "Task07_Pancreas_smoke" / "imagesTs").glob("*.nii.gz"))[0]
    ct = load_nifti(scan)
    image, geometry = preprocess_image(ct.array, ct.affine, config, intensity_stats_from_dict(card["intensity_stats"]))
    probabilities = [predict_slices(load_model(folds / "models" / f"fold{k}.keras", compile=False), image,
                                    config.context_slices, batch_size=4) for k in (0, 1)]
    expected = to_file_grid((probabilities[0] + probabilities[1]) / 2, geometry, config.label_mode)
    inferred = output_dir / scan.name
    assert np.array_equal(np.asarray(nib.load(inferred).dataobj), expected)
