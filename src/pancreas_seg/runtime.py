"""Process-level tuning of the C allocator for training on the CPU.

Why: with the default glibc ``malloc`` settings, every large tensor that TensorFlow frees during a
``model.fit`` step goes back to the kernel (``munmap`` of mmap-served blocks, trimming of the heap
top), so the next step page-faults the same memory in again, zero-filled. When ``fit`` feeds the
model through ``tf.data`` (which it does for every ``keras.utils.PyDataset``), the step's tensors are
allocated from several threads and this churn dominates: on a 2-core machine a 96 px U-Net step
took ~1.05 s with ~2.6 million minor page faults per 12 steps, against ~0.48 s and ~1,000 faults
with freed memory kept in the process (``benchmarks/loader_benchmark.py`` measures both).

:func:`retained_heap` keeps freed memory inside the process while its block runs: no mmap-served
allocations (``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD``). The cost is a
resident set that stays at its high-water mark until the block ends; on exit glibc's defaults are
restored and ``malloc_trim(0)`` hands the free memory back. Where the C library is not glibc
(macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers and glibc's documented defaults (64-bit).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD_BYTES = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = -1  # mallopt takes an int; glibc stores the trim threshold as size_t: -1 = SIZE_MAX


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


def _mallopt(libc: ctypes.CDLL, parameter: int, value: int) -> None:
    if libc.mallopt(parameter, value) != 1:
        raise OSError(f"mallopt({parameter}, {value}) failed")


@contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Keep memory freed inside the block in the process (glibc only); yields whether it applied.

    Not re-entrant and process-wide: it changes ``malloc`` for every thread until the block exits.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        if enabled:
            logger.debug("retained_heap: the C library is not glibc; allocator left unchanged")
        yield False
        return
    _mallopt(libc, _M_MMAP_MAX, 0)
    _mallopt(libc, _M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield True
    finally:
        _mallopt(libc, _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _mallopt(libc, _M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD_BYTES)
        libc.malloc_trim(0)


@contextmanager
def dtype_policy(name: str | None) -> Iterator[None]:
    """TEMPORARY (replaced by the resume branch): set keras' global dtype policy for the block."""
    if name is None:
        yield
        return
    import keras  # noqa: PLC0415

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
