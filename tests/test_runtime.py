"""``retained_heap``: freed memory stays in the process inside the block (no page faults when it is
allocated again), large blocks are mmapped again on exit, disabling it changes nothing, settings
the user made in the environment are left alone, and glibc's dynamic mmap threshold stays off
after the first use (as documented). ``dtype_policy``: Keras' global dtype policy is restored.

Page faults are counted with ``getrusage``: re-allocating and touching a freed 64 MiB block faults
its pages in again when glibc returned them to the kernel, and does not when it kept them.
Whether ``malloc`` served a block by ``mmap`` is read from glibc's ``mallinfo2()`` (``hblks``, the
number of mmapped blocks; glibc >= 2.33) in a fresh Python process per case, so the allocator state
of this test process (and its environment) does not matter.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

from pancreas_seg.core.runtime import glibc_version, retained_heap

glibc_only = pytest.mark.skipif(glibc_version() is None, reason="retained_heap acts on glibc only")

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


@glibc_only
def test_freed_memory_is_reused_without_page_faults_inside_the_block():
    default_faults = _faults_of_reallocation()
    with retained_heap() as applied:
        retained_faults = _faults_of_reallocation()
    restored_faults = _faults_of_reallocation()

    assert applied is True
    assert default_faults >= 16, "the 64 MiB block should be returned to the kernel by default"
    assert retained_faults <= default_faults // 8
    assert restored_faults >= default_faults // 2, "64 MiB blocks must be mmapped again after the block"


@glibc_only
def test_disabled_is_a_no_op():
    with retained_heap(enabled=False) as applied:
        faults = _faults_of_reallocation()
    assert applied is False
    assert faults >= 16


@glibc_only
@pytest.mark.subprocess
def test_memory_is_handed_back_when_the_block_ends():
    # In a fresh process: RSS right after the block is back near its value before the block.
    script = """
import numpy as np
from pancreas_seg.core.runtime import retained_heap

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
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env=_clean_env())
    start, inside, after = map(float, out.stdout.split())
    assert inside - start > 400, "inside the block, the freed 512 MiB stay resident"
    assert after - start < 64, "malloc_trim on exit returns them"


# -- mallinfo2 observations in fresh processes ------------------------------------------------------

# mmapped(size): malloc(size), report whether glibc served it by mmap (hblks grew), free it.
MALLINFO_PRELUDE = r"""
import ctypes, json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]


def mmapped(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    assert block
    served = libc.mallinfo2().hblks - before
    libc.free(block)
    return served == 1


from pancreas_seg.core.runtime import retained_heap
MiB = 2**20
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


needs_mallinfo2 = pytest.mark.skipif(glibc_version() is None or not _has_mallinfo2(),
                                     reason="needs glibc >= 2.33 (mallinfo2)")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the user's malloc tuning, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")}
    return {**env, **extra}


def _observe(body: str, **env: str) -> tuple[dict, str]:
    """Run MALLINFO_PRELUDE + ``body`` (which prints one JSON line) in a fresh Python process."""
    out = subprocess.run([sys.executable, "-c", MALLINFO_PRELUDE + body], check=False, capture_output=True,
                         text=True, env=_clean_env(**env), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@needs_mallinfo2
@pytest.mark.subprocess
def test_large_blocks_are_heap_served_inside_and_mmapped_again_after():
    seen, _ = _observe("""
before = mmapped(64 * MiB)
with retained_heap() as applied:
    inside = [mmapped(64 * MiB), mmapped(256 * 1024)]
print(json.dumps({"applied": applied, "before": before, "inside": inside, "after": mmapped(64 * MiB)}))
""")
    assert seen == {"applied": True, "before": True, "inside": [False, False], "after": True}


@needs_mallinfo2
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_MAX_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}],
                         ids=["MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"])
@pytest.mark.subprocess
def test_user_mmap_max_in_the_environment_is_left_alone(env: dict[str, str]):
    """The user turned mmap off: it stays off after the block (old code turned it back on)."""
    seen, stderr = _observe("""
before = mmapped(64 * MiB)
with retained_heap() as applied:
    inside = mmapped(64 * MiB)
with retained_heap() as again:
    pass
print(json.dumps({"applied": [applied, again], "before": before, "inside": inside, "after": mmapped(64 * MiB)}))
""", **env)
    assert seen == {"applied": [False, False], "before": False, "inside": False, "after": False}
    notes = [line for line in stderr.splitlines() if line.startswith("INFO pancreas_seg.core.runtime")]
    assert len(notes) == 1 and "leaving it alone" in notes[0], stderr  # logged once


@needs_mallinfo2
@pytest.mark.subprocess
def test_user_trim_threshold_in_the_environment_is_left_alone():
    """MALLOC_TRIM_THRESHOLD_ alone: the block does not turn mmap off either."""
    seen, _ = _observe("""
