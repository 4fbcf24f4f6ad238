"""Tumour detection on a held-out set of HARD phantoms: patient AUROC / AP, FROC, size strata, mimics.

Why
---
The test split of a training run holds a handful of patients, too few for a patient-level AUROC or
a FROC to mean much, and the models chose nothing on it only by convention. This script draws
``--n`` (default 40) new patients with the ``hard`` preset of the phantom generator (cancer-like
tumours of 5-40 mm, down to iso-attenuating, lobulated, at the gland's edge, 0-2 per patient, duct
dilation with atrophy, cyst mimics labelled pancreas; ``docs/detection.md``). They are drawn with
the generator settings of ``conf/<--env>`` (``conf/base`` deep-merged with the environment, as
Kedro merges parameters; default ``hard``) but with a seed of their own (``--seed``, default
:data:`DEFAULT_SEED`), which must differ from every seed in ``conf/``: no training, split, tuning
or model choice ever saw these patients. Exactly ``--tumour-fraction`` of them (default 0.5) have
a tumour, so tumour-free patients (some with a cyst) exist for the AUROC and the mimic count.

The set is written once as a Task07 folder by the generator's own writer
(:func:`pancreas_seg.phantoms.write_synthetic_task07`: NIfTI images and labels, per-lesion
metadata in ``dataset.json``) under ``data/01_raw/hard_heldout_<seed>/`` and reused afterwards
(its fingerprint is checked). Every case is segmented by each model of ``--models`` as the
inference pipeline does (:meth:`Predictor.from_reference` with the ``conf/base`` inference settings,
then :meth:`Predictor.segment_with_probability`) and scored at once; only one case's probability
map is ever held.

Train first, then, from the repository root:

    kedro run --env hard --pipelines=train
    .venv/bin/python -m benchmarks.hard_heldout                   # cascade and unet, 40 patients
    .venv/bin/python -m benchmarks.hard_heldout --models unet fcn --n 60 --seed 5151

Per model (definitions: :mod:`pancreas_seg.evaluation.detection`):

* patient AUROC and AP of the patient score (the maximum tumour probability) with 95 % percentile
  bootstrap CIs over the patients (:func:`~pancreas_seg.evaluation.detection.patient_detection`,
  2000 resamples, seed 0, as the evaluation);
* FROC: lesion sensitivity (IoU >= 0.1) at 1/8 ... 8 false-positive candidates per case and the CPM;
* lesion sensitivity per size bin (equivalent diameter < 10, 10-20, > 20 mm, measured on the label);
* tumour Dice over the tumour patients, overall and by the size bin of each patient's largest lesion;
  pancreas Dice over all patients;
* mimic false positives: cyst-only patients (a cyst, no tumour) called tumour, i.e. patient score
  >= 0.5 and at least one predicted tumour voxel.

Writes ``data/08_reporting/benchmarks/hard_heldout.json`` (atomically; strict JSON: an undefined
value is ``null`` and a ``note`` says why), ``hard_heldout.md`` (tables) and ``hard_heldout_froc.png``
(every model's FROC on one plot). The phantoms are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

NAME = "hard_heldout"
DEFAULT_SEED = 4242
"""The held-out set's generator seed: used for no decision, and distinct from every seed in ``conf/``."""
DEFAULT_MODELS = ("cascade", "unet")
CALL_THRESHOLD = 0.5
"""A patient is *called* tumour when its score reaches this and at least one voxel is labelled tumour."""
TRAIN_COMMAND = "kedro run --env hard --pipelines=train"
#: Generator settings the command line may override (small test sets): flag -> PhantomConfig field.
GENERATOR_FLAGS = {"shape_xy_px": int, "spacing_xy_mm": float, "slice_thickness_mm": float, "z_extent_mm": float}


