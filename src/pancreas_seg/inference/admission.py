"""Bounded concurrency for the served model: at most N requests segment at once, at most Q wait.

A request is *admitted* (:meth:`Admission.admit`) before it is read, and holds its :class:`Ticket`
until it is answered. At most ``max_in_flight + max_queue`` tickets exist at once: one more is
refused at once (:class:`Overloaded`, HTTP 503 with ``Retry-After``). A ticket then waits for one of
``max_in_flight`` slots (:meth:`Ticket.slot`) at most ``queue_timeout_s`` (then :class:`Overloaded`
too) and segments while it holds the slot. Everything uses ``threading`` primitives: MLflow's
scoring server runs each request's ``predict`` in a worker thread (``asyncio.to_thread``).

In the scoring server, a request that finds admission full first waits in a :class:`WaitingRoom`
(first come, first served, its body unread; at most ``max_waiting`` of them, at most
``queue_timeout_s`` each), so a client that retries the moment it is answered cannot overtake
clients that waited.

The deadline of a ticket (``request_timeout_s`` after admission) is checked with
:meth:`Ticket.check_deadline` between stages (:class:`DeadlineExceeded`, HTTP 504).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Overloaded(RuntimeError):
    """The server is at capacity; try again after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RuntimeError):
    """A request used up its time budget (``request_timeout_s``)."""


class Admission:
    """Counts admitted requests and hands out the segmentation slots.

    Args:
        max_in_flight: requests segmented at once (>= 1).
        max_queue: admitted requests that may wait for a slot (>= 0).
        queue_timeout_s: longest wait for a slot, s.
        request_timeout_s: a request's time budget from admission, s.
        retry_after_s: what :class:`Overloaded` tells the client to wait, s.
    """

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float, request_timeout_s: float,
                 retry_after_s: int) -> None:
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError(f"admission: max_in_flight >= 1 and max_queue >= 0, got {max_in_flight}, {max_queue}")
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.queue_timeout_s, self.request_timeout_s = queue_timeout_s, request_timeout_s
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet answered (in flight or waiting)."""
        return self._admitted

    def admit(self) -> Ticket:
        """A ticket for one request, or :class:`Overloaded` when ``max_in_flight + max_queue`` are admitted."""
        with self._lock:
            if self._admitted >= self.max_in_flight + self.max_queue:
                raise Overloaded(f"the server is busy ({self.max_in_flight} request(s) segmenting, "
                                 f"{self.max_queue} waiting); retry after {self.retry_after_s} s",
                                 self.retry_after_s)
            self._admitted += 1
        return Ticket(self, time.monotonic() + self.request_timeout_s)

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1


class Ticket:
    """One admitted request; :meth:`release` (idempotent) when it is answered."""

    def __init__(self, admission: Admission, deadline: float) -> None:
        self.admission, self.deadline = admission, deadline
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Leave the admitted count (once; later calls do nothing)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.admission._leave()

    def check_deadline(self, stage: str) -> None:
        """Raise :class:`DeadlineExceeded` when the request's time budget is spent (``stage`` names what is next)."""
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"the request ran out of time ({self.admission.request_timeout_s:g} s) "
                                   f"before {stage}")

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``max_in_flight`` slots; waits at most ``queue_timeout_s`` (and the deadline)."""
        wait = min(self.admission.queue_timeout_s, max(0.0, self.deadline - time.monotonic()))
        if not self.admission._slots.acquire(timeout=wait):
            self.check_deadline("segmenting")
            raise Overloaded(f"no segmentation slot became free within {wait:.3g} s; retry after "
                             f"{self.admission.retry_after_s} s", self.admission.retry_after_s)
        try:
            yield
        finally:
            self.admission._slots.release()


class WaitingRoom:
    """First come, first served admission for the scoring server's event loop.

    Args:
        max_waiting: requests that may wait at once; one more is refused (:class:`Overloaded`).
        wait_s: longest wait, s; then :class:`Overloaded`.
        poll_s: how often the oldest waiter retries admission, s.
    """

    def __init__(self, max_waiting: int, wait_s: float, poll_s: float = 0.05) -> None:
        self.max_waiting, self.wait_s, self.poll_s = max_waiting, wait_s, poll_s
        self._waiting: deque[object] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._waiting)

    async def admit(self, admission: Admission) -> Ticket:
        """A ticket from ``admission``; requests that came earlier get theirs first.

        Raises:
            Overloaded: the room is full, or no ticket came within ``wait_s``.
        """
        if not self._waiting:
            try:
                return admission.admit()
            except Overloaded:
                pass
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"the server is busy ({admission.max_in_flight} segmenting, {admission.max_queue} "
                             f"admitted, {len(self._waiting)} waiting); retry after {admission.retry_after_s} s",
                             admission.retry_after_s)
        place = object()
        self._waiting.append(place)
        deadline = time.monotonic() + self.wait_s
        try:
            while True:
                if self._waiting[0] is place:
                    try:
                        return admission.admit()
                    except Overloaded:
                        pass
                if time.monotonic() >= deadline:
                    raise Overloaded(f"no place became free within {self.wait_s:g} s; retry after "
                                     f"{admission.retry_after_s} s", admission.retry_after_s)
                await asyncio.sleep(self.poll_s)
        finally:
            self._waiting.remove(place)


CURRENT_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("pancreas_seg_serving_ticket",
                                                                              default=None)
"""The ticket the HTTP guard admitted the current request with (``asyncio.to_thread`` copies the
context into the worker thread that runs ``predict``); None when ``predict`` is called directly."""
