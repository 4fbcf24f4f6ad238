"""Tuning wiring: one Optuna study per architecture, each in the architecture's namespace.

The ``tune`` node reads the architecture's own parameters (``params:<arch>.architecture``, as training
does) and the shared ``params:tuning``; its outputs are ``<arch>.tuning_best_trial``,
``<arch>.tuning_trials`` and ``<arch>.tuning_plot``. The ``importances`` node then reads the finished
study: ``<arch>.tuning_importances``, ``<arch>.tuning_importance_plot`` and
``<arch>.tuning_parallel_coordinate_plot`` (``conf/base/catalog_tuning.yml``). The
cascade is not tuned: its stage 2 is a registered architecture with its own settings.
"""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.tuning import nodes

SHARED_INPUTS = {"model_input_slices", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:tuning"}


def template() -> Pipeline:
    """Run one architecture's study and report it, then what mattered in it (parameter importances)."""
    return Pipeline([
        Node(nodes.tune_architecture,
             ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing",
              "params:training", "params:tuning", "params:architecture"],
             ["tuning_best_trial", "tuning_trials", "tuning_plot"], name="tune", tags=MODEL_TRAINING_TAG),
        Node(nodes.report_importances,
             ["tuning_best_trial", "params:training", "params:tuning", "params:architecture"],
             ["tuning_importances", "tuning_importance_plot", "tuning_parallel_coordinate_plot"],
             name="importances"),
    ])


def create_pipeline(models: Iterable[str] = ARCHITECTURE_NAMES) -> Pipeline:
    """Tuning of ``models`` (architecture names; the cascade is not tuned)."""
    models = list(models)
    unknown = [name for name in models if name not in ARCHITECTURE_NAMES]
    if unknown:
        raise ValueError(f"cannot tune {unknown}: tuning covers the architectures {list(ARCHITECTURE_NAMES)} "
                         "(the cascade is not tuned)")
    return sum((Pipeline(template(), namespace=name, inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS)
                for name in models), Pipeline([]))
