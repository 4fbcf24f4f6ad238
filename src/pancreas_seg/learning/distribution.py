"""Training on several devices with Keras 3's distribution API (JAX backend only; no Kedro imports).

The setting ``training.distribution`` (conf/base/parameters_training.yml) chooses where a model
trains:

* ``null``: one device, Keras' default placement.
* ``data_parallel``: ``keras.distribution.DataParallel`` over every device JAX sees (all local
  GPUs; in a multi-process run, the GPUs of every process).
* ``{type: data_parallel, devices: N}``: the first N of those devices.
* ``{type: data_parallel, devices: ["gpu:0", "gpu:2"]}``: these devices (ids as
  ``keras.distribution.list_devices()`` prints them).

What data parallelism computes here:

* The model variables (weights, optimizer and metric state) are replicated on every device of a
  one-axis ``DeviceMesh`` (axis ``batch``).
* Each training batch is the global batch of ``training.batch_size`` slices; Keras' JAX trainer
  places the loader's NumPy batch on the mesh split along the batch axis, so each of the D devices
  holds ``batch_size / D`` rows (:class:`TrainingDataParallel`; ``batch_size`` must divide by D).
  The train step is one XLA program over the mesh: sums over the batch (the batch soft Dice of the
  loss, the cross-entropy mean, the batch-normalisation statistics, the gradient) run over the
  global batch, so the result is the single-device one up to floating-point summation order.
* Validation batches are replicated instead: every device evaluates the whole batch. A sharded
  array must split evenly over the devices, and the last validation batch holds whatever is left
  of the validation slices; replication keeps validation complete and exact (every slice counted
  once, no padding) for any number of slices. It is not faster than one device.

Several processes (one per host, as under SLURM) join one run through
:func:`initialize_multi_process`, which passes Keras' own environment variables to
``keras.distribution.initialize``:

* ``KERAS_DISTRIBUTION_NUM_PROCESSES``: number of processes (more than 1 turns this on);
* ``KERAS_DISTRIBUTION_PROCESS_ID``: this process, 0 .. N-1 (0 is the coordinator);
* ``KERAS_DISTRIBUTION_JOB_ADDRESSES``: ``host:port`` of process 0 (JAX needs only the
  coordinator; a comma-separated list of every process's address is accepted too).

It must run before the first JAX computation of the process (the project's Kedro hook calls it when
the session starts). Every process then runs the same training; each feeds its own contiguous
share of every global training batch (:class:`ProcessBatches`). The checkpoint folder must be one
that every process sees (shared storage), so that all of them resume from the same epoch: each
writes the same checkpoint there (atomically), and process 0 alone moves a checkpoint of other
settings aside (:attr:`Placement.primary`) before any of them reads the folder.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

logger = logging.getLogger(__name__)

SETTING = "training.distribution"
DATA_PARALLEL = "data_parallel"
DISTRIBUTION_TYPES = (DATA_PARALLEL,)
BATCH_AXIS = "batch"

#: The environment variables ``keras.distribution.initialize`` reads (Keras 3.15).
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"
JOB_ADDRESSES_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"


@dataclass(frozen=True)
class DistributionConfig:
    """The parsed ``training.distribution`` setting (see the module docstring)."""

    type: str | None = None                       # None = one device | "data_parallel"
    devices: int | tuple[str, ...] | None = None  # None = all devices | first N | these ids

    @property
    def enabled(self) -> bool:
        return self.type is not None

    @classmethod
    def from_setting(cls, value: Any) -> DistributionConfig:
        """Parse ``null``, ``"data_parallel"`` or ``{type: data_parallel, devices: ...}``."""
        if isinstance(value, DistributionConfig):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            value = {"type": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"{SETTING} must be null, {DATA_PARALLEL!r} or a mapping with 'type' and "
                             f"'devices', got {value!r}")
        unknown = sorted(set(value) - {"type", "devices"})
        if unknown:
            raise ValueError(f"{SETTING}: unknown key(s) {unknown}; known: 'type', 'devices'")
        kind = value.get("type")
        if kind is None:
            if value.get("devices") is not None:
                raise ValueError(f"{SETTING}.devices is set but {SETTING}.type is null: "
                                 f"set {SETTING}.type={DATA_PARALLEL}")
            return cls()
        if kind not in DISTRIBUTION_TYPES:
            raise ValueError(f"{SETTING}.type must be null or one of {DISTRIBUTION_TYPES}, got {kind!r}")
        return cls(type=kind, devices=_parse_devices(value.get("devices")))


def _parse_devices(devices: Any) -> int | tuple[str, ...] | None:
    if devices is None:
        return None
    if isinstance(devices, bool):  # a bool is an int to Python; never a device count
        raise ValueError(f"{SETTING}.devices must be null, a device count or a list of device ids, got {devices!r}")
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"{SETTING}.devices must be at least 1, got {devices}")
        return devices
    if isinstance(devices, Sequence) and not isinstance(devices, str) and devices:
        ids = tuple(str(d) for d in devices)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{SETTING}.devices lists a device twice: {list(ids)}")
        return ids
    raise ValueError(f"{SETTING}.devices must be null, a device count or a non-empty list of device ids "
                     f"such as ['gpu:0', 'gpu:1'], got {devices!r}")


def require_jax(what: str) -> None:
    """Raise unless Keras runs on JAX: its distribution API is implemented for JAX only here."""
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"{what} needs the JAX backend: Keras 3's distribution API (keras.distribution) does not "
            f"support the {backend!r} backend this process runs on. Run with KERAS_BACKEND=jax "
            f"(e.g. `KERAS_BACKEND=jax kedro run ...`), or set {SETTING}=null for one device.")


def select_devices(config: DistributionConfig) -> list[str]:
    """The device ids ``config`` names, from ``keras.distribution.list_devices()``."""
    available = keras.distribution.list_devices()
    if config.devices is None:
        return list(available)
    if isinstance(config.devices, int):
        if config.devices > len(available):
            raise ValueError(f"{SETTING}.devices={config.devices} but only {len(available)} device(s) are "
                             f"available: {available}")
        return list(available[:config.devices])
    missing = [d for d in config.devices if d not in available]
    if missing:
        raise ValueError(f"{SETTING}.devices names unknown device(s) {missing}; available: {available}")
    return list(config.devices)


def check_batch_size(batch_size: int, n_devices: int) -> None:
    """The global batch must split evenly: each device takes ``batch_size / n_devices`` rows."""
    if int(batch_size) % int(n_devices):
        raise ValueError(
            f"training.batch_size={batch_size} does not divide by the {n_devices} devices of "
            f"{SETTING}: data parallelism splits each batch into equal shares, one per device. "
            f"Use a multiple of {n_devices} (e.g. {math.ceil(int(batch_size) / n_devices) * n_devices}) "
            f"or fewer devices ({SETTING}.devices).")


class TrainingDataParallel(keras.distribution.DataParallel):
    """``DataParallel`` that splits training batches over the devices and replicates evaluation ones.

    While :attr:`replicate_inputs` is true (set by :class:`ReplicatedEvaluation` during each
    validation pass) the data layout puts the whole batch on every device; otherwise the batch axis
    is split, as in ``DataParallel``.
    """

    replicate_inputs = False

    def get_data_layout(self, data_shape: Sequence[int]) -> keras.distribution.TensorLayout:
        if self.replicate_inputs:
            return keras.distribution.TensorLayout([None] * len(data_shape), self.device_mesh)
        return super().get_data_layout(data_shape)


class ReplicatedEvaluation(keras.callbacks.Callback):
    """Replicates the inputs of every evaluation pass (``fit``'s validation) on all devices.

    Keras' JAX trainer asks the distribution for the data layout at the first batch of each pass,
    after ``on_test_begin``; the last validation batch may not split evenly over the devices.
    """

    def __init__(self, distribution: TrainingDataParallel) -> None:
        super().__init__()
        self.distribution = distribution

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.distribution.replicate_inputs = True

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self.distribution.replicate_inputs = False


class ProcessBatches(keras.utils.PyDataset):
    """This process's rows of every batch of ``dataset`` (multi-process data parallelism).

    Keras' JAX trainer builds each global batch from the processes' local parts
    (``jax.make_array_from_process_local_data``): process ``p`` of ``P`` feeds rows
    ``[p * B/P, (p + 1) * B/P)`` of the global batch of ``B`` rows. Every process computes the same
    global batch (the loader's batches depend only on seed, epoch and index) and keeps its share.
    The epoch counter stays the wrapped loader's (``dataset.epoch``).
    """

    def __init__(self, dataset: keras.utils.PyDataset, num_processes: int, process_id: int) -> None:
        super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
        self.dataset, self.num_processes, self.process_id = dataset, int(num_processes), int(process_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        batch = self.dataset[index]
        rows = len(batch[0])
        if rows % self.num_processes:
            raise ValueError(f"batch {index} has {rows} rows, which do not split over {self.num_processes} "
                             "processes; training.batch_size must divide by the number of devices")
        share = rows // self.num_processes
        return tuple(part[self.process_id * share:(self.process_id + 1) * share] for part in batch)

    def on_epoch_begin(self) -> None:
        self.dataset.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.dataset.on_epoch_end()


class Placement:
    """Where ``fit_with_resume`` builds, restores and trains a model: one device (this class) or a
    data-parallel mesh (:class:`DataParallelPlacement`). Build, compile, checkpoint restore and
    ``fit`` run inside :meth:`scope`."""

    n_devices = 1
    primary = True  # this process tidies the checkpoint folder (in a multi-process run: process 0)

    def scope(self):
        return nullcontext()

    def synchronize(self, name: str) -> None:
        """Wait here until every process of the run arrives (one process: return at once)."""

    def check_same(self, value: int, what: str) -> None:
        """Raise unless every process of the run has the same ``value`` (one process: nothing)."""

    def training_data(self, dataset: keras.utils.PyDataset) -> keras.utils.PyDataset:
        """The training batches this process feeds to ``fit``."""
        return dataset

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return []


class DataParallelPlacement(Placement):
    """A :class:`TrainingDataParallel` distribution and what ``fit`` needs with it."""

    def __init__(self, distribution: TrainingDataParallel) -> None:
        import jax  # noqa: PLC0415 - the JAX backend is checked in placement()

        self.distribution = distribution
        self.devices = [str(d) for d in np.ravel(distribution.device_mesh.devices)]
        self.n_devices = len(self.devices)
        self.primary = jax.process_index() == 0

    def scope(self):
        return self.distribution.scope()

    def synchronize(self, name: str) -> None:
        if self.distribution.num_processes > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(name)

    def check_same(self, value: int, what: str) -> None:
        if self.distribution.num_processes > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            values = np.ravel(multihost_utils.process_allgather(np.asarray(value, dtype=np.int64))).tolist()
            if len(set(values)) > 1:
                raise RuntimeError(f"the processes of this run disagree on {what}: {values} (by process id)")

    def training_data(self, dataset: keras.utils.PyDataset) -> keras.utils.PyDataset:
        processes = self.distribution.num_processes
        if processes == 1:
            return dataset
        import jax  # noqa: PLC0415 - the JAX backend is checked in placement()

        return ProcessBatches(dataset, processes, jax.process_index())

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [ReplicatedEvaluation(self.distribution)]


def placement(setting: Any, batch_size: int) -> Placement:
    """The placement of ``training.distribution`` for a global batch of ``batch_size`` rows.

    Raises RuntimeError on a backend other than JAX (or when several processes run without a
    distribution), ValueError for a batch size that does not divide by the device count or
    devices that do not exist.
    """
    config = DistributionConfig.from_setting(setting)
    if not config.enabled:
        processes = multi_process_settings()
        if processes is not None:
            raise RuntimeError(
                f"{processes.num_processes} processes joined this run ({NUM_PROCESSES_ENV}) but {SETTING} is "
                f"null: every process would train its own copy. Set {SETTING}={DATA_PARALLEL}.")
        return Placement()
    require_jax(f"{SETTING}={config.type}")
    devices = select_devices(config)
    check_batch_size(batch_size, len(devices))
    mesh = keras.distribution.DeviceMesh(shape=(len(devices),), axis_names=[BATCH_AXIS], devices=devices)
    # auto_shard_dataset=False: Keras auto-shards only tf.data datasets; ProcessBatches shards ours.
    distribution = TrainingDataParallel(device_mesh=mesh, auto_shard_dataset=False)
    logger.info("Data parallel over %d device(s) %s in %d process(es): %d of the %d slices of each batch "
                "per device", len(devices), devices, distribution.num_processes, batch_size // len(devices),
                batch_size)
    return DataParallelPlacement(distribution)


@dataclass(frozen=True)
class MultiProcessSettings:
    """What ``keras.distribution.initialize`` needs to join several processes into one run."""

    num_processes: int
    process_id: int
    job_addresses: str


def multi_process_settings(environ: Mapping[str, str] | None = None) -> MultiProcessSettings | None:
    """The multi-process settings in ``environ`` (default ``os.environ``); None for one process.

    Raises ValueError when ``KERAS_DISTRIBUTION_NUM_PROCESSES`` asks for several processes and
    the process id or the coordinator address is missing or malformed.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(NUM_PROCESSES_ENV, "").strip()
    if not raw:
        return None
    try:
        num_processes = int(raw)
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES_ENV}={raw!r} is not an integer") from None
    if num_processes < 1:
        raise ValueError(f"{NUM_PROCESSES_ENV}={num_processes} must be at least 1")
    if num_processes == 1:
        return None
    missing = [name for name in (PROCESS_ID_ENV, JOB_ADDRESSES_ENV) if not environ.get(name, "").strip()]
    if missing:
        raise ValueError(f"{NUM_PROCESSES_ENV}={num_processes} but {' and '.join(missing)} not set: every process "
                         f"needs its id (0..{num_processes - 1}) and the coordinator's host:port")
    raw_id = environ[PROCESS_ID_ENV].strip()
    try:
        process_id = int(raw_id)
    except ValueError:
        raise ValueError(f"{PROCESS_ID_ENV}={raw_id!r} is not an integer") from None
    if not 0 <= process_id < num_processes:
        raise ValueError(f"{PROCESS_ID_ENV}={process_id} not in 0..{num_processes - 1}")
    addresses = environ[JOB_ADDRESSES_ENV].strip()
    if any(":" not in a for a in addresses.split(",")):
        raise ValueError(f"{JOB_ADDRESSES_ENV}={addresses!r}: expected host:port (of process 0), or a "
                         "comma-separated host:port list of every process")
    return MultiProcessSettings(num_processes, process_id, addresses)


_initialized: MultiProcessSettings | None = None


def initialize_multi_process(environ: Mapping[str, str] | None = None) -> MultiProcessSettings | None:
    """Join the multi-process run described by ``environ`` (see :func:`multi_process_settings`).

    Calls ``keras.distribution.initialize`` once per process (later calls return the same
    settings), which must happen before the process's first JAX computation. Returns None (and
    does nothing) for a single process.
    """
    global _initialized  # noqa: PLW0603 - one initialisation per process, as in JAX
    settings = multi_process_settings(environ)
    if settings is None or _initialized is not None:
        return _initialized if settings is not None else None
    require_jax(f"{NUM_PROCESSES_ENV}={settings.num_processes}")
    keras.distribution.initialize(settings.job_addresses, settings.num_processes, settings.process_id)
    _initialized = settings
    logger.info("Process %d of %d joined the run coordinated by %s", settings.process_id, settings.num_processes,
                settings.job_addresses.split(",")[0])
    return settings
