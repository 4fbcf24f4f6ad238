"""``--env msd`` on small data: the real-data settings run end to end, each step a new process.

The msd environment reads an MSD-layout folder in place (``ingestion.source: msd``), preprocesses
at 256 px, trains the study-width U-Net (base 32) with ReduceLROnPlateau and early stopping, then
the cascade's study-width stage 2 on 1 mm crops on top of it, and evaluates both with test-time
augmentation. Here the folder is the tests' small synthetic Task07
(4 labelled cases, 1 unlabelled). Only the run length is cut (``epochs``, ``steps_per_epoch``,
``batch_size``), and ``mixed_precision`` is off: float16 convolutions have no fast CPU kernels
(one epoch took over 10 minutes here). The node's scoping of the mixed-precision policy is tested
in ``test_training_node_state.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow

RUN_LENGTH = ("training.epochs=2,unet.architecture.overrides.epochs=2,cascade.stage2.overrides.epochs=2,"
              "training.steps_per_epoch=2,training.batch_size=2,training.workers=1,training.mixed_precision=false,"
              "evaluation.batch_size=4")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_msd_environment_on_small_data(small_task07: Path, tmp_path: Path, project_copier,
                                       kedro_cli_runner, model_card_reader) -> None:
    project = project_copier(tmp_path / "pancreas_seg")
    raw_before = _digests(small_task07)

    kedro_cli_runner(project, "--pipelines=train_cascade", "--params",
                     f"ingestion.msd_path={small_task07},{RUN_LENGTH}", env="msd", timeout=1500)

    assert _digests(small_task07) == raw_before, "the raw MSD folder must never be modified"
    split = json.loads((project / "data" / "03_primary" / "splits" / f"{small_task07.name}.json").read_text())
    assert split["settings"]["validation_fraction"] == pytest.approx(0.3)
    card = model_card_reader(project, "unet")
    # read through the MSD reader, the phantoms are still labelled as what they are
    assert card["data_source"] == "synthetic" and card["input_shape"] == [256, 256, 1]
    assert card["cases"] == {"train": split["train"], "validation": split["validation"]}

    checkpoint = project / "data" / "06_models" / "checkpoints" / "unet"
    state = json.loads((checkpoint / "state.json").read_text())
    assert set(state["callbacks"]) == {"reduce_lr_on_plateau", "early_stopping"}  # conf/msd's callbacks
    assert state["completed_epochs"] == 2 and state["finished"] is True

    from pancreas_seg.models.io import load_model  # noqa: PLC0415

    model = load_model(project / "data" / "06_models" / "unet" / "model.keras" / card["version"] / "model.keras",
                       compile=False)
    assert model.output.dtype == "float32"
    assert sum(int(np.prod(w.shape)) for w in model.weights) > 7_000_000     # the study-width U-Net (base 32)
    metrics = project / "data" / "08_reporting" / "evaluation" / "metrics_per_case.csv"
    assert metrics.is_file() and len(metrics.read_text().splitlines()) == 1 + 2 * len(split["test"])  # cascade
    cascade = model_card_reader(project, "cascade")
    assert cascade["cascade"]["crop"]["spacing_mm"] == 1.0 and cascade["cascade"]["crop"]["size_px"] == [160, 224]
    assert cascade["cascade"]["stage1"]["weights_sha256"] == card["weights_sha256"]
    stage2 = load_model(project / "data" / "06_models" / "cascade" / "model.keras" / cascade["version"] / "model.keras",
                        compile=False)
    assert tuple(stage2.input_shape[1:]) == (160, 224, 1)
    assert sum(int(np.prod(w.shape)) for w in stage2.weights) > 7_000_000    # study width (base 32)

    for model in ("unet", "cascade"):
        output_dir = tmp_path / f"masks_{model}"
        kedro_cli_runner(project, "--pipelines=inference", "--params",
                         f"inference.input_path={small_task07 / 'imagesTs'},inference.output_dir={output_dir},"
                         f"inference.batch_size=4,inference.model={model}", env="msd", timeout=900)
        for source in sorted((small_task07 / "imagesTs").glob("*.nii.gz")):
            mask, ct = nib.load(output_dir / source.name), nib.load(source)
            assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine), (model, source.name)
            assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2}
