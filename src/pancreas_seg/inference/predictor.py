"""The one predictor: a trained model (single, fold ensemble, list, cascade or the cascade's fold
ensemble) ready to segment scans.

Every path that segments goes through :class:`Predictor`: the evaluation and cross-validation
nodes (from preprocessed slices), the cascade's stage-1 localisation, the inference pipeline, the
served MLflow model and the benchmarks. It owns

* resolving the model (:meth:`Predictor.from_reference`: a name, ``<arch>.ensemble``, ``runs:/``,
  ``models:/`` or a list) and loading it (:meth:`Predictor.from_trained`), or taking models
  already in memory (:meth:`Predictor.from_models`);
* checking the cards: consistent, of one ensemble, bound to these weights;
* the settings (:class:`PredictionSettings`: batch size, XLA, flip TTA, post-processing), read
  from the ``inference`` or ``evaluation`` parameters;
* the forward pass, the ensemble average and the map-back to the file's grid: the labels and, on
  request (:meth:`Predictor.segment_with_probability`, :class:`ScanPrediction`), the tumour
  probability map with the patient-level tumour score.

Modelled on nnU-Net's ``nnUNetPredictor`` (``initialize_from_trained_model_folder`` +
``predict_from_files``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_seg.core.labels import tumour_channel
from pancreas_seg.evaluation.detection import patient_tumour_score
from pancreas_seg.evaluation.postprocessing import keep_largest_foreground
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.intensity import ForegroundIntensityStats
from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_image
from pancreas_seg.inference.cascade import Cascade, merge_stages, predict_cascade
from pancreas_seg.inference.forward import (
    ModelGridOutput,
    mean_probabilities,
    predict_slices,
    to_file_grid,
    tumour_probability_to_file_grid,
    tumour_score_on_file_grid,
    use_xla,
)
from pancreas_seg.inference.model_card import ModelCard, ModelMismatchError, check_fold_ensemble
from pancreas_seg.inference.model_store import TrainedEnsemble, TrainedModel, members, resolve_model


@dataclass(frozen=True)
class PredictionSettings:
    """How a model is applied (the ``inference`` / ``evaluation`` parameters of ``conf/``).

    Attributes:
        batch_size: slices per forward pass.
        flip_tta: also predict the left-right mirrored slices and average (test-time augmentation).
        keep_largest_component: keep only the largest 3D foreground component of the labels.
        xla: compile the forward pass with XLA (TensorFlow backend; JAX always compiles).
    """

    batch_size: int
    flip_tta: bool
    keep_largest_component: bool = False
    xla: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> PredictionSettings:
        """From a parameter block with ``batch_size`` and ``flip_tta`` (``keep_largest_component``
        and ``xla`` optional: off and on); ``overrides`` replace single values."""
        values = {key: params[key] for key in ("batch_size", "flip_tta")}
        values |= {key: params[key] for key in ("keep_largest_component", "xla") if key in params}
        values |= overrides
        return cls(batch_size=int(values["batch_size"]), flip_tta=bool(values["flip_tta"]),
                   keep_largest_component=bool(values.get("keep_largest_component", cls.keep_largest_component)),
                   xla=bool(values.get("xla", cls.xla)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScanPrediction:
    """One scan segmented, on its file grid (the input's shape; it belongs with the input's affine).

    Attributes:
        labels: uint8 MSD labels {0, 1, 2}, post-processed as the settings say; bit-identical to
            :meth:`Predictor.segment` / :meth:`Predictor.segment_slices`.
        tumour_probability: float32 tumour probability in [0, 1], same shape: the (ensemble-mean)
            model-grid tumour output mapped back with the labels' geometry inverse, interpolated
            linearly. For the cascade: stage 2's tumour probability inside its crop, 0 outside.
            Before post-processing (largest component, the cascade's minimum tumour volume): a
            voxel may keep a probability >= 0.5 where those steps removed the tumour label. None for
            a model without a tumour output (label mode ``pancreas``).
        report: the cascade's report (see :meth:`Predictor.segment_with_report`); empty otherwise.
        patient_tumour_score: the patient-level tumour score, the maximum of the tumour probability
            map (:func:`pancreas_seg.evaluation.detection.patient_tumour_score`); None without a
            tumour output. :meth:`Predictor.segment_with_score` gives it without the map.
    """

    labels: np.ndarray
    tumour_probability: np.ndarray | None
    report: dict[str, Any]
    patient_tumour_score: float | None = None


class Predictor:
    """Loaded models with their cards, checked, and the settings to apply them with.

    Args:
        models: the loaded Keras models (one, or the members of an ensemble; stage 2 of the cascade).
        cards: one card per model.
        settings: how to apply them.
        name: what reports call the model (default: the single card's architecture).
        stage1: the cascade's loaded stage-1 model (cascade cards only); for a fold ensemble of
            cascades, one stage-1 model per member, in order (member k's stage 1 is stage-1 fold k).

    Raises:
        ModelMismatchError: a card was edited, belongs to other weights, the models of an
            ensemble differ in preprocessing or label mode, or fold models are not one
            cross-validation.
    """

    def __init__(self, models: Sequence[Any], cards: Sequence[ModelCard], settings: PredictionSettings,
                 name: str | None = None, stage1: Any = None) -> None:
        from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415 - lazy: Keras

        if not models or len(models) != len(cards):
            raise ValueError(f"a predictor needs one card per model ({len(models)} models, {len(cards)} cards)")
        self.models, self.cards, self.settings = list(models), list(cards), settings
        self.model_files: list[Path] = []   # set by from_trained: the files the models came from
        self.name = name or (cards[0].architecture if len(cards) == 1 else "+".join(c.architecture for c in cards))
        for card in self.cards:
            card.check_consistent()
        self.cascade: Cascade | None = None
        if any(card.is_cascade for card in self.cards):
            if stage1 is None:
                raise ModelMismatchError(f"{self.card.describe()}: a cascade card without its stage-1 model")
            if len(self.cards) > 1:   # a fold ensemble of cascades: one stage-1 model per member
                if not all(card.is_cascade and card.fold is not None for card in self.cards):
                    raise ValueError(f"{self.name}: a cascade can only be part of an ensemble of the cascade's "
                                     "cross-validation fold models (no other models, no single cascade)")
                check_fold_ensemble(self.cards)
                stage1 = list(stage1) if isinstance(stage1, (list, tuple)) else [stage1]
                if len(stage1) != len(self.cards):
                    raise ValueError(f"{self.name}: {len(stage1)} stage-1 model(s) for {len(self.cards)} cascades")
                for card, first, second in zip(self.cards, stage1, self.models, strict=True):
                    card.check_cascade_weights(weights_sha256(first), weights_sha256(second))
                self.cascade = Cascade.from_cards(self.cards, stage1, self.models)
            else:
                if isinstance(stage1, (list, tuple)):
                    (stage1,) = stage1
                self.card.check_cascade_weights(weights_sha256(stage1), weights_sha256(self.models[0]))
                self.cascade = Cascade.from_card(self.card, stage1, self.models[0])
        else:
            if (len({c.preprocessing_fingerprint for c in self.cards}) != 1
                    or len({c.label_mode for c in self.cards}) != 1):
                raise ModelMismatchError(f"{self.name}: its models differ in preprocessing or label mode, so "
                                         "their outputs cannot be averaged")
            if len(self.cards) > 1 and all(card.fold is not None for card in self.cards):
                check_fold_ensemble(self.cards)
            for model, card in zip(self.models, self.cards, strict=True):
                card.check_weights(weights_sha256(model))
        self._compile()

    def _compile(self) -> None:
        for model in self._keras_models():
            use_xla(model, self.settings.xla)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a Dask worker hands the predictor to the next node's worker) as ``.keras`` bytes."""
        from pancreas_seg.models.io import model_bytes  # noqa: PLC0415 - lazy: Keras

        state = dict(self.__dict__)
        state["models"] = [model_bytes(model) for model in self.models]
        state["cascade"] = (None if self.cascade is None
                            else [model_bytes(model) for model in self.cascade.stage1_models])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from pancreas_seg.models.io import load_model_bytes  # noqa: PLC0415 - registers the custom objects

        self.__dict__.update(state)
        self.models = [load_model_bytes(payload, compile=False) for payload in state["models"]]
        if state["cascade"] is not None:
            stage1 = [load_model_bytes(payload, compile=False) for payload in state["cascade"]]
            self.cascade = (Cascade.from_card(self.card, stage1[0], self.models[0]) if len(self.models) == 1
                            else Cascade.from_cards(self.cards, stage1, self.models))
        self._compile()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, models: Sequence[Any], cards: Sequence[ModelCard], settings: PredictionSettings,
                    name: str | None = None, stage1: Any = None) -> Predictor:
        """Models already in memory (a Kedro node's inputs) with their cards."""
        return cls(models, cards, settings, name, stage1)

    @classmethod
    def from_trained(cls, trained: TrainedModel | TrainedEnsemble, settings: PredictionSettings) -> Predictor:
        """Load the model file(s) of a resolved model (both stages of the cascade, every member)."""
        from pancreas_seg.models.io import load_model  # noqa: PLC0415 - lazy: Keras

        parts = members(trained)
        for member in parts:
            member.card.check_consistent()   # before the (slow) model load
        stage1 = None
        if parts[0].card.is_cascade:   # every member's own stage 1 (a fold ensemble of cascades: one each)
            for member in parts:
                if member.stage1_file is None:
                    raise FileNotFoundError(f"{member.model_file}: a cascade card without its stage-1 model file")
            stage1 = [load_model(member.stage1_file, compile=False) for member in parts]
        models = [load_model(member.model_file, compile=False) for member in parts]
        name = trained.name if isinstance(trained, TrainedEnsemble) else parts[0].card.architecture
        predictor = cls(models, [member.card for member in parts], settings, name, stage1)
        predictor.model_files = [member.model_file for member in parts]
        return predictor

    @classmethod
    def from_reference(cls, reference: str | Sequence[str], models_dir: str | Path,
                       settings: PredictionSettings) -> Predictor:
        """Resolve ``reference`` (see :func:`pancreas_seg.inference.model_store.resolve_model`) and load it."""
        reference = reference if isinstance(reference, str) else [str(r) for r in reference]
        return cls.from_trained(resolve_model(reference, models_dir), settings)

    def with_settings(self, **changes: Any) -> Predictor:
        """The same loaded models with other settings (e.g. a request's ``flip_tta``), no reload.

        ``xla`` cannot change here: it is applied to the models when they are loaded.
        """
        if "xla" in changes and changes["xla"] != self.settings.xla:
            raise ValueError("xla is set when the models are loaded; build a new Predictor to change it")
        clone = object.__new__(Predictor)   # not copy.copy: that would pickle and reload the models
        clone.__dict__.update(self.__dict__)
        clone.settings = replace(self.settings, **changes)
        return clone

    # ------------------------------------------------------------------ what it is
    @property
    def card(self) -> ModelCard:
        """The first (for a single model, the) card."""
        return self.cards[0]

    @property
    def preprocessing(self) -> PreprocessingConfig:
        return self.card.preprocessing_config

    @property
    def foreground_stats(self) -> ForegroundIntensityStats | None:
        return self.card.foreground_stats

    @property
    def label_mode(self) -> str:
        return self.card.label_mode

    @property
    def is_cascade(self) -> bool:
        return self.cascade is not None

    @property
    def has_tumour_output(self) -> bool:
        """Whether the model outputs a tumour probability (the cascade: its stage 2); False for
        label mode ``pancreas``, whose :class:`ScanPrediction` has no tumour probability."""
        label_mode = self.cascade.stage2_label_mode if self.cascade is not None else self.label_mode
        return tumour_channel(label_mode) is not None

    def check_disjoint(self, case_ids: Iterable[str], purpose: str) -> None:
        """Refuse when any member was trained or validated on one of ``case_ids``."""
        for card in self.cards:
            card.check_disjoint(case_ids, purpose)

    def _keras_models(self) -> Iterator[Any]:
        yield from self.models
        if self.cascade is not None:
            yield from self.cascade.stage1_models

    # ------------------------------------------------------------------ predicting
    def member_probabilities(self, image_slices: np.ndarray) -> Iterator[np.ndarray]:
        """Each member's (Z, H, W, C) float32 probabilities of preprocessed (Z, H, W) slices, lazily."""
        if self.cascade is not None:
            raise ValueError(f"{self.name}: the cascade predicts from the scan (segment), not from slices")
        settings, context = self.settings, self.preprocessing.context_slices
        for model in self.models:
            yield predict_slices(model, image_slices, context, settings.batch_size, settings.flip_tta)

    def predict_probabilities(self, image_slices: np.ndarray) -> np.ndarray:
        """(Z, H, W, C) float32: the members' mean softmax (memory for two arrays, any member count)."""
        if len(self.models) == 1:   # the mean of one: no copy, no division
            return next(self.member_probabilities(image_slices))
        return mean_probabilities(self.member_probabilities(image_slices))

    def to_labels(self, probabilities: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
        """Model-grid probabilities -> uint8 labels on the scan's file grid, post-processed as set."""
        return self.to_prediction(probabilities, geometry, with_probability=False).labels

    def to_prediction(self, probabilities: np.ndarray, geometry: ScanGeometry,
                      with_probability: bool = True) -> ScanPrediction:
        """Model-grid probabilities -> :class:`ScanPrediction` on the scan's file grid: the labels of
        :meth:`to_labels` and (``with_probability``) the tumour probability map and its maximum."""
        return self._prediction([ModelGridOutput(probabilities, geometry, self.label_mode)],
                                "map" if with_probability else None, geometry.shape, {})

    def segment_slices(self, image_slices: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
        """Preprocessed (Z, H, W) slices of a scan with ``geometry`` -> uint8 labels of ``geometry.shape``."""
        return self.to_labels(self.predict_probabilities(image_slices), geometry)

    def segment_slices_with_probability(self, image_slices: np.ndarray, geometry: ScanGeometry) -> ScanPrediction:
        """:meth:`segment_slices` and the tumour probability map on the same grid (:class:`ScanPrediction`)."""
        return self.to_prediction(self.predict_probabilities(image_slices), geometry)

    def segment(self, hu: np.ndarray, affine: np.ndarray, name: str = "scan") -> np.ndarray:
        """Raw CT (X, Y, Z) HU in file order, any axis order -> uint8 labels of exactly its shape.

        The labels belong with ``affine``; ``name`` is for log messages.
        """
        return self.segment_with_report(hu, affine, name)[0]

    def segment_with_report(self, hu: np.ndarray, affine: np.ndarray,
                            name: str = "scan") -> tuple[np.ndarray, dict[str, Any]]:
        """:meth:`segment` and a report (for the cascade: where stage 1 found the pancreas, how
        many slices and tiles stage 2 ran on; empty for other models)."""
        prediction = self._segment(hu, affine, name, None)
        return prediction.labels, prediction.report

    def segment_with_probability(self, hu: np.ndarray, affine: np.ndarray, name: str = "scan") -> ScanPrediction:
        """:meth:`segment_with_report` and the tumour probability map of the scan (:class:`ScanPrediction`;
        its ``patient_tumour_score`` is the map's maximum). Costs one float32 volume of the scan's
        shape more than :meth:`segment`."""
        return self._segment(hu, affine, name, "map")

    def segment_with_score(self, hu: np.ndarray, affine: np.ndarray, name: str = "scan") -> ScanPrediction:
        """:meth:`segment_with_probability` without keeping the map: the labels, the report and the
        patient tumour score (the same maximum, taken a few slices at a time; ``tumour_probability``
        None). What the served model answers: no float32 volume of the scan's shape is held."""
        return self._segment(hu, affine, name, "max")

    def _segment(self, hu: np.ndarray, affine: np.ndarray, name: str, probability: str | None) -> ScanPrediction:
        if self.cascade is None:
            image, geometry = preprocess_image(hu, affine, self.preprocessing, self.foreground_stats)
            return self._prediction([ModelGridOutput(self.predict_probabilities(image), geometry, self.label_mode)],
                                    probability, hu.shape, {})
        settings = self.settings
        outputs, report = predict_cascade(self.cascade, hu, affine, settings.batch_size, settings.flip_tta, name)
        return self._prediction(outputs, probability, hu.shape, report, affine)

    def _prediction(self, outputs: Sequence[ModelGridOutput], probability: str | None, shape: tuple[int, ...],
                    report: dict[str, Any], affine: np.ndarray | None = None) -> ScanPrediction:
        """Model-grid outputs -> :class:`ScanPrediction`: the one map-back of every path (single model,
        ensemble mean, both stages of the cascade), then the cascade's merge and the post-processing.

        ``probability``: None (labels only), ``"map"`` (the tumour probability map and its maximum)
        or ``"max"`` (the maximum only). The tumour probability is the first output's (the model's;
        the cascade's stage 2, whose crop grid puts 0 outside the crop; 0 everywhere when stage 1
        found nothing); none for a model without a tumour output.
        """
        labels = [to_file_grid(o.probabilities, o.geometry, o.label_mode) for o in outputs]
        tumour_map, score = None, None
        if probability is not None and self.has_tumour_output:
            if not outputs:   # the cascade's stage 1 found no pancreas: stage 2 never looked
                score = 0.0
                tumour_map = np.zeros(shape, dtype=np.float32) if probability == "map" else None
            elif probability == "map":
                first = outputs[0]
                tumour_map = tumour_probability_to_file_grid(first.probabilities, first.geometry, first.label_mode)
                score = patient_tumour_score(tumour_map)
            else:
                first = outputs[0]
                score = tumour_score_on_file_grid(first.probabilities, first.geometry, first.label_mode)
        if self.cascade is None:
            (merged,) = labels
        else:
            merged, removed = merge_stages(self.cascade, labels, shape, affine)
            if outputs:
                report["small_tumour_components_removed"] = removed
        return ScanPrediction(self._postprocess(merged), tumour_map, report, score)

    def _postprocess(self, labels: np.ndarray) -> np.ndarray:
        return keep_largest_foreground(labels) if self.settings.keep_largest_component else labels
