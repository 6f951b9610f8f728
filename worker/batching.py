"""Micro-batching of uploads: celery-batches with at most one batch in flight, and no wait when idle."""

from __future__ import annotations

import time

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.app import BULK_TIME_LIMIT


class CoalescingBatches(Batches):
    """celery-batches with at most one flushed batch in the pool at a time, dispatching at once when idle.

    Batches flushes its buffer every ``flush_interval`` and whenever ``flush_every`` requests came in.
    With one pool process, each flush made while a batch is still running queues another small batch
    behind it, so a burst of uploads was worked off as many batches of 5-60 (a burst ran at 0.49x the bulk
    rate); and a lone upload waited out the interval (p50 251 ms). Here:

    * an upload that arrives while nothing is in flight is dispatched at once (a batch of what is
      buffered, usually one);
    * while a batch is in flight, arrivals accumulate, and the batch's completion flushes them as one
      batch (up to the prefetch limit); the interval timer only matters when a completion is lost;
    * a batch whose completion never comes back (its pool process killed: ``error_callback``; or stuck
      past the hard time limit) does not block the queue.
    """

    _in_flight_since: float | None = None

    def Strategy(self, task, app, consumer):  # noqa: N802 - celery's name
        buffered = super().Strategy(task, app, consumer)

        def handle(message, body, ack, reject, callbacks, **kw):
            buffered(message, body, ack, reject, callbacks, **kw)
            if self._in_flight_since is None:  # idle: do not wait for the interval
                self._do_flush()

        return handle

    def _do_flush(self) -> None:
        since = self._in_flight_since
        if since is not None and time.monotonic() - since < BULK_TIME_LIMIT:
            return
        self._in_flight_since = None
        super()._do_flush()

    def flush(self, requests):
        acks_late = [r for r in requests if r.task.acks_late]
        acks_early = [r for r in requests if not r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in acks_early:
                req.acknowledge()

        def done() -> None:
            self._in_flight_since = None
            if self._buffer.qsize():
                self._do_flush()

        def on_return(result) -> None:
            for req in acks_late:
                req.acknowledge()
            done()

        def on_error(exc) -> None:  # the pool process was lost: the messages stay unacked (redelivered)
            done()

        self._in_flight_since = time.monotonic()
        return self._pool.apply_async(apply_batches_task, (self, serializable, 0, None),
                                      accept_callback=on_accepted, callback=on_return, error_callback=on_error)
