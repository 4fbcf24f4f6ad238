"""Model cards: what a trained model is bound to, and the checks that refuse a mismatched use.

A card is saved with every model version (same node, same version folder). Besides what inference
needs to reproduce the preprocessing, it binds the model to

* its data: the dataset name and the training and validation case ids;
* its preprocessing: the settings and the training-foreground intensity statistics, with a
  fingerprint of both;
* its weights: the SHA-256 of the weight values, so a card cannot be paired with another model.

Evaluation refuses a model whose training or validation cases are among the cases it scores, or
whose preprocessing differs from the one in use; inference refuses a card that does not match its
weights or its own settings. Pure Python: no Kedro, Keras or MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from pancreas_seg.imaging.preprocess import PreprocessingConfig


class ModelMismatchError(ValueError):
    """A model is used on data or settings it is not valid for; the message names them."""


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))


def preprocessing_settings(preprocessing: Mapping[str, Any],
                           intensity_stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a model's input depends on, normalised (``96`` and ``[96, 96]`` are the same).

    ``intensity_stats`` is the ``intensity_stats`` dataset (mode, window, fitted foreground stats).
    """
    config = asdict(PreprocessingConfig.from_params(dict(preprocessing)))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return {"preprocessing": config, "intensity_stats": dict(intensity_stats or {})}


def preprocessing_fingerprint(preprocessing: Mapping[str, Any],
                              intensity_stats: Mapping[str, Any] | None) -> str:
    """SHA-256 (hex, 16 characters) of :func:`preprocessing_settings`."""
    payload = _canonical_json(preprocessing_settings(preprocessing, intensity_stats))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["preprocessing.image_size_px: [96, 96] -> [64, 64]", ...]`` for two nested dicts."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def describe(card: Mapping[str, Any]) -> str:
    """``"unet model (trained 2026-11-28T10:00:00+00:00, version ...)"`` for error messages."""
    version = f", version {card['version']}" if card.get("version") else ""
    return f"{card.get('architecture', '?')} model (trained {card.get('trained_at', '?')}{version})"


def check_preprocessing(card: Mapping[str, Any], preprocessing: Mapping[str, Any],
                        intensity_stats: Mapping[str, Any] | None) -> None:
    """Refuse a model trained with preprocessing other than ``preprocessing`` + ``intensity_stats``."""
    expected = card.get("preprocessing_fingerprint")
    if expected is None:
        raise ModelMismatchError(f"{describe(card)}: its model card has no preprocessing fingerprint "
                                 "(made before models were bound to their data); retrain it")
    if preprocessing_fingerprint(preprocessing, intensity_stats) == expected:
        return
    trained = preprocessing_settings(card["preprocessing"], card.get("intensity_stats"))
    current = preprocessing_settings(preprocessing, intensity_stats)
    listing = "\n".join(f"  - {line}" for line in _differences(trained, current)) or "  (settings differ)"
    raise ModelMismatchError(f"{describe(card)} was trained with other preprocessing than is in use "
                             f"(trained -> now):\n{listing}\nRetrain it, or run with the settings it was "
                             "trained with (the same --env and preprocessing parameters).")


def check_card_consistent(card: Mapping[str, Any]) -> None:
    """Refuse a card whose recorded preprocessing does not match its own fingerprint (edited card)."""
    expected = card.get("preprocessing_fingerprint")
    actual = preprocessing_fingerprint(card["preprocessing"], card.get("intensity_stats"))
    if expected is not None and actual != expected:
        # check_preprocessing would compare the card's settings with themselves: nothing to list
        raise ModelMismatchError(f"{describe(card)}: its model card's preprocessing settings do not match "
                                 f"its preprocessing fingerprint (recorded {expected}, settings give {actual}); "
                                 "the card was edited after training. Restore the card saved with the "
                                 "model (same version folder) or retrain it.")
    check_preprocessing(card, card["preprocessing"], card.get("intensity_stats"))


def check_disjoint(card: Mapping[str, Any], case_ids: Iterable[str], purpose: str) -> None:
    """Refuse a model whose training or validation cases are among ``case_ids``.

    Args:
        card: the model card (``cases.train`` and ``cases.validation`` lists).
        case_ids: the cases about to be scored or segmented.
        purpose: what those cases are, for the message (``"scores as test cases"``).
    """
    cases = card.get("cases")
    if cases is None:
        raise ModelMismatchError(f"{describe(card)}: its model card does not list its training cases "
                                 "(made before models were bound to their data); retrain it")
    seen = set(cases.get("train", [])) | set(cases.get("validation", []))
    overlap = sorted(seen & {str(c) for c in case_ids})
    if overlap:
        raise ModelMismatchError(
            f"{describe(card)} was trained or validated on {len(overlap)} case(s) that this run "
            f"{purpose}: {', '.join(overlap)}. Its scores would be optimistic. The split changed since "
            "the model was trained (see data/03_primary/splits/); retrain the model on the current split.")


