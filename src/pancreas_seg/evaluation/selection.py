"""Choosing the best model from per-case 3D scores: the rule behind the registry's ``champion``.

After ``kedro run --pipelines=train`` every model (the cascade included) is scored on the
VALIDATION cases, after ``--pipelines=cv`` every fold ensemble on the OUT-OF-FOLD cases, in both
cases through :func:`pancreas_seg.evaluation.scoring.score_cases`: a 3D metric per case on the
original file's grid. :class:`SelectionRule` turns those per-case rows into one score per model,
and :func:`rank_models` orders the models by it. The same rule serves both pipelines, so a
``champion`` means the same thing whichever run chose it.

Pure pandas/NumPy: no Kedro, no MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

HIGHER_IS_BETTER = ("dice", "nsd", "nsd_surfel", "slice_dice", "dice_lcc", "nsd_lcc")
"""Per-case columns of :data:`~pancreas_seg.evaluation.scoring.METRIC_COLUMNS` a rule may select on
(higher is better; HD95 is not, and its misses are infinite)."""


@dataclass(frozen=True)
class SelectionRule:
    """How per-case scores become one score per model.

    The score of a model is, for each class in ``classes``, the mean of ``metric`` over the scored
    cases (cases where it is NaN, i.e. both masks empty, left out), then the mean over the classes
    (a class NaN for every case left out). Ties, and models without any score (last), are ordered
    by model name, so the choice is deterministic.

    Attributes:
        split: which cases were scored, the score name's prefix: ``validation`` after ``train``,
            ``cv`` (out of fold) after ``cv``.
        classes: the classes averaged (``pancreas``, ``tumour``).
        metric: a column of :data:`HIGHER_IS_BETTER` (default ``dice``: 3D Dice per case).
    """

    split: str
    classes: tuple[str, ...] = ("pancreas",)
    metric: str = "dice"

    def __post_init__(self) -> None:
        if self.metric not in HIGHER_IS_BETTER:
            raise ValueError(f"selection metric {self.metric!r}: choose one of {list(HIGHER_IS_BETTER)} "
                             "(higher is better)")
        if not self.classes:
            raise ValueError("a selection rule needs at least one class")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], split: str) -> SelectionRule:
        """From a parameter block with ``classes`` (and optionally ``metric``)."""
        return cls(split=split, classes=tuple(str(c) for c in params["classes"]),
                   metric=str(params.get("metric", cls.metric)))

    @property
    def score_name(self) -> str:
        """The score's name, as registry tags and reports carry it: ``validation_dice_pancreas_mean``
        (also the metric the model's MLflow run logs), ``cv_dice_pancreas_tumour_mean``."""
        return f"{self.split}_{self.metric}_{'_'.join(self.classes)}_mean"

    def describe(self) -> str:
        """One sentence for tags and reports."""
        cases = "out-of-fold cases" if self.split == "cv" else f"{self.split} cases"
        return (f"mean over the {cases} of each case's 3D {self.metric} on its original grid, averaged over "
                f"{list(self.classes)}; ties go to the alphabetically first model")

    def scores(self, per_case: pd.DataFrame, model_column: str = "architecture") -> pd.Series:
        """One score per model (index: the ``model_column`` values, sorted), NaN where it has none."""
        missing = {model_column, "case_id", "class", self.metric} - set(per_case.columns)
        if missing:
            raise ValueError(f"per-case scores lack the column(s) {sorted(missing)}")
        rows = per_case[per_case["class"].isin(self.classes)]
        per_class = rows.groupby([model_column, "class"])[self.metric].apply(_nanmean).unstack("class")
        models = sorted(per_case[model_column].astype(str).unique())
        per_class = per_class.reindex(index=models)
        return per_class.apply(lambda row: _nanmean(row.to_numpy(dtype=float)), axis=1).rename(self.score_name)


def _nanmean(values: Any) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def rank_models(scores: pd.Series) -> list[tuple[str, float]]:
    """``[(model, score)]`` best first; equal scores by model name, models without a score last."""
    items = [(str(name), float(value)) for name, value in scores.items()]
    return sorted(items, key=lambda item: (np.isnan(item[1]), -item[1] if not np.isnan(item[1]) else 0.0, item[0]))


def scored_case_ids(per_case: pd.DataFrame, model_column: str = "architecture") -> list[str]:
    """The sorted case ids every model was scored on.

    Raises:
        ValueError: the models were scored on different cases (their scores would not compare).
    """
    cases = {str(model): sorted(set(frame["case_id"].astype(str)))
             for model, frame in per_case.groupby(model_column)}
    distinct = {tuple(c) for c in cases.values()}
    if len(distinct) != 1:
        raise ValueError(f"the models were scored on different cases, so their scores do not compare: {cases}")
    return list(distinct.pop())


def check_selection_cases(cases: Iterable[str], expected: Sequence[str], held_out: Iterable[str]) -> None:
    """Refuse to select on cases other than ``expected`` or on any held-out (test) case.

    Raises:
        ValueError: naming the cases.
    """
    cases, held_out = sorted({str(c) for c in cases}), {str(c) for c in held_out}
    if set(cases) & held_out:
        raise ValueError(f"held-out test case(s) {sorted(set(cases) & held_out)} among the cases a model "
                         "would be selected on: test cases are never used for selection")
    if cases != sorted({str(c) for c in expected}):
        raise ValueError(f"the models were scored on cases {cases}, not on the split's {sorted(expected)}; "
                         "rerun the pipeline on the current split")
