"""SYNTHETIC abdominal CT phantoms in the MSD Task07_Pancreas layout: a simulator, not imaging I/O.

It draws procedural anatomy (no patient data) so the pipeline can be built, tested and benchmarked
without the real data set. It uses :mod:`pancreas_seg.imaging` to write NIfTI files and
:mod:`pancreas_seg.core.labels` for the label values; nothing here imports Kedro, Keras or MLflow.
"""

from pancreas_seg.phantoms.generator import (
    DATASET_NAME,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    PhantomCase,
    PhantomConfig,
    case_seed,
    dataset_case,
    dataset_fingerprint,
    make_phantom,
    non_ras_indices,
    tumour_indices,
    write_synthetic_task07,
)

__all__ = [
    "DATASET_NAME",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "PhantomCase",
    "PhantomConfig",
    "case_seed",
    "dataset_case",
    "dataset_fingerprint",
    "make_phantom",
    "non_ras_indices",
    "tumour_indices",
    "write_synthetic_task07",
]
