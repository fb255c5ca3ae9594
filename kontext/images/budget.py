"""The process-wide limits of image work: a memory budget in bytes shared by every decode (and one
for downloads), and the small thread pools that run Pillow off the event loop.

Other modules read :data:`DECODE_BUDGET`, :data:`DECODE_BUDGET_BYTES` and
:data:`DOWNLOAD_BUDGET` through this module (``budget.DECODE_BUDGET``), so a test that swaps one
swaps it for all."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


MIB = 1024 * 1024

DECODE_BUDGET_BYTES = 160 * MIB
"""The memory that all image decodes of the process may hold at once, and the most that one WebP
decode may take (a 10 MP WebP; larger WebPs are checked by structure only: the RIFF chunk
layout, and :func:`thumbnail_bytes` refuses them). 160 MiB is one worst-case 40 MP RGBA decode;
with it the bot's memory for checks stays within ~200 MiB whatever members send (see
:data:`DECODE_BUDGET`)."""

DOWNLOAD_BUDGET_BYTES = 8 * 20 * MIB
"""The bytes that all downloads of :func:`fetch_and_check` may hold at once: eight attachments at
Discord's default 20 MiB limit (more when they are smaller). A download reserves its
``Content-Length`` (or ``max_bytes`` when there is none) before reading the body."""

CHECK_THREADS = 2
"""Threads of the pool that runs image checks and thumbnails (never the event loop's)."""


class MemoryBudget:
    """A weighted, first-come-first-served semaphore in bytes, shared by the whole process.

    :meth:`acquire` waits until ``cost`` bytes fit beside what is held; a cost over the capacity
    takes all of it, so such a job runs alone. Strict arrival order (a large cost is never
    overtaken by small ones, so it cannot starve). Safe across threads and event loops.
    ``in_use``/``holders``/``waiting`` say what it holds now (metrics).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.holders = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _grant(self, take: int) -> None:
        self.in_use += take
        self.holders += 1

    async def acquire(self, cost: int) -> int:
        """Wait for ``cost`` bytes (capped at the capacity); returns what to :meth:`release`."""
        take = max(0, min(cost, self.capacity))
        with self._lock:
            if not self._waiters and self.in_use + take <= self.capacity:
                self._grant(take)
                return take
            waiter = _Waiter(take, asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self.release(take)
            else:
                self._wake()  # the first in line left: the next one may fit now
            raise
        return take

    def release(self, take: int) -> None:
        """Give ``take`` bytes back (from any thread)."""
        with self._lock:
            self.in_use -= take
            self.holders -= 1
        self._wake()

    def _wake(self) -> None:
        ready: list[_Waiter] = []
        with self._lock:
            while self._waiters and self.in_use + self._waiters[0].take <= self.capacity:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self._grant(waiter.take)
                ready.append(waiter)
        for waiter in ready:
            try:
                waiter.future.get_loop().call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:  # its event loop is closed: nobody will use the grant
                self.release(waiter.take)


@dataclass(eq=False, slots=True)
class _Waiter:
    """One :meth:`MemoryBudget.acquire` waiting in line for ``take`` bytes."""

    take: int
    future: asyncio.Future[None]
    granted: bool = False  # set under the budget's lock when its bytes were given to it


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


DECODE_BUDGET = MemoryBudget(DECODE_BUDGET_BYTES)
"""Every image check and thumbnail of the process holds its estimated decode memory here."""

DOWNLOAD_BUDGET = MemoryBudget(DOWNLOAD_BUDGET_BYTES)
"""Every :func:`fetch_and_check` holds its body's bytes here until it returns."""

class LazyPool:
    """A small thread pool made on first use (no threads in a process that never needs it)."""

    def __init__(self, threads: int, prefix: str) -> None:
        self._threads, self._prefix = threads, prefix
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=self._prefix)
            return self._pool


_check_pool = LazyPool(CHECK_THREADS, "kontext-image")


async def run_budgeted(cost: int, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` on the check pool once ``cost`` bytes of :data:`DECODE_BUDGET`
    are free. The bytes are given back when ``fn`` ends, not when the caller stops waiting: a
    cancelled check that already runs keeps its share until its thread is done."""
    take = await DECODE_BUDGET.acquire(cost)
    try:
        work = _check_pool().submit(functools.partial(fn, *args, **kwargs))
    except BaseException:
        DECODE_BUDGET.release(take)
        raise
    work.add_done_callback(lambda _: DECODE_BUDGET.release(take))
    return await asyncio.wrap_future(work)
