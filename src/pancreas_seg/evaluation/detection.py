"""Tumour detection: patient-level AUROC / AP with bootstrap CIs, lesion-level FROC, size strata.

Pure NumPy/SciPy/pandas; no Kedro, no MLflow, no scikit-learn (the tests check AUROC and AP
against scikit-learn).

Definitions chosen
------------------
Patient score
    :func:`patient_tumour_score`: the maximum tumour probability over all voxels of the scan. A
    scan scores high when at least one voxel is confidently tumour, whatever the tumour's size.
AUROC
    :func:`auroc`: the Mann-Whitney statistic, the probability that a random positive patient
    scores higher than a random negative one, ties counting one half:
    ``(sum of the positives' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.
    Equal to ``sklearn.metrics.roc_auc_score``.
Average precision
    :func:`average_precision`: ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds in descending order (patients with tied scores enter together), with ``R_0 = 0``;
    step-wise, no interpolation. Equal to ``sklearn.metrics.average_precision_score``. A random
    ranking has AP ~ prevalence (``n_positive / n_patients``), not 0.5.
Bootstrap CI
    :func:`patient_detection`: percentile bootstrap over patients with the same resampling as
    :func:`pancreas_seg.evaluation.statistics.bootstrap_mean_ci` (``rng.integers(0, n, (B, n))``
    with ``rng = np.random.default_rng(seed)``, ``np.quantile`` at ``(1 - confidence) / 2`` and
    ``1 - (1 - confidence) / 2``). A resample holding one class only has no AUROC or AP: it is
    skipped, ``n_bootstrap_used`` counts the rest and ``note`` says how many were skipped. Both
    metrics use the same resamples.
Candidates and lesions (one case)
    :func:`lesion_candidates`: *candidates* are the connected components of the predicted
    tumour mask; *lesions* are the connected components of the true tumour mask; both with the
    lesion neighbourhood of :func:`pancreas_seg.evaluation.metrics.lesion_detection` (full 3D
    26-connectivity by default, ``scipy.ndimage.label``). A candidate's *confidence* is the
    maximum tumour probability over its voxels.
Hit criterion and matching
    A candidate *hits* a lesion when their voxel IoU ``|C ∩ L| / |C ∪ L|`` is at least
    ``iou_threshold`` (default :data:`IOU_THRESHOLD` = 0.1; IoU exactly 0.1 is a hit). Matching is
    greedy and one-to-one: candidates are visited by confidence, highest first (ties: lower
    candidate id first); each takes the not yet matched lesion it hits with the highest IoU (ties:
    lower lesion id). A lesion is therefore counted at most once, and a candidate matches at most
    one lesion even if it covers several. Every unmatched candidate is a false positive,
    including a second candidate on an already matched lesion (LUNA16 ignores such duplicates
    instead) and a candidate whose IoU is below the threshold. Because matching visits the most
    confident candidates first, the matching restricted to the candidates above any threshold is
    the greedy matching of those candidates alone, so one matching serves the whole FROC curve.
    Unlike :func:`~pancreas_seg.evaluation.metrics.lesion_detection` (any overlap finds a lesion),
    a small blob inside a large lesion does not detect it.
FROC
    :func:`froc` pools the candidate and lesion tables of all cases. At each threshold ``t``
    (every distinct candidate confidence, plus ``+inf`` for the origin), a lesion is detected if
    its matched candidate has confidence ``>= t``; sensitivity = detected lesions / all lesions,
    FP per case = false-positive candidates with confidence ``>= t`` / ``n_cases``. ``n_cases``
    counts every case, with or without a true lesion: a tumour-free case adds false positives
    only. The sensitivity at an FP rate ``r`` is that of the most permissive (lowest) threshold
    whose FP per case is ``<= r``, i.e. the highest sensitivity reached without exceeding ``r``;
    step-wise (the official LUNA16 script interpolates linearly between operating points
    instead). CPM = mean of the sensitivities at :data:`FROC_FP_RATES` (1/8 ... 8 FP per case).
Lesion size
    ``volume_mm3`` = voxel count x voxel volume (``prod(spacing_mm)``); ``diameter_mm`` = the
    diameter of the sphere of equal volume, ``(6 V / pi) ** (1/3)``. Bins:
    :data:`SIZE_BIN_LABELS` with edges :data:`SIZE_BIN_EDGES_MM`, see
    :func:`size_stratified_sensitivity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from pancreas_seg.evaluation.metrics import LESION_CONNECTIVITY, _as_bool, _check_pair, _check_spacing

IOU_THRESHOLD = 0.1
"""Default hit criterion of :func:`lesion_candidates`: voxel IoU >= 0.1."""
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per case at which :func:`froc` reads the sensitivity; CPM is their mean."""
SIZE_BIN_EDGES_MM = (10.0, 20.0)
"""Equivalent-diameter edges in mm: ``d < 10``, ``10 <= d <= 20``, ``d > 20`` (the middle bin is closed)."""
SIZE_BIN_LABELS = ("<10 mm", "10-20 mm", ">20 mm")
"""Names of the size bins, in the order of :data:`SIZE_BIN_EDGES_MM`."""

