"""The model card: a typed, versioned record of what a trained model is and what it is bound to.

A card is saved with every model version (same node, same version folder) as JSON. Besides what
inference needs to reproduce the preprocessing, it binds the model to

* its data: the dataset name and the training and validation case ids;
* its preprocessing: the settings and the training-foreground intensity statistics, with a
  fingerprint of both;
* its weights: the SHA-256 of the weight values, so a card cannot be paired with another model.

:class:`ModelCard` is the one reader and writer of that JSON: no other module reads a card by
string key. Its ``check_*`` methods refuse a mismatched use with :class:`ModelMismatchError`:
evaluation refuses a model whose training or validation cases are among the cases it scores, or
whose preprocessing differs from the one in use; inference refuses a card that does not match its
weights or its own settings. Pure Python: no Kedro, Keras or MLflow.

Schema versions: cards written before the schema was versioned (no ``schema_version`` key) are
version 0 and load unchanged when they hold every field; a card that lacks a field, or that a
newer release wrote, is refused with a message that says how to retrain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pancreas_seg.imaging.intensity import ForegroundIntensityStats
from pancreas_seg.imaging.preprocess import PreprocessingConfig, intensity_stats_from_dict

SCHEMA_VERSION = 1
"""The card format this release writes. 0 = the unversioned cards of earlier releases (same fields)."""
CASCADE_ARCHITECTURE = "cascade"


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


@dataclass(frozen=True)
class CaseSplit:
    """The case ids a model was trained and validated on (sorted)."""

    train: tuple[str, ...]
    validation: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Iterable[str]]) -> CaseSplit:
        return cls(tuple(str(c) for c in data.get("train", [])), tuple(str(c) for c in data.get("validation", [])))

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "validation": list(self.validation)}

    @property
    def seen(self) -> frozenset[str]:
        """Every case the model was trained or validated on."""
        return frozenset(self.train) | frozenset(self.validation)


@dataclass(frozen=True)
class CascadeSpec:
    """What ties the cascade's two stages together (the ``cascade`` block of its card).

    Attributes:
        stage1: the stage-1 model: ``architecture``, ``label_mode``, ``mlflow_run_id``,
            ``trained_at``, ``input_shape`` and ``weights_sha256``.
        stage2: the stage-2 model: ``architecture``, ``label_mode``, ``input_shape``.
        crop: the crop settings stage 2 was trained with (:class:`pancreas_seg.cascade.crops.CropConfig`).
        jitter_std_mm: the training position jitter (z/in-plane, mm).
        stage1_localisation: the summary of stage 1's box errors on validation cases.
        tumour_fraction: share of tumour windows per training batch.
        min_tumour_volume_mm3: smaller predicted tumour components become pancreas, mm³.
        stage2_crops: where stage 2's training crops came from: ``jittered_truth`` (around the true
            pancreas, shifted by ``jitter_std_mm``; cards written before this field) or
            ``out_of_fold`` (around the box of each case's out-of-fold stage-1 prediction, cross-validation).
    """

    stage1: Mapping[str, Any]
    stage2: Mapping[str, Any]
    crop: Mapping[str, Any]
    jitter_std_mm: tuple[float, ...] = ()
    stage1_localisation: Mapping[str, Any] = field(default_factory=dict)
    tumour_fraction: float | None = None
    min_tumour_volume_mm3: float = 0.0
    stage2_crops: str = "jittered_truth"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CascadeSpec:
        return cls(stage1=dict(data.get("stage1", {})), stage2=dict(data.get("stage2", {})),
                   crop=dict(data.get("crop", {})), jitter_std_mm=tuple(data.get("jitter_std_mm", ())),
                   stage1_localisation=dict(data.get("stage1_localisation", {})),
                   tumour_fraction=data.get("tumour_fraction"),
                   min_tumour_volume_mm3=float(data.get("min_tumour_volume_mm3", 0.0)),
                   stage2_crops=str(data.get("stage2_crops", "jittered_truth")))

    def to_dict(self) -> dict[str, Any]:
        return {"stage1": dict(self.stage1), "stage2": dict(self.stage2), "crop": dict(self.crop),
                "jitter_std_mm": list(self.jitter_std_mm), "stage1_localisation": dict(self.stage1_localisation),
                "tumour_fraction": self.tumour_fraction, "min_tumour_volume_mm3": self.min_tumour_volume_mm3,
                "stage2_crops": self.stage2_crops}

    @property
    def stage1_label_mode(self) -> str:
        return str(self.stage1["label_mode"])

    @property
    def stage2_label_mode(self) -> str:
        return str(self.stage2["label_mode"])


_REQUIRED = ("architecture", "label_mode", "preprocessing", "preprocessing_fingerprint", "dataset", "cases",
             "weights_sha256")
"""Fields without which a card cannot bind its model; a card missing one is refused."""


@dataclass(frozen=True)
class ModelCard:
    """A trained model's card. Build it with :meth:`for_trained_model`, store it with :meth:`to_json`.

    Attributes:
        architecture: ``unet`` ... or ``cascade``.
        label_mode: the model's output (``multiclass``, ``pancreas`` or ``tumour``).
        preprocessing: the ``preprocessing`` parameters the model was trained with.
        intensity_stats: the ``intensity_stats`` dataset (mode, window HU, fitted foreground stats).
        preprocessing_fingerprint: :func:`preprocessing_fingerprint` of the two above.
        dataset: the dataset name (``Task07_Pancreas`` ...); case ids only mean something within it.
        cases: the training and validation case ids.
        weights_sha256: SHA-256 of the weight values (:func:`pancreas_seg.models.io.weights_sha256`).
        mlflow_run_id: the model's MLflow run.
        input_shape: (H px, W px, context slices).
        data_source: ``synthetic`` or ``msd``.
        monitor, best_value, epochs_completed: the checkpoint criterion and its best value.
        keras_backend, git_commit, trained_at: provenance (ISO 8601 UTC time).
        fold, n_folds, cv_run_id: set for a cross-validation fold model.
        cascade: set for the cascade (stage 2 is the model, stage 1 described here).
        version: where the card was loaded from (a Kedro version, an MLflow URI); not saved.
        schema_version: the card format (:data:`SCHEMA_VERSION`).
    """

    architecture: str
    label_mode: str
    preprocessing: Mapping[str, Any]
    intensity_stats: Mapping[str, Any] | None
    preprocessing_fingerprint: str
    dataset: str
    cases: CaseSplit
    weights_sha256: str
    mlflow_run_id: str | None = None
    input_shape: tuple[int, ...] = ()
    data_source: str | None = None
    monitor: str | None = None
    best_value: float | None = None
    epochs_completed: int | None = None
    keras_backend: str | None = None
    git_commit: str | None = None
    trained_at: str | None = None
    fold: int | None = None
    n_folds: int | None = None
    cv_run_id: str | None = None
    cascade: CascadeSpec | None = None
    version: str | None = field(default=None, compare=False)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ building and storing
    @classmethod
    def for_trained_model(cls, architecture: str, label_mode: str, preprocessing: Mapping[str, Any],
                          intensity_stats: Mapping[str, Any] | None, dataset: str, cases: CaseSplit,
                          weights_sha256: str, **provenance: Any) -> ModelCard:
        """A new card; the fingerprint is computed and ``trained_at`` set to now (UTC) unless given."""
        provenance.setdefault("trained_at", datetime.now(UTC).isoformat(timespec="seconds"))
        return cls(architecture=architecture, label_mode=label_mode, preprocessing=dict(preprocessing),
                   intensity_stats=None if intensity_stats is None else dict(intensity_stats),
                   preprocessing_fingerprint=preprocessing_fingerprint(preprocessing, intensity_stats),
                   dataset=dataset, cases=cases, weights_sha256=weights_sha256, **provenance)

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with ``changes`` (the card is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The card as stored (JSON types; ``version`` is left out, ``None`` fold/cascade fields too)."""
        data: dict[str, Any] = {
            "schema_version": self.schema_version, "architecture": self.architecture,
            "mlflow_run_id": self.mlflow_run_id, "input_shape": list(self.input_shape),
            "label_mode": self.label_mode, "preprocessing": dict(self.preprocessing),
            "intensity_stats": None if self.intensity_stats is None else dict(self.intensity_stats),
            "preprocessing_fingerprint": self.preprocessing_fingerprint, "dataset": self.dataset,
            "data_source": self.data_source, "cases": self.cases.to_dict(), "weights_sha256": self.weights_sha256,
            "monitor": self.monitor, "best_value": self.best_value, "epochs_completed": self.epochs_completed,
            "keras_backend": self.keras_backend, "git_commit": self.git_commit, "trained_at": self.trained_at,
        }
        for key in ("fold", "n_folds", "cv_run_id"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.cascade is not None:
            data["cascade"] = self.cascade.to_dict()
        return data

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card", version: str | None = None) -> ModelCard:
        """Read a stored card (this schema or an earlier unversioned one).

        Raises:
            ModelMismatchError: the card lacks a field that binds its model, or a newer release
                wrote it; the message names ``source`` and says how to retrain.
        """
        schema = int(data.get("schema_version", 0))
        if schema > SCHEMA_VERSION:
            raise ModelMismatchError(f"{source}: model card schema version {schema} was written by a newer "
                                     f"pancreas_seg (this one reads up to {SCHEMA_VERSION}); upgrade pancreas_seg "
                                     "or retrain the model with this version.")
        missing = [key for key in _REQUIRED if data.get(key) is None]
        if missing:
            why = ("made before models were bound to their data"
                   if {"preprocessing_fingerprint", "cases"} & set(missing) else "incomplete")
            raise ModelMismatchError(f"{source}: the model card has no {', '.join(missing)} ({why}); it cannot be "
                                     "checked against its data and weights. Retrain the model with this version "
                                     "(kedro run --pipelines=train_<architecture>).")
        fold = data.get("fold")
        return cls(
            architecture=str(data["architecture"]), label_mode=str(data["label_mode"]),
            preprocessing=dict(data["preprocessing"]),
            intensity_stats=None if data.get("intensity_stats") is None else dict(data["intensity_stats"]),
            preprocessing_fingerprint=str(data["preprocessing_fingerprint"]), dataset=str(data["dataset"]),
            cases=CaseSplit.from_dict(data["cases"]), weights_sha256=str(data["weights_sha256"]),
            mlflow_run_id=data.get("mlflow_run_id"), input_shape=tuple(int(v) for v in data.get("input_shape") or ()),
            data_source=data.get("data_source"), monitor=data.get("monitor"), best_value=data.get("best_value"),
            epochs_completed=data.get("epochs_completed"), keras_backend=data.get("keras_backend"),
            git_commit=data.get("git_commit"), trained_at=data.get("trained_at"),
            fold=None if fold is None else int(fold),
            n_folds=None if data.get("n_folds") is None else int(data["n_folds"]), cv_run_id=data.get("cv_run_id"),
            cascade=None if data.get("cascade") is None else CascadeSpec.from_dict(data["cascade"]),
            version=version, schema_version=SCHEMA_VERSION)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "model card", version: str | None = None) -> ModelCard:
        """:meth:`from_dict` of JSON text; unreadable JSON is a :class:`ModelMismatchError` naming ``source``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ModelMismatchError(f"{source}: not a JSON model card ({exc})") from None
        if not isinstance(data, Mapping):
            raise ModelMismatchError(f"{source}: not a JSON model card (a {type(data).__name__}, not an object)")
        return cls.from_dict(data, source, version)

    # ------------------------------------------------------------------ what it describes
    @property
    def is_cascade(self) -> bool:
        return self.cascade is not None

    @property
    def preprocessing_config(self) -> PreprocessingConfig:
        """The preprocessing the model's input needs."""
        return PreprocessingConfig.from_params(dict(self.preprocessing))

    @property
    def foreground_stats(self) -> ForegroundIntensityStats | None:
        """Training-foreground intensity statistics (z-score mode), else None."""
        return intensity_stats_from_dict(None if self.intensity_stats is None else dict(self.intensity_stats))

    def describe(self) -> str:
        """``"unet model (trained 2026-11-28T10:00:00+00:00, version ...)"`` for error messages."""
        version = f", version {self.version}" if self.version else ""
        return f"{self.architecture} model (trained {self.trained_at or '?'}{version})"

    # ------------------------------------------------------------------ checks
    def check_preprocessing(self, preprocessing: Mapping[str, Any], intensity_stats: Mapping[str, Any] | None) -> None:
        """Refuse a model trained with preprocessing other than ``preprocessing`` + ``intensity_stats``."""
        if preprocessing_fingerprint(preprocessing, intensity_stats) == self.preprocessing_fingerprint:
            return
        trained = preprocessing_settings(self.preprocessing, self.intensity_stats)
        current = preprocessing_settings(preprocessing, intensity_stats)
        listing = "\n".join(f"  - {line}" for line in _differences(trained, current)) or "  (settings differ)"
        raise ModelMismatchError(f"{self.describe()} was trained with other preprocessing than is in use "
                                 f"(trained -> now):\n{listing}\nRetrain it, or run with the settings it was "
                                 "trained with (the same --env and preprocessing parameters).")

    def check_consistent(self) -> None:
        """Refuse a card whose recorded preprocessing does not match its own fingerprint (edited card)."""
        actual = preprocessing_fingerprint(self.preprocessing, self.intensity_stats)
        if actual != self.preprocessing_fingerprint:
            raise ModelMismatchError(f"{self.describe()}: its model card's preprocessing settings do not match "
                                     f"its preprocessing fingerprint (recorded {self.preprocessing_fingerprint}, "
                                     f"settings give {actual}); the card was edited after training. Restore the "
                                     "card saved with the model (same version folder) or retrain it.")

    def check_disjoint(self, case_ids: Iterable[str], purpose: str) -> None:
        """Refuse a model whose training or validation cases are among ``case_ids``.

        ``purpose`` says what those cases are, for the message (``"scores as test cases"``).
        """
        overlap = sorted(self.cases.seen & {str(c) for c in case_ids})
        if overlap:
            raise ModelMismatchError(
                f"{self.describe()} was trained or validated on {len(overlap)} case(s) that this run "
                f"{purpose}: {', '.join(overlap)}. Its scores would be optimistic. The split changed since "
                "the model was trained (see data/03_primary/splits/); retrain the model on the current split.")

    def check_dataset(self, dataset: str) -> None:
        """Refuse a model trained on another dataset than ``dataset`` (case ids would not mean the same)."""
        if self.dataset != dataset:
            raise ModelMismatchError(f"{self.describe()} was trained on dataset {self.dataset!r}, "
                                     f"but this run evaluates {dataset!r}; retrain it on this dataset "
                                     "(same --env) first.")

    def check_weights(self, weights_sha256: str) -> None:
        """Refuse a card that belongs to another model (its recorded weights hash differs)."""
        if self.weights_sha256 != weights_sha256:
            raise ModelMismatchError(f"{self.describe()}: the model card does not belong to this model file "
                                     f"(weights SHA-256 {weights_sha256[:12]}..., card says "
                                     f"{self.weights_sha256[:12]}...). Model and card must "
                                     "come from the same version folder; retrain or restore the pair.")

    def check_cascade_weights(self, stage1_sha256: str, stage2_sha256: str) -> None:
        """Refuse a cascade card that does not belong to these two models (see :meth:`check_weights`)."""
        self.check_weights(stage2_sha256)
        recorded = str((self.cascade.stage1 if self.cascade else {}).get("weights_sha256"))
        if recorded != stage1_sha256:
            raise ModelMismatchError(f"{self.describe()}: its stage-1 model is not the one the card was saved with "
                                     f"(weights SHA-256 {stage1_sha256[:12]}..., card says "
                                     f"{recorded[:12]}...). Both stages and the card must "
                                     "come from the same version folder; retrain or restore them.")

    def check_stage1(self, dataset: str, cases: CaseSplit, test_case_ids: Iterable[str],
                     preprocessing: Mapping[str, Any], intensity_stats: Mapping[str, Any] | None) -> None:
        """Refuse this model as a cascade's stage 1 unless it is bound to the data stage 2 is trained on.

        Stage 1 must localise the pancreas (label mode ``multiclass`` or ``pancreas``), come from this
        dataset and preprocessing, and be trained on exactly the current ``cases``: its localisation
        errors are measured on the validation cases, which it must not have seen, and it must not
        have seen any test case.
        """
        if self.label_mode == "tumour":
            raise ModelMismatchError(f"{self.describe()} predicts only the tumour; a cascade's stage 1 "
                                     "must localise the pancreas (label mode multiclass or pancreas)")
        self.check_dataset(dataset)
        self.check_preprocessing(preprocessing, intensity_stats)
        self.check_disjoint(test_case_ids, "holds out as test cases")
        trained = {"train": sorted(self.cases.train), "validation": sorted(self.cases.validation)}
        current = {"train": sorted(cases.train), "validation": sorted(cases.validation)}
        if trained != current:
            changed = sorted(set(trained["train"]) ^ set(current["train"])
                             | set(trained["validation"]) ^ set(current["validation"]))
            raise ModelMismatchError(f"{self.describe()} was trained on another train/validation split than "
                                     f"the cascade uses (cases that moved: {', '.join(changed)}); retrain stage 1 "
                                     "on the current split first.")


def check_fold_ensemble(cards: Sequence[ModelCard]) -> None:
    """Refuse fold models that do not form one cross-validation ensemble.

    The cards must be of one architecture, dataset, label mode and preprocessing (fingerprint);
    carry folds ``0..n_folds-1`` exactly once; and have pairwise disjoint validation cases (each
    fold validated on its own patients). Otherwise :class:`ModelMismatchError` names the difference.
    """
    if not cards:
        raise ModelMismatchError("an ensemble needs at least one fold model")
    first = cards[0]
    for key in ("architecture", "dataset", "label_mode", "preprocessing_fingerprint", "n_folds"):
        values = sorted({str(getattr(card, key)) for card in cards})
        if len(values) != 1:
            raise ModelMismatchError(f"the fold models of {first.describe()} differ in {key}: {values}; "
                                     "they come from different cross-validation runs. Rerun the cv pipeline.")
    folds = sorted(card.fold for card in cards if card.fold is not None)
    n_folds = int(first.n_folds or 0)
    if folds != list(range(n_folds)) or len(cards) != n_folds:
        raise ModelMismatchError(f"the fold models of {first.describe()} have folds {folds}, expected "
                                 f"0..{n_folds - 1} once each. Rerun the cv pipeline.")
    seen: dict[str, int] = {}
    for card in cards:
        for case in card.cases.validation:
            if case in seen:
                raise ModelMismatchError(f"case {case} is a validation case of fold {seen[case]} and of fold "
                                         f"{card.fold}: the fold models come from different splits. "
                                         "Rerun the cv pipeline.")
            seen[case] = int(card.fold or 0)
