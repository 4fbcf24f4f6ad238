"""Hyperparameter search per architecture (Optuna): ``kedro run --pipelines=tune`` / ``tune_<architecture>``."""

from pancreas_seg.pipelines.tuning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