# --------------------------------------------------------------------------- settings
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hard_heldout", description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="hard", help="conf/<env> whose generator settings draw the set "
                                                      "(base deep-merged with it; its preset must be hard)")
    parser.add_argument("--n", type=int, default=40, help="patients to draw (default 40)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"generator seed, distinct from every seed in conf/ (default {DEFAULT_SEED})")
    parser.add_argument("--tumour-fraction", type=float, default=0.5,
                        help="exact share of patients with a tumour (default 0.5)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="model references, as inference.model (default: cascade unet)")
    parser.add_argument("--models-dir", default=str(_common.REPO_ROOT / "data" / "06_models"))
    parser.add_argument("--data-dir", default=None,
                        help="where the set is written / reused (default data/01_raw/hard_heldout_<seed>)")
    parser.add_argument("--report-dir", default=str(_common.REPORT_DIR),
                        help="where the JSON, markdown and PNG go (default data/08_reporting/benchmarks)")
    parser.add_argument("--conf-dir", default=str(_common.REPO_ROOT / "conf"))
    parser.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples of the AUROC / AP CIs")
    parser.add_argument("--shape-xy-px", type=int, default=None, help="override the in-plane matrix, px")
    for flag in ("spacing_xy_mm", "slice_thickness_mm", "z_extent_mm"):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=float, nargs=2, default=None,
                            metavar=("LOW", "HIGH"), help=f"override the generator's {flag} range")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.tumour_fraction <= 1.0:
        parser.error(f"--tumour-fraction must be in [0, 1], got {args.tumour_fraction}")
    return args


def environment_parameters(conf_dir: Path, env: str) -> dict[str, Any]:
    """``conf/base`` with ``conf/<env>`` deep-merged over it, as ``kedro run --env <env>`` sees them."""
    from benchmarks.gpu_check import environment_parameters as merged  # noqa: PLC0415 - YAML only

    if not (conf_dir / env).is_dir():
        raise FileNotFoundError(f"no environment {conf_dir / env}")
    return merged(conf_dir, env)


def _seeds(value: Any, path: str = "") -> list[tuple[str, int]]:
    """Every ``(dotted key, int)`` under a key whose name ends in ``seed``."""
    if isinstance(value, Mapping):
        found = []
        for key, item in value.items():
            dotted = f"{path}.{key}" if path else str(key)
            if str(key).endswith("seed") and isinstance(item, int) and not isinstance(item, bool):
                found.append((dotted, item))
            found += _seeds(item, dotted)
        return found
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in _seeds(item, f"{path}[{index}]")]
    return []


def conf_seeds(conf_dir: Path) -> list[tuple[str, int]]:
    """``(file:key, seed)`` of every seed in every environment's parameter files under ``conf_dir``."""
    import yaml  # noqa: PLC0415

    found = []
    for path in sorted(conf_dir.glob("*/parameters*.y*ml")):
        for key, seed in _seeds(yaml.safe_load(path.read_text()) or {}):
            found.append((f"{path.relative_to(conf_dir)}:{key}", seed))
    return found


def check_seed(seed: int, conf_dir: Path) -> None:
    """Refuse a seed that any setting in ``conf/`` uses (a data set, split, sampler ... seed)."""
    clashes = [where for where, value in conf_seeds(conf_dir) if value == seed]
    if clashes:
        raise ValueError(f"--seed {seed} is used in conf/ ({', '.join(clashes)}); the held-out set needs a seed "
                         "no setting uses, so no decision was ever made on its patients: pick another")


def phantom_config(params: Mapping[str, Any], tumour_fraction: float, overrides: Mapping[str, Any] | None = None):
    """The environment's ``ingestion.synthetic.phantom`` settings with ``tumour_fraction`` and ``overrides``."""
    from pancreas_seg.phantoms import PhantomConfig  # noqa: PLC0415

    phantom = {**params["ingestion"]["synthetic"]["phantom"], "tumour_fraction": tumour_fraction,
               **{key: value for key, value in (overrides or {}).items() if value is not None}}
    config = PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in phantom.items()})
    if config.preset != "hard":
        raise ValueError(f"the generator settings draw preset {config.preset!r}; the held-out set is of hard "
                         "phantoms: use --env hard (conf/hard) or an environment with phantom.preset: hard")
    return config


