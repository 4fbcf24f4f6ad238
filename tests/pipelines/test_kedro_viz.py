"""``kedro viz build`` (kedro-viz 12.5) writes a static site whose JSON shows every pipeline.

Runs in a fresh project copy (no training needed: viz reads the pipelines and instantiates the
catalog, it runs nothing), so the repository gets no ``build/`` or ``.viz/`` folder.

``build/api/main`` is the ``__default__`` pipeline's graph; ``build/api/pipelines/<name>`` has
one file per registered pipeline with the same keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARCHITECTURES = ("unet", "unet_small", "fcn", "vnet2d")
PIPELINES = {"train", "data", "ingestion", "preprocessing", "training", "evaluation", "inference", "__default__"}
PIPELINES |= {f"train_{arch}" for arch in (*ARCHITECTURES, "cascade")}  # one named pipeline per model
PIPELINES |= {"tune", "tuning"} | {f"tune_{arch}" for arch in ARCHITECTURES}    # Optuna studies, not in train
CASCADE_STEPS = {"prepare_training_crops", "measure_stage1_localisation", "train_stage2", "validate_stage2",
                 "score_validation_cases", "check_model_binding", "predict_test_cases", "score_test_cases",
                 "summarise_model"}


@pytest.fixture(scope="module")
def viz_build(tmp_path_factory: pytest.TempPathFactory, project_copier, subprocess_env) -> Path:
    project = project_copier(tmp_path_factory.mktemp("viz") / "pancreas_seg")
    result = subprocess.run([sys.executable, "-m", "kedro", "viz", "build"], check=False, cwd=project,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"kedro viz build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return project / "build"


def test_viz_build_lists_pipelines_and_model_namespaces(viz_build: Path) -> None:
    main = json.loads((viz_build / "api" / "main").read_text())
    print("build/api/main top-level keys:", sorted(main))  # noqa: T201  (documentation aid)
    print("modular_pipelines keys:", sorted(main["modular_pipelines"]))  # noqa: T201

    assert {p["id"] for p in main["pipelines"]} >= PIPELINES
    assert main["selected_pipeline"] == "__default__"

    # the four architecture namespaces are modular pipelines, each with its own task nodes
    modular = main["modular_pipelines"]
    assert set(ARCHITECTURES) <= set(modular)
    tasks = [n for n in main["nodes"] if n["type"] == "task"]
    for arch in ARCHITECTURES:
        assert modular[arch]["name"] == arch
        assert any(child["type"] == "task" for child in modular[arch]["children"])
        assert {"id": arch, "type": "modularPipeline"} in modular["__root__"]["children"]
        names = {n["full_name"] for n in tasks if n["modular_pipelines"] == [arch]}
        assert names == {f"{arch}.{step}" for step in ("train_model", "validate_model", "score_validation_cases",
                                                      "check_model_binding",
                                                      "predict_test_cases", "score_test_cases",
                                                      "summarise_model")}, (arch, names)
    # the cascade is a namespace too, with its own training steps and the evaluation's
    assert {"id": "cascade", "type": "modularPipeline"} in modular["__root__"]["children"]
    cascade = {n["full_name"] for n in tasks if n["modular_pipelines"] == ["cascade"]}
    assert cascade == {f"cascade.{step}" for step in CASCADE_STEPS}, cascade
    training = next(n for n in tasks if n["full_name"] == "unet.train_model")
    assert {"train", "training", "__default__"} <= set(training["pipelines"])

    # one JSON per registered pipeline; inference is a pipeline of its own
    assert {p.name for p in (viz_build / "api" / "pipelines").iterdir()} >= PIPELINES
    inference = json.loads((viz_build / "api" / "pipelines" / "inference").read_text())
    assert inference["selected_pipeline"] == "inference"
    # find -> load the predictor -> segment -> write, the outputs as datasets between the steps
    inference_tasks = {n["name"] for n in inference["nodes"] if n["type"] == "task"}
    assert inference_tasks == {"find_scans", "load_predictor", "segment_scans", "plot_overlays", "make_dicom_segs",
                               "report_inference"}, inference_tasks
    inference_data = {n["name"] for n in inference["nodes"] if n["type"] == "data"}
    assert {"inference_masks", "inference_overlays", "inference_dicom_seg", "inference_report"} <= inference_data
    assert (viz_build / "index.html").is_file()
