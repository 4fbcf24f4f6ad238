"""Which Keras backend this process runs on: the ``runtime.keras_backend`` setting.

Keras reads its backend once, when it is first imported (``KERAS_BACKEND``, else
``~/.keras/keras.json``, else TensorFlow). :func:`apply_backend` therefore has to run before
anything imports Keras: the project hook does it when a Kedro context is created
(:class:`pancreas_seg.hooks.KerasBackendHook`), the served pyfunc model in its ``load_context``.
Cheap to import and Kedro-free: nothing here imports Keras, JAX or TensorFlow at import time, and
:func:`choose_backend` imports JAX only when a JAX GPU plugin is installed.

The setting:

* ``auto`` (the default): an explicit, non-empty ``KERAS_BACKEND`` in the environment wins (a user
  who typed ``KERAS_BACKEND=jax kedro run`` gets JAX). Otherwise JAX when a JAX GPU backend is
  present (a CUDA/ROCm plugin is installed AND ``jax.devices()`` lists a non-CPU device), else
  TensorFlow when it is installed (the fastest on a CPU), else JAX. ``~/.keras/keras.json`` is not
  consulted: Keras writes ``"backend": "tensorflow"`` there on its first import, so it says nothing
  about what the user wants.
* ``jax`` / ``tensorflow``: that backend. It wins over ``KERAS_BACKEND`` in the environment, and
  says so in the log when the two differ.

The choice is written to ``os.environ["KERAS_BACKEND"]``, so every child process (tuning workers,
Dask workers of a LocalCluster, scripts) inherits it. A backend that is not installed is an error
naming the extra that installs it (:data:`INSTALL_HINTS`). When Keras is already imported, an
explicit setting that differs from its backend is an error (Keras cannot switch); ``auto`` keeps
the backend Keras already runs on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Collection, MutableMapping

logger = logging.getLogger(__name__)

#: The setting's key in the parameters (``conf/base/parameters_runtime.yml``).
SETTING = "runtime.keras_backend"
AUTO = "auto"
JAX = "jax"
TENSORFLOW = "tensorflow"
SETTINGS = (AUTO, JAX, TENSORFLOW)
ENV_VAR = "KERAS_BACKEND"

#: The module that must be importable for each backend Keras knows.
BACKEND_MODULES = {JAX: ("jax", "jaxlib"), TENSORFLOW: ("tensorflow",), "torch": ("torch",),
                   "numpy": ("numpy",), "openvino": ("openvino",)}
#: What to type to install a backend that is missing.
INSTALL_HINTS = {
    JAX: 'pip install -e ".[gpu]" (JAX with CUDA 12, for an NVIDIA GPU; `make install-gpu`), '
         'or pip install "jax[cpu]" for JAX on the CPU',
    TENSORFLOW: 'pip install -e ".[tf]" (TensorFlow on the CPU; `make install` does it)',
}
#: Modules of JAX's accelerator plugins: their presence is what makes probing JAX's devices worth it.
JAX_GPU_PLUGIN_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                          "jax_plugins")

#: ``KERAS_DISTRIBUTION_NUM_PROCESSES`` > 1: a multi-process run, which is JAX-only here and must
#: call ``jax.distributed.initialize`` before JAX touches a device (so ``auto`` does not probe).
MULTI_PROCESS_ENV_VAR = "KERAS_DISTRIBUTION_NUM_PROCESSES"


class BackendError(RuntimeError):
    """The requested Keras backend cannot be used in this process."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a broken or half-removed package
        return False


def installed_backends() -> list[str]:
    """The backends among ``jax`` and ``tensorflow`` whose packages are installed (find_spec only:
    nothing is imported)."""
    return [name for name in (JAX, TENSORFLOW) if all(_importable(m) for m in BACKEND_MODULES[name])]


def jax_gpu_plugins() -> list[str]:
    """The JAX accelerator-plugin modules installed (``jax_cuda12_plugin``, ``jax_plugins``...)."""
    return [name for name in JAX_GPU_PLUGIN_MODULES if _importable(name)]


def jax_has_accelerator() -> bool:
    """True when JAX has a non-CPU device. Imports JAX only when a GPU plugin is installed (a plain
    ``jax[cpu]`` install answers False at once); initialises JAX's backends when it does."""
    if not jax_gpu_plugins() or JAX not in installed_backends():
        return False
    try:
        import jax  # noqa: PLC0415

        return any(device.platform != "cpu" for device in jax.devices())
    except Exception as exc:  # noqa: BLE001 - a plugin without a usable driver: JAX is CPU-only here
        logger.info("JAX has a GPU plugin but no usable accelerator (%s: %s)", type(exc).__name__, exc)
        return False


def _missing(backend: str, setting: str, source: str, available: Collection[str]) -> BackendError:
    hint = INSTALL_HINTS.get(backend, f"install the {backend!r} package")
    return BackendError(f"Keras backend {backend!r} ({source}) is not installed in this environment: {hint}. "
                        f"Installed backends: {', '.join(available) or 'none'}; {SETTING} is {setting!r}.")


