"""The inference pipeline on one REAL abdominal CT, with models from the smoke train run.

Real data: ``../shared/realdata/ct_abdomen_3mm.nii.gz`` (next to the repository), one abdominal CT,
122 x 101 x 112 voxels, 3 mm isotropic, RAS, int32 HU. Attribution (from its NOTICE.md): it is the
example CT from the TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``,
Apache-2.0 licence). Used read-only.

The smoke models were trained for one epoch of two batches on synthetic phantoms, so their masks
are noise: they check geometry, dtype and plumbing on real data, not accuracy (they even predict
"pancreas" in the air around the phantoms). Whether predictions land inside the body is
therefore checked with an *intensity probe*: a 1x1-convolution Keras model, saved in the same
layout as a trained one, that labels every pixel brighter than ~0 HU after the project's own
preprocessing. Through the same inference pipeline its mask must coincide with the CT's
soft-tissue voxels on the original grid; a flipped, transposed or shifted mask would not.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

pytestmark = pytest.mark.slow

CT_NAME = "ct_abdomen_3mm.nii.gz"
CASE_ID = "ct_abdomen_3mm"
BODY_HU = -500.0  # air outside the body is about -1000 HU
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_ct(require_realdata) -> Path:
    """The real CT: skipped locally without ../shared/realdata, a failure under CI (conftest)."""
    return require_realdata(CT_NAME) / CT_NAME


def _run_inference(runner, project: Path, ct_file: Path, output_dir: Path, model: str,
                   *, models_dir: Path | None = None, **extra_env: str) -> dict:
    # as `kedro run --pipeline=inference --env smoke --params "inference.input_path=...,..."`
    params = {"inference.input_path": str(ct_file), "inference.output_dir": str(output_dir),
              "inference.model": model}
    if models_dir is not None:
        params["inference.models_dir"] = str(models_dir)
    runner(project, pipeline_name="inference", runtime_params=params, extra_env=extra_env or None)
    return json.loads((project / "data" / "08_reporting" / "inference_report.json").read_text())


def _check_mask(mask_path: Path, ct: nib.Nifti1Image) -> np.ndarray:
    """Same shape, affine and (RAS) orientation as the CT; uint8 labels in {0, 1, 2}."""
    mask = nib.load(mask_path)
    assert mask.shape == ct.shape
    assert np.array_equal(mask.affine, ct.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    labels = np.asanyarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8 and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    return labels


def test_inference_on_real_ct(smoke_project: Path, smoke_tracking_uri: str, tmp_path: Path,  # noqa: PLR0917
                              kedro_session_runner, model_card_reader, real_ct: Path) -> None:
    ct = nib.load(real_ct)

    # 1. by architecture name: the newest unet model in data/06_models
    output_dir = tmp_path / "masks"
    report = _run_inference(kedro_session_runner, smoke_project, real_ct, output_dir, "unet")
    labels = _check_mask(output_dir / f"{CASE_ID}.nii.gz", ct)
    foreground = labels > 0
    in_air = np.count_nonzero(foreground & (np.asanyarray(ct.dataobj) <= BODY_HU))
    # not asserted: a phantom-trained smoke model's mask is noise (see the probe test for geometry)
    print(f"smoke unet on real CT: {foreground.sum()} foreground voxels, {in_air} of them with "  # noqa: T201
          f"HU <= {BODY_HU:.0f}")
    overlay = output_dir / f"{CASE_ID}_overlay.png"
    assert overlay.is_file() and overlay.read_bytes()[:8] == PNG_MAGIC

    assert report["model"] == "unet" and report["architecture"] == "unet"
    assert report["trained_on"] == "synthetic" and report["skipped"] == []
    [entry] = report["outputs"]
    assert entry["case_id"] == CASE_ID and Path(entry["input"]) == real_ct
    assert Path(entry["mask"]) == output_dir / f"{CASE_ID}.nii.gz" and Path(entry["overlay"]) == overlay
    assert entry["shape"] == list(ct.shape)
    assert entry["voxels_pancreas"] == int(np.count_nonzero(labels == 1))
    assert entry["voxels_tumour"] == int(np.count_nonzero(labels == 2))

    # 2. by MLflow URI: unet's nested run (the run that produced the newest unet model)
    card = model_card_reader(smoke_project, "unet")
    run = mlflow.MlflowClient(tracking_uri=smoke_tracking_uri).get_run(card["mlflow_run_id"])
    assert run.data.tags["architecture"] == "unet" and "mlflow.parentRunId" in run.data.tags
    mlflow_dir = tmp_path / "masks_mlflow"
    uri = f"runs:/{run.info.run_id}"
    report = _run_inference(kedro_session_runner, smoke_project, real_ct, mlflow_dir, uri,
                            MLFLOW_TRACKING_URI=smoke_tracking_uri)
    assert report["model"] == uri and report["architecture"] == "unet"
    assert Path(report["model_file"]).parent.name == "bundle"   # the run's pyfunc model "segmenter"
    same = _check_mask(mlflow_dir / f"{CASE_ID}.nii.gz", ct)
    assert np.array_equal(same, labels), "the MLflow artifact gives a different mask than data/06_models"


def _write_probe_model(card: dict, models_dir: Path) -> float:
    """Save an intensity-threshold "unet" in the trained-model layout; return its threshold (HU).

    Its card is the smoke unet's (same preprocessing, so the same input) with the probe's own
    weights hash, saved under the probe's version: inference refuses a card of another model.
    """
    import keras  # noqa: PLC0415

    from pancreas_seg.models.io import save_model, weights_sha256  # noqa: PLC0415

    assert card["label_mode"] == "multiclass" and card["preprocessing"]["intensity"]["mode"] == "window"
    low, high = card["preprocessing"]["intensity"]["window_hu"]
    threshold = 0.3  # in the window's [0, 1] scale
    inputs = keras.Input(tuple(card["input_shape"]))
    outputs = keras.layers.Conv2D(3, 1, activation="softmax", name="probe")(inputs)
    model = keras.Model(inputs, outputs, name="unet")
    steep = 200.0  # logits: background 0, pancreas steep * (x - threshold), tumour never
    kernel = np.zeros((1, 1, card["input_shape"][-1], 3), dtype="float32")
    kernel[..., kernel.shape[2] // 2, 1] = steep  # the centre slice of a 2.5D input
    model.get_layer("probe").set_weights([kernel, np.array([0.0, -steep * threshold, -1e3], dtype="float32")])
    version = "2026-01-01T00.00.00.000Z"
    target = models_dir / "unet" / "model.keras" / version / "model.keras"
    target.parent.mkdir(parents=True)
    save_model(model, target)
    # bound to the smoke unet's (phantom) training cases: none of them is the real CT
    assert CASE_ID not in set(card["cases"]["train"]) | set(card["cases"]["validation"])
    probe_card = {k: v for k, v in card.items() if k != "version"}
    probe_card["weights_sha256"] = weights_sha256(model)
    card_file = models_dir / "unet" / "model_card.json" / version / "model_card.json"
    card_file.parent.mkdir(parents=True)
    card_file.write_text(json.dumps(probe_card, indent=2))
    return low + threshold * (high - low)


def test_real_ct_geometry_with_intensity_probe(smoke_project: Path, tmp_path: Path, kedro_session_runner,
                                               model_card_reader, real_ct: Path) -> None:
    ct = nib.load(real_ct)
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    threshold_hu = _write_probe_model(model_card_reader(smoke_project, "unet"), tmp_path / "probe_models")
    output_dir = tmp_path / "probe_masks"
    report = _run_inference(kedro_session_runner, smoke_project, real_ct, output_dir, "unet",
                            models_dir=tmp_path / "probe_models")
    assert Path(report["model_file"]).is_relative_to(tmp_path / "probe_models")
    labels = _check_mask(output_dir / f"{CASE_ID}.nii.gz", ct)
    predicted = labels == 1
    assert not np.any(labels == 2)
    assert predicted.sum() > 1000

    # the mask lands on tissue, not in the air around (or inside) the patient: every predicted
    # voxel has HU > -500 or touches such a voxel (the model sees the slice at 64 px, ~2x coarser
    # than the CT, so its edges are uncertain by one voxel); almost all lie on tissue themselves
    tissue = hu > BODY_HU
    near_tissue = ndimage.binary_dilation(tissue, ndimage.generate_binary_structure(3, 3))
    assert not np.any(predicted & ~near_tissue), \
        f"{np.count_nonzero(predicted & ~near_tissue)} predicted voxels lie in air, away from any tissue"
    in_air = np.count_nonzero(predicted & ~tissue)
    assert in_air <= 1e-3 * predicted.sum(), f"{in_air} of {predicted.sum()} predicted voxels have HU <= {BODY_HU}"
    # ... and the mask is the CT's own bright tissue, on the original grid (a flip, transpose or
    # shift of the mask would give a far lower overlap)
    reference = hu > threshold_hu
    dice = 2 * np.count_nonzero(predicted & reference) / (predicted.sum() + reference.sum())
    assert dice > 0.8, f"probe mask vs HU > {threshold_hu:.0f}: Dice {dice:.3f}"
    for axis in range(3):
        flipped = np.flip(reference, axis)
        dice_flipped = 2 * np.count_nonzero(predicted & flipped) / (predicted.sum() + flipped.sum())
        assert dice_flipped < dice - 0.1, (axis, dice, dice_flipped)


def test_probe_model_with_the_trained_models_card_is_refused(smoke_project: Path, tmp_path: Path,
                                                             kedro_session_runner, model_card_reader,
                                                             real_ct: Path) -> None:
    """The smoke unet's card next to another model (the probe) does not describe its weights."""
    from pancreas_seg.inference.model_card import ModelMismatchError  # noqa: PLC0415

    card = model_card_reader(smoke_project, "unet")
    models_dir = tmp_path / "probe_models"
    _write_probe_model(card, models_dir)
    [card_file] = (models_dir / "unet" / "model_card.json").glob("*/model_card.json")
    card_file.write_text(json.dumps({k: v for k, v in card.items() if k != "version"}, indent=2))
    output_dir = tmp_path / "refused"
    with pytest.raises(ModelMismatchError, match="does not belong to this model file"):
        _run_inference(kedro_session_runner, smoke_project, real_ct, output_dir, "unet", models_dir=models_dir)
    assert not output_dir.exists() or not any(output_dir.iterdir())
