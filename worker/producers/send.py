"""The one send path: every message styletag publishes (bulk chunks, uploads, their retries, the nightly
chunks) goes through :class:`Sender`, with one retry policy and one error for an unreachable broker.

Messages go to the broker named by the settings passed in (not to whatever the Celery app was configured
with at import), by task *name*, so a producer never imports the worker's task code.
"""

from __future__ import annotations

from collections.abc import Callable

from catalog.errors import ServiceUnavailable
from catalog.settings import Settings, redact_url

TAG_PRODUCTS = "styletag.tag_products"
TAG_UPLOADS = "styletag.tag_uploads"
# A broker that does not answer within about 3 s (0.5 + 1 + 1.5) is reported, not waited for forever.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 2.0}


class Sender:
    """``with Sender(settings) as send: send(TAG_PRODUCTS, (run_id, ids), queue="bulk")``.

    One broker connection and producer for the whole block. ``before_send`` runs before every message
    (the nightly producer refreshes its lock there)."""

    def __init__(self, settings: Settings, before_send: Callable[[], None] | None = None):
        self.settings = settings
        self.before_send = before_send
        self._conn = None
        self._producer_cm = None
        self._producer = None

    def __enter__(self) -> Sender:
        from kombu.exceptions import OperationalError

        from worker.app import app, broker_connection

        self._conn = broker_connection(self.settings)
        try:
            self._producer_cm = app.producer_or_acquire(self._conn.Producer())
            self._producer = self._producer_cm.__enter__()
        except OperationalError as exc:
            self._conn.release()
            raise self._unreachable(exc) from None
        return self

    def _unreachable(self, exc: BaseException) -> ServiceUnavailable:
        detail = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        return ServiceUnavailable(f"cannot reach the broker at {redact_url(self.settings.broker_url)}: {detail}")

    def __exit__(self, *exc) -> None:
        try:
            if self._producer_cm is not None:
                self._producer_cm.__exit__(*exc)
        finally:
            if self._conn is not None:
                self._conn.release()

    def __call__(self, task: str, args: tuple = (), kwargs: dict | None = None, *, queue: str,
                 countdown: float | None = None) -> None:
        from kombu.exceptions import OperationalError

        from worker.app import app

        if self.before_send is not None:
            self.before_send()
        try:
            app.send_task(task, args=args, kwargs=kwargs or {}, queue=queue, countdown=countdown,
                          producer=self._producer, retry=True, retry_policy=RETRY_POLICY)
        except OperationalError as exc:
            raise self._unreachable(exc) from None


def send_one(settings: Settings, task: str, args: tuple = (), kwargs: dict | None = None, *, queue: str,
             countdown: float | None = None) -> None:
    """One message, through its own :class:`Sender`."""
    with Sender(settings) as send:
        send(task, args, kwargs, queue=queue, countdown=countdown)
