"""The garbage collector's settings for the long-running processes (server, controller)."""

from __future__ import annotations

import gc

# Allocations between two collections of the young generation (Python's default: 700). A
# write allocates thousands of objects, nearly all freed by reference counting; at 700 every
# request ran several young collections that found nothing to free. Measured alternating with
# the default (benchmarks/write_cpu.py): 3.59 -> 3.37 ms of CPU per audited write.
YOUNG_COLLECTION_EVERY = 20_000
# Young collections between two of the middle generation, and those between two full ones.
OLDER_COLLECTION_EVERY = 20


def settle() -> None:
    """Once a process has started: move everything alive into the permanent generation (full
    collections stop rescanning it; they paused the loop 100+ ms under load), then collect
    the young generation every `YOUNG_COLLECTION_EVERY` allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, OLDER_COLLECTION_EVERY, OLDER_COLLECTION_EVERY)
