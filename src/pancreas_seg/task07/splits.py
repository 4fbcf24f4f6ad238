"""Patient-level, seeded train/validation/test splits and optional k-fold assignment.

In MSD Task07 every case is one patient, so the default grouping key is the case id; a separate
``patient_id`` column can be given when several scans belong to one patient. A patient is never
in two splits.

New splits and folds are stratified by tumour presence (a case has a tumour iff its label map
contains label 2; a patient iff one of its cases does): test, validation and every fold get their
share of the tumour patients, not just of the patients (:func:`assign_splits`, :func:`assign_folds`).

The split is made once per dataset and persisted (``data/03_primary/splits/<dataset>.json``, like
nnU-Net's ``splits_final.json``): later runs reuse it, a new one needs an explicit
``split.recompute: true``, and cases that drop out are removed from it without moving any other.
A split persisted before stratification existed is reused as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
#: What new splits are stratified by, as recorded in a split's ``stratified_by``.
STRATIFIED_BY = "tumour"


def has_tumour(cases: pd.DataFrame) -> pd.Series:
    """Per case (row): does its label map contain label 2? From the manifest's ``voxels_tumour``."""
    return cases["voxels_tumour"].astype(int) > 0


def _patient_strata(patient_ids: pd.Series, strata: pd.Series) -> dict[str, Hashable]:
    """``{patient: stratum}``: a patient's stratum is the largest of its cases' (tumour if any has one)."""
    frame = pd.DataFrame({"patient": patient_ids.astype(str).to_numpy(), "stratum": strata.to_numpy()})
    return frame.groupby("patient")["stratum"].max().to_dict()


def _stratum_order(groups: Mapping[Hashable, list[str]]) -> list[Hashable]:
    """Strata in tie-breaking order: the smaller first; of equal size, the one that sorts last
    first (``True`` before ``False``: tumour before no tumour)."""
    return sorted(sorted(groups, reverse=True), key=lambda s: len(groups[s]))   # stable sort


def _apportion(sizes: Mapping[Hashable, int], total: int, order: list[Hashable]) -> dict[Hashable, int]:
    """Split ``total`` over strata in proportion to ``sizes`` (largest remainders): each stratum gets
    ``floor`` or ``ceil`` of ``size * total / sum(sizes)``; ties go to the earlier stratum in ``order``."""
    n = sum(sizes.values())
    if n == 0:
        return dict.fromkeys(sizes, 0)
    quota = {s: sizes[s] * total / n for s in sizes}
    counts = {s: math.floor(quota[s] + 1e-9) for s in sizes}
    left = total - sum(counts.values())
    by_remainder = sorted(order, key=lambda s: -(quota[s] - counts[s]))  # stable: ties keep ``order``
    for s in by_remainder[:left]:
        counts[s] += 1
    return counts


def _warn_empty(what: str, counts: Mapping[Hashable, int], sizes: Mapping[Hashable, int]) -> None:
    empty = [s for s in sizes if sizes[s] > 0 and counts.get(s, 0) == 0]
    for stratum in empty:
        logger.warning("Stratified split: %s gets no patient of stratum %s=%s (%d patient(s) in it, too "
                       "few to share out)", what, STRATIFIED_BY, stratum, sizes[stratum])


