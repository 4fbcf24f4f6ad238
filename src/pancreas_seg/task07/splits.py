"""Patient-level, seeded train/validation/test splits and optional k-fold assignment.

In MSD Task07 every case is one patient, so the default grouping key is the case id; a separate
``patient_id`` column can be given when several scans belong to one patient. A patient is never
in two splits.
"""

from __future__ import annotations

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
    fold_of = {p: -1 for p in patients}
    if n_folds >= 2:
        development = shuffled[n_test:]
        for i, patient in enumerate(development):
            fold_of[patient] = i % n_folds
    ids = patient_ids.astype(str)
    return pd.DataFrame({"split": ids.map(split_of), "fold": ids.map(fold_of).astype(int)},
                        index=patient_ids.index)