def normalise_setting(setting: object) -> str:
    """``setting`` as one of :data:`SETTINGS` (None -> ``auto``); anything else is a ValueError."""
    value = AUTO if setting is None else str(setting).strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"{SETTING} must be one of {list(SETTINGS)}, got {setting!r}")
    return value


def choose_backend(setting: object, environ: MutableMapping[str, str] | None = None, *,
                   installed: Collection[str] | None = None,
                   jax_accelerator: bool | Callable[[], bool] | None = None) -> str:
    """The Keras backend for ``setting`` (see the module docstring); nothing is changed.

    ``installed`` (default :func:`installed_backends`) and ``jax_accelerator`` (default
    :func:`jax_has_accelerator`, asked only when needed) describe the machine.
    Raises :class:`BackendError` when the chosen backend is not installed.
    """
    setting = normalise_setting(setting)
    environ = os.environ if environ is None else environ
    available = installed_backends() if installed is None else list(installed)

    def check(backend: str, source: str) -> str:
        if backend in (JAX, TENSORFLOW):
            present = backend in available
        else:   # torch, numpy, openvino: Keras knows them, the project does not test them
            present = all(_importable(m) for m in BACKEND_MODULES.get(backend, (backend,)))
        if not present:
            raise _missing(backend, setting, source, available)
        return backend

    if setting != AUTO:
        return check(setting, SETTING)
    explicit = environ.get(ENV_VAR, "").strip().lower()
    if explicit:
        return check(explicit, f"{ENV_VAR} in the environment")
    if JAX in available and environ.get(MULTI_PROCESS_ENV_VAR, "").strip() not in {"", "1"}:
        return JAX   # multi-process training is JAX-only; probing devices now would break jax.distributed
    if JAX in available:
        probe = jax_has_accelerator if jax_accelerator is None else jax_accelerator
        if probe() if callable(probe) else probe:
            return JAX
    if TENSORFLOW in available:
        return TENSORFLOW
    if JAX in available:
        return JAX
    raise BackendError(f"No Keras backend is installed: {INSTALL_HINTS[JAX]}; or {INSTALL_HINTS[TENSORFLOW]}.")


def running_backend() -> str | None:
    """The backend of the Keras already imported in this process, or None when Keras is not imported."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        return str(keras.backend.backend())
    except AttributeError:   # keras still importing (a circular import): its environment decided
        return os.environ.get(ENV_VAR) or None


def apply_backend(setting: object = AUTO, environ: MutableMapping[str, str] | None = None) -> str:
    """Choose the backend for ``setting`` and write it to ``KERAS_BACKEND``; returns it.

    Call before Keras is imported. If it already is: ``auto`` keeps Keras' backend; an explicit
    setting naming another backend raises :class:`BackendError`.
    """
    setting = normalise_setting(setting)
    environ = os.environ if environ is None else environ
    running = running_backend()
    if running is not None:
        if setting not in (AUTO, running):
            raise BackendError(
                f"{SETTING} is {setting!r} but Keras was already imported in this process with the {running!r} "
                f"backend, and Keras cannot switch backends. Set it before anything imports Keras "
                f"(e.g. `{ENV_VAR}={setting} kedro run ...`), or run in a fresh process.")
        environ[ENV_VAR] = running
        logger.debug("Keras already imported with the %s backend", running)
        return running
    previous = environ.get(ENV_VAR, "").strip().lower()
    chosen = choose_backend(setting, environ)
    if setting != AUTO and previous and previous != chosen:
        logger.info("%s=%s overrides %s=%s from the environment", SETTING, setting, ENV_VAR, previous)
    environ[ENV_VAR] = chosen
    return chosen


def describe_devices(backend: str | None = None) -> list[str]:
    """The devices ``backend`` (default: the one in use or chosen) computes on, e.g.
    ``["gpu:0 NVIDIA H100 80GB HBM3"]`` or ``["/device:CPU:0"]``. Imports the backend's package."""
    backend = backend or running_backend() or os.environ.get(ENV_VAR) or TENSORFLOW
    if backend == JAX:
        import jax  # noqa: PLC0415

        return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
    if backend == TENSORFLOW:
        import tensorflow as tf  # noqa: PLC0415

        return [d.name for d in tf.config.list_logical_devices()]
    import keras  # noqa: PLC0415

    return [str(d) for d in keras.distribution.list_devices()]


def describe_devices_if_loaded(backend: str | None = None) -> list[str] | None:
    """:func:`describe_devices` when it costs no big import: JAX (about a second) always, TensorFlow
    (about 9 s) only once it is imported; None otherwise."""
    backend = backend or running_backend() or os.environ.get(ENV_VAR)
    if backend == JAX or (backend is not None and BACKEND_MODULES.get(backend, (backend,))[0] in sys.modules):
        return describe_devices(backend)
    return None
