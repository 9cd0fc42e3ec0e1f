"""How the ``detrkit`` program has the C allocator (glibc's malloc) treat freed memory.

By default glibc gives blocks of 32 MB and more straight back to the operating system when they
are freed, and trims the top of its heap whenever much of it is free. A detector's activations are
such blocks (one 800x1066 image's 256-channel map at stride 4 is 52 MB), so every forward pass
maps fresh memory and faults in each of its pages again, several microseconds a page on a virtual
machine: about 90 ms of an 800x1066 forward here. Keeping freed memory for reuse removes that.

The settings are process-wide, so the library never changes them itself; the ``detrkit`` program,
which owns its process, does at start-up, unless the environment sets malloc's thresholds.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt's parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap and return to it; larger ones are still mapped alone.
_KEEP_UP_TO = 1 << 30
# How a user already sets what this would: malloc's own environment variables, or glibc's tunables.
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep freed blocks of up to 1 GiB for reuse: none is unmapped, and the
    heap is trimmed only when more than 1 GiB at its top is free. Returns whether the settings
    were made: not off Linux's glibc, and not when the environment sets malloc's thresholds
    itself. The resident size then stays near its peak."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _USER_VARIABLES) or any(
        name in tunables for name in _USER_TUNABLES
    ):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    made = [mallopt(option, _KEEP_UP_TO) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return all(made)
