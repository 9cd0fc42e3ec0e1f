"""How the ``detrkit`` program has the C allocator (glibc's malloc) treat freed memory.

By default glibc gives blocks of 32 MB and more straight back to the operating system when they
are freed, and trims the top of its heap whenever much of it is free. A detector's activations are
such blocks (one 800x1066 image's 256-channel map at stride 4 is 52 MB), so every forward pass
maps fresh memory and faults in each of its pages again, several microseconds a page on a virtual
machine: about 90 ms of an 800x1066 forward here. Keeping freed memory for reuse removes that.

The settings are process-wide, so the library never changes them itself; the ``detrkit`` program,
which owns its process, does at start-up, unless the environment sets malloc's own variables.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap and return to it; larger ones are still mapped alone.
_KEEP_UP_TO = 1 << 30
# Environment variables with which a user already sets what this would.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep freed blocks of up to 1 GiB for reuse: none is unmapped, the heap
    is never trimmed. Returns whether the settings were made: not off glibc, and not when the
    environment sets malloc's thresholds itself. The resident size then stays at its peak."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_UP_TO)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
    )
