"""A manifest's cases predicted and scored by the one :class:`~pancreas_seg.inference.predictor.Predictor`.

The held-out TEST cases (the evaluation pipeline) and the VALIDATION cases a model is selected on
(after training) go through the same two functions: :func:`predict_cases` (a single model predicts
each case's preprocessed slices, the cascade runs both stages on the CT file, as inference does;
both map back to the file's own grid) and :func:`pancreas_seg.evaluation.scoring.score_cases`.
So the validation score that picks the registry's ``champion`` is the test score's twin: a 3D
metric per case on the original grid, for every kind of model alike.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg.evaluation.scoring import score_cases
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import CasePrediction, NiftiVolume, load_nifti
from pancreas_seg.inference.model_card import ModelMismatchError
from pancreas_seg.inference.predictor import Predictor

logger = logging.getLogger(__name__)


def predict_cases(predictor: Predictor, cases: Sequence[str],
                  model_input_slices: Mapping[str, Callable[[], np.ndarray]], slice_geometry: Mapping[str, Any],
                  case_manifest: pd.DataFrame, kind: str = "test",
                  with_probability: bool = True) -> dict[str, Callable[[], CasePrediction]]:
    """Lazily predict ``cases`` on each original file's grid and affine.

    A single model (or ensemble) predicts the preprocessed slices ``model_input_slices``; the
    cascade runs both stages on the case's CT file (``image_path`` in the manifest), as inference
    does. ``kind`` (``test``, ``validation``) is for the log. Returns ``{case_id: fn}``; each ``fn``
    predicts its case when called, so only one case (labels and tumour probability) is in memory
    at a time. Each gives a :class:`~pancreas_seg.imaging.nifti_io.CasePrediction`: the labels,
    not post-processed beyond the predictor's own settings, and (``with_probability``, a model
    with a tumour output) the tumour probability map that detection is scored on
    (:class:`~pancreas_seg.inference.predictor.ScanPrediction`); saved by
    :class:`pancreas_seg.datasets.PredictionDataset`.
    """
    image_paths = case_manifest.set_index("case_id")["image_path"]
    with_probability = with_probability and predictor.has_tumour_output

    def predict(index: int, case_id: str) -> CasePrediction:
        logger.info("%s: predicting %s case %d/%d: %s", predictor.name, kind, index, len(cases), case_id)
        if predictor.is_cascade:
            ct = load_nifti(image_paths.loc[case_id])
            if with_probability:
                prediction = predictor.segment_with_probability(ct.array, ct.affine, case_id)
                labels, probability, report = prediction.labels, prediction.tumour_probability, prediction.report
            else:
                (labels, report), probability = predictor.segment_with_report(ct.array, ct.affine, case_id), None
            logger.info("%s: %s: stage 2 on %d slice(s), %s tile(s)", predictor.name, case_id,
                        report["stage2_slices"], report.get("stage2_tiles", 0))
            return CasePrediction(NiftiVolume(labels, ct.affine), probability)
        geometry = ScanGeometry.from_dict(slice_geometry[case_id])
        image = model_input_slices[f"{case_id}/image"]()
        if not with_probability:
            return CasePrediction(NiftiVolume(predictor.segment_slices(image, geometry), geometry.affine))
        prediction = predictor.segment_slices_with_probability(image, geometry)
        return CasePrediction(NiftiVolume(prediction.labels, geometry.affine), prediction.tumour_probability)

    return {case_id: functools.partial(predict, i, case_id) for i, case_id in enumerate(cases, start=1)}


def check_validation_cases(predictor: Predictor, cases: Sequence[str], test_cases: Sequence[str]) -> None:
    """Refuse to select a model on anything but its own validation cases, or on any test case.

    Every card must have seen no test case (:meth:`~pancreas_seg.inference.model_card.ModelCard.check_disjoint`)
    and have been validated on every case of ``cases``; so ``cases`` are disjoint from the test cases.

    Raises:
        ModelMismatchError: naming the cases.
    """
    for card in predictor.cards:
        card.check_disjoint(test_cases, "holds out as test cases (never used for model selection)")
        missing = sorted(set(cases) - set(card.cases.validation))
        if missing:
            raise ModelMismatchError(f"{card.describe()} was not validated on case(s) {missing} of the current "
                                     "validation split; retrain it on the current split")


def score_validation_cases(predictor: Predictor, cases: Sequence[str], test_cases: Sequence[str],
                           model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                           slice_geometry: dict[str, Any], case_manifest: pd.DataFrame,
                           tolerance_mm: float) -> pd.DataFrame:
    """The validation ``cases`` predicted and scored as the evaluation scores test cases.

    Checks first (:func:`check_validation_cases`); returns :func:`score_cases` rows (columns
    :data:`~pancreas_seg.evaluation.scoring.METRIC_COLUMNS`, ``architecture`` = the predictor's name).
    """
    if not cases:
        raise ValueError("the manifest has no validation cases to select a model on; set split.validation_fraction > 0")
    check_validation_cases(predictor, cases, test_cases)
    predictions = predict_cases(predictor, cases, model_input_slices, slice_geometry, case_manifest, "validation",
                                with_probability=False)   # model selection scores segmentation only
    return score_cases(predictions, list(cases), case_manifest, slice_geometry, predictor.name, tolerance_mm)
