"""One process-wide thread pool for the CPU work dpclip splits across cores.

Used, through :func:`in_shares`, by the noise draw (:mod:`dpclip.noise`) and the per-sample conv chunks
(``dpclip.grad_sample.rules._map_chunks``). Also :func:`serial`, which runs small passes on
one intra-op thread. It holds threads only, no state that affects a
result: callers give every piece of work its own inputs and outputs, so which thread runs it
does not change any value. Recreated after ``fork``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

__all__ = ["helper_pool", "in_shares", "serial", "serial_gemm", "GEMM_SERIAL_FLOPS", "SERIAL_MAX"]

T = TypeVar("T")

_LOCK = threading.Lock()
_POOL: dict[str, tuple] = {}  # name -> (pid, ThreadPoolExecutor): reused across steps


def _executor(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's executor ``name`` (``workers`` threads), created on first use and again
    in a child after ``fork`` (the parent's threads do not exist there)."""
    with _LOCK:
        pid, pool = _POOL.get(name, (None, None))
        if pid != os.getpid():
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"dpclip-{name}")
            _POOL[name] = (os.getpid(), pool)
        return pool  # type: ignore[return-value]


def helper_pool() -> ThreadPoolExecutor:
    """The pool (``cpu_count - 1`` workers: the calling thread takes a share itself)."""
    return _executor("helper", max(1, (os.cpu_count() or 2) - 1))


def in_shares(fn: Callable[[int, int], T], count: int) -> list[T]:
    """``[fn(lo, hi), ...]`` over ``range(count)`` cut into one contiguous share per torch
    thread, in share order. The calling thread runs the first share and the pool the others,
    each on one intra-op thread and in the caller's grad mode (it is thread-local); the thread
    count is restored afterwards. With one thread or one item it is ``[fn(0, count)]`` on the
    caller. Each share must write only its own outputs, so that values do not depend on the
    thread count."""
    threads = torch.get_num_threads()
    workers = min(threads, count)
    if workers <= 1:
        return [fn(0, count)]
    bounds = [count * j // workers for j in range(workers + 1)]
    grad_enabled = torch.is_grad_enabled()

    def run(lo: int, hi: int) -> T:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_enabled):
            return fn(lo, hi)

    try:
        futures = [helper_pool().submit(run, bounds[j], bounds[j + 1]) for j in range(1, workers)]
        out = [run(bounds[0], bounds[1])]
        out.extend(future.result() for future in futures)
    finally:
        torch.set_num_threads(threads)
    return out


SERIAL_MAX = 1 << 19
"""Numbers up to which an element-wise pass runs on one CPU thread (:func:`serial`)."""


GEMM_SERIAL_FLOPS = 12_000_000
"""Floating-point operations up to which a matrix product runs on one CPU thread
(:func:`serial_gemm`). Measured on 2 threads after a parallel region, workers asleep:
``[10, 256] @ [256, 32]`` 140 us on two threads and 22 on one; ``[32, 256] @ [256, 512]``
(8.4 MFLOP) 174 and 162; 16.8 MFLOP break even (docs/design.md E19)."""


class serial:
    """Run the block on one intra-op thread when it touches at most ``limit``
    (:data:`SERIAL_MAX`) numbers on CPU. Waking the sleeping OpenMP workers (``OMP_WAIT_POLICY=passive``, the
    engine benchmark's setting) costs more than splitting such a pass saves: W1's six
    per-sample norms took 0.63 ms on two threads and 0.18 ms on one (docs/design.md E19). The
    thread count is restored afterwards, also on an exception; values do not depend on it.
    torch's vectorised math functions (``sqrt``, ``exp``, ``log``) split even a 256-number call
    across the threads: 58 us on two threads and 1.3 us on one.

    A small class rather than a generator context manager: a step enters it a few dozen
    times, and ``contextlib``'s machinery cost 1.7 us per entry against 0.5 here."""

    __slots__ = ("_threads",)

    def __init__(self, numbers: int, device: torch.device, limit: int = SERIAL_MAX) -> None:
        threads = 0
        if numbers <= limit and device.type == "cpu":
            threads = torch.get_num_threads()
            if threads <= 1:
                threads = 0
        self._threads = threads  # 0: nothing to change

    def __enter__(self) -> None:
        if self._threads:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)


def serial_gemm(flops: int, device: torch.device) -> serial:
    """:func:`serial` for a matrix product of ``flops`` floating-point operations (``2 m n k``):
    one thread up to :data:`GEMM_SERIAL_FLOPS`."""
    return serial(flops, device, limit=GEMM_SERIAL_FLOPS)
