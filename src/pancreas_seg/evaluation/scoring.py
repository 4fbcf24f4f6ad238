"""Scoring predictions in 3D and summarising the scores: per-case rows, per-model summaries, tables.

The evaluation, cross-validation and tuning pipelines all score through :func:`score_cases` and
summarise through :func:`build_summary`, so a number means the same wherever it is reported.
Pure pandas/NumPy: no Kedro, no MLflow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg.core.labels import class_mask
from pancreas_seg.evaluation.detection import (
    FROC_FP_RATES,
    SIZE_BIN_LABELS,
    froc,
    lesion_candidates,
    patient_detection,
    patient_tumour_score,
    size_stratified_sensitivity,
)
from pancreas_seg.evaluation.metrics import (
    LESION_KEYS,
    case_metrics,
    lesion_detection,
    slice_dice,
    summarise,
    summarise_lesions,
)
from pancreas_seg.evaluation.postprocessing import keep_largest_foreground
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import PROBABILITY_SUFFIX, CasePrediction, NiftiVolume, load_nifti

logger = logging.getLogger(__name__)

SCORE_METRICS = ("dice", "hd95_mm", "nsd", "hd95_surfel_mm", "nsd_surfel", "slice_dice", "dice_lcc",
                 "hd95_mm_lcc", "nsd_lcc")
"""Per-case scores that :func:`build_summary` summarises per class (mean, median, std, counts).
``hd95_mm``/``nsd`` count surface voxels; ``hd95_surfel_mm``/``nsd_surfel`` weight surface elements
by area as DeepMind's surface-distance (and the MSD challenge) do: see :mod:`pancreas_seg.evaluation.metrics`."""
LESION_CLASS = "tumour"
"""The class whose connected components are counted as lesions (lesion columns, ``lesions`` block)."""
DETECTION_KEYS = ("patient_tumour_score", "detection_candidates", "detection_lesions")
"""Per-case detection columns (tumour rows; NaN elsewhere and for a model without a tumour probability):
the patient score (:func:`~pancreas_seg.evaluation.detection.patient_tumour_score`, the maximum tumour
probability) and, as JSON lists, the case's candidates ``[confidence, true_positive]`` and true lesions
``[diameter_mm, detected, confidence]`` of :func:`~pancreas_seg.evaluation.detection.lesion_candidates`
(IoU >= 0.1 hits), which :func:`build_summary` pools into the FROC."""
METRIC_COLUMNS = ["case_id", "architecture", "class", *SCORE_METRICS, "truth_present", *LESION_KEYS,
                  *DETECTION_KEYS]
"""The per-case CSV: ``truth_present`` (the class is in that case's ground truth) on every row; the
lesion counts of :func:`~pancreas_seg.evaluation.metrics.lesion_detection` and the detection columns
(:data:`DETECTION_KEYS`) on the :data:`LESION_CLASS` rows, NaN on the others."""
DETECTION_BOOTSTRAP = {"n_bootstrap": 2000, "confidence": 0.95, "seed": 0}
"""Percentile bootstrap over the patients of the AUROC / AP confidence intervals (:func:`build_summary`)."""


def _labels_and_probability(value: CasePrediction | NiftiVolume, predictions: Mapping[str, Callable[[], Any]],
                            case_id: str) -> tuple[NiftiVolume, np.ndarray | None]:
    """A prediction partition's labels and tumour probability: from a :class:`CasePrediction` (a node's
    own output), else from the ``<case>_tumour_probability`` partition next to it (a loaded folder)."""
    if isinstance(value, CasePrediction):
        return value.labels, value.tumour_probability
    partner = predictions.get(f"{case_id}{PROBABILITY_SUFFIX}")
    return value, None if partner is None else np.asarray(partner().array, dtype=np.float32)


