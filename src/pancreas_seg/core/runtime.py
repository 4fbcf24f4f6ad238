"""Process-wide settings that must be scoped to one block and put back afterwards.

Cheap to import and Kedro-free: Keras is imported only inside :func:`dtype_policy`.

:func:`dtype_policy` sets Keras' global dtype policy (e.g. ``mixed_float16``) for a block and restores
the previous one on exit, so a later architecture trained in the same process does not inherit it.

:func:`retained_heap` tunes the C allocator for training on the CPU; :func:`release_free_heap`
hands memory that is free inside the process back to the kernel (a long-lived worker between tasks).

Why: with the default glibc ``malloc`` settings, every large tensor that TensorFlow frees during a
``model.fit`` step goes back to the kernel (``munmap`` of mmap-served blocks, trimming of the heap
top), so the next step page-faults the same memory in again, zero-filled. When ``fit`` feeds the
model through ``tf.data`` (which it does for every ``keras.utils.PyDataset``), the step's tensors are
allocated from several threads and this churn dominates: on a 2-core machine a 96 px U-Net step
took ~1.05 s with ~2.6 million minor page faults per 12 steps, against ~0.48 s and ~1,000 faults
with freed memory kept in the process (``benchmarks/loader_benchmark.py`` measures both).

:func:`retained_heap` keeps freed memory inside the process while its block runs: no mmap-served
allocations (``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD``). The cost is a
resident set that stays at its high-water mark until the block ends; on exit ``M_MMAP_MAX`` and
``M_TRIM_THRESHOLD`` go back to glibc's defaults (65536 and 128 KiB) and ``malloc_trim(0)`` hands
the free memory back.

What is NOT restored: any ``mallopt`` of these parameters permanently switches off glibc's dynamic
mmap threshold (``no_dyn_threshold``; glibc has no call to switch it back on). By default glibc
raises its mmap threshold (128 KiB at start) to the size of each freed mmap-served block up to
32 MiB, so a program that repeatedly allocates e.g. 1 MiB buffers soon serves them from the heap.
After the first use of :func:`retained_heap`, the threshold stays where it was when the block was
entered (128 KiB unless it had already grown) for the rest of the process: blocks above it are
mmapped and unmapped on every allocation. Likewise the trim threshold goes back to 128 KiB, not to
the twice-the-mmap-threshold value the dynamic rule may have set. Use it in processes that train
(or that tolerate this), not in a long-lived service that later does unrelated work.

If the user tuned the allocator through the environment (``MALLOC_MMAP_MAX_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or the matching ``glibc.malloc.*`` entries of
``GLIBC_TUNABLES``), :func:`retained_heap` leaves the allocator alone. Where the C library is not
glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers and glibc's documented defaults (64-bit).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD_BYTES = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = -1  # mallopt takes an int; glibc stores the trim threshold as size_t: -1 = SIZE_MAX

#: Environment variables through which a user sets what retained_heap would override; glibc reads
#: them at process start.
MALLOC_ENV_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: The same settings as glibc tunables (``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:...``).
MALLOC_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")

_lock = threading.Lock()
_active = False            # a retained_heap block is running (the outer one restores)
_user_settings_logged = False


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another one."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def glibc_version() -> str | None:
    """glibc's version string (e.g. ``"2.41"``), or None when the process does not use glibc."""
    libc = _glibc()
    return None if libc is None else libc.gnu_get_libc_version().decode()


def user_malloc_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The allocator settings the user made through the environment that retained_heap would
    override: names from :data:`MALLOC_ENV_VARIABLES` and ``GLIBC_TUNABLES`` entries (``name=value``)
    from :data:`MALLOC_TUNABLES`. Empty when there are none."""
    environ = os.environ if environ is None else environ
    found = [name for name in MALLOC_ENV_VARIABLES if name in environ]
    for entry in environ.get("GLIBC_TUNABLES", "").split(":"):
        if entry.partition("=")[0].strip() in MALLOC_TUNABLES:
            found.append(f"GLIBC_TUNABLES {entry.strip()}")
    return found


def _mallopt(libc: ctypes.CDLL, parameter: int, value: int) -> None:
    if libc.mallopt(parameter, value) != 1:
        raise OSError(f"mallopt({parameter}, {value}) failed")


@contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Keep memory freed inside the block in the process (glibc only); yields whether it applied.

    Process-wide: it changes ``malloc`` for every thread until the block exits. A block nested in
    another one changes nothing (the outer one restores). Yields False, changing nothing, when
    ``enabled`` is false, the C library is not glibc, or the user set the allocator's mmap/trim
    settings in the environment (see :func:`user_malloc_settings`; logged once at INFO).

    On exit ``M_MMAP_MAX`` (65536) and ``M_TRIM_THRESHOLD`` (128 KiB) get glibc's defaults back and
    free memory is returned (``malloc_trim(0)``), but glibc's dynamic mmap threshold stays off for
    the rest of the process: the mmap threshold keeps the value it had on entry (128 KiB unless it
    had grown), so allocations above it are mmapped every time (see the module docstring).
    """
    global _active, _user_settings_logged  # noqa: PLW0603
    libc = _glibc() if enabled else None
    if libc is None:
        if enabled:
            logger.debug("retained_heap: the C library is not glibc; allocator left unchanged")
        yield False
        return
    user_settings = user_malloc_settings()
    if user_settings:
        with _lock:
            first = not _user_settings_logged
            _user_settings_logged = True
        if first:
            logger.info("retained_heap: the allocator is tuned through the environment (%s); "
                        "leaving it alone", ", ".join(user_settings))
        yield False
        return
    with _lock:
        outer = not _active
        if outer:
            _mallopt(libc, _M_MMAP_MAX, 0)
            _mallopt(libc, _M_TRIM_THRESHOLD, _NEVER_TRIM)
            _active = True
    try:
        yield True
    finally:
        if outer:
            with _lock:
                _mallopt(libc, _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _mallopt(libc, _M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD_BYTES)
                _active = False
            libc.malloc_trim(0)


@contextmanager
def dtype_policy(name: str | None) -> Iterator[str]:
    """Keras' global dtype policy set to ``name`` (e.g. ``"mixed_float16"``) inside the block.

    ``None`` leaves the policy as it is. On exit, also on an exception, the policy in effect before
    the block is restored. Keras keeps this setting per thread: it applies to the calling thread.
    Yields the name of the policy in effect inside the block.
    """
    import keras  # noqa: PLC0415 - lazy: keeps this module cheap to import

    previous = keras.config.dtype_policy()
    try:
        if name is not None:
            keras.config.set_dtype_policy(name)
        yield keras.config.dtype_policy().name
    finally:
        keras.config.set_dtype_policy(previous)


def release_free_heap() -> bool:
    """Give the kernel back the memory that is free inside this process (glibc's ``malloc_trim(0)``).

    For long-lived processes between units of work (a Dask worker after each task): glibc keeps
    what a task freed, and fragments of it pile up over hundreds of tasks. Unlike the
    ``MALLOC_TRIM_THRESHOLD_`` setting, it leaves glibc's dynamic mmap threshold on, so a task's
    own allocations stay as fast as in a plain process. Returns False, doing nothing, when the C
    library is not glibc or a :func:`retained_heap` block is running (a training that keeps its
    memory on purpose).
    """
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if _active:
            return False
        libc.malloc_trim(0)
    return True
