"""polytask.utils.host_memory: large freed blocks are kept for reuse unless the user chose otherwise.

Each case runs in a fresh interpreter: the allocator setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

# mallinfo2().hblkhd: the bytes the process holds in blocks served by mmap; .arena: the size of the
# heap. Each step allocates 64, 96 and 48 MiB tensors (above glibc's mmap threshold, at most 32 MiB)
# and frees them together, as a training step does with its activations.
PROBE = r"""
import ctypes, json
import torch
from polytask.utils.host_memory import host_malloc_state, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
state = keep_freed_memory()
before = libc.mallinfo2().hblkhd
mmapped, heap, total = 0, [], 0.0
for step in range(30):
    tensors = [torch.ones(n << 18) for n in (64, 96, 48)]
    mmapped = max(mmapped, libc.mallinfo2().hblkhd - before)
    total += float(sum(t.sum() for t in tensors))
    del tensors
    heap.append(libc.mallinfo2().arena)
print(json.dumps({"state": state, "recorded": host_malloc_state(), "mmapped_mib": mmapped / 2**20,
                  "heap_growth_mib": (heap[-1] - heap[4]) / 2**20, "total": total}))
"""
STEP_MIB = 64 + 96 + 48


def probe(**env: str) -> dict:
    """Run :data:`PROBE` with ``env`` added to a clean copy of the environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "POLYTASK_HOST_MALLOC")}
    done = subprocess.run([sys.executable, "-c", PROBE], check=False, env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_and_are_reused_step_after_step() -> None:
    out = probe()
    assert out["state"] == out["recorded"] == "keep"
    assert out["mmapped_mib"] == 0
    # 25 more steps would add 25 x 208 MiB without reuse; glibc may still split one freed block badly once
    assert out["heap_growth_mib"] < STEP_MIB
    assert out["total"] == 30 * STEP_MIB * 2**18


def test_system_choice_leaves_glibc_as_it_is() -> None:
    out = probe(POLYTASK_HOST_MALLOC="system")
    assert out["state"] == "system"
    assert out["mmapped_mib"] >= STEP_MIB


def test_the_users_own_malloc_tunables_are_left_alone() -> None:
    out = probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4096")
    assert out["state"] == "user: GLIBC_TUNABLES"
    assert out["mmapped_mib"] >= STEP_MIB


def test_an_unknown_choice_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask.cli import main
    from polytask.utils.host_memory import keep_freed_memory

    monkeypatch.setenv("POLYTASK_HOST_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"POLYTASK_HOST_MALLOC='jemalloc': expected one of keep, system"):
        keep_freed_memory()
    assert main(["summary", "--help"]) == 2
