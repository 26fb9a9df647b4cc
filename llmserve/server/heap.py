"""Garbage-collector settings for serving: keep collections off the request path.

CPython's full (generation 2) collection scans every tracked object. After the engine has started,
the process holds hundreds of thousands of them (the libraries, the engine client, vLLM's and
torch's module state) that live as long as the process, so each full pass stalls the event loop
for tens of milliseconds, and every request in flight waits that long. `gc.freeze` moves all
objects that exist at that moment to a permanent generation that collections skip, as `vllm serve`
does after its startup. Objects created later (the requests') are collected as usual.

The young passes scan the objects of requests in flight (a few hundred each: coroutines, futures,
headers). Python's default of one pass per 700 net allocations runs them hundreds of times a
second under load, each one over objects that are still alive; a higher first threshold runs them
less often at the same cost per pass (`benchmarks/gc_pauses.py` measures both).
"""

from __future__ import annotations

import gc


def tune_collector(gen0_threshold: int) -> None:
    """Set how many net allocations of tracked objects start a young pass."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def freeze_heap() -> int:
    """Collect what is garbage now, then freeze the rest; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
