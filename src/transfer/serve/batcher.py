"""Dynamic batching: images of concurrent requests share one model call.

A request is admitted with :meth:`Batcher.admit` (a :class:`Ticket`; refused with
:class:`Overloaded` when ``capacity`` requests are already in the server), decodes its
images, and hands them to :meth:`Ticket.submit`. One asyncio task forms batches: it takes
up to ``max_batch`` waiting images, and holds the first one for at most ``max_wait_s``
for more to arrive -- but only while admitted requests are still being read or decoded,
so a lone request never waits for company that is not coming. The images are stacked and
run in one dedicated thread (one call at a time: the model's own threads use the cores), so
the event loop keeps reading requests while a batch runs, and the next batch forms meanwhile.

A request that would wait longer than ``max_queue_s`` at the current service rate (requests
in the server over requests finished per second) is refused at admission; an image whose
request has waited longer than ``max_queue_s`` (since its body was read) when its batch forms is
answered with :class:`Overloaded` instead of being run (the server sheds load it cannot
serve in time, like Triton's queue policy), so under overload accepted requests keep a
bounded latency and the rest get 503 quickly.

A request whose client has gone (:meth:`Ticket.abandon`, called when the server sees the
connection close) loses its images that have not reached the model yet: they leave the
queue at once and their futures get :class:`ClientGone`, so a client that hangs up costs no
model call and no place in the queue. A batch that fails anywhere -- stacking its images,
the model call, splitting the answers, the ``on_batch`` callback -- answers each of its
images with :class:`BatchFailed`, and the batcher goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The server cannot take (or finish in time) this request; ``retry_after`` in whole seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ClientGone(Exception):
    """The request's client disconnected before this image reached the model: it was not run."""


class BatchFailed(Exception):
    """A batch failed at ``stage`` (a key of :attr:`STAGES`) with ``cause``;
    every image of the batch gets this (the traceback is logged once per batch)."""

    STAGES = {"stack": "stacking the batch's images", "model": "the model call",
              "answers": "splitting the model's answers", "on_batch": "recording the batch (on_batch)",
              "batching": "forming the batch"}

    def __init__(self, stage: str, cause: BaseException, size: int):
        self.stage, self.cause, self.size = stage, cause, size
        self.message = f"{self.STAGES[stage]} failed ({type(cause).__name__}) for a batch of {size} image(s)"
        super().__init__(self.message)


@dataclass
class Result:
    """One image's answer from the batcher."""

    probs: Any      # the model's answer for this image: ``predict(x)[0][i]``
    queue_s: float  # from submit until its batch started
    model_s: float  # the batch's model + head call
    batch_size: int


@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future
    submitted: float
    admitted: float
    ticket: "Ticket"


@dataclass
class BatchStats:
    """Handed to ``on_batch`` after every model call."""

    size: int
    seconds: float
    depth: int


class Ticket:
    """A request's place in the server from admission until its answer is sent."""

    def __init__(self, batcher: "Batcher"):
        self._b = batcher
        self.admitted = time.perf_counter()
        self._preparing = True
        self._open = True
        self._queued = 0  # this request's images in the queue (not yet taken into a batch)
        self.gone = False

    def submit(self, images: list[np.ndarray], since: float | None = None) -> list[asyncio.Future]:
        """Queue decoded images (uint8 (H, W, 3) each); one future of :class:`Result` per image.

        ``since`` (``time.perf_counter()``, default: admission) is when the request started
        waiting on the server: its body read, so a slow upload does not count as queueing.
        After :meth:`abandon`, nothing is queued: every future already holds :class:`ClientGone`.

        Raises:
            Overloaded: the images do not fit in the queue, or the server is stopping.
        """
        self._done_preparing()
        if self.gone:
            return [_failed(ClientGone("the client disconnected before the image was queued")) for _ in images]
        return self._b._enqueue(self, images, self.admitted if since is None else since)

    def abandon(self) -> int:
        """The client went away: drop this request's images that have not reached the model
        (their futures get :class:`ClientGone`) and queue nothing more for it. Images already in
        a running batch finish. Returns how many images were dropped now."""
        if self.gone:
            return 0
        self.gone = True
        return self._b._drop(self, ClientGone("the client disconnected before the image reached the model"))

    def _done_preparing(self):
        if self._preparing:
            self._preparing = False
            self._b._preparing -= 1
            self._b._wake.set()

    def close(self):
        """The answer is out (or the request ended otherwise): free its place. Images still queued
        (the handler was interrupted) are dropped, so nobody waits for them."""
        if self._open:
            self._done_preparing()
            self._open = False
            if self._queued:
                self._b._drop(self, ClientGone("the request ended before the image reached the model"))
            self._b._in_flight -= 1
            self._b._done.append(time.perf_counter())

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _failed(exc: BaseException) -> asyncio.Future:
    f = asyncio.get_running_loop().create_future()
    f.set_exception(exc)
    return f


