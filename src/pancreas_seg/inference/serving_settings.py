"""The served model's limits and back-pressure settings (``inference.serving`` in ``conf/``).

Where they come from, last one wins:

1. the defaults of :class:`ServingSettings` (the same values as ``conf/base/parameters_inference.yml``;
   used for models logged without the block);
2. the ``inference.serving`` parameters of the run that logged the model, recorded in its bundle
   (``bundle.json``, ``serving_settings``) by :func:`pancreas_seg.inference.serving.log_segmentation_model`;
3. at serve time, without relogging, environment variables ``PANCREAS_SEG_SERVING_<KEY>`` (the key
   in capitals, e.g. ``PANCREAS_SEG_SERVING_MAX_IN_FLIGHT=2``; ``PATH_ROOTS`` is a list separated by
   ``os.pathsep``, ``:`` on Linux; an empty value clears it).

A value that does not parse, or a limit that is not positive, stops the model from loading (the
server does not start) with a message naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pancreas_seg.imaging.nifti_upload import VolumeLimits

if TYPE_CHECKING:
    from pancreas_seg.imaging.dicom_io import ArchiveLimits

ENV_PREFIX = "PANCREAS_SEG_SERVING_"
MIB = 2**20


@dataclass(frozen=True)
class ServingSettings:
    """What the served model accepts and how many requests it works on at once.

    Attributes:
        max_request_mib: largest HTTP request body, and largest total of a request's base64 input
            text, MiB. A request past it is answered 413 (before its body is read when the server
            guard is installed, see :mod:`pancreas_seg.inference.scoring_server_guard`).
        max_rows: scans (DataFrame rows) per request.
        max_voxels: voxels per scan (from its header, before the voxel data is inflated).
        max_dim: voxels along any one axis of a scan.
        min_spacing_mm: smallest accepted voxel size along any axis, mm.
        max_spacing_mm: largest accepted voxel size along any axis, mm.
        max_in_flight: requests segmented at the same time.
        max_queue: requests waiting for one of the ``max_in_flight`` slots; one more is answered
            503 with ``Retry-After``.
        queue_timeout_s: longest wait for a slot, s; then 503 with ``Retry-After``. Also the
            longest wait in the waiting room.
        max_waiting: requests held in a first-come-first-served waiting room, their bodies unread,
            while ``max_in_flight + max_queue`` are admitted (so a client that retries at once
            cannot overtake one that waits); one more is answered 503 with ``Retry-After``. Only
            with the scoring-server guard (``mlflow models serve``).
        request_timeout_s: a request's time budget from admission, s, checked before each stage
            (waiting, reading, segmenting each scan); past it the answer is 504. A scan whose
            segmentation has started runs to its end: MLflow's own timeout
            (``mlflow models serve -t``, ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, default 60 s)
            is the hard limit the client sees.
        retry_after_s: the ``Retry-After`` value of a 503, s.
        path_roots: folders under which the served model reads the ``path`` input (after resolving
            symlinks and ``..``). Empty (the default): the ``path`` input is refused in the served
            model; an in-process caller can still allow it (``SegmentationModel(local_paths=True)``).
        dicom_max_members: entries (files and folders) in a ``dicom_zip_base64`` archive, checked
            from its central directory before anything is extracted; 413 past it.
        dicom_max_uncompressed_mib: total uncompressed size of a ``dicom_zip_base64`` archive's
            members, MiB, checked from its central directory and again while extracting; 413 past it.
    """

    max_request_mib: float = 768.0
    max_rows: int = 4
    max_voxels: int = 512 * 512 * 1024
    max_dim: int = 2048
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 10.0
    max_in_flight: int = 1
    max_queue: int = 2
    queue_timeout_s: float = 30.0
    max_waiting: int = 32
    request_timeout_s: float = 60.0
    retry_after_s: int = 10
    path_roots: tuple[str, ...] = ()
    dicom_max_members: int = 4096
    dicom_max_uncompressed_mib: float = 1024.0

    def __post_init__(self) -> None:
        for name in ("max_request_mib", "max_rows", "max_voxels", "max_dim", "max_in_flight",
                     "queue_timeout_s", "request_timeout_s", "retry_after_s", "dicom_max_members",
                     "dicom_max_uncompressed_mib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"serving.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_queue", "max_waiting"):
            if getattr(self, name) < 0:
                raise ValueError(f"serving.{name} must be 0 or more, got {getattr(self, name)!r}")
        self.volume_limits  # noqa: B018 - checks the spacing range

    @property
    def max_request_bytes(self) -> int:
        """:attr:`max_request_mib` in bytes."""
        return int(self.max_request_mib * MIB)

    @property
    def volume_limits(self) -> VolumeLimits:
        """The per-scan limits (a scan's decoded file is at most 3/4 of the request's base64 text)."""
        return VolumeLimits(max_file_bytes=self.max_request_bytes * 3 // 4, max_voxels=self.max_voxels,
                            max_dim=self.max_dim, min_spacing_mm=self.min_spacing_mm,
                            max_spacing_mm=self.max_spacing_mm)

    @property
    def archive_limits(self) -> ArchiveLimits:
        """The limits of a ``dicom_zip_base64`` archive (:func:`pancreas_seg.imaging.dicom_io.check_archive`)."""
        from pancreas_seg.imaging.dicom_io import ArchiveLimits  # noqa: PLC0415 - pydicom only for DICOM input

        return ArchiveLimits(max_uncompressed_bytes=int(self.dicom_max_uncompressed_mib * MIB),
                             max_members=self.dicom_max_members)

    @property
    def resolved_roots(self) -> tuple[Path, ...]:
        """:attr:`path_roots` with symlinks and ``..`` resolved."""
        return tuple(Path(root).expanduser().resolve() for root in self.path_roots)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> ServingSettings:
        """From an ``inference.serving`` block (missing keys keep their defaults; unknown keys are refused)."""
        params = dict(params or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"serving settings: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{name: _convert(name, value) for name, value in params.items()})

    def with_environment(self, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """These settings with ``PANCREAS_SEG_SERVING_<KEY>`` environment variables applied."""
        environ = os.environ if environ is None else environ
        changes = {f.name: _convert(f.name, environ[ENV_PREFIX + f.name.upper()], from_env=True)
                   for f in fields(self) if ENV_PREFIX + f.name.upper() in environ}
        return replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what the bundle records)."""
        values = asdict(self)
        values["path_roots"] = list(self.path_roots)
        return values


_TYPES = {f.name: f.type for f in fields(ServingSettings)}


def _convert(name: str, value: Any, from_env: bool = False) -> Any:
    where = f"{ENV_PREFIX}{name.upper()}" if from_env else f"serving.{name}"
    kind = _TYPES[name]
    try:
        if name == "path_roots":
            if isinstance(value, str):
                return tuple(p for p in value.split(os.pathsep) if p) if from_env else (value,)
            return tuple(str(p) for p in value or ())
        if kind == "int":
            number = float(value)
            if number != int(number):
                raise ValueError("not a whole number")
            return int(number)
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}={value!r}: not a valid {kind} ({exc})") from None