with retained_heap() as applied:
    inside = mmapped(64 * MiB)
print(json.dumps({"applied": applied, "inside": inside}))
""", MALLOC_TRIM_THRESHOLD_=str(64 * 2**20))
    assert seen == {"applied": False, "inside": True}


@needs_mallinfo2
@pytest.mark.subprocess
def test_dynamic_mmap_threshold_stays_off_after_first_use():
    """As documented: in a fresh process freeing a 1 MiB mmapped block raises the mmap threshold,
    so the next 1 MiB block comes from the heap; after retained_heap the threshold is fixed (at
    128 KiB here), so every 1 MiB block is mmapped; a threshold that had grown stays grown."""
    fresh, _ = _observe("""
print(json.dumps([mmapped(1 * MiB), mmapped(1 * MiB)]))
""")
    assert fresh == [True, False]
    after, _ = _observe("""
with retained_heap():
    pass
print(json.dumps([mmapped(1 * MiB), mmapped(1 * MiB), mmapped(1 * MiB)]))
""")
    assert after == [True, True, True]
    grown, _ = _observe("""
mmapped(1 * MiB)  # the threshold grows to ~1 MiB
with retained_heap():
    pass
print(json.dumps([mmapped(1 * MiB), mmapped(2 * MiB), mmapped(2 * MiB)]))
""")
    assert grown == [False, True, True]


@needs_mallinfo2
@pytest.mark.subprocess
def test_nested_block_leaves_the_restore_to_the_outer_one():
    seen, _ = _observe("""
with retained_heap() as outer:
    with retained_heap() as inner:
        pass
    between = mmapped(64 * MiB)
print(json.dumps({"applied": [outer, inner], "between": between, "after": mmapped(64 * MiB)}))
""")
    assert seen == {"applied": [True, True], "between": False, "after": True}


def test_user_malloc_settings_reads_env_and_tunables():
    from pancreas_seg.core.runtime import user_malloc_settings  # noqa: PLC0415

    assert user_malloc_settings({}) == []
    assert user_malloc_settings({"MALLOC_ARENA_MAX": "2",
                                 "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) == []
    assert user_malloc_settings({"MALLOC_TRIM_THRESHOLD_": "1"}) == ["MALLOC_TRIM_THRESHOLD_"]
    assert user_malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=4096"}) \
        == ["GLIBC_TUNABLES glibc.malloc.mmap_threshold=4096"]


# -- dtype_policy ----------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_runtime_imports_without_keras_or_kedro():
    out = subprocess.run([sys.executable, "-c", "import sys, pancreas_seg.core.runtime; "
                          "print(sorted(m for m in ('keras', 'kedro', 'tensorflow') if m in sys.modules))"],
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_dtype_policy_is_restored_on_exit_and_on_error():
    import keras  # noqa: PLC0415

    from pancreas_seg.core.runtime import dtype_policy  # noqa: PLC0415

    original = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # a non-default outer policy must come back too
    try:
        with dtype_policy("mixed_float16") as inside:
            assert inside == "mixed_float16"
            layer = keras.layers.Dense(2)
            assert layer.compute_dtype == "float16" and layer.variable_dtype == "float32"
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        with pytest.raises(RuntimeError, match="boom"), dtype_policy("mixed_float16"):
            raise RuntimeError("boom")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        with dtype_policy(None) as unchanged:
            assert unchanged == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
    finally:
        keras.config.set_dtype_policy(original)


_FRAGMENTED_HEAP = """
import numpy as np
from pancreas_seg.core.runtime import release_free_heap, retained_heap

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

blocks = [np.ones(2**14, dtype=np.float32) for _ in range(3200)]  # 3200 x 64 KiB, heap-served
top = blocks[-1]   # keeps the heap's top in use, so glibc's automatic trimming cannot give anything back
del blocks
freed = rss_mib()
with retained_heap(enabled=MODE == "inside_retained_heap"):
    released = release_free_heap()
    after = rss_mib()
print(released, freed, after)
"""


@glibc_only
@pytest.mark.parametrize("mode", ["plain", "inside_retained_heap"])
@pytest.mark.subprocess
def test_release_free_heap_returns_freed_heap_pages_except_inside_retained_heap(mode: str):
    """200 MiB of freed 64 KiB blocks below a live one stay resident until release_free_heap;
    inside a retained_heap block (a training keeping its memory) it leaves them alone."""
    out = subprocess.run([sys.executable, "-c", f"MODE = {mode!r}\n" + _FRAGMENTED_HEAP], check=True,
                         capture_output=True, text=True, env=_clean_env())
    released, freed, after = out.stdout.split()
    assert float(freed) > 220, "the freed blocks should still be resident before the release"
    if mode == "plain":
        assert released == "True"
        assert float(freed) - float(after) > 150
    else:
        assert released == "False"
        assert abs(float(freed) - float(after)) < 20
