"""Ingestion nodes: thin wrappers around :mod:`pancreas_seg.task07` and the phantom generator."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pandas as pd

from pancreas_seg.phantoms import PhantomConfig, write_synthetic_task07
from pancreas_seg.runners.parallel import map_over_cases
from pancreas_seg.task07.archive import extract_task07_archive
from pancreas_seg.task07.layout import is_synthetic, read_dataset_json
from pancreas_seg.task07.splits import (
    STRATIFIED_BY,
    composition_lines,
    has_tumour,
    make_split,
    reconcile_split,
    split_assignment,
    split_composition,
)
from pancreas_seg.task07.validation import (
    ON_INVALID,
    CaseRecord,
    InvalidDatasetError,
    enforce_policy,
    validate_task07,
)

logger = logging.getLogger(__name__)
SOURCES = ("synthetic", "msd")


def _log_progress(action: str):
    def progress(index: int, total: int, case_id: str) -> None:
        logger.info("%s case %d/%d: %s", action, index, total, case_id)
    return progress


def stage_raw_dataset(ingestion: dict[str, Any]) -> str:
    """Return the Task07 folder to read: phantoms are generated, a ``.tar`` is extracted safely.

    Raw data is only read: an MSD folder is used in place and never modified.
    """
    source = ingestion.get("source", "synthetic")
    if source not in SOURCES:
        raise ValueError(f"ingestion.source must be one of {SOURCES}, got {source!r}")
    if source == "synthetic":
        synthetic = ingestion["synthetic"]
        logger.warning("Using SYNTHETIC phantom data (not patients): %s", synthetic["path"])
        root = write_synthetic_task07(
            synthetic["path"], n_train=int(synthetic["n_train"]), n_test=int(synthetic["n_test"]),
            config=PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in synthetic["phantom"].items()}),
            seed=int(synthetic["seed"]), progress=_log_progress("Generating phantom"))
        return str(Path(root).resolve())
    msd_path = ingestion.get("msd_path")
    if not msd_path:
        raise ValueError("ingestion.source is 'msd' but ingestion.msd_path is not set: give the "
                         "Task07_Pancreas folder or the Task07_Pancreas.tar archive")
    path = Path(msd_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ingestion.msd_path: {path} does not exist")
    if path.is_file():
        return str(extract_task07_archive(path, ingestion["extract_dir"]).resolve())
    return str(path.resolve())


def validate_raw_dataset(raw_root: str, ingestion: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    """Validate every case before any processing; return the report and the valid cases."""
    on_invalid = ingestion.get("on_invalid", "fail")
    if on_invalid not in ON_INVALID:
        raise ValueError(f"ingestion.on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    root = Path(raw_root)
    synthetic = is_synthetic(read_dataset_json(root))
    result = validate_task07(root, float(ingestion.get("affine_tolerance_mm", 1e-3)),
                             map_cases=functools.partial(map_over_cases, what="Validating"))
    for finding in result.findings:
        logger.error("Invalid input %s (check: %s)", finding, finding.check)
    cases = pd.DataFrame([asdict(c) for c in result.cases],
                         columns=[f.name for f in fields(CaseRecord)])
    cases["source"] = "synthetic" if synthetic else "msd"
    logger.info("%d valid case(s) in %s%s", len(cases), root, " (SYNTHETIC phantoms)" if synthetic else "")
    return result.report(root, on_invalid, synthetic), cases


def apply_invalid_policy(validation_report: dict[str, Any], validated_cases: pd.DataFrame) -> pd.DataFrame:
    """``fail``: raise listing every bad case (the report is already saved); ``skip``: keep valid cases."""
    enforce_policy(validation_report)
    if validated_cases.empty:
        raise InvalidDatasetError(
            f"No valid case left in {validation_report['dataset_root']} "
            f"({validation_report['n_bad_cases']} invalid); see data/08_reporting/validation_report.json")
    if validation_report["bad_cases"]:
        logger.warning("Skipping %d invalid case(s): %s", validation_report["n_bad_cases"],
                       ", ".join(validation_report["bad_cases"]))
    return validated_cases


def dataset_name(raw_root: str) -> str:
    """The dataset's name: its raw folder (``Task07_Pancreas``, ``Task07_Pancreas_synthetic`` ...)."""
    return Path(raw_root).name