class Batcher:
    """Groups images into batches for ``predict(x) -> (answers, seconds)`` (x: ``stack(images)``).

    Args:
        predict: one model call and one head call on a batch (runs in the model thread);
            ``answers[i]`` is the answer for image ``i``.
        max_batch: most images per call.
        max_wait_s: longest the oldest waiting image is held for the batch to fill.
        capacity: most requests in the server, and most images waiting for the model.
        max_queue_s: an image whose request has waited longer than this (since it was read)
            when its batch forms gets :class:`Overloaded` (``None``: no limit).
        on_batch: called with :class:`BatchStats` after each model call, before the answers
            are handed out (metrics).
        stack: the images of a batch -> the model's input (runs in the model thread, before
            ``predict``); default :func:`numpy.stack`.

    Example::

        b = Batcher(model.predict, max_batch=32, max_wait_s=0.005, capacity=256)
        b.start()
        with b.admit() as ticket:
            results = await asyncio.gather(*ticket.submit([pixels]))
        await b.stop()
    """

    def __init__(self, predict: Callable[[np.ndarray], tuple[Sequence, float]], *, max_batch: int,
                 max_wait_s: float, capacity: int, max_queue_s: float | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 stack: Callable[[list[np.ndarray]], np.ndarray] = np.stack):
        self._predict = predict
        self._stack = stack
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.max_queue_s = max_queue_s
        self._on_batch = on_batch
        self._q: deque[_Job] = deque()
        self._in_flight = 0
        self._preparing = 0
        self._closing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="transfer-model")
        self._s_per_image = 0.0  # running estimate, for Retry-After
        self._done: deque[float] = deque(maxlen=256)  # when the last requests finished: the service rate
        self._running: list[_Job] = []  # the batch in the model thread
        self.stopped_by: str | None = None  # why the batching task ended early (it should never)

    # -- what the app sees -------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Images waiting for the model."""
        return len(self._q)

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet answered."""
        return self._in_flight

    @property
    def model_thread(self) -> ThreadPoolExecutor:
        """The one thread model calls run in (the warm-up uses it too)."""
        return self._pool

    def retry_after(self) -> int:
        """Whole seconds until the current queue should have drained (at least 1)."""
        return max(1, min(60, math.ceil(len(self._q) * self._s_per_image)))

    def expected_wait(self) -> float:
        """Seconds a request admitted now would take, by Little's law: requests in the server
        over the rate at which requests finished lately (0 while fewer than ``max_batch``
        requests are in the server, or too few finished to tell a rate)."""
        n = self._in_flight
        if n < self.max_batch or len(self._done) < 32:
            return 0.0
        now = time.perf_counter()
        window = now - self._done[0]
        if window <= 0 or now - self._done[-1] > 1.0:  # no recent completions: no current rate
            return 0.0
        return n / (len(self._done) / window)

    def admit(self) -> Ticket:
        """A ticket for one request.

        Raises:
            Overloaded: ``capacity`` requests are in the server already, a new one would wait
                longer than ``max_queue_s`` at the current service rate, or it is stopping.
        """
        if self._closing:
            raise Overloaded("the server is shutting down" if self.stopped_by is None else
                             f"the server stopped batching ({self.stopped_by})", retry_after=1)
        if self._in_flight >= self.capacity:
            raise Overloaded(f"the server is full ({self._in_flight} requests in progress)", self.retry_after())
        wait = self.expected_wait()
        if self.max_queue_s is not None and wait > self.max_queue_s:
            raise Overloaded(f"the server is overloaded: a new request would wait about {1000 * wait:.0f} ms "
                             f"(limit {1000 * self.max_queue_s:.0f} ms)", max(1, math.ceil(wait)))
        self._in_flight += 1
        self._preparing += 1
        return Ticket(self)

    def _enqueue(self, ticket: Ticket, images: list[np.ndarray], admitted: float) -> list[asyncio.Future]:
        if self._closing:
            raise Overloaded("the server is shutting down", retry_after=1)
        if self._q and len(self._q) + len(images) > self.capacity:
            raise Overloaded(f"the queue is full ({len(self._q)} images waiting)", self.retry_after())
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futs = []
        for x in images:
            f = loop.create_future()
            self._q.append(_Job(x, f, now, admitted, ticket))
            futs.append(f)
        ticket._queued += len(images)
        self._wake.set()
        return futs

    def _drop(self, ticket: Ticket, exc: BaseException) -> int:
        """Take ``ticket``'s images out of the queue; their futures get ``exc``. Returns how many."""
        if not ticket._queued:
            return 0
        keep: deque[_Job] = deque()
        dropped = 0
        for j in self._q:
            if j.ticket is ticket:
                dropped += 1
                if not j.future.done():
                    j.future.set_exception(exc)
            else:
                keep.append(j)
        self._q = keep
        ticket._queued = 0
        return dropped

    # -- the batching task -------------------------------------------------------------
    def start(self) -> None:
        """Start forming batches (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="transfer-batcher")
            self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Refuse new work, finish every queued image, then stop the model thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    def _ended(self, task: asyncio.Task) -> None:
        """The batching task ended. Unless it was asked to stop, that is a bug: refuse new work
        (503) and fail what waits, instead of letting requests hang."""
        if self._closing and not task.cancelled() and task.exception() is None:
            return
        reason = "cancelled" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}"
        log.log(logging.WARNING if task.cancelled() else logging.CRITICAL,
                "the batching task ended unexpectedly (%s); new predictions get 503", reason)
        self.stopped_by = reason
        self._closing = True
        failed = BatchFailed("batching", RuntimeError(reason), len(self._q) + len(self._running))
        _fail(self._running, failed)
        while self._q:
            j = self._q.popleft()
            j.ticket._queued -= 1
            if not j.future.done():
                j.future.set_exception(failed)

    async def _run(self) -> None:
        while True:
            if not self._q:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs: list[_Job] = []
            try:
                await self._fill()
                jobs = self._take()
                if jobs:
                    await self._run_batch(jobs)
            except Exception as exc:  # a bug in forming the batch: fail what was taken, keep serving
                log.exception("forming a batch failed")
                self._running = []
                _fail(jobs, BatchFailed("batching", exc, len(jobs)))

    async def _fill(self) -> None:
        """Wait (bounded) while the batch is not full and more images are on their way."""
        deadline = self._q[0].submitted + self.max_wait_s
        while len(self._q) < self.max_batch and self._preparing > 0 and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                return
            if not self._q:  # every waiting image was dropped meanwhile (its client left)
                return

    def _take(self) -> list[_Job]:
        """Up to ``max_batch`` live jobs; abandoned ones are dropped, too-old ones shed."""
        jobs: list[_Job] = []
        now = time.perf_counter()
        while self._q and len(jobs) < self.max_batch:
            j = self._q.popleft()
            j.ticket._queued -= 1
            if j.future.done():  # answered already (its request ended)
                continue
            if self.max_queue_s is not None and now - j.admitted > self.max_queue_s:
                j.future.set_exception(Overloaded(
                    f"the request waited {1000 * (now - j.admitted):.0f} ms, longer than the server's "
                    f"{1000 * self.max_queue_s:.0f} ms limit, before the model was free", self.retry_after()))
                continue
            jobs.append(j)
        return jobs

    def _call(self, images: list[np.ndarray]) -> tuple[Sequence, float]:
        """Stack and predict (in the model thread); a failure names its stage."""
        try:
            x = self._stack(images)
        except Exception as exc:
            raise BatchFailed("stack", exc, len(images)) from exc
        try:
            return self._predict(x)
        except Exception as exc:
            raise BatchFailed("model", exc, len(images)) from exc

    async def _run_batch(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        n = len(jobs)
        self._running = jobs
        try:
            out, seconds = await loop.run_in_executor(self._pool, self._call, [j.x for j in jobs])
            stage = "answers"
            try:
                if len(out) != n:
                    raise ValueError(f"the model answered {len(out)} rows for {n} images")
                results = [Result(out[i], start - j.submitted, seconds, n) for i, j in enumerate(jobs)]
                stage = "on_batch"
                if self._on_batch is not None:
                    self._on_batch(BatchStats(n, seconds, len(self._q)))
            except Exception as exc:
                raise BatchFailed(stage, exc, n) from exc
        except BatchFailed as exc:  # every image of the batch gets the error; the next batch runs
            log.error("%s", exc.message, exc_info=exc.cause)
            self._running = []
            _fail(jobs, exc)
            return
        self._running = []  # (left set if the task is cancelled mid-batch: _ended fails them)
        per = seconds / n
        self._s_per_image = per if self._s_per_image == 0 else 0.9 * self._s_per_image + 0.1 * per
        for j, r in zip(jobs, results):
            if not j.future.done():
                j.future.set_result(r)


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(exc)


__all__ = ["Batcher", "Ticket", "Result", "Overloaded", "ClientGone", "BatchFailed", "BatchStats"]
