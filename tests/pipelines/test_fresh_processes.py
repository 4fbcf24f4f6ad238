"""The whole chain, every step a NEW PROCESS, as a user runs it from the shell (``--env smoke``).

``kedro run --pipelines=train`` trains every architecture in one process; then, each in a process
of its own: ``--pipelines=evaluation`` (models loaded where nothing was built or trained),
``--pipelines=inference``, the comparison notebook (its own kernel) and a bare interpreter that
does ``catalog.load("<arch>.model")`` through a KedroSession. Finally the binding of models to
their split: asking for another split without ``split.recompute`` fails with SplitMismatchError;
with it the data are re-split, and evaluation then refuses the models (ModelMismatchError naming
the cases they were trained on that are now test cases).

One trained project copy (module fixture) serves every step; the tests run in file order and the
last one changes the split, so it must stay last.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.models.names import CASCADE_NAME, CASCADE_STAGE1, MODEL_NAMES

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "model_comparison.ipynb"
DATASET = "Task07_Pancreas_smoke"  # conf/smoke: ingestion.synthetic.path


def _flat(text: str) -> str:
    """Console output with line wrapping undone (rich wraps log lines and tracebacks)."""
    return " ".join(text.split())


def _manifest(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "data" / "03_primary" / "case_manifest.csv")


def _split_file(project: Path) -> Path:
    return project / "data" / "03_primary" / "splits" / f"{DATASET}.json"


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory: pytest.TempPathFactory, project_copier, kedro_cli_runner) -> Path:
    """A project copy after ``python -m kedro run --pipelines=train --env smoke`` (its own process)."""
    project = project_copier(tmp_path_factory.mktemp("fresh_processes") / "pancreas_seg")
    kedro_cli_runner(project, "--pipelines=train")
    return project


def test_train_persisted_the_split_and_versioned_cards(trained_project: Path, model_card_reader) -> None:
    record = json.loads(_split_file(trained_project).read_text())
    manifest = _manifest(trained_project)
    assert record["dataset"] == DATASET and record["settings"]["seed"] == 42
    assert set(manifest["dataset"]) == {DATASET}
    for name in ("train", "validation", "test"):
        assert sorted(manifest.loc[manifest["split"] == name, "case_id"]) == record[name], name
    for arch in MODEL_NAMES:
        card = model_card_reader(trained_project, arch)
        assert card["dataset"] == DATASET
        assert card["cases"] == {"train": record["train"], "validation": record["validation"]}
        assert len(card["weights_sha256"]) == 64 and card["preprocessing_fingerprint"]
    # the cascade is bound to the stage-1 model it was trained on (the newest model_unet)
    cascade, stage1 = model_card_reader(trained_project, CASCADE_NAME), model_card_reader(trained_project, CASCADE_STAGE1)
    assert cascade["cascade"]["stage1"]["weights_sha256"] == stage1["weights_sha256"]
    assert cascade["preprocessing_fingerprint"] == stage1["preprocessing_fingerprint"]


def test_evaluation_in_a_fresh_process(trained_project: Path, evaluation_rerunner, model_card_reader) -> None:
    evaluation = trained_project / "data" / "08_reporting" / "evaluation"
    predictions = trained_project / "data" / "07_model_output"
    evaluation_rerunner(trained_project)  # the train run wrote them: this new process must write them again

    manifest = _manifest(trained_project)
    test_cases = manifest[manifest["split"] == "test"]
    test_ids = sorted(test_cases["case_id"])
    assert test_ids
    per_case = pd.read_csv(evaluation / "metrics_per_case.csv")
    assert len(per_case) == len(MODEL_NAMES) * 2 * len(test_ids)
    assert set(per_case["architecture"]) == set(MODEL_NAMES)
    assert sorted(set(per_case["case_id"])) == test_ids
    dice = per_case["dice"].dropna()
    assert ((dice >= 0) & (dice <= 1)).all()
    comparison = pd.read_csv(evaluation / "model_comparison.csv")
    assert set(comparison["architecture"]) == set(MODEL_NAMES)
    for arch in MODEL_NAMES:
        card = model_card_reader(trained_project, arch)
        check = json.loads((evaluation / arch / "model_check.json").read_text())
        assert check["architecture"] == arch and check["dataset"] == DATASET
        assert check["test_cases"] == test_ids
        assert check["weights_sha256"] == card["weights_sha256"]
        assert check["preprocessing_fingerprint"] == card["preprocessing_fingerprint"]
        assert len(pd.read_csv(evaluation / arch / "metrics_per_case.csv")) == 2 * len(test_ids)
        for case in test_cases.itertuples():
            raw = nib.load(case.image_path)
            prediction = nib.load(predictions / arch / f"{case.case_id}.nii.gz")
            assert prediction.shape == raw.shape, (arch, case.case_id)
            assert np.array_equal(prediction.affine, raw.affine), (arch, case.case_id)


def test_inference_in_a_fresh_process(trained_project: Path, kedro_cli_runner, tmp_path: Path) -> None:
    inputs = trained_project / "data" / "01_raw" / DATASET / "imagesTs"
    output_dir = tmp_path / "masks"
    kedro_cli_runner(trained_project, "--pipelines=inference",
                     f"--params=inference.input_path={inputs},inference.output_dir={output_dir}")

    report = json.loads((trained_project / "data" / "08_reporting" / "inference_report.json").read_text())
    files = sorted(inputs.glob("*.nii.gz"))
    assert files and report["architecture"] == "unet" and report["skipped"] == []
    assert len(report["outputs"]) == len(files)
    for path in files:
        case_id = path.name.removesuffix(".nii.gz")
        ct = nib.load(path)
        mask = nib.load(output_dir / f"{case_id}.nii.gz")
        assert mask.shape == ct.shape, case_id
        assert np.array_equal(mask.affine, ct.affine), case_id
        assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2}
        assert (output_dir / f"{case_id}_overlay.png").is_file()


def test_cascade_inference_in_a_fresh_process(trained_project: Path, kedro_cli_runner, model_card_reader,
                                              tmp_path: Path) -> None:
    inputs = trained_project / "data" / "01_raw" / DATASET / "imagesTs"
    output_dir = tmp_path / "cascade_masks"
    kedro_cli_runner(trained_project, "--pipelines=inference",
                     f"--params=inference.input_path={inputs},inference.output_dir={output_dir},"
                     f"inference.model={CASCADE_NAME}")

    report = json.loads((trained_project / "data" / "08_reporting" / "inference_report.json").read_text())
    files = sorted(inputs.glob("*.nii.gz"))
    assert files and report["architecture"] == CASCADE_NAME and len(report["outputs"]) == len(files)
    assert Path(report["model_file"]).parent.parent.parent.name == CASCADE_NAME
    for path in files:
        case_id = path.name.removesuffix(".nii.gz")
        ct, mask = nib.load(path), nib.load(output_dir / f"{case_id}.nii.gz")
        assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine), case_id
        assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2}


def test_inference_refuses_a_training_case_in_a_fresh_process(trained_project: Path, kedro_cli_runner,
                                                               model_card_reader, tmp_path: Path) -> None:
    case_id = model_card_reader(trained_project, "unet")["cases"]["train"][0]
    image = trained_project / "data" / "01_raw" / DATASET / "imagesTr" / f"{case_id}.nii.gz"
    assert image.is_file()
    output_dir = tmp_path / "refused"
    result = kedro_cli_runner(trained_project, "--pipelines=inference",
                              f"--params=inference.input_path={image},inference.output_dir={output_dir}",
                              check=False)
    output = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, output[-3000:]
    assert "ModelMismatchError" in output, output[-3000:]
    assert "1 case(s) that this run was asked to segment" in output and case_id in output, output[-3000:]
    assert not output_dir.exists() or not list(output_dir.glob("*.nii.gz"))


def test_notebook_in_a_fresh_kernel(trained_project: Path, subprocess_env) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    workdir = trained_project / "notebooks"
    workdir.mkdir(exist_ok=True)
    target = workdir / NOTEBOOK.name
    shutil.copy(NOTEBOOK, target)
    notebook = nbformat.read(target, as_version=4)
    env = subprocess_env(PANCREAS_SEG_PROJECT=str(trained_project), PANCREAS_SEG_ENV="smoke")
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # the kernel: a new process with exactly this environment
    nbformat.write(notebook, target)

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert all(arch in text for arch in MODEL_NAMES), "comparison table not shown"
    assert "dice_mean" in text and "val_dice_pancreas" in text
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 3


CATALOG_LOAD = """
import json
from pathlib import Path

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