def _labelled(valid_cases: pd.DataFrame) -> pd.DataFrame:
    return valid_cases[valid_cases["subset"] == "training"]


def plan_split(valid_cases: pd.DataFrame, raw_root: str, persisted_splits: Mapping[str, Callable[[], Any]],
               split: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The dataset's patient-level split: made on the first run, reused (and kept) afterwards.

    Returns ``{dataset: split record}`` for the ``case_splits`` folder. Cases that are no longer
    valid are removed from a persisted split; nothing else moves. ``split.recompute: true`` makes a
    new split from the seed and fractions, stratified by tumour presence. The record's
    ``composition`` counts the patients and tumour patients of each split and fold (also logged).
    """
    name = dataset_name(raw_root)
    labelled = _labelled(valid_cases)
    patient_of = (dict(zip(labelled["case_id"].astype(str), labelled["patient_id"].astype(str), strict=True))
                  if "patient_id" in labelled else None)
    tumour_of = dict(zip(labelled["case_id"].astype(str), has_tumour(labelled), strict=True))
    if name in persisted_splits and not split.get("recompute", False):
        persisted = persisted_splits[name]()
        record, dropped = reconcile_split(persisted, labelled["case_id"], split, name, patient_of, tumour_of)
        if record["settings"].get("n_folds") != persisted["settings"].get("n_folds"):
            logger.warning("split.n_folds changed (%s -> %s): cross-validation folds re-dealt over the same "
                           "train and validation patients; no case moved between train, validation and test",
                           persisted["settings"].get("n_folds", 0), record["settings"]["n_folds"])
        if dropped:
            logger.warning("Removed %d case(s) that are no longer valid from the persisted split of %s: %s",
                           len(dropped), name, ", ".join(dropped))
        logger.info("Reusing the persisted split of %s (made %s, seed %s)", name, record["created_at"],
                    record["settings"]["seed"])
        if record.get("stratified_by") != STRATIFIED_BY:
            logger.warning("The persisted split of %s predates stratification by tumour presence and is kept "
                           "as it is; split.recompute=true makes a stratified one (models trained on the old "
                           "split are then refused by evaluation)", name)
    else:
        if name in persisted_splits:
            logger.warning("split.recompute is set: replacing the persisted split of %s", name)
        record = make_split(labelled, split, name)
        logger.info("New patient-level split of %s (seed %s), stratified by tumour presence", name, split["seed"])
    record["composition"] = split_composition(record, tumour_of, patient_of)
    for line in composition_lines(record["composition"]):
        logger.info("Split of %s: %s", name, line)
    return {name: record}


def build_case_manifest(valid_cases: pd.DataFrame, case_splits: Mapping[str, Any], raw_root: str) -> pd.DataFrame:
    """The labelled cases with their ``split`` and ``fold`` from the persisted split, plus the
    unlabelled ``imagesTs`` cases (split ``unlabelled``), and the ``dataset`` they belong to."""
    name = dataset_name(raw_root)
    record = case_splits[name]
    record = record() if callable(record) else record
    manifest = valid_cases.copy()
    labelled = manifest["subset"] == "training"
    if "patient_id" not in manifest:
        manifest["patient_id"] = manifest["case_id"]
    assigned = split_assignment(record, manifest.loc[labelled, "case_id"])
    manifest["split"] = "unlabelled"
    manifest["fold"] = -1
    manifest.loc[labelled, "split"] = assigned["split"].to_numpy()
    manifest.loc[labelled, "fold"] = assigned["fold"].to_numpy()
    manifest["dataset"] = name
    logger.info("Split of %s: %s", name, manifest["split"].value_counts().to_dict())
    return manifest.sort_values("case_id").reset_index(drop=True)
