"""Garbage-collector settings for the long-running processes this package owns.

Measured, not folklore: ``docs/performance.md`` ("The garbage collector") has the counts.
"""

from __future__ import annotations

import gc

__all__ = ["GC_YOUNG_THRESHOLD", "freeze_gc_heap", "tune_gc_for_serving"]


def freeze_gc_heap() -> None:
    """Move everything alive now into the collector's permanent generation, as vLLM's API server
    does after start-up (``vllm.utils.gc_utils.freeze_gc_heap``): full collections then no longer
    walk the start-up heap (modules, the redactor's tables, the server)."""
    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    gc.freeze()


#: The young generation's collection threshold the gateway sets (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc_for_serving() -> None:
    """The collector settings of a process of ours once started: the gateway (``vllm-audit
    serve``), the collector, the shipper. Never called inside a host such as vLLM: there the
    middleware leaves the host's collector alone (vLLM freezes its own heap).

    Measured in the in-process strict bench (64 requests in flight), per request on the loop
    thread: full collections walking the start-up heap, 10-23 ms each, ~10 µs (hence
    :func:`freeze_gc_heap`); young collections, ~370 per 6,400 requests, 5-8 µs, and the middle
    generation's 2-4 µs. A strict batch keeps its requests' objects alive until its fsync, so the
    allocation count crosses 700 on every batch although those objects then die by reference
    counting: the collections found no garbage at all. With the young threshold at
    ``GC_YOUNG_THRESHOLD`` they no longer run at that load; cyclic garbage, if any, is still
    collected every that many objects.
    """
    freeze_gc_heap()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(max(_young, GC_YOUNG_THRESHOLD), middle, old)