project = Path.cwd()
bootstrap_project(project)
with KedroSession.create(project_path=project, env="smoke") as session:
    catalog = session.load_context().catalog
    import numpy as np
    from pancreas_seg.models.io import weights_sha256
    from pancreas_seg.models.names import ARCHITECTURE_NAMES
    result = {}
    for arch in ARCHITECTURE_NAMES + ("cascade", "cascade.stage1_model"):
        model = catalog.load(arch if "." in arch else f"model_{arch}")
        shape = tuple(model.input_shape[1:])
        output = model.predict(np.zeros((1, *shape), dtype="float32"), verbose=0)
        result[arch] = {"weights_sha256": weights_sha256(model), "input_shape": list(shape),
                        "output_shape": list(output.shape), "finite": bool(np.isfinite(output).all())}
print("RESULT " + json.dumps(result))
"""


def test_catalog_loads_every_model_in_a_fresh_interpreter(trained_project: Path, subprocess_env,
                                                          model_card_reader) -> None:
    result = subprocess.run([sys.executable, "-c", CATALOG_LOAD], check=False, cwd=trained_project,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    loaded = json.loads(line.removeprefix("RESULT "))
    assert sorted(loaded) == sorted((*MODEL_NAMES, "cascade.stage1_model"))
    stage1 = loaded.pop("cascade.stage1_model")   # saved with the cascade, bound by its card
    cascade_card = model_card_reader(trained_project, CASCADE_NAME)
    assert stage1["weights_sha256"] == cascade_card["cascade"]["stage1"]["weights_sha256"]
    assert stage1["input_shape"] == cascade_card["cascade"]["stage1"]["input_shape"]
    for arch, info in loaded.items():
        card = model_card_reader(trained_project, arch)
        assert info["weights_sha256"] == card["weights_sha256"], arch  # the newest version, card's model
        assert info["input_shape"] == card["input_shape"], arch
        assert info["output_shape"] == [1, *card["input_shape"][:2], 3] and info["finite"], arch


def test_a_new_split_needs_recompute_and_then_binds_the_models_out(trained_project: Path, kedro_cli_runner,
                                                                   model_card_reader) -> None:
    split_file = _split_file(trained_project)
    persisted = split_file.read_text()

    # 1. other split settings without recompute: refused, the persisted split stays as it was
    result = kedro_cli_runner(trained_project, "--pipelines=data", "--params=split.seed=7", check=False)
    output = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, output[-3000:]
    assert "SplitMismatchError" in output and "split.seed: 42 -> 7" in output, output[-3000:]
    assert split_file.read_text() == persisted

    # 2. with recompute: a new split, persisted, and the manifest follows it
    kedro_cli_runner(trained_project, "--pipelines=data", "--params=split.seed=7,split.recompute=true")
    old, new = json.loads(persisted), json.loads(split_file.read_text())
    assert new["settings"]["seed"] == 7 and new["dataset"] == DATASET
    manifest = _manifest(trained_project)
    assert sorted(manifest.loc[manifest["split"] == "test", "case_id"]) == new["test"]
    card = model_card_reader(trained_project, "unet")
    seen = set(card["cases"]["train"]) | set(card["cases"]["validation"])
    assert seen == set(old["train"]) | set(old["validation"])
    overlap = sorted(seen & set(new["test"]))
    assert overlap, f"seed 7 keeps the same test cases {new['test']}: pick another seed for this test"

    # 3. evaluation now refuses the models trained on the old split, naming the cases
    result = kedro_cli_runner(trained_project, "--pipelines=evaluation", check=False)
    output = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, output[-3000:]
    assert "ModelMismatchError" in output, output[-3000:]
    assert f"{len(overlap)} case(s) that this run scores as test cases: {', '.join(overlap)}" in output, \
        output[-3000:]
