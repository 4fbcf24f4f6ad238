"""``conf/hard`` and ``benchmarks.hard_heldout``: the environment trains as base on hard phantoms, and
the held-out benchmark draws a deterministic set and scores real (tiny, untrained) models on it.

No mocks: the set is written by the generator's own writer (6 patients of 96 px, thick slices), the
models are real ``.keras`` files with cards in the ``data/06_models`` layout, and the numbers are
checked against the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from benchmarks import _common
from benchmarks import hard_heldout as bench
from pancreas_seg.imaging.nifti_io import load_nifti

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
#: Tiny set: 6 patients (3 with a tumour), 96 px at ~4 mm, 6-8 mm slices over 120-140 mm.
SMALL = ["--n", "6", "--shape-xy-px", "96", "--spacing-xy-mm", "4.0", "4.4", "--slice-thickness-mm", "6.0", "8.0",
         "--z-extent-mm", "120.0", "140.0"]
SIZE_PX = (64, 64)
TINY_MODEL = {"base_filters": 4, "depth": 2, "dropout": 0.0, "l2_weight": 0.0}
VERSION = "2026-01-01T00.00.00.000Z"
#: A seed (in no setting of conf/) whose tiny set has a patient with two lesions and a cyst-only patient.
TEST_SEED = 4246


def _kedro_parameters(env: str) -> dict:
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from pancreas_seg.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    return OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": env})["parameters"]


def test_the_hard_environment_changes_only_the_phantoms() -> None:
    base, hard = _kedro_parameters("base"), _kedro_parameters("hard")
    assert bench.environment_parameters(CONF, "hard") == hard   # the benchmark reads what Kedro gives
    assert {key for key in base.keys() | hard.keys() if base.get(key) != hard.get(key)} == {"ingestion"}
    synthetic, base_synthetic = hard["ingestion"]["synthetic"], base["ingestion"]["synthetic"]
    assert synthetic["path"] == "data/01_raw/Task07_Pancreas_hard" != base_synthetic["path"]
    assert synthetic["phantom"]["preset"] == "hard" and base_synthetic["phantom"]["preset"] == "easy"
    assert {**synthetic, "path": None, "phantom": {**synthetic["phantom"], "preset": None}} == \
        {**base_synthetic, "path": None, "phantom": {**base_synthetic["phantom"], "preset": None}}
    assert {k: v for k, v in hard["ingestion"].items() if k != "synthetic"} == \
        {k: v for k, v in base["ingestion"].items() if k != "synthetic"}


def test_the_default_seed_is_in_no_setting_and_a_used_one_is_refused() -> None:
    seeds = dict(bench.conf_seeds(CONF))
    assert seeds["base/parameters_ingestion.yml:ingestion.synthetic.seed"] == 2026
    assert bench.DEFAULT_SEED not in seeds.values()
    bench.check_seed(bench.DEFAULT_SEED, CONF)
    with pytest.raises(ValueError, match=r"--seed 2026 is used in conf/ \(base/parameters_ingestion.yml"):
        bench.check_seed(2026, CONF)


def test_an_easy_environment_is_refused() -> None:
    with pytest.raises(ValueError, match="preset 'easy'"):
        bench.phantom_config(bench.environment_parameters(CONF, "base"), 0.5)


def test_missing_models_name_the_path_and_the_training_command(tmp_path: Path) -> None:
    data, report = tmp_path / "heldout", tmp_path / "report"
    common = [*SMALL, "--data-dir", str(data), "--report-dir", str(report)]
    with pytest.raises(FileNotFoundError, match=r"no models folder .*nowhere.*kedro run --env hard --pipelines=train"):
        bench.main([*common, "--models-dir", str(tmp_path / "nowhere")])
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        bench.main([*common, "--models-dir", str(tmp_path / "models"), "--models", "unet"])
    message = str(error.value)
    assert "'unet'" in message and str(tmp_path / "models" / "unet") in message and bench.TRAIN_COMMAND in message
    assert not data.exists() and not report.exists()   # refused before drawing anything


def _untrained_model(models_dir: Path, architecture: str) -> None:
    """An untrained multiclass model and its card, saved where training saves them."""
    root = models_dir / architecture
    trained, _ = _common.untrained_single_stage_model(architecture, TINY_MODEL, SIZE_PX,
                                                      root / "model.keras" / VERSION / "model.keras")
    (root / "model_card.json" / VERSION).mkdir(parents=True)
    (root / "model_card.json" / VERSION / "model_card.json").write_text(trained.card.to_json())


def _components(label_path: Path) -> int:
    """True tumour components (26-connectivity, as the FROC counts lesions)."""
    return ndimage.label(load_nifti(label_path).array == 2, structure=np.ones((3, 3, 3), dtype=bool))[1]


@pytest.mark.slow
def test_a_tiny_heldout_set_scored_by_two_models(tmp_path: Path) -> None:
    models_dir, data, report_dir = tmp_path / "models", tmp_path / f"hard_heldout_{TEST_SEED}", tmp_path / "report"
    for architecture in ("unet", "unet_small"):
        _untrained_model(models_dir, architecture)
    bench.main([*SMALL, "--seed", str(TEST_SEED), "--models", "unet", "unet_small", "--models-dir", str(models_dir),
                "--data-dir", str(data), "--report-dir", str(report_dir), "--n-bootstrap", "200"])

    assert sorted(p.name for p in report_dir.iterdir()) == ["hard_heldout.json", "hard_heldout.md",
                                                           "hard_heldout_froc.png"]   # no temporary left
    report = json.loads((report_dir / "hard_heldout.json").read_text())
    assert {"benchmark", "seed", "env", "data_dir", "tumour_fraction", "generator", "dataset", "settings",
            "n_bootstrap", "call_threshold", "models", "machine", "outputs"} <= set(report)
    assert (report["seed"], report["env"], report["generator"]["preset"]) == (TEST_SEED, "hard", "hard")
    inference = bench.environment_parameters(CONF, "base")["inference"]   # conf/base's inference settings
    assert report["settings"] == {key: inference[key] for key in report["settings"]}

    # the counts, against the set on disk
    dataset = json.loads((data / "dataset.json").read_text())
    cases = dataset["synthetic"]["cases"]
    counts = report["dataset"]
    assert counts["n_patients"] == len(dataset["training"]) == 6
    assert counts["n_tumour_patients"] == sum(c["tumour"] for c in cases) == 3   # exact share 0.5
    assert counts["n_lesions"] == sum(len(c["lesions"]) for c in cases) >= 3
    cyst_only = {f"pancreas_{i + 1:03d}" for i, c in enumerate(cases)
                 if not c["tumour"] and any(cyst["voxels"] > 0 for cyst in c["cysts"])}
    assert counts["n_cyst_only_patients"] == len(cyst_only) >= 1
    assert counts["n_patients_with_two_lesions"] == sum(len(c["lesions"]) == 2 for c in cases) >= 1
    n_components = sum(_components(data / entry["label"]) for entry in dataset["training"])

    assert list(report["models"]) == ["unet", "unet_small"]
    for name, model in report["models"].items():
        assert {"reference", "model_files", "version", "trained_on", "warnings", "n_cases", "pancreas_dice",
                "tumour_dice_tumour_patients", "tumour_dice_by_largest_lesion_size", "mimic_false_positives",
                "tumour_free_called_tumour", "detection", "cases"} <= set(model), name
        assert model["version"] == VERSION and "not on the hard phantoms" in model["warnings"][0]
        assert len(model["cases"]) == model["n_cases"] == 6
        assert model["pancreas_dice"]["n"] == 6 and model["tumour_dice_tumour_patients"]["n"] == 3
        assert sum(s["n"] for s in model["tumour_dice_by_largest_lesion_size"].values()) == 3
        mimic = model["mimic_false_positives"]
        assert mimic["n_cyst_only_patients"] == counts["n_cyst_only_patients"]
        assert 0 <= mimic["n_called"] <= mimic["n_cyst_only_patients"] and len(mimic["case_ids"]) == mimic["n_called"]
        for case in model["cases"]:   # called = score >= 0.5 and a predicted tumour voxel; mimics = cyst-only called
            assert case["called_tumour"] == (case["patient_tumour_score"] >= 0.5 and case["predicted_tumour_voxels"] > 0)
            assert case["cyst_only"] == (case["case_id"] in cyst_only)
        assert set(mimic["case_ids"]) == {c["case_id"] for c in model["cases"] if c["cyst_only"] and c["called_tumour"]}
        detection = model["detection"]
        assert detection["available"] is True
        patient = detection["patient"]
        assert (patient["n_patients"], patient["n_positive"], patient["n_bootstrap"]) == (6, 3, 200)
        for key in ("auroc", "ap"):
            assert (patient[key] is None and patient["note"]) or 0.0 <= patient[key] <= 1.0, (name, key, patient)
        curve = detection["froc"]
        assert curve["n_cases"] == 6 and curve["n_lesions"] == n_components
        assert curve["fp_rates"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0] and len(curve["sensitivity_at_rates"]) == 7
        assert curve["cpm"] is None or 0.0 <= curve["cpm"] <= 1.0
        assert [row["size_bin"] for row in detection["size_sensitivity"]] == ["<10 mm", "10-20 mm", ">20 mm"]
        assert sum(row["n_lesions"] for row in detection["size_sensitivity"]) == n_components
        assert [c["patient_tumour_score"] is not None for c in model["cases"]] == [True] * 6
    markdown = (report_dir / "hard_heldout.md").read_text()
    assert (report_dir / "hard_heldout_froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| unet |" in markdown and "| unet_small |" in markdown and "AUROC" in markdown

    # written once: a second call reuses the folder untouched
    stamp = (data / "dataset.json").stat().st_mtime_ns
    config = bench.phantom_config(bench.environment_parameters(CONF, "hard"), 0.5,
                                  {"shape_xy_px": 96, "spacing_xy_mm": (4.0, 4.4), "slice_thickness_mm": (6.0, 8.0),
                                   "z_extent_mm": (120.0, 140.0)})
    assert bench.ensure_heldout(data, 6, config, TEST_SEED, progress=False) == data
    assert (data / "dataset.json").stat().st_mtime_ns == stamp

    # deterministic: the same seed draws the same set elsewhere; another seed another one
    again = bench.ensure_heldout(tmp_path / "again", 6, config, TEST_SEED, progress=False)
    assert json.loads((again / "dataset.json").read_text())["synthetic"] == dataset["synthetic"]
    for entry in dataset["training"]:
        for key in ("image", "label"):
            np.testing.assert_array_equal(load_nifti(again / entry[key]).array, load_nifti(data / entry[key]).array)
    other = bench.ensure_heldout(tmp_path / "other", 6, config, TEST_SEED + 1, progress=False)
    assert json.loads((other / "dataset.json").read_text())["synthetic"]["cases"] != dataset["synthetic"]["cases"]