def check_dataset(card: Mapping[str, Any], dataset: str) -> None:
    """Refuse a model trained on another dataset than ``dataset`` (case ids would not mean the same)."""
    if card.get("dataset") != dataset:
        raise ModelMismatchError(f"{describe(card)} was trained on dataset {card.get('dataset')!r}, "
                                 f"but this run evaluates {dataset!r}; retrain it on this dataset "
                                 "(same --env) first.")


def check_weights(card: Mapping[str, Any], weights_sha256: str) -> None:
    """Refuse a card that belongs to another model (its recorded weights hash differs)."""
    if card.get("weights_sha256") != weights_sha256:
        raise ModelMismatchError(f"{describe(card)}: the model card does not belong to this model file "
                                 f"(weights SHA-256 {weights_sha256[:12]}..., card says "
                                 f"{str(card.get('weights_sha256'))[:12]}...). Model and card must "
                                 "come from the same version folder; retrain or restore the pair.")


def check_stage1(stage1_card: Mapping[str, Any], dataset: str, cases: Mapping[str, Iterable[str]],
                 test_case_ids: Iterable[str], preprocessing: Mapping[str, Any],
                 intensity_stats: Mapping[str, Any] | None) -> None:
    """Refuse a cascade stage 1 that is not bound to the data and settings stage 2 is trained on.

    Stage 1 must localise the pancreas (label mode ``multiclass`` or ``pancreas``), come from this
    dataset and preprocessing, and be trained on exactly the current ``cases`` (train and
    validation ids): its localisation errors are measured on the validation cases, which it must
    not have seen, and it must not have seen any test case.
    """
    if stage1_card.get("label_mode") == "tumour":
        raise ModelMismatchError(f"{describe(stage1_card)} predicts only the tumour; a cascade's stage 1 "
                                 "must localise the pancreas (label mode multiclass or pancreas)")
    check_dataset(stage1_card, dataset)
    check_preprocessing(stage1_card, preprocessing, intensity_stats)
    check_disjoint(stage1_card, test_case_ids, "holds out as test cases")
    trained = {split: sorted(stage1_card.get("cases", {}).get(split, [])) for split in ("train", "validation")}
    current = {split: sorted(str(c) for c in cases.get(split, [])) for split in ("train", "validation")}
    if trained != current:
        changed = sorted(set(trained["train"]) ^ set(current["train"])
                         | set(trained["validation"]) ^ set(current["validation"]))
        raise ModelMismatchError(f"{describe(stage1_card)} was trained on another train/validation split than "
                                 f"the cascade uses (cases that moved: {', '.join(changed)}); retrain stage 1 "
                                 "on the current split first.")


def check_cascade_weights(card: Mapping[str, Any], stage1_sha256: str, stage2_sha256: str) -> None:
    """Refuse a cascade card that does not belong to these two models (see :func:`check_weights`)."""
    check_weights(card, stage2_sha256)
    stage1 = card.get("cascade", {}).get("stage1", {})
    if stage1.get("weights_sha256") != stage1_sha256:
        raise ModelMismatchError(f"{describe(card)}: its stage-1 model is not the one the card was saved with "
                                 f"(weights SHA-256 {stage1_sha256[:12]}..., card says "
                                 f"{str(stage1.get('weights_sha256'))[:12]}...). Both stages and the card must "
                                 "come from the same version folder; retrain or restore them.")


def check_fold_ensemble(cards: Sequence[Mapping[str, Any]]) -> None:
    """Refuse fold models that do not form one cross-validation ensemble.

    The cards must be of one architecture, dataset, label mode and preprocessing (fingerprint);
    carry folds ``0..n_folds-1`` exactly once; and have pairwise disjoint validation cases (each
    fold validated on its own patients). Otherwise :class:`ModelMismatchError` names the difference.
    """
    if not cards:
        raise ModelMismatchError("an ensemble needs at least one fold model")
    first = cards[0]
    for key in ("architecture", "dataset", "label_mode", "preprocessing_fingerprint", "n_folds"):
        values = sorted({str(card.get(key)) for card in cards})
        if len(values) != 1:
            raise ModelMismatchError(f"the fold models of {describe(first)} differ in {key}: {values}; "
                                     "they come from different cross-validation runs. Rerun the cv pipeline.")
    folds = sorted(int(card["fold"]) for card in cards if card.get("fold") is not None)
    n_folds = int(first.get("n_folds") or 0)
    if folds != list(range(n_folds)) or len(cards) != n_folds:
        raise ModelMismatchError(f"the fold models of {describe(first)} have folds {folds}, expected "
                                 f"0..{n_folds - 1} once each. Rerun the cv pipeline.")
    seen: dict[str, int] = {}
    for card in cards:
        for case in card["cases"]["validation"]:
            if case in seen:
                raise ModelMismatchError(f"case {case} is a validation case of fold {seen[case]} and of fold "
                                         f"{card['fold']}: the fold models come from different splits. "
                                         "Rerun the cv pipeline.")
            seen[case] = int(card["fold"])
