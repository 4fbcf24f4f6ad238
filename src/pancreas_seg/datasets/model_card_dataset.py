"""``ModelCardDataset``: a :class:`~pancreas_seg.inference.model_card.ModelCard` as a JSON file.

Nodes pass typed cards; this dataset is where they become JSON and back (atomic local writes,
versionable like the model saved beside it). A card that cannot be read names its file.
"""

from __future__ import annotations

from typing import Any

from pancreas_seg.datasets._fsspec_file import FsspecFileDataset
from pancreas_seg.inference.model_card import ModelCard


class ModelCardDataset(FsspecFileDataset):
    """Save/load a model card as indented JSON (``model_card.json``)."""

    def load(self) -> ModelCard:
        path = self._load_path()
        version = self.resolve_load_version() if self._version else None
        return ModelCard.from_json(self._read_bytes(), source=path, version=version)

    def save(self, card: ModelCard) -> None:
        if not isinstance(card, ModelCard):
            raise TypeError(f"{self._filepath}: expected a ModelCard, got {type(card).__name__}")
        self._write_bytes((card.to_json() + "\n").encode())

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "format": "model card json"}