def _detection(labels: np.ndarray, probability: np.ndarray | None, truth: np.ndarray,
               spacing: tuple[float, ...]) -> dict[str, Any]:
    """The :data:`DETECTION_KEYS` of one case (NaN without a probability map)."""
    if probability is None:
        return dict.fromkeys(DETECTION_KEYS, np.nan)
    candidates, lesions = lesion_candidates(class_mask(labels, LESION_CLASS), probability,
                                            class_mask(truth, LESION_CLASS), spacing)
    return {"patient_tumour_score": patient_tumour_score(probability),
            "detection_candidates": json.dumps([[round(float(c), 6), bool(t)] for c, t in
                                                zip(candidates["confidence"], candidates["true_positive"], strict=True)]),
            "detection_lesions": json.dumps([[round(float(d), 3), bool(f), None if np.isnan(c) else round(float(c), 6)]
                                             for d, f, c in zip(lesions["diameter_mm"], lesions["detected"],
                                                                lesions["confidence"], strict=True)])}


def score_cases(predictions: Mapping[str, Callable[[], CasePrediction | NiftiVolume]], cases: list[str],
                case_manifest: pd.DataFrame, slice_geometry: dict[str, Any], name: str,
                tolerance_mm: float) -> pd.DataFrame:
    """Score ``cases`` (predictions on the original grid) against their labels: rows of :data:`METRIC_COLUMNS`.

    Per case and class: Dice, HD95 (mm) and NSD (voxel-count and surfel-weighted) and slice Dice,
    without and with largest-component post-processing. Slice Dice is taken along each scan's
    axial axis, from its geometry in ``slice_geometry``. Every row also says whether the truth has
    the class (``truth_present``); the tumour rows carry the lesion counts and sensitivity of the
    raw (not post-processed) prediction and, when the prediction has a tumour probability map (a
    :class:`CasePrediction`, or a ``<case>_tumour_probability`` partition next to ``<case>``), the
    detection columns :data:`DETECTION_KEYS`; the other rows NaN there. ``name`` fills ``architecture``.
    Each case's prediction and probability map are loaded, scored and dropped in turn.
    """
    manifest = case_manifest.set_index("case_id")
    rows = []
    for index, case_id in enumerate(cases, start=1):
        logger.info("%s: scoring case %d/%d: %s", name, index, len(cases), case_id)
        prediction, probability = _labels_and_probability(predictions[case_id](), predictions, case_id)
        truth = load_nifti(manifest.loc[case_id, "label_path"])
        if prediction.array.shape != truth.array.shape or not np.allclose(prediction.affine, truth.affine, atol=1e-3):
            raise ValueError(f"prediction for {case_id} is not on the label's grid "
                             f"({prediction.array.shape} vs {truth.array.shape})")
        spacing = truth.spacing_mm
        # the scan geometry's axial axis: array axis 2 only for files stored in an axial-last order
        axial = ScanGeometry.from_dict(slice_geometry[case_id]).axial_axis
        raw = case_metrics(prediction.array, truth.array, spacing, tolerance_mm)
        lcc = case_metrics(keep_largest_foreground(prediction.array), truth.array, spacing, tolerance_mm)
        lesions = lesion_detection(prediction.array, truth.array, LESION_CLASS)
        detection = _detection(prediction.array, probability, truth.array, spacing)
        del probability
        for plain, post in zip(raw, lcc, strict=True):
            class_name = plain["class"]
            rows.append({"case_id": case_id, "architecture": name, "class": class_name,
                         **{key: plain[key] for key in ("dice", "hd95_mm", "nsd", "hd95_surfel_mm", "nsd_surfel")},
                         "slice_dice": slice_dice(prediction.array, truth.array, class_name, axis=axial),
                         "dice_lcc": post["dice"], "hd95_mm_lcc": post["hd95_mm"], "nsd_lcc": post["nsd"],
                         "truth_present": bool(class_mask(truth.array, class_name).any()),
                         **(lesions if class_name == LESION_CLASS else dict.fromkeys(LESION_KEYS, np.nan)),
                         **(detection if class_name == LESION_CLASS else dict.fromkeys(DETECTION_KEYS, np.nan))})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def score_out_of_fold_cases(predictions: Mapping[str, Callable[[], NiftiVolume]], cases: list[str],
                            case_manifest: pd.DataFrame, slice_geometry: dict[str, Any], name: str,
                            tolerance_mm: float) -> pd.DataFrame:
    """:func:`score_cases` of out-of-fold predictions, plus each case's ``fold`` (from the manifest)
    before ``class``: how cross-validation scores every architecture and the cascade."""
    metrics = score_cases(predictions, cases, case_manifest, slice_geometry, name, tolerance_mm)
    fold_of = dict(zip(case_manifest["case_id"].astype(str), case_manifest["fold"].astype(int), strict=True))
    metrics.insert(metrics.columns.get_loc("class"), "fold", metrics["case_id"].map(fold_of).astype(int))
    return metrics


