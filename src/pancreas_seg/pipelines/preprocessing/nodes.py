"""Preprocessing nodes: thin wrappers around :mod:`pancreas_seg.imaging`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.intensity import (
    ForegroundIntensityStats,
    fit_foreground_stats,
    sample_foreground_hu,
)
from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    intensity_stats_from_dict,
    plan_case_geometry,
    preprocess_case,
)
from pancreas_seg.runners.parallel import LazyCaseParts, map_over_cases

logger = logging.getLogger(__name__)


def labelled_cases(case_manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows with a label (train, validation and test splits), sorted by case id."""
    return case_manifest[case_manifest["split"].isin(["train", "validation", "test"])].sort_values("case_id")


def fit_intensity_stats(case_manifest: pd.DataFrame, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """Window mode: record the window. zscore mode: fit foreground stats on the TRAIN split only."""
    intensity = preprocessing["intensity"]
    stats: dict[str, Any] = {"mode": intensity["mode"], "window_hu": list(intensity["window_hu"]),
                             "foreground": None}
    if intensity["mode"] != "zscore":
        return stats
    train = case_manifest[case_manifest["split"] == "train"]
    rng = np.random.default_rng(int(intensity.get("seed", 0)))
    samples = []
    for index, row in enumerate(train.itertuples(), start=1):
        logger.info("Sampling foreground HU %d/%d: %s", index, len(train), row.case_id)
        ct = load_nifti(row.image_path)
        label = load_nifti(row.label_path)
        samples.append(sample_foreground_hu(ct.array, label.array > 0,
                                            int(intensity["samples_per_case"]), rng))
    fitted = fit_foreground_stats(samples, tuple(intensity["foreground_percentiles"]))
    logger.info("Training-foreground HU stats: %s", fitted)
    stats["foreground"] = fitted.to_dict()
    return stats


def preprocess_case_parts(image_path: str, label_path: str, config: PreprocessingConfig,
                          stats: ForegroundIntensityStats | None, geometry: ScanGeometry) -> dict[str, np.ndarray]:
    """``{"image": (Z, H, W) float32|float16, "label": (Z, H, W) uint8}`` of one case."""
    case = preprocess_case(image_path, label_path, config, stats, geometry)
    return {"image": case.image, "label": case.label}


def preprocess_cases(case_manifest: pd.DataFrame, intensity_stats: dict[str, Any],
                     preprocessing: dict[str, Any]) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Any]]:
    """Plan every labelled case's geometry once, now; preprocess its arrays lazily, one case at a time.

    The shards of a case are made with exactly the :class:`ScanGeometry` recorded for it. Under
    :class:`pancreas_seg.runners.DaskRunner` the planning is mapped over the cluster's workers and
    each case's partitions are saved by a task of their own (``<case_id>/`` is the group), the
    largest scans (voxels) first.

    Returns:
        ``{"<case_id>/image": fn, "<case_id>/label": fn}`` for the PartitionedDataset (each fn
        preprocesses when Kedro saves that partition, so memory is bounded by one case), and
        ``{case_id: ScanGeometry.to_dict()}`` (``slice_geometry.json``).
    """
    config = PreprocessingConfig.from_params(preprocessing)
    stats = intensity_stats_from_dict(intensity_stats)
    cases = labelled_cases(case_manifest)
    voxels = list(cases["shape_x"] * cases["shape_y"] * cases["shape_z"])   # a case's cost: its voxels
    plans = map_over_cases(functools.partial(plan_case_geometry, config=config), list(cases["image_path"]),
                           what="Planning geometry", names=list(cases["case_id"]), costs=voxels)
    geometries = dict(zip(cases["case_id"], plans, strict=True))

    partitions: dict[str, Callable[[], np.ndarray]] = {}
    for position, (row, cost) in enumerate(zip(cases.itertuples(), voxels, strict=True), start=1):
        case = LazyCaseParts(preprocess_case_parts,
                             (row.image_path, row.label_path, config, stats, geometries[row.case_id]),
                             ("image", "label"), f"Preprocessing case {position}/{len(cases)}: {row.case_id}",
                             cost=cost)
        partitions.update(case.partitions(row.case_id))
    return partitions, {case_id: geometry.to_dict() for case_id, geometry in geometries.items()}
