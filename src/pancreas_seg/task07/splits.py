"""Patient-level, seeded train/validation/test splits and optional k-fold assignment.

In MSD Task07 every case is one patient, so the default grouping key is the case id; a separate
``patient_id`` column can be given when several scans belong to one patient. A patient is never
in two splits.

The split is made once per dataset and persisted (``data/03_primary/splits/<dataset>.json``, like
nnU-Net's ``splits_final.json``): later runs reuse it, a new one needs an explicit
``split.recompute: true``, and cases that drop out are removed from it without moving any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("train", "validation", "test")


def assign_splits(patient_ids: pd.Series, test_fraction: float, validation_fraction: float,
                  seed: int, n_folds: int = 0) -> pd.DataFrame:
    """Assign each row to ``train``, ``validation`` or ``test`` by patient.

    Args:
        patient_ids: one entry per case (index = case order); duplicates are the same patient.
        test_fraction: share of patients held out for final evaluation (0 <= f < 1).
        validation_fraction: share of the *remaining* patients used for validation, e.g. 0.3
            for the study's 70/30 train/validation split.
        seed: RNG seed; the result depends only on the set of patient ids and the seed.
        n_folds: if >= 2, also assign a ``fold`` (0..n_folds-1) to every non-test patient.

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
    split_of = {p: "test" for p in shuffled[:n_test]}
    split_of.update({p: "validation" for p in shuffled[n_test:n_test + n_val]})
    split_of.update({p: "train" for p in shuffled[n_test + n_val:]})
    fold_of = dict.fromkeys(patients, -1) | assign_folds(shuffled[n_test:], n_folds, seed)
    ids = patient_ids.astype(str)
    return pd.DataFrame({"split": ids.map(split_of), "fold": ids.map(fold_of).astype(int)},
                        index=patient_ids.index)


def assign_folds(development_patients: Iterable[str], n_folds: int, seed: int) -> dict[str, int]:
    """Cross-validation folds ``{patient: 0..n_folds-1}`` of the non-test patients (empty if n_folds < 2).

    Depends only on the set of patients, ``n_folds`` and ``seed``: the sorted patients are shuffled
    with ``seed`` and dealt round-robin, so fold sizes differ by at most one. Folds never change
    which patients are train, validation or test.
    """
    if n_folds < 2:
        return {}
    patients = sorted({str(p) for p in development_patients})
    if len(patients) < n_folds:
        raise ValueError(f"split.n_folds={n_folds} needs at least {n_folds} non-test patients, "
                         f"there are {len(patients)}")
    order = np.random.default_rng([seed, n_folds]).permutation(len(patients))
    return {patients[index]: position % n_folds for position, index in enumerate(order)}


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
        cases: one row per labelled case with ``case_id`` and optionally ``patient_id``.
        split: the ``split`` parameters (seed, test_fraction, validation_fraction, n_folds).
        dataset: the dataset's name (its raw folder), recorded so a split never meets other data.

    Returns:
        ``{"dataset", "settings", "created_at", "train", "validation", "test", "folds", "dropped"}``:
        sorted case-id lists per split, ``folds`` maps non-test case ids to their fold (n_folds >= 2).
    """
    settings = _settings(split)
    patients = cases["patient_id"] if "patient_id" in cases else cases["case_id"]
    assigned = assign_splits(patients, settings["test_fraction"], settings["validation_fraction"],
                             settings["seed"], settings["n_folds"])
    ids = cases["case_id"].astype(str)
    record: dict[str, Any] = {"dataset": dataset, "settings": settings,
                              "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    for name in SPLITS:
        record[name] = sorted(ids[assigned["split"] == name])
    record["folds"] = {c: int(f) for c, f in zip(ids, assigned["fold"], strict=True) if f >= 0}
    record["dropped"] = []
    return record


def reconcile_split(record: Mapping[str, Any], case_ids: Iterable[str], split: Mapping[str, Any],
                    dataset: str, patient_of: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Reuse a persisted split for the current labelled ``case_ids``.

    Cases of the split that are no longer valid (``on_invalid: skip`` dropped them, or they were
    removed) are taken out of it, and nothing else moves. When ``split.n_folds`` differs from the
    persisted one, the folds are dealt anew over the split's non-test patients (``patient_of``:
    case id -> patient id; default: every case is its own patient); train, validation and test stay
    as they are. Returns the updated record and the dropped case ids.

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
        fold_of = assign_folds(patient.values(), wanted["n_folds"], wanted["seed"])
        updated["folds"] = {c: fold_of[patient[c]] for c in development if patient[c] in fold_of}
        updated["settings"] = {**persisted, "n_folds": wanted["n_folds"]}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    updated["dropped"] = [*record.get("dropped", []), *({"case_id": c, "dropped_at": now} for c in dropped)]
    if not updated["train"]:
        raise SplitMismatchError(f"no training case of {dataset!r} is left in its persisted split. {hint}")
    return updated, dropped


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


def split_case_ids(case_manifest: pd.DataFrame) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the sorted case ids a model is trained on."""
    return {split: sorted(case_manifest.loc[case_manifest["split"] == split, "case_id"].astype(str))
            for split in ("train", "validation")}


test_case_ids.__test__ = False   # a helper, not a test: pytest collects test_* names imported into test modules