HD95_METRICS = ("hd95_mm", "hd95_surfel_mm", "hd95_mm_lcc")
"""Columns whose mean/median never stand alone: misses (``inf``) and undefined cases (NaN) are
counted next to them wherever they are reported (CSV, markdown, MLflow, plots)."""
HD95_COUNTS = ("n_finite", "n_inf", "n_nan")
TRUTH_PRESENT_DICE = "dice_truth_present"
"""Summary entry: Dice over the cases whose ground truth has the class (``n`` = those cases)."""
LESION_SUMMARY = ("lesion_sensitivity", "fp_components_per_case", "lesions_true", "lesions_found",
                  "lesions_predicted", "fp_components")
"""Entries of a summary's ``lesions`` block that go to MLflow and into the comparison table."""


def _fp_label(rate: float) -> str:
    """``0.125`` -> ``"0.125"``, ``1.0`` -> ``"1"`` (column and metric names of FROC operating points)."""
    return f"{rate:g}"


def _json_rows(cells: pd.Series) -> list[list[Any]]:
    return [item for cell in cells if isinstance(cell, str) for item in json.loads(cell)]


def summarise_detection(tumour_rows: pd.DataFrame, n_bootstrap: int = DETECTION_BOOTSTRAP["n_bootstrap"],
                        confidence: float = DETECTION_BOOTSTRAP["confidence"],
                        seed: int = DETECTION_BOOTSTRAP["seed"]) -> dict[str, Any]:
    """Tumour detection of one model from its :data:`LESION_CLASS` rows (one per case).

    Returns ``patient`` (:func:`~pancreas_seg.evaluation.detection.patient_detection`: AUROC and AP
    of ``patient_tumour_score`` against ``truth_present``, with percentile bootstrap CIs over the
    cases), ``froc`` (:func:`~pancreas_seg.evaluation.detection.froc` of the pooled candidates and
    lesions: ``fp_rates``, ``sensitivity_at_rates``, ``cpm``, the curve ``fp_per_case`` /
    ``sensitivity`` as lists, counts, ``note``), ``size_sensitivity`` (rows of
    :func:`~pancreas_seg.evaluation.detection.size_stratified_sensitivity`) and ``n_cases``; or
    ``{"available": False, "note": ...}`` when no case has a tumour probability map (a ``pancreas``
    model, or a CSV written before detection was scored).
    """
    rows = tumour_rows[tumour_rows["patient_tumour_score"].notna()] if "patient_tumour_score" in tumour_rows else \
        tumour_rows.iloc[0:0]
    if rows.empty:
        return {"available": False, "note": "no tumour probability map: the model has no tumour output, "
                                            "or the scores predate detection"}
    patient = patient_detection(rows["patient_tumour_score"].to_numpy(dtype=float),
                                rows["truth_present"].eq(True).to_numpy(), n_bootstrap, confidence, seed)
    candidates = pd.DataFrame(_json_rows(rows["detection_candidates"]), columns=["confidence", "true_positive"])
    lesions = pd.DataFrame(_json_rows(rows["detection_lesions"]), columns=["diameter_mm", "detected", "confidence"])
    candidates["true_positive"] = candidates["true_positive"].astype(bool)
    lesions["detected"] = lesions["detected"].astype(bool)
    lesions["confidence"] = lesions["confidence"].astype(float)
    curve = froc(candidates, lesions, len(rows))
    return {"available": True, "n_cases": len(rows), "patient": patient,
            "froc": {"fp_rates": curve["fp_rates"].tolist(), "sensitivity_at_rates": curve["sensitivity_at_rates"].tolist(),
                     "cpm": curve["cpm"], "fp_per_case": curve["fp_per_case"].tolist(),
                     "sensitivity": curve["sensitivity"].tolist(),
                     **{key: curve[key] for key in ("n_cases", "n_lesions", "n_detected", "n_candidates",
                                                    "n_false_positives", "note")}},
            "size_sensitivity": size_stratified_sensitivity(lesions).to_dict(orient="records")}


