"""Dynamic micro-batching and the generation queue, both in front of ONE inference thread.

The event loop never runs the model: it parses requests, queues their texts and awaits futures. A collector task
takes up to `max_batch_size` queued texts - waiting at most `max_wait_ms` after the oldest one arrived (and after
the model became free) for more to come - and runs them as one call on the inference thread; while that runs, the next batch queues up. A request
may be split over several batches and a batch may hold many requests; answers are scattered back by position,
so every request gets its own answers in its own order.

Limits: more than `max_queue` texts waiting -> 429 at once (QueueFull). A request not answered within
`timeout_s` -> 504 (Timeout); its texts not yet handed to a batch are dropped, so it costs no model time. A
request whose client went away is dropped the same way.

Generation runs one request at a time on the same thread (GenerationQueue); a running generation is stopped by
its cancel flag (time limit, client gone) through the model's stopping criterion (backend._Watch).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ApiError, QueueFull, ShuttingDown, Timeout

log = logging.getLogger("sftlab.serve")


@dataclass(eq=False)
class _Job:
    items: list
    future: asyncio.Future
    deadline: float
    arrived: float
    results: list = field(default_factory=list)
    taken: int = 0  # items handed to a batch so far (they are taken in order)
    answered: int = 0
    dropped: bool = False


class MicroBatcher:
    """`await submit(items)` -> `run(items)`'s answers for these items, computed in batches with other requests'."""

    def __init__(self, run: Callable[[list], list], executor: concurrent.futures.Executor, *, max_batch_size: int,
                 max_wait_ms: float, max_queue: int, timeout_s: float, metrics=None):
        self.run, self.executor, self.metrics = run, executor, metrics
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # items waiting in live jobs
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._free_since = 0.0  # when the model last finished a batch (time.monotonic())

    @property
    def queue_depth(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="sftlab-batcher")

    async def stop(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown())

    async def submit(self, items: list) -> list:
        if self._closed:
            raise ShuttingDown()
        if self._queued + len(items) > self.max_queue:
            raise QueueFull(f"{self._queued} texts are waiting and this request adds {len(items)} "
                            f"(--max-queue {self.max_queue})")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(items, loop.create_future(), now + self.timeout_s, now, [None] * len(items))
        self._jobs.append(job)
        self._queued += len(items)
        self._wake.set()
        try:
            return await asyncio.wait_for(job.future, self.timeout_s)
        except TimeoutError:
            raise Timeout(self.timeout_s) from None
        finally:  # answered, timed out, or the client went away (CancelledError): untaken items leave the queue
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        if not job.dropped:
            job.dropped = True
            self._queued -= len(job.items) - job.taken

    def _head(self) -> _Job | None:
        now = time.monotonic()
        while self._jobs:
            job = self._jobs[0]
            if job.dropped or job.future.done() or job.taken == len(job.items):
                self._jobs.popleft()
            elif now > job.deadline:  # its waiter times out any moment; do not spend model time on it
                self._drop(job)
                self._jobs.popleft()
            else:
                return job
        return None

    def _take(self) -> list[tuple[_Job, int]]:
        batch: list[tuple[_Job, int]] = []
        while len(batch) < self.max_batch_size and (job := self._head()) is not None:
            n = min(self.max_batch_size - len(batch), len(job.items) - job.taken)
            batch += [(job, i) for i in range(job.taken, job.taken + n)]
            job.taken += n
            self._queued -= n
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            head = self._head()
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Fill the batch: wait for more texts until it is full or max_wait has passed since the oldest text
            # arrived AND since the model became free. The second clock matters under load: the clients whose
            # answers just went out send their next requests within a few ms; without it every batch would hold
            # only what arrived while the previous one ran (half the clients: measured 16 of 32, 7.0 ms CPU per
            # text instead of 5.8 at 32).
            while self._queued < self.max_batch_size:
                left = max(head.arrived, self._free_since) + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            items = [job.items[i] for job, i in batch]
            t0 = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.executor, self.run, items)
            except Exception as e:  # noqa: BLE001 - a model failure fails these requests, not the server
                self._free_since = time.monotonic()
                await self._one_by_one(batch, e)
                continue
            self._free_since = time.monotonic()
            if self.metrics:
                self.metrics.batch_size.observe(len(items))
                self.metrics.inference.labels(kind="classify").observe(time.perf_counter() - t0)
            for (job, i), answer in zip(batch, answers):
                self._answer(job, [i], [answer])


    async def _one_by_one(self, batch: list[tuple[_Job, int]], error: Exception) -> None:
        """A failed batch is run again request by request, so only the request that fails alone gets an error:
        one bad text never fails its batch-mates (validation in app.py should have stopped it already)."""
        loop = asyncio.get_running_loop()
        groups: dict[int, tuple[_Job, list[int]]] = {}
        for job, i in batch:
            groups.setdefault(id(job), (job, []))[1].append(i)
        for job, idx in groups.values():
            if job.future.done():
                continue
            if len(groups) > 1:
                try:
                    answers = await loop.run_in_executor(self.executor, self.run, [job.items[i] for i in idx])
                except Exception as e:  # noqa: BLE001
                    error = e
                else:
                    self._answer(job, idx, answers)
                    continue
            log.error("inference failed on a request of %d texts: %r", len(job.items), error)
            job.future.set_exception(error if isinstance(error, ApiError) else ApiError(
                500, f"inference failed: {type(error).__name__}", "internal_error"))
        self._free_since = time.monotonic()

    @staticmethod
    def _answer(job: _Job, idx: list[int], answers: list) -> None:
        for i, answer in zip(idx, answers):
            job.results[i] = answer
            job.answered += 1
        if job.answered == len(job.items) and not job.future.done():
            job.future.set_result(job.results)


class GenHandle:
    """One generation on the inference thread: its cancel flag, deadline and (asyncio) future."""

    def __init__(self, future: asyncio.Future, cf: concurrent.futures.Future, cancel: threading.Event,
                 deadline: float, timeout_s: float):
        self.future, self._cf, self.cancel_event, self.deadline, self.timeout_s = future, cf, cancel, deadline, \
            timeout_s

    def cancel(self) -> None:
        """Stop it: dropped if not started yet, else it ends after the current token."""
        self.cancel_event.set()
        self._cf.cancel()

    async def result(self) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self.future), max(self.deadline - time.monotonic(), 0))
        except TimeoutError:
            self.cancel()
            raise Timeout(self.timeout_s) from None
        except asyncio.CancelledError:  # the client went away
            self.cancel()
            raise


class GenerationQueue:
    """Generation requests run one at a time (FIFO); at most `max_queue` waiting or running, more -> 429."""

    def __init__(self, executor: concurrent.futures.Executor, *, max_queue: int, timeout_s: float):
        self.executor, self.max_queue, self.timeout_s = executor, max_queue, timeout_s
        self.depth = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any]) -> GenHandle:
        """Queue `fn(cancel=Event, deadline=monotonic seconds)`; it must return soon after either fires."""
        if self._closed:
            raise ShuttingDown()
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} generation requests are queued or running (--max-queue-generate "
                            f"{self.max_queue})")
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        deadline = time.monotonic() + self.timeout_s
        self.depth += 1
        cf = self.executor.submit(fn, cancel=cancel, deadline=deadline)
        cf.add_done_callback(lambda _: _call_soon(loop, self._finished))
        return GenHandle(asyncio.wrap_future(cf, loop=loop), cf, cancel, deadline, self.timeout_s)

    def _finished(self) -> None:
        self.depth -= 1

    def stop(self) -> None:
        self._closed = True


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
    """From the inference thread; a no-op once the loop is gone (shutdown)."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        pass
