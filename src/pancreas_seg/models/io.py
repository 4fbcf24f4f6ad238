"""Saving and loading ``.keras`` model files: the one model-loading function of the project.

Every path that reads a model (the catalog's :class:`~pancreas_seg.datasets.KerasModelDataset`,
training resume, inference, benchmarks, tests) calls :func:`load_model`, which registers the
project's custom layers, losses and metrics before Keras deserialises anything. A fresh process
(``kedro run --pipelines=evaluation``, a notebook's ``catalog.load("model_unet")``) therefore loads
a model without having built or trained one first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pancreas_seg.core.atomic import atomic_path

if TYPE_CHECKING:  # Keras (and TensorFlow, ~9 s) is imported by load_model only, not on import:
    import keras  # the pipeline registry imports this module for every `kedro` command


def register_custom_objects() -> None:
    """Import every module that registers a Keras serialisable (idempotent, cheap after the first)."""
    import pancreas_seg.learning.losses  # noqa: F401, PLC0415
    import pancreas_seg.learning.metrics  # noqa: F401, PLC0415
    import pancreas_seg.models.registry  # noqa: F401, PLC0415 - imports every architecture's layers


def load_model(path: str | os.PathLike[str], compile: bool = True) -> keras.Model:  # noqa: A002
    """Load a ``.keras`` file with ``safe_mode=True`` (no arbitrary code), custom objects registered.

    Args:
        path: a local ``.keras`` file written by :func:`save_model` or ``model.save``.
        compile: also restore the optimizer, loss and metrics (needed to resume training).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    register_custom_objects()
    import keras  # noqa: PLC0415 - lazily, see the imports above

    return keras.saving.load_model(path, safe_mode=True, compile=compile)


def save_model(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` (weights, architecture, optimizer state) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def model_bytes(model: keras.Model) -> bytes:
    """The ``.keras`` file of ``model`` as bytes (for object stores and MLflow artifacts)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"{model.name}.keras"
        model.save(local)
        return local.read_bytes()


def load_model_bytes(payload: bytes, compile: bool = True) -> Any:  # noqa: A002
    """Inverse of :func:`model_bytes`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.keras"
        local.write_bytes(payload)
        return load_model(local, compile=compile)


def weights_sha256(model: keras.Model) -> str:
    """SHA-256 (hex) of every weight value in order: identifies a trained model's parameters."""
    import hashlib  # noqa: PLC0415

    import keras  # noqa: PLC0415 - lazily, see the imports above
    import numpy as np  # noqa: PLC0415

    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