def build_summary(metrics_per_case: pd.DataFrame, architecture: str, mlflow_run_id: str | None,
                  data_source: str | None) -> dict[str, Any]:
    """Mean/median/std per class and metric (NaN excluded, inf counted separately), lesions, detection.

    ``classes[<class>]`` holds :func:`summarise` of every :data:`SCORE_METRICS` column and of
    ``dice_truth_present`` (Dice over the cases where ``truth_present`` is true). ``lesions``
    holds, for :data:`LESION_CLASS`, :func:`summarise_lesions` over all its rows (pooled lesion
    sensitivity, false-positive components per case, counts); ``detection`` holds, for it,
    :func:`summarise_detection` (patient AUROC/AP with CIs, FROC, size-stratified sensitivity).
    """
    summary: dict[str, Any] = {"architecture": architecture, "mlflow_run_id": mlflow_run_id,
                               "n_cases": int(metrics_per_case["case_id"].nunique()),
                               "data_source": data_source, "classes": {}, "lesions": {}, "detection": {}}
    for class_name, frame in metrics_per_case.groupby("class"):
        stats = {m: summarise(frame[m].to_numpy(dtype=float)) for m in SCORE_METRICS}
        # eq(True): a bool column, also when read back from the CSV; NaN never counts as present
        stats[TRUTH_PRESENT_DICE] = summarise(frame.loc[frame["truth_present"].eq(True), "dice"].to_numpy(dtype=float))
        summary["classes"][class_name] = stats
    lesion_rows = metrics_per_case[metrics_per_case["class"] == LESION_CLASS]
    if not lesion_rows.empty:
        summary["lesions"][LESION_CLASS] = summarise_lesions(lesion_rows[list(LESION_KEYS)].to_dict(orient="records"))
        summary["detection"][LESION_CLASS] = summarise_detection(lesion_rows)
    return summary


_SIZE_KEYS = dict(zip(SIZE_BIN_LABELS, ("lt10mm", "10to20mm", "gt20mm"), strict=True))
"""Size bin label -> the suffix of its column / metric name."""


def detection_values(detection: Mapping[str, Any]) -> dict[str, float]:
    """The flat detection numbers of one :func:`summarise_detection` block (NaN when not available):
    :data:`DETECTION_COLUMNS`."""
    values = dict.fromkeys(DETECTION_COLUMNS, np.nan)
    if not detection.get("available"):
        return values
    patient, curve = detection["patient"], detection["froc"]
    values |= {key: patient[key] for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "ap", "ap_ci_low", "ap_ci_high")}
    values |= {"n_patients_with_tumour": patient["n_positive"], "froc_cpm": curve["cpm"]}
    values |= {f"froc_sensitivity_at_{_fp_label(r)}_fp": v
               for r, v in zip(curve["fp_rates"], curve["sensitivity_at_rates"], strict=True)}
    for row in detection["size_sensitivity"]:
        key = _SIZE_KEYS[row["size_bin"]]
        values |= {f"sensitivity_{key}": row["sensitivity"], f"lesions_{key}": row["n_lesions"],
                   f"detected_{key}": row["n_detected"]}
    return values


DETECTION_COLUMNS = ("auroc", "auroc_ci_low", "auroc_ci_high", "ap", "ap_ci_low", "ap_ci_high", "n_patients_with_tumour",
                     "froc_cpm", *(f"froc_sensitivity_at_{_fp_label(r)}_fp" for r in FROC_FP_RATES),
                     *(f"{kind}_{key}" for key in _SIZE_KEYS.values()
                       for kind in ("sensitivity", "lesions", "detected")))
"""Detection columns of the comparison table (on :data:`LESION_CLASS` rows) and, as
``test_tumour_<column>``, MLflow metrics: patient AUROC and AP with their bootstrap CI, the number of
cases with a tumour, FROC CPM and sensitivity at 1/8 ... 8 false positives per case, and per size bin
(equivalent diameter < 10, 10-20, > 20 mm) the lesion sensitivity, lesions and detected lesions."""


