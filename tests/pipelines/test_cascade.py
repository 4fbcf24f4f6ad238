"""The cascade end to end (``--env smoke``): what the default ``train`` run leaves for it, and a
stage 2 in the ``tumour`` label mode through training, evaluation and inference, each a new process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

DATASET = "Task07_Pancreas_smoke"


def test_train_leaves_a_complete_bound_cascade(smoke_project: Path, model_card_reader) -> None:
    manifest = pd.read_csv(smoke_project / "data" / "03_primary" / "case_manifest.csv")
    validation = sorted(manifest.loc[manifest["split"] == "validation", "case_id"])
    localisation = json.loads((smoke_project / "data" / "08_reporting" / "training"
                               / "cascade_stage1_localisation.json").read_text())
    assert localisation["stage1"] == "unet" and sorted(localisation["cases"]) == validation
    assert localisation["summary"]["n_cases"] == len(validation)

    card, stage1 = model_card_reader(smoke_project, "cascade"), model_card_reader(smoke_project, "unet")
    spec = card["cascade"]
    assert spec["stage1"]["weights_sha256"] == stage1["weights_sha256"]
    assert spec["stage2"] == {"architecture": "unet", "label_mode": "multiclass", "input_shape": [32, 64, 1]}
    assert spec["crop"]["spacing_mm"] == 3.0 and spec["stage1_localisation"] == localisation["summary"]
    assert all(j >= 3.0 for j in spec["jitter_std_mm"])              # the configured floor, mm
    assert card["cases"] == stage1["cases"] and card["label_mode"] == "multiclass"
    version = card["version"]
    assert (smoke_project / "data" / "06_models" / "cascade" / "stage1_model.keras" / version
            / "stage1_model.keras").is_file()

    crops = smoke_project / "data" / "05_model_input" / "cascade_crops"
    index = json.loads((smoke_project / "data" / "04_feature" / "cascade_crop_index.json").read_text())
    train_val = sorted(manifest.loc[manifest["split"].isin(["train", "validation"]), "case_id"])
    assert sorted(index) == train_val                                  # never a test case
    for case_id in train_val:
        image, label = np.load(crops / case_id / "image.npy"), np.load(crops / case_id / "label.npy")
        assert image.shape == label.shape and image.shape[1] >= 32 and image.shape[2] >= 64
        assert label.any() and set(np.unique(label).tolist()) <= {0, 1, 2}

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{smoke_project / 'mlflow.db'}")
    run = client.get_run(card["mlflow_run_id"])
    assert run.data.tags["stage1_architecture"] == "unet" and run.data.tags["stage2_architecture"] == "unet"
    assert run.data.params["cascade.crop.spacing_mm"] == "3.0"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"stage1_localisation.json", "model_card.json"}
    logged = Path(client.get_logged_model(run.outputs.model_outputs[0].model_id).artifact_location.removeprefix("file://"))
    bundle = json.loads((logged / "artifacts" / "bundle" / "bundle.json").read_text())
    assert bundle["kind"] == "single" and bundle["members"][0]["stage1"]          # both stages are in it


def test_tumour_label_mode_end_to_end(smoke_project: Path, tmp_path: Path, kedro_cli_runner) -> None:
    """Stage 2 learns only the tumour; the pancreas comes from stage 1. Train, evaluate, infer."""
    project = tmp_path / "pancreas_seg"
    shutil.copytree(smoke_project, project, ignore=shutil.ignore_patterns("mlruns", "notebooks"))
    shutil.rmtree(project / "data" / "06_models" / "checkpoints" / "cascade")
    kedro_cli_runner(project, "--pipelines=train_cascade", "--params=cascade.stage2.label_mode=tumour")

    card_path = max((project / "data" / "06_models" / "cascade" / "model_card.json").glob("*/model_card.json"))
    card = json.loads(card_path.read_text())
    assert card["cascade"]["stage2"]["label_mode"] == "tumour" and card["cascade"]["stage2"]["input_shape"][-1] == 1
    per_case = pd.read_csv(project / "data" / "08_reporting" / "evaluation" / "cascade" / "metrics_per_case.csv")
    dice = per_case["dice"].dropna()
    assert set(per_case["class"]) == {"pancreas", "tumour"} and dice.between(0, 1).all()

    shutil.rmtree(project / "data" / "08_reporting" / "evaluation")
    kedro_cli_runner(project, "--pipelines=evaluation")   # a new process: both stages load from disk
    summary = json.loads((project / "data" / "08_reporting" / "evaluation" / "cascade" / "summary.json").read_text())
    assert summary["architecture"] == "cascade"

    inputs = project / "data" / "01_raw" / DATASET / "imagesTs"
    output_dir = tmp_path / "masks"
    kedro_cli_runner(project, "--pipelines=inference",
                     f"--params=inference.input_path={inputs},inference.output_dir={output_dir},inference.model=cascade")
    for path in sorted(inputs.glob("*.nii.gz")):
        ct, mask = nib.load(path), nib.load(output_dir / path.name)
        assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2}