def ensure_heldout(root: Path, n: int, config: Any, seed: int, progress: bool = True) -> Path:
    """Write (once) or reuse the held-out set: ``n`` labelled cases, no unlabelled ones."""
    from pancreas_seg.phantoms import write_synthetic_task07  # noqa: PLC0415

    def report(index: int, total: int, case_id: str) -> None:
        if progress:
            print(f"  drew phantom {index}/{total} {case_id}", flush=True)

    try:
        return write_synthetic_task07(root, n_train=n, n_test=0, config=config, seed=seed, progress=report)
    except FileExistsError as exc:
        raise FileExistsError(f"{root} holds another data set than the one asked for (another --n, --tumour-fraction "
                              "or generator settings with this seed): remove it or pass --data-dir. "
                              f"({exc})") from None


def heldout_cases(root: Path) -> list[dict[str, Any]]:
    """The set's cases from its ``dataset.json``: id, image and label paths, lesion and cyst metadata."""
    dataset = json.loads((root / "dataset.json").read_text())
    meta = {case["id"]: case for case in dataset["synthetic"]["cases"]}
    cases = []
    for entry in dataset["training"]:
        case_id = Path(entry["image"]).name.removesuffix(".nii.gz")
        info = meta[case_id]
        lesions, cysts = list(info.get("lesions", [])), list(info.get("cysts", []))
        cases.append({"case_id": case_id, "image": root / entry["image"], "label": root / entry["label"],
                      "tumour": bool(info["tumour"]), "lesions": lesions, "cysts": cysts,
                      "cyst_only": not info["tumour"] and any(c.get("voxels", 0) > 0 for c in cysts)})
    return cases