def flat_test_metrics(summary: dict[str, Any]) -> dict[str, float | int]:
    """The flat ``test_<metric>_<class>_<stat>`` dict that the evaluation logs to MLflow.

    Every metric gets its ``mean`` and ``median`` (over finite values); every HD95 column also gets
    ``n_inf`` (misses: exactly one of prediction / truth empty), ``n_finite`` and ``n_nan`` (both
    empty, undefined), so an HD95 mean is never logged without the number of misses behind it.
    ``dice_truth_present`` (e.g. ``test_dice_truth_present_tumour_mean``) also gets ``n``, the
    cases whose truth has the class. The pooled lesion values are not per-case statistics and
    have no ``<stat>``: ``test_<name>_<class>`` for every name in :data:`LESION_SUMMARY`, e.g.
    ``test_lesion_sensitivity_tumour`` and ``test_fp_components_per_case_tumour``. Detection:
    ``test_tumour_<name>`` for every name in :data:`DETECTION_COLUMNS`, e.g. ``test_tumour_auroc``,
    ``test_tumour_ap``, ``test_tumour_froc_cpm`` (NaN values are not logged).
    """
    flat: dict[str, float | int] = {}
    for class_name, metrics in summary["classes"].items():
        for metric, stats in metrics.items():
            names = ("mean", "median") + (HD95_COUNTS if metric in HD95_METRICS else ())
            names += ("n",) if metric == TRUTH_PRESENT_DICE else ()
            for stat in names:
                flat[f"test_{metric}_{class_name}_{stat}"] = stats[stat]
    for class_name, lesions in summary.get("lesions", {}).items():
        for name in LESION_SUMMARY:
            flat[f"test_{name}_{class_name}"] = lesions[name]
    for class_name, detection in summary.get("detection", {}).items():
        flat |= {f"test_{class_name}_{name}": value for name, value in detection_values(detection).items()}
    return flat


