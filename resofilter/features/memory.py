"""Host memory of a scoring pass: glibc's allocator, told to hand large freed blocks back.

A scoring batch allocates and frees tensors of tens of MB (activations, the gradient of a
slice of logits, per-sample gradient blocks) in a pattern a forward pass does not have.
glibc raises its mmap threshold each time such a block is freed (up to 32 MB), after which
blocks of that size come from the heap and stay resident when freed: on the benchmark's
12-layer model the process's peak RSS was 2.07× a forward pass while the live tensors at
the peak were ~1.5× (experiments/benchmarks/score_speed.py). A fixed threshold
(``score.mmap_threshold``) keeps every block above it in its own mapping, returned to the
system the moment it is freed. A process-wide setting, applied by the score stage; on a
libc without ``mallopt`` (macOS, musl) nothing is changed and that is logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_APPLIED: set[int] = set()


def set_mmap_threshold(nbytes: int | None) -> bool:
    """Blocks of at least ``nbytes`` get their own mapping (freed back at once); ``None``: glibc's default.
    True when applied."""
    if nbytes is None:
        return False
    if nbytes in _APPLIED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        ok = False
    if ok:
        _APPLIED.add(nbytes)
        log.debug("malloc mmap threshold set to %d bytes", nbytes)
    else:
        log.info("score.mmap_threshold=%d not applied (no glibc mallopt here): peak memory may be higher", nbytes)
    return ok
