"""``retained_heap``: freed memory stays in the process inside the block (no page faults when it is
allocated again), glibc's defaults come back on exit, and disabling it changes nothing.

Page faults are counted with ``getrusage``: re-allocating and touching a freed 64 MiB block faults
its pages in again when glibc returned them to the kernel, and does not when it kept them.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import numpy as np
import pytest

from pancreas_seg.runtime import glibc_version, retained_heap

pytestmark = pytest.mark.skipif(glibc_version() is None, reason="retained_heap acts on glibc only")

BLOCK_FLOATS = 64 * 2**18  # 64 MiB of float32: far above glibc's largest mmap threshold (32 MiB)


def _faults_of_reallocation() -> int:
    """Minor page faults of allocating and touching a block of the same size as one just freed."""
    block = np.ones(BLOCK_FLOATS, dtype=np.float32)
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(BLOCK_FLOATS, dtype=np.float32)
    assert float(block[-1]) == 1.0
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_without_page_faults_inside_the_block():
    default_faults = _faults_of_reallocation()
    with retained_heap() as applied:
        retained_faults = _faults_of_reallocation()
    restored_faults = _faults_of_reallocation()

    assert applied is True
    assert default_faults >= 16, "the 64 MiB block should be returned to the kernel by default"
    assert retained_faults <= default_faults // 8
    assert restored_faults >= default_faults // 2, "glibc's defaults must be back after the block"


def test_disabled_is_a_no_op():
    with retained_heap(enabled=False) as applied:
        faults = _faults_of_reallocation()
    assert applied is False
    assert faults >= 16


def test_memory_is_handed_back_when_the_block_ends():
    # In a fresh process: RSS right after the block is back near its value before the block.
    script = """
import numpy as np
from pancreas_seg.runtime import retained_heap

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

start = rss_mib()
with retained_heap():
    blocks = [np.ones(2**24, dtype=np.float32) for _ in range(8)]  # 8 x 64 MiB
    del blocks
    inside = rss_mib()
print(start, inside, rss_mib())
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    start, inside, after = map(float, out.stdout.split())
    assert inside - start > 400, "inside the block, the freed 512 MiB stay resident"
    assert after - start < 64, "malloc_trim on exit returns them"
