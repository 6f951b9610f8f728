"""The Celery app and all of its configuration, in one place.

Queue semantics (see DESIGN.md): JSON only, ack late and requeue when a worker dies, prefetch 1 for
bulk work, a visibility timeout longer than the longest task, time limits on every task, and two
queues: ``uploads`` (latency-sensitive, micro-batched) and ``bulk`` (nightly retag chunks).

The broker is Redis (``redis://``) or Redis behind Sentinel (``sentinel://h1:26379;sentinel://h2:26379``
with ``STYLETAG_BROKER_MASTER_NAME``). Nothing in styletag opens Redis from the URL by itself: the nightly
lock and the queue-depth exporter use the redis-py client of a kombu connection (``broker_connection``),
so whatever kombu supports, they support.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue
from kombu import transport as kombu_transport

from catalog.settings import Settings

BULK_QUEUE = "bulk"
UPLOADS_QUEUE = "uploads"

# Read once, when the app is built: the queue options below are fixed for the life of a worker process.
SETTINGS = Settings.from_env()

# The longest task (a bulk chunk) must finish well inside these; the broker's visibility timeout
# (after which an unacknowledged message is delivered again) is longer still.
BULK_SOFT_TIME_LIMIT = SETTINGS.task_soft_time_limit
BULK_TIME_LIMIT = SETTINGS.task_time_limit
VISIBILITY_TIMEOUT = SETTINGS.visibility_timeout
# kombu gives an unacknowledged message back to the queue only when a consumer sweeps for expired ones,
# by default every 10 s x 10 = 100 s whatever the timeout. Sweep at a fifth of the timeout (1 to 10 s),
# so that a killed worker's chunk is redelivered about one visibility timeout after it was taken.
UNACKED_RESTORE_INTERVAL = max(1, min(10, VISIBILITY_TIMEOUT // 5))

# Upload micro-batching: a burst becomes full batches; a lone upload waits at most the interval.
UPLOAD_FLUSH_EVERY = SETTINGS.upload_batch
UPLOAD_FLUSH_INTERVAL = SETTINGS.upload_interval

# A bulk message carries at most this many ids; larger ones are refused, never executed blindly.
MAX_IDS_PER_TASK = SETTINGS.max_ids_per_task


# Every Redis connection a styletag process opens uses kombu's Redis transport with each item checked before
# it is delivered (worker/messages.py): a malformed item is dead-lettered instead of stopping the consumer.
# Registered under the URL schemes themselves, so that it also holds after kombu fails over to another
# URL of a Sentinel list (which re-reads the transport from the scheme).
GUARDED_TRANSPORTS = {
    "redis": "worker.messages:GuardedRedisTransport",
    "rediss": "worker.messages:GuardedRedisTransport",
    "sentinel": "worker.messages:GuardedSentinelTransport",
}


def install_guarded_transports() -> None:
    for scheme, target in GUARDED_TRANSPORTS.items():
        kombu_transport.TRANSPORT_ALIASES[scheme] = target
        getattr(kombu_transport, "_transport_cache", {}).pop(scheme, None)  # resolved before this import


install_guarded_transports()


def task_queues() -> tuple[Queue, ...]:
    """Each queue bound to a direct exchange of its own name with its own name as routing key: a message
    published to exchange ``bulk`` / key ``bulk`` reaches ``bulk`` only (with one shared exchange and
    key, kombu's Redis transport delivered it to both queues)."""
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (UPLOADS_QUEUE, BULK_QUEUE))


def sentinel_options(settings: Settings) -> dict:
    """kombu transport options for a ``sentinel://`` broker URL (empty for any other URL): the name of
    the master the Sentinels monitor and, when the Sentinels want a password of their own, the
    keyword arguments of the connections to them."""
    if not settings.broker_url.startswith("sentinel://"):
        return {}
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # A Sentinel that does not answer is skipped at once for the next one in the URL (redis-py's
    # default retries each with back-off, ~4 s per dead Sentinel at every new connection).
    sentinel_kwargs: dict = {"socket_connect_timeout": 5, "socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}
    if settings.broker_sentinel_password:
        sentinel_kwargs["password"] = settings.broker_sentinel_password.get()
    return {"master_name": settings.broker_master_name, "sentinel_kwargs": sentinel_kwargs}


def broker_connection(settings: Settings, *, read: bool = False, **kwargs):
    """A kombu connection to ``settings``' broker (not to whatever the app was configured with at
    import), Sentinel options included. Every Redis client styletag uses comes from one of these."""
    kwargs["transport_options"] = {**(kwargs.get("transport_options") or {}), **sentinel_options(settings)}
    connect = app.connection_for_read if read else app.connection_for_write
    return connect(settings.broker_url, **kwargs)


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or SETTINGS
    app = Celery("styletag", broker=settings.broker_url, include=["worker.tasks", "worker.ops.beat"])
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=None,
        worker_send_task_events=False,
        task_queues=task_queues(),
        task_default_queue=BULK_QUEUE,
        task_default_exchange=BULK_QUEUE,
        task_default_routing_key=BULK_QUEUE,
        task_routes={
            "styletag.tag_products": {"queue": BULK_QUEUE},
            "styletag.tag_uploads": {"queue": UPLOADS_QUEUE},
        },
        task_soft_time_limit=BULK_SOFT_TIME_LIMIT,
        task_time_limit=BULK_TIME_LIMIT,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
            **sentinel_options(settings),
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_connection_max_retries=settings.broker_max_retries,
        timezone="UTC",
        enable_utc=True,
    )
    return app


app = make_app()


def remove_stale_bindings(settings: Settings) -> int:
    """Bindings an older styletag left in Redis, which bound ``uploads`` to exchange ``bulk`` with key ``bulk``
    (kombu keeps bindings in the broker, so new queue declarations alone do not remove them). Called by
    ``styletag worker`` before its consumers declare the queues; returns how many were removed."""
    removed = 0
    with broker_connection(settings, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)
        channel = conn.default_channel
        client, sep = channel.client, channel.sep
        ours = (UPLOADS_QUEUE, BULK_QUEUE)
        for exchange in ours:
            key = channel.keyprefix_queue % exchange
            for member in client.smembers(key):
                queue = (member.decode() if isinstance(member, bytes) else str(member)).split(sep)[-1]
                if queue in ours and queue != exchange:
                    removed += client.srem(key, member)
    return removed
