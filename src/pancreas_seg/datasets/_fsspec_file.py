"""Shared base for single-file datasets: fsspec paths, versioning, atomic local writes."""

from __future__ import annotations

from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import AbstractVersionedDataset, Version, get_filepath_str, get_protocol_and_path

from pancreas_seg.core.atomic import atomic_write_bytes


class FsspecFileDataset(AbstractVersionedDataset[Any, Any]):
    """A versionable dataset stored as one file on any fsspec filesystem.

    Subclasses implement :meth:`_decode` / :meth:`_encode`, or override load/save for formats
    that need a local path. Local writes go to a temporary file and are renamed into place.
    """

    DEFAULT_LOAD_ARGS: dict[str, Any] = {}

    def __init__(self, *, filepath: str, load_args: dict[str, Any] | None = None,
                 version: Version | None = None, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        fs_args = deepcopy(fs_args) or {}
        if protocol == "file":
            fs_args.setdefault("auto_mkdir", True)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(deepcopy(credentials) or {}), **fs_args)
        self._load_args = {**self.DEFAULT_LOAD_ARGS, **(load_args or {})}
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version,
                         exists_function=self._fs.exists, glob_function=self._fs.glob)

    @property
    def _is_local(self) -> bool:
        return self._protocol == "file"

    def _load_path(self) -> str:
        return get_filepath_str(self._get_load_path(), self._protocol)

    def _save_path(self) -> str:
        return get_filepath_str(self._get_save_path(), self._protocol)

    def _write_bytes(self, payload: bytes) -> None:
        path = self._save_path()
        if self._is_local:
            atomic_write_bytes(path, payload)
        else:  # object stores publish a whole object at once
            with self._fs.open(path, "wb") as handle:
                handle.write(payload)
        self._invalidate_cache()

    def _read_bytes(self) -> bytes:
        with self._fs.open(self._load_path(), "rb") as handle:
            return handle.read()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol,
                "load_args": self._load_args, "version": self._version}

    def _exists(self) -> bool:
        try:
            return self._fs.exists(self._load_path())
        except Exception:  # noqa: BLE001 - kedro raises DatasetError when no version exists
            return False

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