def comparison_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per architecture × class with mean ± std of each metric.

    HD95 columns (:data:`HD95_METRICS`) also carry the median and the counts ``n_finite``
    (the cases the mean/median/std are over), ``n_inf`` (misses) and ``n_nan`` (both empty).
    ``dice_truth_present_{mean,std,n}`` is the Dice over the ``n`` cases whose truth has the
    class. The lesion columns (:data:`LESION_SUMMARY`: ``lesion_sensitivity``,
    ``fp_components_per_case``, ``lesions_true``, ...) are filled on the :data:`LESION_CLASS` rows
    and NaN on the others (also for a summary written before lesions were counted); so are the
    detection columns (:data:`DETECTION_COLUMNS`: ``auroc``, ``ap`` with CIs, ``froc_cpm``, ...).
    """
    rows = []
    for summary in summaries:
        for class_name, metrics in summary["classes"].items():
            row = {"architecture": summary["architecture"], "class": class_name, "n_cases": summary["n_cases"]}
            for metric, stats in metrics.items():
                row[f"{metric}_mean"] = stats["mean"]
                row[f"{metric}_std"] = stats["std"]
                if metric in HD95_METRICS:
                    row[f"{metric}_median"] = stats["median"]
                    for count in HD95_COUNTS:
                        row[f"{metric}_{count}"] = int(stats[count])
                if metric == TRUTH_PRESENT_DICE:
                    row[f"{metric}_n"] = int(stats["n"])
            lesions = summary.get("lesions", {}).get(class_name, {})
            row.update({name: lesions.get(name, np.nan) for name in LESION_SUMMARY})
            row.update(detection_values(summary.get("detection", {}).get(class_name, {})))
            rows.append(row)
    table = pd.DataFrame(rows)
    for column in (f"{TRUTH_PRESENT_DICE}_{s}" for s in ("mean", "std", "n")):
        if column not in table:   # only summaries from before dice_truth_present existed
            table[column] = np.nan
    return table.sort_values(["class", "dice_mean"], ascending=[True, False])


HD95_NOTE = (
    "HD95 and NSD count surface voxels; the *surfel* columns weight surface elements by their area, as "
    "DeepMind's surface-distance package and the MSD challenge do: compare those with published numbers. "
    "HD95 (mm) is mean ± std over the cases with a finite HD95 (median in brackets). A **miss** is a case "
    "where exactly one of prediction and truth has the structure (the model missed it, or predicted it "
    "where the truth has none): its HD95 is infinite, it is not averaged in and is counted as "
    "\"k misses of m\", m being the cases where the truth or the prediction has the structure. "
    "Cases where both are empty (typical for the tumour class) have an undefined HD95 (NaN) and are "
    "excluded; their number is given as \"both empty\". For the tumour class, absent from many "
    "truths, a tumour predicted in a case without one is a miss, and a correct \"no tumour\" is a "
    "both-empty case."
)
LESION_NOTE = (
    "**Dice (cases with tumour)** is the tumour Dice over the test cases whose ground truth has a tumour "
    "(their number n in brackets); the Dice column also counts a tumour predicted in a tumour-free case "
    "(Dice 0) and leaves out correct \"no tumour\" cases (NaN). A **lesion** is a connected tumour "
    "component (26-connectivity, in 3D on the original grid). **Lesion sensitivity** is found / true "
    "pooled over the test cases: a true lesion is found if at least one predicted tumour voxel lies in "
    "it (n/a when no test case has a tumour). **FP components / case** is the number of predicted "
    "tumour components that overlap no true tumour voxel, divided by the number of test cases (all of "
    "them, with or without a tumour; total and cases in brackets). Lesion metrics are taken on the raw "
    "prediction (no largest-component step) and only for the tumour class (– on pancreas rows)."
)


def _hd95_cell(row: pd.Series, metric: str) -> str:
    """``"5.4 ± 1.2 (median 5.1; 1 miss of 5; 2 both empty)"`` from a comparison-table row."""
    mean, std, median = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_median"]
    n_finite, n_inf, n_nan = (int(row[f"{metric}_{c}"]) for c in HD95_COUNTS)
    counts = [f"{n_inf} {'miss' if n_inf == 1 else 'misses'} of {n_finite + n_inf}"]
    if n_nan:
        counts.append(f"{n_nan} both empty")
    if pd.isna(mean):
        return f"n/a ({'; '.join(counts)})"
    return f"{mean:.1f} ± {0 if pd.isna(std) else std:.1f} (median {median:.1f}; {'; '.join(counts)})"


def _count(value: Any) -> str:
    """An integer count from a table cell (float when the column also holds NaN)."""
    return str(int(value))


def _lesion_cells(row: pd.Series) -> tuple[str, str, str]:
    """Markdown cells "Dice (cases with tumour)", "lesion sensitivity", "FP components / case".

    "–" on rows of other classes, "n/a" on a tumour row without the values (an old summary).
    """
    if row["class"] != LESION_CLASS:
        return "–", "–", "–"
    mean, std, n = (row[f"{TRUTH_PRESENT_DICE}_{s}"] for s in ("mean", "std", "n"))
    if pd.isna(n):
        dice_cell = "n/a"
    elif pd.isna(mean):
        dice_cell = f"n/a (n={_count(n)})"
    else:
        dice_cell = f"{mean:.3f} ± {0 if pd.isna(std) else std:.3f} (n={_count(n)})"
    if pd.isna(row["lesions_true"]):
        return dice_cell, "n/a", "n/a"
    found, true = _count(row["lesions_found"]), _count(row["lesions_true"])
    sensitivity = row["lesion_sensitivity"]
    sensitivity_cell = f"{'n/a' if pd.isna(sensitivity) else f'{sensitivity:.3f}'} ({found}/{true})"
    fp_total = int(row["fp_components"])
    fp_cell = (f"{row['fp_components_per_case']:.2f} ({fp_total} in {row['n_cases']} "
               f"{'case' if row['n_cases'] == 1 else 'cases'})")
    return dice_cell, sensitivity_cell, fp_cell


DETECTION_NOTE = (
    "**Tumour detection.** The **patient score** is the maximum tumour probability over the scan; "
    "**AUROC** and **AP** (average precision) rank the test cases by it against whether their ground truth has "
    "a tumour (n with tumour in brackets; AP of a random ranking is the prevalence), with a 95 % percentile "
    "bootstrap CI over the cases (n/a with one class only). A **candidate** is a predicted tumour component, "
    "its confidence the maximum tumour probability inside it; it **hits** a true lesion when their voxel IoU is "
    "at least 0.1 (one candidate per lesion, most confident first; other candidates are false positives). "
    "**FROC**: lesion sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false-positive candidates per case "
    "(the best sensitivity reached without exceeding the rate); **CPM** is their mean. **By size**: sensitivity "
    "per equivalent diameter of the true lesion (found/true), counting every candidate however many false "
    "positives come with it (so it can exceed the FROC's sensitivity at 8 FP/case). See docs/detection.md."
)


def _detection_lines(table: pd.DataFrame) -> list[str]:
    """The tumour-detection markdown table (one row per architecture), or nothing without detection columns."""
    rows = table[table["class"] == LESION_CLASS] if "auroc" in table else table.iloc[0:0]
    if rows.empty or rows["n_patients_with_tumour"].isna().all():   # no model had a tumour probability map
        return []

    def value(v: Any, digits: int = 3) -> str:
        return "n/a" if pd.isna(v) else f"{v:.{digits}f}"

    def with_ci(row: pd.Series, name: str) -> str:
        if pd.isna(row[name]):
            return "n/a"
        return f"{row[name]:.3f} [{value(row[f'{name}_ci_low'])}, {value(row[f'{name}_ci_high'])}]"

    rates = [f"{_fp_label(r)}" for r in FROC_FP_RATES]
    lines = ["| architecture | n (with tumour) | AUROC [95% CI] | AP [95% CI] | FROC CPM "
             f"| sensitivity at {', '.join(rates)} FP/case | <10 mm | 10-20 mm | >20 mm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        if pd.isna(r["froc_cpm"]) and pd.isna(r["auroc"]) and pd.isna(r["n_patients_with_tumour"]):
            lines.append(f"| {r['architecture']} | {r['n_cases']} | n/a (no tumour probability) | | | | | | |")
            continue
        sizes = [f"{value(r[f'sensitivity_{k}'], 2)} ({_count(r[f'detected_{k}'])}/{_count(r[f'lesions_{k}'])})"
                 for k in _SIZE_KEYS.values()]
        lines.append(f"| {r['architecture']} | {r['n_cases']} ({_count(r['n_patients_with_tumour'])}) "
                     f"| {with_ci(r, 'auroc')} | {with_ci(r, 'ap')} | {value(r['froc_cpm'])} "
                     f"| {', '.join(value(r[f'froc_sensitivity_at_{x}_fp'], 2) for x in rates)} | {' | '.join(sizes)} |")
    return lines


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-markdown version of the comparison table (mean ± std; HD95 with its miss counts).

    The last three columns are for the tumour class only ("–" on pancreas rows): tumour Dice over
    the cases with a tumour, pooled lesion sensitivity (found/true) and false-positive components
    per case; :data:`HD95_NOTE` and :data:`LESION_NOTE` below the table define them. A second
    table, *Tumour detection*, gives each model's patient AUROC and AP with CIs, FROC CPM and
    operating points and size-stratified sensitivity (:data:`DETECTION_NOTE`).
    """
    header = ("| architecture | class | n | Dice | HD95 (mm) | NSD | HD95 (mm, surfel) | NSD (surfel) | slice Dice "
              "| Dice (LCC) | HD95 (mm, LCC) | Dice (cases with tumour) | lesion sensitivity (found/true) "
              "| FP components / case |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def fmt(row: pd.Series, metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "n/a" if pd.isna(mean) else f"{mean:.3f} ± {0 if pd.isna(std) else std:.3f}"

    lines = [f"| {r['architecture']} | {r['class']} | {r['n_cases']} | {fmt(r, 'dice')} | {_hd95_cell(r, 'hd95_mm')} "
             f"| {fmt(r, 'nsd')} | {_hd95_cell(r, 'hd95_surfel_mm')} | {fmt(r, 'nsd_surfel')} | {fmt(r, 'slice_dice')} | {fmt(r, 'dice_lcc')} | {_hd95_cell(r, 'hd95_mm_lcc')} "
             f"| {' | '.join(_lesion_cells(r))} |"
             for _, r in table.iterrows()]
    detection = _detection_lines(table)
    detection_text = ("\n\n### Tumour detection\n\n" + "\n".join(detection) + "\n\n" + DETECTION_NOTE
                      if detection else "")
    return header + "\n".join(lines) + "\n\n" + HD95_NOTE + "\n\n" + LESION_NOTE + detection_text + "\n"
