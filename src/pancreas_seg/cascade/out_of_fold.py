"""Out-of-fold stage-1 boxes: where the cascade's stage 2 learns from in cross-validation.

nnU-Net trains its cascade's second stage on stage-1 predictions from cross-validation: every
training case is predicted by the stage-1 fold model that did not train on it, so stage 2 sees
the localisation errors stage 1 makes on new scans, not the too-precise boxes of cases stage 1
was trained on. This module holds the bookkeeping of that rule, without any model:

* :class:`FoldCases`: which cases one stage-1 fold model was trained and validated on (from its card);
* :func:`assign_out_of_fold`: for each case, the one fold model that held it out;
* :func:`check_out_of_fold_crops`: refuse stage-2 training crops whose box did not come from an
  out-of-fold stage-1 prediction.

The provenance record of a crop (an entry of the crop index) carries ``source``
(:data:`CROP_SOURCES`), ``stage1_fold`` (the fold model whose prediction placed the box, or None
for crops around the true pancreas) and ``stage1_weights_sha256``. Pure Python: no Keras, no Kedro.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OUT_OF_FOLD = "out_of_fold"
JITTERED_TRUTH = "jittered_truth"
CROP_SOURCES = (OUT_OF_FOLD, JITTERED_TRUTH)
"""Where stage-2 training crops are placed: around the box of the case's out-of-fold stage-1
prediction (as at inference), or around the true pancreas with position jitter."""


def check_crop_source(source: str) -> str:
    """``source`` if it is one of :data:`CROP_SOURCES`, else ValueError."""
    if source not in CROP_SOURCES:
        raise ValueError(f"cascade.stage2.crop_source must be one of {list(CROP_SOURCES)}, got {source!r}")
    return source


@dataclass(frozen=True)
class FoldCases:
    """The cases one stage-1 fold model was trained and validated (held out) on."""

    fold: int
    train: frozenset[str]
    validation: frozenset[str]

    @classmethod
    def of(cls, fold: int, train: Iterable[str], validation: Iterable[str]) -> FoldCases:
        return cls(int(fold), frozenset(str(c) for c in train), frozenset(str(c) for c in validation))


def assign_out_of_fold(case_ids: Iterable[str], folds: Sequence[FoldCases]) -> dict[str, int]:
    """``{case_id: fold}``: the fold model that held each case out and did not train on it.

    Raises:
        ValueError: a case is held out by no fold model or by several, or the fold model that
            holds it out also trained on it.
    """
    assignment = {}
    for case_id in sorted(str(c) for c in case_ids):
        holders = [f.fold for f in folds if case_id in f.validation]
        if len(holders) != 1:
            raise ValueError(f"case {case_id} is held out by the stage-1 fold model(s) {holders}, not by exactly "
                             "one: the fold models are not one cross-validation of these cases")
        fold = holders[0]
        if case_id in next(f for f in folds if f.fold == fold).train:
            raise ValueError(f"case {case_id}: stage-1 fold model {fold} holds it out but also trained on it")
        assignment[case_id] = fold
    return assignment


def out_of_fold_record(fold: int, weights_sha256: str, box: Sequence[int] | None) -> dict[str, Any]:
    """The provenance of a crop placed by stage-1 fold model ``fold`` (``box``: None when it found nothing)."""
    return {"source": OUT_OF_FOLD, "stage1_fold": int(fold), "stage1_weights_sha256": str(weights_sha256),
            "stage1_box": None if box is None else [int(v) for v in box]}


def check_out_of_fold_crops(crop_index: Mapping[str, Mapping[str, Any]], case_ids: Iterable[str],
                            folds: Sequence[FoldCases], weights_sha256: Mapping[int, str] | None = None) -> None:
    """Refuse unless every case in ``case_ids`` has a crop placed by an out-of-fold stage-1 prediction.

    Each case's crop record must say ``source: out_of_fold`` and name a stage-1 fold model that
    held the case out and did not train on it (and, given ``weights_sha256`` ``{fold: sha}``,
    that model's weights).

    Raises:
        ValueError: naming the case and what is wrong.
    """
    by_fold = {f.fold: f for f in folds}
    for case_id in sorted(str(c) for c in case_ids):
        record = crop_index.get(case_id)
        if record is None:
            raise ValueError(f"case {case_id} has no stage-2 crop")
        if record.get("source") != OUT_OF_FOLD:
            raise ValueError(f"case {case_id}: its stage-2 crop comes from {record.get('source')!r}, not from an "
                             "out-of-fold stage-1 prediction")
        fold = record.get("stage1_fold")
        model = by_fold.get(fold) if fold is not None else None
        if model is None:
            raise ValueError(f"case {case_id}: its crop names stage-1 fold {fold}, which is not among the fold "
                             f"models {sorted(by_fold)}")
        if case_id in model.train or case_id not in model.validation:
            raise ValueError(f"case {case_id}: its crop was placed by stage-1 fold model {fold}, which trained on it "
                             "(not an out-of-fold prediction)")
        if weights_sha256 is not None and record.get("stage1_weights_sha256") != weights_sha256.get(fold):
            raise ValueError(f"case {case_id}: its crop was placed by other stage-1 weights than fold model {fold}'s; "
                             "rerun the cascade's cross-validation")
