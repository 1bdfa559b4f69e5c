"""One process-wide thread pool for the CPU work dpclip splits across cores.

Used by the noise draw (:func:`dpclip.noise.fill_normal`) and the per-sample conv chunks
(``dpclip.grad_sample.rules._map_chunks``). Also :func:`serial`, which runs small passes on
one intra-op thread. It holds threads only, no state that affects a
result: callers give every piece of work its own inputs and outputs, so which thread runs it
does not change any value. Recreated after ``fork``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["helper_pool", "serial", "SERIAL_MAX"]

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


SERIAL_MAX = 1 << 19
"""Numbers up to which an element-wise pass runs on one CPU thread (:func:`serial`)."""


@contextmanager
def serial(numbers: int, device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when it touches at most :data:`SERIAL_MAX`
    numbers on CPU. Waking the sleeping OpenMP workers (``OMP_WAIT_POLICY=passive``, the
    engine benchmark's setting) costs more than splitting such a pass saves: W1's six
    per-sample norms took 0.63 ms on two threads and 0.18 ms on one (docs/design.md E19). The
    thread count is restored afterwards, also on an exception; values do not depend on it."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or numbers > SERIAL_MAX:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