def assign_splits(patient_ids: pd.Series, test_fraction: float, validation_fraction: float,  # noqa: PLR0917
                  seed: int, n_folds: int = 0, strata: pd.Series | None = None) -> pd.DataFrame:
    """Assign each row to ``train``, ``validation`` or ``test`` by patient.

    Without ``strata`` the shuffled patients are cut in order. With ``strata`` the sizes of test
    and validation stay the same, and each stratum contributes in proportion: test gets
    ``floor`` or ``ceil`` of ``stratum size * n_test / n`` of every stratum, validation the same of
    what is left of it (largest remainders; a tie goes to the smaller stratum, then to the one that
    sorts last: the tumour stratum of ``True``/``False``). Within a stratum the patients are taken
    in the seeded order. With one stratum the result is the unstratified one.

    Args:
        patient_ids: one entry per case (index = case order); duplicates are the same patient.
        test_fraction: share of patients held out for final evaluation (0 <= f < 1).
        validation_fraction: share of the *remaining* patients used for validation, e.g. 0.3
            for the study's 70/30 train/validation split.
        seed: RNG seed; the result depends only on the set of patient ids and the seed.
        n_folds: if >= 2, also assign a ``fold`` (0..n_folds-1) to every non-test patient
            (stratified like the split, :func:`assign_folds`).
        strata: optional, one entry per row like ``patient_ids`` (e.g. tumour presence); a patient's
            stratum is the largest of its rows'.

    Returns:
        DataFrame indexed like ``patient_ids`` with columns ``split`` and ``fold`` (-1 if unused).
    """
    for name, value in (("test_fraction", test_fraction), ("validation_fraction", validation_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    patients = np.array(sorted(set(patient_ids.astype(str))))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    shuffled = patients[order]
    n_test = int(round(test_fraction * len(patients)))
    n_val = int(round(validation_fraction * (len(patients) - n_test)))
    if len(patients) >= 3 and validation_fraction > 0:
        n_val = max(n_val, 1)
    if len(patients) - n_test - n_val < 1:
        raise ValueError(f"{len(patients)} patients are too few for test={test_fraction}, "
                         f"validation={validation_fraction}: no training patient left")
    if strata is None:
        split_of = {p: "test" for p in shuffled[:n_test]}
        split_of.update({p: "validation" for p in shuffled[n_test:n_test + n_val]})
        split_of.update({p: "train" for p in shuffled[n_test + n_val:]})
        patient_stratum = None
    else:
        patient_stratum = _patient_strata(patient_ids, strata)
        split_of = _stratified_split(list(shuffled), patient_stratum, n_test, n_val)
    development = [p for p in shuffled if split_of[p] != "test"]
    fold_of = dict.fromkeys(patients, -1) | assign_folds(development, n_folds, seed, patient_stratum)
    ids = patient_ids.astype(str)
    return pd.DataFrame({"split": ids.map(split_of), "fold": ids.map(fold_of).astype(int)},
                        index=patient_ids.index)


def _stratified_split(shuffled: list[str], stratum_of: Mapping[str, Hashable], n_test: int,
                      n_val: int) -> dict[str, str]:
    """``{patient: split}``: ``n_test`` and then ``n_val`` patients taken stratum by stratum (in
    proportion, :func:`_apportion`), each stratum's patients in ``shuffled`` order."""
    groups: dict[Hashable, list[str]] = {}
    for patient in shuffled:
        groups.setdefault(stratum_of[patient], []).append(patient)
    order = _stratum_order(groups)
    test = _apportion({s: len(g) for s, g in groups.items()}, n_test, order)
    rest = {s: len(g) - test[s] for s, g in groups.items()}
    validation = _apportion(rest, n_val, order)
    _warn_empty("test", test, {s: len(g) for s, g in groups.items()} if n_test else {})
    _warn_empty("validation", validation, rest if n_val else {})
    split_of: dict[str, str] = {}
    for stratum, members in groups.items():
        t, v = test[stratum], validation[stratum]
        split_of.update({p: "test" for p in members[:t]})
        split_of.update({p: "validation" for p in members[t:t + v]})
        split_of.update({p: "train" for p in members[t + v:]})
    return split_of


def assign_folds(development_patients: Iterable[str], n_folds: int, seed: int,
                 strata: Mapping[str, Hashable] | None = None) -> dict[str, int]:
    """Cross-validation folds ``{patient: 0..n_folds-1}`` of the non-test patients (empty if n_folds < 2).

    Depends only on the set of patients, ``n_folds``, ``seed`` (and ``strata``): the sorted patients
    are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most one. With
    ``strata`` (``{patient: stratum}``, e.g. tumour presence) the shuffled patients are dealt
    stratum after stratum, the count running on: every fold gets ``floor`` or ``ceil`` of
    ``stratum size / n_folds`` of each stratum, and fold sizes still differ by at most one. A
    stratum smaller than ``n_folds`` leaves some folds without it (a warning says so). Folds never
    change which patients are train, validation or test.
    """
    if n_folds < 2:
        return {}
    patients = sorted({str(p) for p in development_patients})
    if len(patients) < n_folds:
        raise ValueError(f"split.n_folds={n_folds} needs at least {n_folds} non-test patients, "
                         f"there are {len(patients)}")
    order = np.random.default_rng([seed, n_folds]).permutation(len(patients))
    shuffled = [patients[index] for index in order]
    if strata is not None:
        groups: dict[Hashable, list[str]] = {}
        for patient in shuffled:
            groups.setdefault(strata[patient], []).append(patient)
        shuffled = [p for stratum in _stratum_order(groups) for p in groups[stratum]]
        for stratum, members in groups.items():
            if len(members) < n_folds:
                logger.warning("Stratified folds: only %d non-test patient(s) with %s=%s for %d folds; "
                               "%d fold(s) get none of them", len(members), STRATIFIED_BY, stratum,
                               n_folds, n_folds - len(members))
    return {patient: position % n_folds for position, patient in enumerate(shuffled)}


# --------------------------------------------------------------------------- persisted split
#: Split settings that define a split; changing one of them needs ``split.recompute: true``.
#: ``n_folds`` is not one of them: folds are re-dealt over the same non-test patients
#: (:func:`assign_folds`) without moving any case between train, validation and test.
SPLIT_SETTINGS = ("seed", "test_fraction", "validation_fraction")


class SplitMismatchError(ValueError):
    """The persisted split does not fit the current cases or settings; the message says how."""


def _settings(split: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": int(split["seed"]), "test_fraction": float(split["test_fraction"]),
            "validation_fraction": float(split["validation_fraction"]),
            "n_folds": int(split.get("n_folds", 0) or 0)}


def make_split(cases: pd.DataFrame, split: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """A new persisted split (the ``splits/<dataset>.json`` record) of the labelled ``cases``.

    Args:
        cases: one row per labelled case with ``case_id`` and optionally ``patient_id``; with a
            ``voxels_tumour`` column (the case manifest's) the split and folds are stratified by
            tumour presence (:func:`has_tumour`) and the record says so (``stratified_by``).
        split: the ``split`` parameters (seed, test_fraction, validation_fraction, n_folds).
        dataset: the dataset's name (its raw folder), recorded so a split never meets other data.

    Returns:
        ``{"dataset", "settings", "created_at", ["stratified_by",] "train", "validation", "test",
        "folds", "dropped"}``: sorted case-id lists per split, ``folds`` maps non-test case ids to
        their fold (n_folds >= 2).
    """
    settings = _settings(split)
    patients = cases["patient_id"] if "patient_id" in cases else cases["case_id"]
    strata = has_tumour(cases) if "voxels_tumour" in cases else None
    assigned = assign_splits(patients, settings["test_fraction"], settings["validation_fraction"],
                             settings["seed"], settings["n_folds"], strata)
    ids = cases["case_id"].astype(str)
    record: dict[str, Any] = {"dataset": dataset, "settings": settings,
                              "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if strata is not None:
        record["stratified_by"] = STRATIFIED_BY
    for name in SPLITS:
        record[name] = sorted(ids[assigned["split"] == name])
    record["folds"] = {c: int(f) for c, f in zip(ids, assigned["fold"], strict=True) if f >= 0}
    record["dropped"] = []
    return record


def reconcile_split(record: Mapping[str, Any], case_ids: Iterable[str], split: Mapping[str, Any],  # noqa: PLR0917
                    dataset: str, patient_of: Mapping[str, str] | None = None,
                    tumour_of: Mapping[str, bool] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Reuse a persisted split for the current labelled ``case_ids``.

    Cases of the split that are no longer valid (``on_invalid: skip`` dropped them, or they were
    removed) are taken out of it, and nothing else moves. When ``split.n_folds`` differs from the
    persisted one, the folds are dealt anew over the split's non-test patients (``patient_of``:
    case id -> patient id; default: every case is its own patient), stratified by tumour presence
    when ``tumour_of`` (case id -> has a tumour) is given; train, validation and test stay as they
    are. A split made before stratification (no ``stratified_by``) is reused as it is. Returns the
    updated record and the dropped case ids.

    Raises:
        SplitMismatchError: the record is of another dataset, the split settings changed, or there
            are labelled cases the split does not know; the message names them and the way out
            (``split.recompute: true`` makes a new split).
    """
    hint = ("Set split.recompute=true (for example `kedro run --params split.recompute=true`) to "
            "make a new split; models trained on the old one will then be refused by evaluation.")
    if record.get("dataset") != dataset:
        raise SplitMismatchError(f"the persisted split is of dataset {record.get('dataset')!r}, not "
                                 f"{dataset!r}. {hint}")
    wanted, persisted = _settings(split), dict(record["settings"])
    changed = {k: (persisted.get(k), wanted[k]) for k in SPLIT_SETTINGS if persisted.get(k) != wanted[k]}
    if changed:
        listing = ", ".join(f"split.{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise SplitMismatchError(f"split settings changed since the split of {dataset!r} was made "
                                 f"({listing}). {hint}")
    current = {str(c) for c in case_ids}
    known = {c for name in SPLITS for c in record[name]}
    unknown = sorted(current - known)
    if unknown:
        raise SplitMismatchError(f"{len(unknown)} labelled case(s) of {dataset!r} are not in its persisted "
                                 f"split: {', '.join(unknown)}. {hint}")
    dropped = sorted(known - current)
    updated = {**record, **{name: [c for c in record[name] if c in current] for name in SPLITS}}
    updated["folds"] = {c: f for c, f in record.get("folds", {}).items() if c in current}
    if int(persisted.get("n_folds", 0) or 0) != wanted["n_folds"]:
        development = [c for name in ("train", "validation") for c in updated[name]]
        patient = {c: str((patient_of or {}).get(c, c)) for c in development}
        strata = None
        if tumour_of is not None:
            strata = {}
            for c in development:
                strata[patient[c]] = bool(strata.get(patient[c], False) or tumour_of[c])
        fold_of = assign_folds(patient.values(), wanted["n_folds"], wanted["seed"], strata)
        updated["folds"] = {c: fold_of[patient[c]] for c in development if patient[c] in fold_of}
        updated["settings"] = {**persisted, "n_folds": wanted["n_folds"]}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    updated["dropped"] = [*record.get("dropped", []), *({"case_id": c, "dropped_at": now} for c in dropped)]
    if not updated["train"]:
        raise SplitMismatchError(f"no training case of {dataset!r} is left in its persisted split. {hint}")
    return updated, dropped


def split_composition(record: Mapping[str, Any], tumour_of: Mapping[str, bool],
                      patient_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """How many patients, and how many with a tumour, each split and fold of ``record`` holds.

    Args:
        record: a split record (:func:`make_split`, :func:`reconcile_split`).
        tumour_of: case id -> has a tumour (:func:`has_tumour`) for every case of the record.
        patient_of: case id -> patient id (default: every case is its own patient); a patient has a
            tumour if one of its cases has.

    Returns:
        ``{"train": {"patients": n, "with_tumour": k}, "validation": ..., "test": ...}`` plus
        ``"folds": {"0": {...}, ...}`` when the record has folds.
    """
    def count(cases: Iterable[str]) -> dict[str, int]:
        tumour: dict[str, bool] = {}
        for case in cases:
            patient = str((patient_of or {}).get(case, case))
            tumour[patient] = tumour.get(patient, False) or bool(tumour_of[case])
        return {"patients": len(tumour), "with_tumour": sum(tumour.values())}

    composition: dict[str, Any] = {name: count(record[name]) for name in SPLITS}
    folds = record.get("folds", {})
    if folds:
        composition["folds"] = {str(f): count(c for c, g in folds.items() if g == f)
                                for f in sorted(set(folds.values()))}
    return composition


def composition_lines(composition: Mapping[str, Any]) -> list[str]:
    """One line per split and fold: ``"test: 5 patients, 3 with tumour"``."""
    lines = [f"{name}: {c['patients']} patients, {c['with_tumour']} with tumour"
             for name, c in ((n, composition[n]) for n in ("train", "validation", "test"))]
    lines += [f"fold {fold}: {c['patients']} patients, {c['with_tumour']} with tumour"
              for fold, c in composition.get("folds", {}).items()]
    return lines


def split_assignment(record: Mapping[str, Any], case_ids: Iterable[str]) -> pd.DataFrame:
    """``split`` and ``fold`` columns for ``case_ids`` (index: case id) from a persisted split."""
    split_of = {c: name for name in SPLITS for c in record[name]}
    folds = record.get("folds", {})
    ids = [str(c) for c in case_ids]
    return pd.DataFrame({"split": [split_of[c] for c in ids],
                         "fold": [int(folds.get(c, -1)) for c in ids]}, index=ids)


def manifest_dataset(case_manifest: pd.DataFrame) -> str:
    """The dataset a case manifest describes (its ``dataset`` column, one value).

    Raises:
        ValueError: the manifest predates persisted splits (no ``dataset`` column) or mixes datasets.
    """
    if "dataset" not in case_manifest:
        raise ValueError("data/03_primary/case_manifest.csv has no 'dataset' column: it was written by an "
                         "older version. Run `kedro run --pipelines=data` (same --env) to rebuild it.")
    names = sorted(set(case_manifest["dataset"].astype(str)))
    if len(names) != 1:
        raise ValueError(f"the case manifest mixes datasets {names}; run `kedro run --pipelines=data` again")
    return names[0]


def manifest_folds(case_manifest: pd.DataFrame) -> int:
    """The number of cross-validation folds in a case manifest (its ``fold`` column).

    Raises:
        ValueError: the manifest has fewer than 2 folds; the message says how to set them.
    """
    folds = sorted(int(f) for f in set(case_manifest["fold"]) if int(f) >= 0)
    if len(folds) < 2:
        raise ValueError("cross-validation needs split.n_folds >= 2, but data/03_primary/case_manifest.csv has "
                         f"{len(folds)} fold(s). Set split.n_folds (for example `--params split.n_folds=3`) "
                         "and run the data pipeline (same --env): the folds are dealt over the same train "
                         "and validation patients, no case moves")
    if folds != list(range(len(folds))):
        raise ValueError(f"the case manifest's folds {folds} are not 0..{len(folds) - 1}; run the data pipeline again")
    return len(folds)


def fold_manifest(case_manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest as fold ``fold`` of cross-validation sees it.

    Every non-test labelled case (``train`` or ``validation`` in the split) becomes ``validation``
    if it is in ``fold`` and ``train`` otherwise; test and unlabelled cases keep their split, so the
    held-out test cases are never trained or validated on. Returns a new frame.
    """
    n_folds = manifest_folds(case_manifest)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold {fold} does not exist: the manifest has folds 0..{n_folds - 1}")
    manifest = case_manifest.copy()
    development = manifest["split"].isin(["train", "validation"])
    manifest.loc[development, "split"] = np.where(manifest.loc[development, "fold"] == fold, "validation", "train")
    return manifest


def test_case_ids(case_manifest: pd.DataFrame) -> list[str]:
    """The sorted held-out test case ids of a case manifest."""
    return sorted(case_manifest.loc[case_manifest["split"] == "test", "case_id"])


def development_case_ids(case_manifest: pd.DataFrame) -> list[str]:
    """The sorted non-test labelled cases (train + validation): those cross-validation scores out of fold."""
    return sorted(case_manifest.loc[case_manifest["split"].isin(["train", "validation"]), "case_id"].astype(str))


def split_case_ids(case_manifest: pd.DataFrame) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the sorted case ids a model is trained on."""
    return {split: sorted(case_manifest.loc[case_manifest["split"] == split, "case_id"].astype(str))
            for split in ("train", "validation")}


test_case_ids.__test__ = False   # a helper, not a test: pytest collects test_* names imported into test modules
