"""The C allocator's hold on memory a long-running server frees.

glibc serves a block of at least its mmap threshold (128 KiB to start) with its own mapping and
unmaps it at free. But each time such a block is freed, glibc raises the threshold to that block's
size, up to 32 MiB, and from then on blocks below it come from the heap, where freed memory stays
in the process until the heap's top is trimmed (at twice the threshold). One large request body
(`serve` accepts up to MAX_BODY; a data URL of 28 MiB is legal) therefore makes every later
body, image and numpy plan of a few MiB heap memory that is not given back: measured with
`scripts/serve_hostile_load.py --only mixed`, the server's RSS grew by about 5-15 MiB in some
runs and 45-96 MiB in others (docs/RESULTS.md, "`serve` gives back the memory of large request
bodies").

    return_freed_blocks()   # once, at the start of a server process

A fixed threshold (mallopt(M_MMAP_THRESHOLD), which also turns the raising off) keeps large
blocks mapped and unmapped at free. It costs a mapping and its page faults per large block, which
the dynamic threshold was made to save; for a server, memory given back is worth more.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
FREED_BLOCK_THRESHOLD = 1 << 20  # blocks of 1 MiB and more are mapped apart and unmapped at free


def return_freed_blocks(threshold: int = FREED_BLOCK_THRESHOLD) -> bool:
    """Fix the C allocator's mmap threshold at `threshold` bytes where the allocator has one
    (glibc); True if it was set, False elsewhere (macOS, Windows, musl: nothing to do)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