CANDIDATE_COLUMNS = ("candidate_id", "confidence", "volume_mm3", "lesion_id", "iou", "max_iou",
                     "true_positive")
"""Columns of the candidate table of :func:`lesion_candidates`."""
LESION_COLUMNS = ("lesion_id", "volume_mm3", "diameter_mm", "detected", "candidate_id", "confidence",
                  "iou", "max_iou")
"""Columns of the lesion table of :func:`lesion_candidates`."""


# --------------------------------------------------------------------------- input checks
def _check_probability(probability: np.ndarray, name: str = "probability") -> np.ndarray:
    """Return ``probability`` as an array after checking it is real, non-empty, NaN-free and in [0, 1]."""
    arr = np.asarray(probability)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real-valued (float) array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    low, high = arr.min(), arr.max()   # NaN propagates through min/max: one pass each
    if np.isnan(low) or np.isnan(high):
        raise ValueError(f"{name} contains NaN ({int(np.count_nonzero(np.isnan(arr)))} voxels)")
    if low < 0 or high > 1:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{float(low)}, {float(high)}]")
    return arr


def _check_scores_labels(scores: Sequence[float] | np.ndarray,
                         labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patient scores as finite float64 and labels as bool, both 1D of equal length."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    raw = np.asarray(labels).ravel()
    if s.size != raw.size:
        raise ValueError(f"scores has {s.size} values, labels has {raw.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite, got {int(np.count_nonzero(~np.isfinite(s)))} NaN/inf values")
    if raw.dtype != np.bool_:
        numeric = raw.astype(np.float64)
        if not np.all((numeric == 0) | (numeric == 1)):
            bad = raw[~((numeric == 0) | (numeric == 1))][:3].tolist()
            raise ValueError(f"labels must be 0/1 or boolean (tumour present), got e.g. {bad}")
        raw = numeric == 1
    return s, raw


# --------------------------------------------------------------------------- patient level
def patient_tumour_score(tumour_probability: np.ndarray) -> float:
    """Patient-level tumour score: the maximum tumour probability over the scan.

    Args:
        tumour_probability: tumour probability per voxel, float array of any shape (e.g. (X, Y, Z)),
            values in [0, 1], non-empty, no NaN.

    Returns:
        The maximum, a float in [0, 1].

    Raises:
        ValueError: if the array is empty, not real-valued, holds NaN or leaves [0, 1].
    """
    return float(_check_probability(tumour_probability, "tumour_probability").max())


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC of checked inputs (NaN without both classes)."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)   # average ranks for ties
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Step-wise average precision of checked inputs (NaN without both classes)."""
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0 or n_pos == positive.size:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]   # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1.0)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2) of patient scores vs labels.

    Args:
        scores: shape (n,), finite floats (e.g. :func:`patient_tumour_score` per patient).
        labels: shape (n,), 0/1 or bool, 1 = tumour present.

    Returns:
        AUROC in [0, 1]; NaN when only one class is present.
    """
    return _auroc(*_check_scores_labels(scores, labels))


def average_precision(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` (step-wise, as scikit-learn) of patient scores.

    Args:
        scores: shape (n,), finite floats.
        labels: shape (n,), 0/1 or bool, 1 = tumour present.

    Returns:
        AP in [0, 1]; NaN when only one class is present.
    """
    return _average_precision(*_check_scores_labels(scores, labels))


def patient_detection(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Patient-level detection: AUROC and AP with percentile bootstrap CIs over patients.

    Args:
        scores: shape (n,), finite floats, one per patient (e.g. :func:`patient_tumour_score`).
        labels: shape (n,), 0/1 or bool, 1 = tumour present in the reference.
        n_bootstrap: resamples of the patients (>= 1), drawn as in the module docstring.
        confidence: coverage of the intervals, in (0, 1).
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``{"auroc", "auroc_ci_low", "auroc_ci_high", "ap", "ap_ci_low", "ap_ci_high"}`` as floats
        (NaN when the data hold one class only, CIs NaN also when no resample holds both),
        ``"n_patients"``, ``"n_positive"``, ``"n_bootstrap"`` (asked), ``"n_bootstrap_used"``
        (resamples holding both classes) as ints, ``"confidence"``, ``"seed"`` and ``"note"``:
        an empty string, or why values are NaN / how many resamples were skipped.
    """
    s, positive = _check_scores_labels(scores, labels)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    n, n_pos = int(s.size), int(np.count_nonzero(positive))
    nan = float("nan")
    record: dict[str, Any] = {
        "auroc": nan, "auroc_ci_low": nan, "auroc_ci_high": nan,
        "ap": nan, "ap_ci_low": nan, "ap_ci_high": nan,
        "n_patients": n, "n_positive": n_pos, "n_bootstrap": int(n_bootstrap), "n_bootstrap_used": 0,
        "confidence": float(confidence), "seed": int(seed), "note": "",
    }
    if n_pos == 0 or n_pos == n:
        record["note"] = (f"only one class present ({n_pos} positive of {n} patients): "
                          "AUROC and AP are undefined")
        return record
    record["auroc"] = _auroc(s, positive)
    record["ap"] = _average_precision(s, positive)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    resampled_pos = positive[idx]
    n_pos_resampled = resampled_pos.sum(axis=1)
    usable = (n_pos_resampled > 0) & (n_pos_resampled < n)
    aurocs = [_auroc(s[row], pos) for row, pos in zip(idx[usable], resampled_pos[usable], strict=True)]
    aps = [_average_precision(s[row], pos) for row, pos in zip(idx[usable], resampled_pos[usable], strict=True)]
    n_used = int(np.count_nonzero(usable))
    record["n_bootstrap_used"] = n_used
    quantiles = [(1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0]
    if n_used:
        record["auroc_ci_low"], record["auroc_ci_high"] = (float(q) for q in np.quantile(aurocs, quantiles))
        record["ap_ci_low"], record["ap_ci_high"] = (float(q) for q in np.quantile(aps, quantiles))
    if n_used < n_bootstrap:
        record["note"] = (f"{n_bootstrap - n_used} of {n_bootstrap} bootstrap resamples held one class "
                          "only and were skipped")
        if n_used == 0:
            record["note"] += ": no confidence interval"
    return record


# --------------------------------------------------------------------------- lesion level
def _equivalent_diameter_mm(volume_mm3: np.ndarray) -> np.ndarray:
    """Diameter in mm of the sphere of equal volume, ``(6 V / pi) ** (1/3)``."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)


def lesion_candidates(pred_mask: np.ndarray, probability: np.ndarray, truth_mask: np.ndarray,
                      spacing_mm: Sequence[float], iou_threshold: float = IOU_THRESHOLD, *,
                      connectivity: int = LESION_CONNECTIVITY) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Candidates (predicted components) and true lesions of one case, matched by voxel IoU.

    Hit criterion: voxel IoU ``>= iou_threshold`` (default 0.1); greedy one-to-one matching by
    candidate confidence, highest first (definitions in the module docstring).

    Args:
        pred_mask: predicted tumour mask, boolean/0-1 array (X, Y, Z) on the original grid
            (e.g. ``class_mask(pred_labels, "tumour")``).
        probability: tumour probability per voxel, float array of the same shape, values in [0, 1].
        truth_mask: reference tumour mask, boolean/0-1 array of the same shape.
        spacing_mm: voxel size in mm along each array axis.
        iou_threshold: minimum IoU of a hit, in (0, 1].
        connectivity: component neighbourhood, 1..ndim (3 = 26-connectivity in 3D), as in
            :func:`~pancreas_seg.evaluation.metrics.lesion_detection`.

    Returns:
        ``(candidates, lesions)``. ``candidates``: one row per predicted component, columns
        :data:`CANDIDATE_COLUMNS`: ``candidate_id`` (component label, 1..), ``confidence`` (max
        probability inside), ``volume_mm3``, ``lesion_id`` (matched lesion or -1), ``iou`` (with
        the matched lesion, NaN if unmatched), ``max_iou`` (best IoU with any lesion, 0 if none),
        ``true_positive`` (bool). ``lesions``: one row per true component, columns
        :data:`LESION_COLUMNS`: ``lesion_id`` (1..), ``volume_mm3``, ``diameter_mm`` (sphere of
        equal volume), ``detected`` (bool), ``candidate_id`` (matched, or -1), ``confidence`` (of the
        matched candidate, NaN if missed), ``iou`` (NaN if missed), ``max_iou`` (best IoU with any
        candidate). Add a case column before pooling cases for :func:`froc`.

    Raises:
        ValueError: on a shape mismatch, NaN or out-of-range probabilities, bad spacing, threshold or
            connectivity.
    """
    pred, truth = _as_bool(pred_mask), _as_bool(truth_mask)
    _check_pair(pred, truth)
    prob = _check_probability(probability)
    if prob.shape != pred.shape:
        raise ValueError(f"probability shape {prob.shape} != mask shape {pred.shape}")
    spacing = _check_spacing(spacing_mm, pred.ndim)
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not 1 <= connectivity <= max(pred.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{pred.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(pred.ndim, connectivity)
    cand, n_cand = ndimage.label(pred, structure=structure)
    les, n_les = ndimage.label(truth, structure=structure)
    voxel_mm3 = float(np.prod(spacing))

    cand_size = np.bincount(cand.ravel(), minlength=n_cand + 1)[1:]
    les_size = np.bincount(les.ravel(), minlength=n_les + 1)[1:]
    both = (cand > 0) & (les > 0)
    pair = cand[both].astype(np.int64) * (n_les + 1) + les[both]
    inter = np.bincount(pair, minlength=(n_cand + 1) * (n_les + 1)).reshape(n_cand + 1, n_les + 1)[1:, 1:]
    iou = inter / (cand_size[:, None] + les_size[None, :] - inter)   # sizes >= 1: no division by 0
    conf = (np.asarray(ndimage.maximum(prob, labels=cand, index=np.arange(1, n_cand + 1)), dtype=np.float64)
            if n_cand else np.zeros(0))

    cand_lesion = np.full(n_cand, -1, dtype=np.int64)      # 0-based lesion index or -1
    les_cand = np.full(n_les, -1, dtype=np.int64)          # 0-based candidate index or -1
    for i in np.argsort(-conf, kind="stable"):             # highest confidence first, ties by id
        hits = (iou[i] >= iou_threshold) & (les_cand < 0)
        if hits.any():
            j = int(np.argmax(np.where(hits, iou[i], -1.0)))
            cand_lesion[i], les_cand[j] = j, i

    matched_c = cand_lesion >= 0
    matched_l = les_cand >= 0
    cand_rows = np.arange(n_cand)
    les_rows = np.arange(n_les)
    candidates = pd.DataFrame({
        "candidate_id": cand_rows + 1,
        "confidence": conf,
        "volume_mm3": cand_size * voxel_mm3,
        "lesion_id": np.where(matched_c, cand_lesion + 1, -1),
        "iou": np.where(matched_c, iou[cand_rows, np.maximum(cand_lesion, 0)] if n_les else np.nan, np.nan),
        "max_iou": iou.max(axis=1) if n_les else np.zeros(n_cand),
        "true_positive": matched_c,
    }, columns=list(CANDIDATE_COLUMNS))
    volume = les_size * voxel_mm3
    lesions = pd.DataFrame({
        "lesion_id": les_rows + 1,
        "volume_mm3": volume,
        "diameter_mm": _equivalent_diameter_mm(volume),
        "detected": matched_l,
        "candidate_id": np.where(matched_l, les_cand + 1, -1),
        "confidence": np.where(matched_l, conf[np.maximum(les_cand, 0)] if n_cand else np.nan, np.nan),
        "iou": np.where(matched_l, iou[np.maximum(les_cand, 0), les_rows] if n_cand else np.nan, np.nan),
        "max_iou": iou.max(axis=0) if n_cand else np.zeros(n_les),
    }, columns=list(LESION_COLUMNS))
    return candidates, lesions


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = set(columns) - set(table.columns)
    if missing:
        raise ValueError(f"{name} lacks columns {sorted(missing)}")


def froc(candidates: pd.DataFrame, lesions: pd.DataFrame, n_cases: int,
         fp_rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """Free-response ROC over cases: sensitivity vs false positives per case, and the CPM.

    Args:
        candidates: the candidate tables of :func:`lesion_candidates` of all cases, concatenated
            (columns ``confidence``, ``true_positive`` used).
        lesions: the lesion tables of the same cases, concatenated (``detected``, ``confidence``).
        n_cases: number of cases evaluated (>= 1), including cases without lesion or candidate.
        fp_rates: false positives per case at which to read the sensitivity (> 0).

    Returns:
        ``"fp_rates"`` and ``"sensitivity_at_rates"`` (float arrays of equal length, step-wise
        sensitivity at each rate), ``"cpm"`` (their mean); the full curve for plotting as float
        arrays of equal length, from the origin (threshold ``inf``) down to the lowest confidence:
        ``"thresholds"``, ``"fp_per_case"``, ``"sensitivity"``; the counts ``"n_cases"``,
        ``"n_lesions"``, ``"n_detected"``, ``"n_candidates"``, ``"n_false_positives"``; and
        ``"note"`` (why sensitivities are NaN: no true lesion; else empty).

    Raises:
        ValueError: on missing columns, ``n_cases < 1``, non-positive rates, non-finite
            confidences, or tables that disagree (detected lesions != true-positive candidates).
    """
    _require_columns(candidates, ("confidence", "true_positive"), "candidates")
    _require_columns(lesions, ("detected", "confidence"), "lesions")
    if int(n_cases) != n_cases or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases}")
    rates = np.asarray(fp_rates, dtype=np.float64).ravel()
    if rates.size == 0 or not np.all(np.isfinite(rates) & (rates > 0)):
        raise ValueError(f"fp_rates must be positive and finite, got {list(fp_rates)}")
    conf = candidates["confidence"].to_numpy(dtype=np.float64)
    is_tp = candidates["true_positive"].to_numpy(dtype=bool)
    detected = lesions["detected"].to_numpy(dtype=bool)
    lesion_conf = lesions["confidence"].to_numpy(dtype=np.float64)[detected]
    if not np.all(np.isfinite(conf)) or not np.all(np.isfinite(lesion_conf)):
        raise ValueError("candidate confidences (and those of detected lesions) must be finite")
    if int(np.count_nonzero(is_tp)) != lesion_conf.size:
        raise ValueError(f"tables disagree: {int(np.count_nonzero(is_tp))} true-positive candidates but "
                         f"{lesion_conf.size} detected lesions")

    n_lesions = len(lesions)
    fp_conf = np.sort(conf[~is_tp])
    tp_conf = np.sort(lesion_conf)
    thresholds = np.unique(conf)[::-1]
    n_fp = fp_conf.size - np.searchsorted(fp_conf, thresholds, side="left")   # confidence >= t
    n_tp = tp_conf.size - np.searchsorted(tp_conf, thresholds, side="left")
    thresholds = np.r_[np.inf, thresholds]
    fp_per_case = np.r_[0.0, n_fp / n_cases]
    if n_lesions:
        sensitivity = np.r_[0.0, n_tp / n_lesions]
        # FP per case and sensitivity both grow as the threshold falls: the last point <= r is the best
        at_rates = sensitivity[np.searchsorted(fp_per_case, rates, side="right") - 1]
        note = ""
    else:
        sensitivity = np.full(thresholds.size, np.nan)
        at_rates = np.full(rates.size, np.nan)
        note = "no true lesion in any case: sensitivity is undefined"
    return {
        "fp_rates": rates,
        "sensitivity_at_rates": at_rates,
        "cpm": float(np.mean(at_rates)),
        "thresholds": thresholds,
        "fp_per_case": fp_per_case,
        "sensitivity": sensitivity,
        "n_cases": int(n_cases),
        "n_lesions": int(n_lesions),
        "n_detected": int(tp_conf.size),
        "n_candidates": int(conf.size),
        "n_false_positives": int(fp_conf.size),
        "note": note,
    }


def size_bin(diameter_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """Size bin label of each equivalent diameter: ``< 10``, ``10 <= d <= 20``, ``> 20`` mm.

    Args:
        diameter_mm: shape (n,), finite, in mm.

    Returns:
        Object array of shape (n,) holding :data:`SIZE_BIN_LABELS` entries.
    """
    d = np.asarray(diameter_mm, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError("diameter_mm must be finite")
    low, high = SIZE_BIN_EDGES_MM
    index = np.where(d < low, 0, np.where(d <= high, 1, 2))
    return np.asarray(SIZE_BIN_LABELS, dtype=object)[index]


def size_stratified_sensitivity(lesions: pd.DataFrame) -> pd.DataFrame:
    """Lesion sensitivity per size bin of equivalent diameter (edges :data:`SIZE_BIN_EDGES_MM`).

    Args:
        lesions: lesion tables of :func:`lesion_candidates`, one or several cases concatenated
            (columns ``diameter_mm`` in mm and ``detected`` used).

    Returns:
        One row per bin in :data:`SIZE_BIN_LABELS` order, columns ``size_bin``,
        ``diameter_low_mm``, ``diameter_high_mm`` (bin edges; 0 and ``inf`` outside), ``n_lesions``,
        ``n_detected`` (ints) and ``sensitivity`` = detected / lesions (NaN for an empty bin).
    """
    _require_columns(lesions, ("diameter_mm", "detected"), "lesions")
    bins = size_bin(lesions["diameter_mm"].to_numpy())
    detected = lesions["detected"].to_numpy(dtype=bool)
    edges = (0.0, *SIZE_BIN_EDGES_MM, float("inf"))
    rows = []
    for k, label in enumerate(SIZE_BIN_LABELS):
        in_bin = bins == label
        n, found = int(np.count_nonzero(in_bin)), int(np.count_nonzero(detected & in_bin))
        rows.append({"size_bin": label, "diameter_low_mm": edges[k], "diameter_high_mm": edges[k + 1],
                     "n_lesions": n, "n_detected": found, "sensitivity": found / n if n else float("nan")})
    return pd.DataFrame(rows)
