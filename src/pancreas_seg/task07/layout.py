"""Reading an MSD Task07 folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    """One case's files. ``label`` is None for unlabelled (imagesTs) cases."""

    case_id: str
    image: Path
    label: Path | None
    subset: str  # "training" (imagesTr + labelsTr) or "test" (imagesTs, no label)

    def stored_bytes(self) -> int:
        """Bytes of the case's files on disk (image + label): a cheap measure of the work of reading it."""
        return sum(path.stat().st_size for path in (self.image, self.label) if path is not None)


def case_id_from_path(path: str | Path) -> str:
    """``.../pancreas_001.nii.gz`` -> ``pancreas_001``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_hidden_resource_file(path: str | Path) -> bool:
    """macOS AppleDouble files (``._name``) and dotfiles, which the MSD tar is known to carry."""
    return Path(path).name.startswith(".")


def list_nifti_files(folder: Path) -> list[Path]:
    """NIfTI files in ``folder`` (sorted), skipping ``._*`` resource files and other dotfiles."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not is_hidden_resource_file(p) and p.name.endswith(NIFTI_SUFFIXES))


def read_dataset_json(root: Path) -> dict[str, Any]:
    """Parse ``root/dataset.json``; raise ValueError naming the file if it is missing or malformed."""
    path = root / "dataset.json"
    if not path.is_file():
        raise ValueError(f"{path}: dataset.json is missing; is {root} an MSD Task07 folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("training", "test"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: key '{key}' must be a list")
    return data


def resolve_entry(root: Path, entry: str) -> Path:
    """Resolve a dataset.json path like ``./imagesTr/pancreas_001.nii.gz`` against ``root``."""
    return (root / entry).resolve() if not Path(entry).is_absolute() else Path(entry)


def is_synthetic(dataset_json: dict[str, Any]) -> bool:
    """True when the folder was written by this project's phantom generator."""
    return "synthetic" in dataset_json