def dataset_counts(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Patients, tumour patients, lesions (drawn, from the metadata), cysts, cyst-only patients."""
    return {"n_patients": len(cases), "n_tumour_patients": sum(c["tumour"] for c in cases),
            "n_tumour_free_patients": sum(not c["tumour"] for c in cases),
            "n_lesions": sum(len(c["lesions"]) for c in cases),
            "n_patients_with_two_lesions": sum(len(c["lesions"]) >= 2 for c in cases),
            "n_cysts": sum(1 for c in cases for cyst in c["cysts"] if cyst.get("voxels", 0) > 0),
            "n_cyst_only_patients": sum(c["cyst_only"] for c in cases),
            "lesion_diameter_mm_drawn": [les["equivalent_diameter_mm"] for c in cases for les in c["lesions"]]}


# --------------------------------------------------------------------------- models
def load_predictor(reference: str, models_dir: Path, settings: Any, load: bool = True) -> Any:
    """:meth:`Predictor.from_reference` (``load`` False: only resolve the files, no Keras), with an
    error naming the path and the training command when the model is missing."""
    from pancreas_seg.inference.model_store import resolve_model  # noqa: PLC0415
    from pancreas_seg.inference.predictor import Predictor  # noqa: PLC0415

    if not models_dir.is_dir():
        raise FileNotFoundError(f"no models folder {models_dir}: train the models on hard phantoms first "
                                f"(`{TRAIN_COMMAND}`), or pass --models-dir")
    try:
        return Predictor.from_reference(reference, models_dir, settings) if load else \
            resolve_model(reference, models_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model {reference!r} not found under {models_dir} ({exc}); train it on hard "
                                f"phantoms first: `{TRAIN_COMMAND}`") from None


# --------------------------------------------------------------------------- scoring
def score_case(predictor: Any, case: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """Segment one case and score it; returns its row and its candidate and lesion tables (or None
    for a model without a tumour output). The probability map is dropped before returning."""
    from pancreas_seg.core.labels import TUMOUR, class_mask  # noqa: PLC0415
    from pancreas_seg.evaluation.detection import lesion_candidates  # noqa: PLC0415
    from pancreas_seg.evaluation.metrics import dice  # noqa: PLC0415
    from pancreas_seg.imaging.nifti_io import load_nifti  # noqa: PLC0415

    image, truth = load_nifti(case["image"]), load_nifti(case["label"])
    start = time.perf_counter()
    prediction = predictor.segment_with_probability(image.array, image.affine, case["case_id"])
    seconds = time.perf_counter() - start
    labels, truth_labels = prediction.labels, truth.array
    true_tumour = class_mask(truth_labels, "tumour")
    row: dict[str, Any] = {
        "case_id": case["case_id"], "tumour_present": bool(true_tumour.any()), "cyst_only": case["cyst_only"],
        "lesions_drawn": len(case["lesions"]),
        "dice_pancreas": dice(class_mask(labels, "pancreas"), class_mask(truth_labels, "pancreas")),
        "dice_tumour": dice(class_mask(labels, "tumour"), true_tumour),
        "patient_tumour_score": prediction.patient_tumour_score,
        "predicted_tumour_voxels": int(np.count_nonzero(labels == TUMOUR)), "seconds": seconds,
    }
    candidates = lesions = None
    if prediction.tumour_probability is not None:
        candidates, lesions = lesion_candidates(class_mask(labels, "tumour"), prediction.tumour_probability,
                                                true_tumour, truth.spacing_mm)
        candidates.insert(0, "case_id", case["case_id"])
        lesions.insert(0, "case_id", case["case_id"])
        row["largest_lesion_mm"] = float(lesions["diameter_mm"].max()) if len(lesions) else None
        row["lesions_true"] = len(lesions)   # true tumour components: what the FROC counts (touching lesions merge)
        row["lesions_detected"] = int(lesions["detected"].sum())
        row["false_positive_candidates"] = int((~candidates["true_positive"]).sum())
    else:   # no tumour output: the largest true lesion's size still bins the tumour Dice
        from scipy import ndimage  # noqa: PLC0415

        from pancreas_seg.evaluation.metrics import LESION_CONNECTIVITY  # noqa: PLC0415

        structure = ndimage.generate_binary_structure(true_tumour.ndim, LESION_CONNECTIVITY)
        components, n = ndimage.label(true_tumour, structure=structure)
        volume = np.bincount(components.ravel())[1:].max() * float(np.prod(truth.spacing_mm)) if n else 0.0
        row["largest_lesion_mm"] = float(np.cbrt(6.0 * volume / np.pi)) if n else None   # equal-volume sphere
    row["called_tumour"] = bool(row["patient_tumour_score"] is not None
                                and row["patient_tumour_score"] >= CALL_THRESHOLD
                                and row["predicted_tumour_voxels"] > 0)
    del prediction
    return row, candidates, lesions


def summarise_model(rows: Sequence[Mapping[str, Any]], candidates: Sequence[Any], lesions: Sequence[Any],
                    n_bootstrap: int) -> dict[str, Any]:
    """Detection, Dice and mimic numbers of one model from its per-case rows and tables."""
    import pandas as pd  # noqa: PLC0415

    from pancreas_seg.evaluation.detection import (  # noqa: PLC0415
        SIZE_BIN_LABELS,
        froc,
        patient_detection,
        size_bin,
        size_stratified_sensitivity,
    )
    from pancreas_seg.evaluation.metrics import summarise  # noqa: PLC0415
    from pancreas_seg.evaluation.scoring import DETECTION_BOOTSTRAP  # noqa: PLC0415

    tumour_rows = [r for r in rows if r["tumour_present"]]
    dice_by_size = {}
    for label in SIZE_BIN_LABELS:
        in_bin = [r["dice_tumour"] for r in tumour_rows
                  if r["largest_lesion_mm"] is not None and size_bin([r["largest_lesion_mm"]])[0] == label]
        dice_by_size[label] = summarise(in_bin)
    cyst_only = [r for r in rows if r["cyst_only"]]
    tumour_free = [r for r in rows if not r["tumour_present"]]
    summary: dict[str, Any] = {
        "n_cases": len(rows),
        "pancreas_dice": summarise(r["dice_pancreas"] for r in rows),
        "tumour_dice_tumour_patients": summarise(r["dice_tumour"] for r in tumour_rows),
        "tumour_dice_by_largest_lesion_size": dice_by_size,
        "mimic_false_positives": {
            "n_called": sum(r["called_tumour"] for r in cyst_only), "n_cyst_only_patients": len(cyst_only),
            "case_ids": [r["case_id"] for r in cyst_only if r["called_tumour"]],
            "definition": f"cyst-only patients (a cyst, no tumour) with patient score >= {CALL_THRESHOLD} "
                          "and at least one predicted tumour voxel"},
        "tumour_free_called_tumour": {"n_called": sum(r["called_tumour"] for r in tumour_free),
                                      "n_tumour_free_patients": len(tumour_free)},
        "seconds_per_case_median": _common.median([r["seconds"] for r in rows]),
    }
    if not candidates:
        summary["detection"] = {"available": False,
                                "note": "the model has no tumour output: no probability map, no detection metrics"}
        return summary
    scores = [r["patient_tumour_score"] for r in rows]
    truth = [r["tumour_present"] for r in rows]
    patient = patient_detection(scores, truth, n_bootstrap=n_bootstrap, confidence=DETECTION_BOOTSTRAP["confidence"],
                                seed=DETECTION_BOOTSTRAP["seed"])
    pooled_candidates, pooled_lesions = pd.concat(candidates, ignore_index=True), pd.concat(lesions, ignore_index=True)
    curve = froc(pooled_candidates, pooled_lesions, len(rows))
    summary["detection"] = {
        "available": True, "patient": patient,
        "froc": {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in curve.items()},
        "size_sensitivity": size_stratified_sensitivity(pooled_lesions).to_dict(orient="records"),
    }
    return summary


def evaluate_model(reference: str, models_dir: Path, settings: Any, cases: Sequence[Mapping[str, Any]],
                   n_bootstrap: int, expected_dataset: str) -> dict[str, Any]:
    """Load one model, segment and score every case (one probability map at a time), summarise."""
    predictor = load_predictor(reference, models_dir, settings)
    rows, candidates, lesions = [], [], []
    for index, case in enumerate(cases, start=1):
        row, case_candidates, case_lesions = score_case(predictor, case)
        rows.append(row)
        if case_candidates is not None:
            candidates.append(case_candidates)
            lesions.append(case_lesions)
        score = row["patient_tumour_score"]
        found = f", lesions {row['lesions_detected']}/{len(case_lesions)}" if case_lesions is not None else ""
        print(f"[{reference}] {index}/{len(cases)} {case['case_id']}: "
              f"{'tumour' if row['tumour_present'] else 'cyst only' if row['cyst_only'] else 'no tumour'}, "
              f"score {'n/a' if score is None else f'{score:.3f}'}{found}, "
              f"pancreas Dice {row['dice_pancreas']:.3f}, {row['seconds']:.1f} s", flush=True)
    card = predictor.card
    model_files = [str(path) for path in getattr(predictor, "model_files", [])]
    warnings = []
    if card.dataset != expected_dataset:
        warnings.append(f"the model was trained on {card.dataset!r}, not on the hard phantoms "
                        f"({expected_dataset!r}); train with `{TRAIN_COMMAND}`")
    del predictor
    _clear_keras()
    return {"reference": reference, "model_files": model_files, "version": card.version,
            "trained_on": card.dataset, "trained_at": card.trained_at, "warnings": warnings,
            **summarise_model(rows, candidates, lesions, n_bootstrap), "cases": rows}


def _clear_keras() -> None:
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()


# --------------------------------------------------------------------------- reports
def _strict(value: Any) -> Any:
    """JSON-ready: NaN / inf -> None, NumPy scalars and arrays -> Python, tuples -> lists, paths -> str."""
    if isinstance(value, Mapping):
        return {str(key): _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_strict(item) for item in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _with_ci(block: Mapping[str, Any], key: str) -> str:
    if block.get(key) is None or not math.isfinite(block[key]):
        return "n/a"
    low, high = block.get(f"{key}_ci_low"), block.get(f"{key}_ci_high")
    ci = f" [{_num(low)}, {_num(high)}]" if low is not None and math.isfinite(low) else ""
    return f"{_num(block[key])}{ci}"


def _dice(stats: Mapping[str, Any]) -> str:
    return "n/a (n=0)" if not stats["n_finite"] else f"{_num(stats['mean'])} (n={stats['n_finite']})"


def markdown(report: Mapping[str, Any]) -> str:
    """The report's tables as markdown."""
    from pancreas_seg.evaluation.detection import FROC_FP_RATES, SIZE_BIN_LABELS  # noqa: PLC0415

    data = report["dataset"]
    lines = [f"# Held-out hard phantoms (seed {report['seed']}, SYNTHETIC)", "",
             f"{data['n_patients']} patients, {data['n_tumour_patients']} with a tumour "
             f"({data['n_lesions']} lesions drawn, {data['n_patients_with_two_lesions']} patients with two), "
             f"{data['n_cyst_only_patients']} cyst-only; generator settings of conf/{report['env']}, "
             f"data `{report['data_dir']}`. `python -m benchmarks.hard_heldout`; definitions: docs/detection.md.", "",
             "## Patients and segmentation", "",
             "| model | AUROC [95 % CI] | AP [95 % CI] | CPM | tumour Dice (tumour patients) "
             f"| {' | '.join(f'tumour Dice, largest {b}' for b in SIZE_BIN_LABELS)} | pancreas Dice "
             "| cyst-only called tumour | tumour-free called tumour |",
             "|---|---|---|---|---|" + "---|" * len(SIZE_BIN_LABELS) + "---|---|---|"]
    for name, model in report["models"].items():
        detection = model["detection"]
        patient = detection.get("patient", {}) if detection["available"] else {}
        cpm = _num(detection["froc"]["cpm"]) if detection["available"] else "n/a"
        mimic, free = model["mimic_false_positives"], model["tumour_free_called_tumour"]
        lines.append(f"| {name} | {_with_ci(patient, 'auroc')} | {_with_ci(patient, 'ap')} | {cpm} | "
                     f"{_dice(model['tumour_dice_tumour_patients'])} | "
                     + " | ".join(_dice(model["tumour_dice_by_largest_lesion_size"][b]) for b in SIZE_BIN_LABELS)
                     + f" | {_dice(model['pancreas_dice'])} | {mimic['n_called']}/{mimic['n_cyst_only_patients']} "
                       f"| {free['n_called']}/{free['n_tumour_free_patients']} |")
    rates = [f"1/{round(1 / r)}" if r < 1 else f"{r:g}" for r in FROC_FP_RATES]
    lines += ["", "## Lesions (IoU >= 0.1)", "",
              f"| model | {' | '.join(f'sens. @ {r} FP/case' for r in rates)} | CPM "
              f"| {' | '.join(f'sens. {b}' for b in SIZE_BIN_LABELS)} |",
              "|---|" + "---|" * (len(rates) + 1 + len(SIZE_BIN_LABELS))]
    for name, model in report["models"].items():
        detection = model["detection"]
        if not detection["available"]:
            lines.append(f"| {name} | " + " | ".join(["n/a"] * (len(rates) + 1 + len(SIZE_BIN_LABELS))) + " |")
            continue
        curve = detection["froc"]
        bins = [f"{_num(row['sensitivity'])} ({row['n_detected']}/{row['n_lesions']})"
                for row in detection["size_sensitivity"]]
        lines.append(f"| {name} | {' | '.join(_num(v) for v in curve['sensitivity_at_rates'])} | {_num(curve['cpm'])} "
                     f"| {' | '.join(bins)} |")
    notes = [f"{name}: {note}" for name, model in report["models"].items()
             for note in [*model["warnings"], model["detection"].get("note", ""),
                          model["detection"].get("patient", {}).get("note", ""),
                          model["detection"].get("froc", {}).get("note", "")] if note]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write_reports(report: Mapping[str, Any], report_dir: Path) -> dict[str, Path]:
    """The JSON, the markdown and the FROC plot, each written atomically."""
    from pancreas_seg.core.atomic import atomic_path, atomic_write_text  # noqa: PLC0415
    from pancreas_seg.evaluation.plots import plot_froc  # noqa: PLC0415

    paths = {"json": report_dir / f"{NAME}.json", "markdown": report_dir / f"{NAME}.md",
             "froc_png": report_dir / f"{NAME}_froc.png"}
    report = {**report, "outputs": {key: str(path) for key, path in paths.items()}}
    atomic_write_text(paths["json"], json.dumps(_strict(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], markdown(report))
    figure = plot_froc({name: model["detection"] for name, model in report["models"].items()},
                       title=f"tumour FROC, {report['dataset']['n_patients']} held-out hard phantoms")
    with atomic_path(paths["froc_png"]) as tmp:
        figure.savefig(tmp, dpi=120)
    return paths


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from pancreas_seg.inference.predictor import PredictionSettings  # noqa: PLC0415

    conf_dir, models_dir = Path(args.conf_dir), Path(args.models_dir)
    check_seed(args.seed, conf_dir)
    params = environment_parameters(conf_dir, args.env)
    overrides = {"shape_xy_px": args.shape_xy_px, "spacing_xy_mm": args.spacing_xy_mm,
                 "slice_thickness_mm": args.slice_thickness_mm, "z_extent_mm": args.z_extent_mm}
    config = phantom_config(params, args.tumour_fraction, overrides)
    for reference in args.models:   # before drawing: a missing model fails in seconds, not after the phantoms
        load_predictor(reference, models_dir, None, load=False)
    root = Path(args.data_dir) if args.data_dir else _common.REPO_ROOT / "data" / "01_raw" / f"{NAME}_{args.seed}"
    print(f"held-out set: {args.n} hard phantoms, seed {args.seed}, tumour fraction {args.tumour_fraction} -> {root}",
          flush=True)
    ensure_heldout(root, args.n, config, args.seed)
    cases = heldout_cases(root)
    inference = environment_parameters(conf_dir, "base")["inference"]
    settings = PredictionSettings.from_params(inference)
    expected_dataset = Path(params["ingestion"]["synthetic"]["path"]).name
    report: dict[str, Any] = {
        "benchmark": NAME, "seed": args.seed, "env": args.env, "data_dir": str(root),
        "tumour_fraction": args.tumour_fraction, "generator": config.to_dict(),
        "dataset": dataset_counts(cases), "settings": settings.to_dict(), "n_bootstrap": args.n_bootstrap,
        "call_threshold": CALL_THRESHOLD, "models": {}, "machine": _common.machine_info(),
        "note": "SYNTHETIC phantoms. null = undefined (NaN), with a note saying why",
    }
    for reference in args.models:
        report["models"][reference] = evaluate_model(reference, models_dir, settings, cases, args.n_bootstrap,
                                                     expected_dataset)
    paths = write_reports(report, Path(args.report_dir))
    print(markdown(report))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
