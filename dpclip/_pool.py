"""One process-wide thread pool for the CPU work dpclip splits across cores.

Used by the noise draw (:func:`dpclip.noise.fill_normal`) and the per-sample conv chunks
(``dpclip.grad_sample.rules._map_chunks``). It holds threads only, no state that affects a
result: callers give every piece of work its own inputs and outputs, so which thread runs it
does not change any value. Recreated after ``fork``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["helper_pool"]

_LOCK = threading.Lock()
_POOL: dict[str, object] = {}  # {"pid": int, "pool": ThreadPoolExecutor}: reused across steps


def helper_pool() -> ThreadPoolExecutor:
    """The pool (``cpu_count - 1`` workers: the calling thread takes a share itself)."""
    with _LOCK:
        if _POOL.get("pid") != os.getpid():
            _POOL["pool"] = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                               thread_name_prefix="dpclip-helper")
            _POOL["pid"] = os.getpid()
        return _POOL["pool"]  # type: ignore[return-value]
