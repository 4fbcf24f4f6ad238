"""Cross-validation wiring: one namespace per architecture, then a comparison across them.

In namespace ``<arch>``: train a model per fold of the persisted split, predict and score every
non-test case out of fold, score the fold models and their ensemble on the held-out test cases,
and summarise. Results read across namespaces are published under plain names
(``cv_summary_unet``, ``cv_metrics_per_case_unet``, ``cv_test_metrics_unet``, ``fold_models_unet``,
``fold_cards_unet``). The comparison
ranks the architectures by out-of-fold Dice, tests every pair on the same cases, and registers the
best fold ensemble as ``champion``.
"""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.cv import nodes

SHARED_INPUTS = {"model_input_slices", "slice_geometry", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:evaluation", "params:cv", "params:inference"}
PUBLISHED_OUTPUTS = ("cv_summary", "cv_metrics_per_case", "cv_test_metrics", "fold_models", "fold_cards")
"""Published as ``<name>_<arch>``; the fold models and cards also serve as the cascade's stage 1 (``cv_cascade``)."""


def template() -> Pipeline:
    return Pipeline([
        Node(nodes.train_fold_models,
             ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing", "params:training",
              "params:architecture", "params:inference"],
             ["fold_models", "fold_cards"], name="train_fold_models", tags=MODEL_TRAINING_TAG),
        Node(nodes.predict_out_of_fold,
             ["fold_models", "fold_cards", "model_input_slices", "slice_geometry", "case_manifest",
              "intensity_stats", "params:preprocessing", "params:evaluation"],
             "oof_predictions", name="predict_out_of_fold"),
        Node(nodes.score_out_of_fold,
             ["oof_predictions", "case_manifest", "slice_geometry", "fold_cards", "params:evaluation"],
             "cv_metrics_per_case", name="score_out_of_fold"),
        Node(nodes.evaluate_fold_ensemble,
             ["fold_models", "fold_cards", "model_input_slices", "slice_geometry", "case_manifest",
              "intensity_stats", "params:preprocessing", "params:evaluation", "params:cv"],
             ["ensemble_test_predictions", "cv_test_metrics"], name="evaluate_fold_ensemble"),
        Node(nodes.summarise_cross_validation, ["cv_metrics_per_case", "cv_test_metrics", "fold_cards"],
             "cv_summary", name="summarise_cross_validation"),
    ])


def create_pipeline(models: Iterable[str] = ARCHITECTURE_NAMES, external: Iterable[str] = ()) -> Pipeline:
    """Cross-validation of ``models`` (architecture names), compared with the ``external`` candidates.

    An external candidate (the ``cascade``, whose per-fold training and prediction its own
    pipeline wires: ``pipelines.cascade.create_cv_pipeline``) publishes ``cv_metrics_per_case_<name>``,
    ``cv_test_metrics_<name>`` and ``fold_cards_<name>`` like an architecture here; this pipeline
    summarises it and ranks, tests and selects it with the architectures.
    """
    archs, others = list(models), list(external)
    unknown = sorted(set(archs) - set(ARCHITECTURE_NAMES))
    if unknown:
        raise ValueError(f"cross-validation covers the architectures {list(ARCHITECTURE_NAMES)}, not {unknown}")
    per_model = sum((Pipeline(template(), namespace=arch, inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS,
                              outputs={name: f"{name}_{arch}" for name in PUBLISHED_OUTPUTS})
                     for arch in archs), Pipeline([]))
    per_model += Pipeline([
        Node(nodes.summarise_cross_validation,
             [f"cv_metrics_per_case_{name}", f"cv_test_metrics_{name}", f"fold_cards_{name}"], f"cv_summary_{name}",
             name=f"summarise_cross_validation_{name}")
        for name in others])
    archs = archs + others
    comparison = Pipeline([
        Node(nodes.compare_cross_validation,
             ["cv_metrics_per_case", "params:statistics", *(f"cv_summary_{a}" for a in archs)],
             ["cv_comparison", "cv_comparison_markdown"], name="compare_cross_validation"),
        Node(nodes.plot_cross_validation_froc, [f"cv_summary_{a}" for a in archs], "cv_froc_plot",
             name="plot_cross_validation_froc"),
        Node(nodes.compare_statistically,
             ["cv_metrics_per_case", "params:statistics"],
             ["cv_paired_comparison", "cv_paired_comparison_markdown", "cv_paired_comparison_plot"],
             name="compare_cross_validation_statistically"),
        Node(nodes.combine_out_of_fold, [f"cv_metrics_per_case_{a}" for a in archs], "cv_metrics_per_case",
             name="combine_out_of_fold"),
        Node(nodes.select_best_configuration,
             ["cv_comparison", "cv_metrics_per_case", "case_manifest", "params:cv"], "cv_selection",
             name="select_best_configuration"),
    ])
    return per_model + comparison
