"""The tuning pipelines are registered, one namespace per architecture, and kept out of ``train``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pancreas_seg.models.names import ARCHITECTURE_NAMES, CASCADE_NAME
from pancreas_seg.pipeline_registry import register_pipelines
from pancreas_seg.pipelines import tuning


def test_tune_pipelines_are_registered_and_not_part_of_train() -> None:
    pipelines = register_pipelines()
    assert {"tune", "tuning", *(f"tune_{arch}" for arch in ARCHITECTURE_NAMES)} <= set(pipelines)
    tune_nodes = {node.name for node in pipelines["tune"].nodes}
    assert {f"{arch}.tune" for arch in ARCHITECTURE_NAMES} <= tune_nodes
    assert {node.name for node in pipelines["data"].nodes} <= tune_nodes          # ingestion + preprocessing
    for name in ("train", "__default__", "training"):
        assert not [node.name for node in pipelines[name].nodes if node.name.endswith(".tune")], name
    only_unet = {node.name for node in pipelines["tune_unet"].nodes if node.name.endswith(".tune")}
    assert only_unet == {"unet.tune"}


def test_each_namespace_reads_its_architecture_and_publishes_its_reports() -> None:
    node, importances = tuning.create_pipeline(["fcn"]).nodes      # topological order: the study first
    assert node.name == "fcn.tune"
    assert node.inputs == ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing",
                           "params:training", "params:tuning", "params:fcn.architecture"]
    assert node.outputs == ["fcn.tuning_best_trial", "fcn.tuning_trials", "fcn.tuning_plot"]
    assert importances.name == "fcn.importances"
    assert importances.inputs == ["fcn.tuning_best_trial", "params:training", "params:tuning",
                                  "params:fcn.architecture"]
    assert importances.outputs == ["fcn.tuning_importances", "fcn.tuning_importance_plot",
                                   "fcn.tuning_parallel_coordinate_plot"]


def test_every_tuning_output_has_a_catalog_entry() -> None:
    """The reports are files (conf/base/catalog_tuning.yml), not MemoryDatasets lost after the run."""
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415
    from kedro.io import DataCatalog  # noqa: PLC0415

    from pancreas_seg.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    conf = Path(__file__).resolve().parents[2] / "conf"
    catalog = DataCatalog.from_config(OmegaConfigLoader(str(conf), **CONFIG_LOADER_ARGS)["catalog"])
    for output in sorted(tuning.create_pipeline(["unet"]).all_outputs()):
        dataset = catalog.get(output)
        assert dataset is not None and "filepath" in dataset._describe(), output
        assert str(dataset._describe()["filepath"]).startswith("data/08_reporting/tuning/unet_"), output


def test_the_cascade_is_not_tuned() -> None:
    with pytest.raises(ValueError, match="the cascade is not tuned"):
        tuning.create_pipeline([CASCADE_NAME])
