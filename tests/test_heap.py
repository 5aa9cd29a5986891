"""`heap.settle`: what the server and the controller do to the garbage collector once started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from opsapi import heap


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settle_freezes_what_is_alive_and_collects_the_young_generation_less_often(
    restored_collector: None,
) -> None:
    # given an object alive before the process settles
    survivor = {"kept": [1, 2, 3]}
    # when it settles
    heap.settle()
    # then the survivor is in the permanent generation (no collection rescans it) ...
    assert gc.get_freeze_count() > 0
    assert not any(survivor is tracked for tracked in gc.get_objects())
    # ... and young collections run every YOUNG_COLLECTION_EVERY allocations, not 700
    young, middle, full = gc.get_threshold()
    assert young == heap.YOUNG_COLLECTION_EVERY > 700
    assert middle == full == heap.OLDER_COLLECTION_EVERY
    # and cyclic garbage made afterwards is still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
