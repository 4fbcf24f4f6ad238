"""Project pipelines.

Every architecture in :data:`pancreas_seg.models.names.ARCHITECTURE_NAMES` and the ``cascade``
are namespaces of the ``training`` and ``evaluation`` pipelines. Run a subset with a named pipeline
(``kedro run --pipelines=train_unet``) or, for data already prepared, with
``kedro run --pipelines=training --namespaces=unet``. Hyperparameter search is separate from
``train``: ``kedro run --pipelines=tune`` (every architecture) or ``tune_<architecture>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from kedro.pipeline import Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES, CASCADE_NAME, CASCADE_STAGE1, MODEL_NAMES
from pancreas_seg.pipelines import (
    cascade,
    cv,
    evaluation,
    inference,
    ingestion,
    preprocessing,
    training,
    tuning,
)


def training_of(models: Iterable[str] = MODEL_NAMES) -> Pipeline:
    """Training of ``models`` (architectures and/or ``cascade``), their registration and their
    learning curves in one figure."""
    names = list(models)
    pipeline = training.create_pipeline([name for name in names if name != CASCADE_NAME])
    if CASCADE_NAME in names:
        pipeline += cascade.create_pipeline()
    return (pipeline + training.create_registration_pipeline(names)
            + training.create_learning_curves_pipeline(names))


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    ``train`` (the default) = ingestion -> preprocessing -> training of every architecture and the
    cascade -> held-out evaluation and comparison. ``train_<architecture>`` does the same for one
    model; ``train_cascade`` also trains its stage 1 (``train_unet``'s model). ``cv`` (and
    ``cv_<architecture>``, ``cv_cascade``) = the data pipelines -> k-fold cross-validation of every
    architecture and of the cascade (stage 2 per fold on out-of-fold ``unet`` predictions) ->
    comparison, paired statistics and selection of the best fold ensemble. ``tune`` = the data
    pipelines -> an Optuna study per architecture (``tune_<architecture>``: one; ``tuning``: the
    studies on prepared data). Neither ``cv`` nor ``tune`` is part of the default ``train``.
    """
    data = ingestion.create_pipeline() + preprocessing.create_pipeline()
    train = data + training_of() + evaluation.create_pipeline()
    per_model = {
        f"train_{name}": data + training_of([name]) + evaluation.create_pipeline([name])
        for name in ARCHITECTURE_NAMES
    }
    per_model[f"train_{CASCADE_NAME}"] = (data + training_of([CASCADE_STAGE1, CASCADE_NAME])
                                          + evaluation.create_pipeline([CASCADE_NAME]))
    cross_validation = {f"cv_{name}": data + cv.create_pipeline([name]) for name in ARCHITECTURE_NAMES}
    cross_validation[f"cv_{CASCADE_NAME}"] = (data + cv.create_pipeline([CASCADE_STAGE1], external=[CASCADE_NAME])
                                              + cascade.create_cv_pipeline())
    per_model.update({f"tune_{name}": data + tuning.create_pipeline([name]) for name in ARCHITECTURE_NAMES})
    return {
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "data": data,
        "training": training_of(),
        "evaluation": evaluation.create_pipeline(),
        "inference": inference.create_pipeline(),
        "tuning": tuning.create_pipeline(),
        "train": train,
        "tune": data + tuning.create_pipeline(),
        **per_model,
        "cv": data + cv.create_pipeline(external=[CASCADE_NAME]) + cascade.create_cv_pipeline(),
        **cross_validation,
        "__default__": train,
    }
