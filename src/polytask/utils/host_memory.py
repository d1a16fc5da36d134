"""Whether the C allocator keeps large freed blocks for reuse (glibc on Linux).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
gives it back to the system on ``free``. A CPU training step allocates and frees the same large
activations and gradients at every step, so each step writes to new pages, and the kernel faults
in and zeroes every one of them. Keeping the freed blocks in the heap for the next allocation
removes that cost: on ETR-NLP's NYUv2 SegNet, whose primitive responses are 141 MiB tensors, it
was a fifth of a task path's training step (benchmarks/RESULTS.md, "ETR-NLP against hard
sharing").

``polytask`` asks for it when a command starts (:func:`keep_freed_memory`). The environment
variable ``POLYTASK_HOST_MALLOC`` chooses: ``keep`` (the default) or ``system`` (glibc's own
behaviour). A malloc setting the user made (``GLIBC_TUNABLES`` with ``glibc.malloc.*``,
``MALLOC_*_`` variables, or a replacement allocator in ``LD_PRELOAD``) is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV_VAR = "POLYTASK_HOST_MALLOC"
"""The environment variable that chooses ``keep`` or ``system``."""

CHOICES = ("keep", "system")

TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap above this is still given back to the system."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_state = "not set (keep_freed_memory was not called)"


def _users_setting() -> str | None:
    """The variable through which the user configured malloc, or None."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "LD_PRELOAD"
    return next((name for name in _USER_MALLOC_VARIABLES if name in os.environ), None)


def keep_freed_memory() -> str:
    """Make glibc keep large freed blocks for reuse, unless the user chose otherwise.

    Sets glibc's ``M_MMAP_MAX`` to 0 (large blocks come from the heap, not from a fresh ``mmap``
    each) and ``M_TRIM_THRESHOLD`` to :data:`TRIM_THRESHOLD_BYTES`. It changes how the process
    allocates from now on, not what it computes. Freed memory stays with the process: in 40 training
    steps of two SegNets the resident memory settled 6 % above glibc's own peak (docs/scaling.md).

    Returns:
        What applies, for reports: ``"keep"``, ``"system"`` (``POLYTASK_HOST_MALLOC=system``),
        ``"user: <variable>"`` or ``"unsupported: <why>"`` (not Linux with glibc).

    Raises:
        ValueError: ``POLYTASK_HOST_MALLOC`` is neither ``keep`` nor ``system``.
    """
    global _state
    _state = _apply()
    return _state


def host_malloc_state() -> str:
    """What the last :func:`keep_freed_memory` returned (the bench report records it)."""
    return _state


def _apply() -> str:
    choice = os.environ.get(ENV_VAR, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system":
        return "system"
    user = _users_setting()
    if user is not None:
        return f"user: {user}"
    libc = platform.libc_ver()[0]
    if not sys.platform.startswith("linux") or libc != "glibc":
        return f"unsupported: {sys.platform} {libc or 'without glibc'}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "unsupported: mallopt refused"
    return "keep"
