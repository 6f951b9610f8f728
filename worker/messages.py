"""What a message may hold, checked before any work: the broker's envelope of every item a worker takes
off a queue, the body of every task message, and the ids and run ids of the tasks' arguments.

Three depths, outermost first:

1. The transport (:class:`GuardedRedisTransport`, :class:`GuardedSentinelTransport`, registered for
   ``redis://``, ``rediss://`` and ``sentinel://`` in ``worker/app.py``). kombu's Redis channel pops an
   item off the list and decodes it in the consumer's event loop; an item that is not JSON
   (``lpush bulk '{{{'``), or JSON that is not a kombu envelope (``lpush bulk '[1,2,3]'``), raised out of
   that loop and stopped the Celery process for good ("Unrecoverable error"). Here such an item is
   *dead-lettered*: its raw text (cut to ``DEAD_LETTER_BODY_MAX`` characters) goes to the Redis list
   ``styletag:dead-letter`` (the newest ``DEAD_LETTER_MAX`` kept), the count per queue and reason to the
   hash ``styletag:dead-letter:counts`` (exported by ``styletag metrics`` as
   ``styletag_messages_dead_lettered_total``), one error line is logged, and the consumer goes on.
2. The task body (:func:`guard_strategy`): Celery builds a request from the body before any task code
   runs, and an exception there (a body that is not [args, kwargs, embed]) stopped the worker too. Such
   a message is an invalid task: logged, dead-lettered and counted the same way, rejected without
   requeue.
3. The arguments (:func:`validate_ids`, :func:`validate_run_id`), checked by the tasks themselves.
"""

from __future__ import annotations

import json
import logging
import time

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.app import MAX_IDS_PER_TASK

log = logging.getLogger("styletag.messages")

DEAD_LETTER_KEY = "styletag:dead-letter"
DEAD_LETTER_COUNTS_KEY = "styletag:dead-letter:counts"
DEAD_LETTER_MAX = 1000  # entries kept in the list (newest first)
DEAD_LETTER_BODY_MAX = 65536  # characters of a raw item kept in its entry
DEAD_LETTER_REASONS = ("not_utf8", "not_json", "not_an_envelope", "bad_body", "malformed_task")


class InvalidMessage(ValueError):
    pass


class MalformedEnvelope(ValueError):
    """A broker item that no consumer can take: ``reason`` is one of DEAD_LETTER_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _shown(value, limit: int = 80) -> str:
    from worker.ops.logs import shown

    return shown(value, limit)


# --- 3. arguments --------------------------------------------------------------------------------------


def validate_ids(product_ids, *, limit: int = MAX_IDS_PER_TASK) -> list[int]:
    """Ids must be a list of positive ints, bounded in length; anything else is refused unexecuted."""
    if not isinstance(product_ids, list):
        raise InvalidMessage(f"product_ids must be a list, got {type(product_ids).__name__}")
    if len(product_ids) > limit:
        raise InvalidMessage(f"{len(product_ids)} ids in one message, over the limit of {limit}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in product_ids):
        raise InvalidMessage("product_ids must hold positive 64-bit integers only")
    return list(dict.fromkeys(product_ids))


MAX_IDS_PER_UPLOAD = 64  # ids one upload message may carry (enqueue_upload_ids sends a burst in such messages)


def upload_ids(args, kwargs: dict) -> list[int]:
    """The product ids of an upload message: ``(id,)`` (one upload; what every styletag sends for one) or
    ``([id, ...],)`` with at most :data:`MAX_IDS_PER_UPLOAD` (a burst enqueued in one call); or the same
    under ``product_id``. InvalidMessage for anything else."""
    value = args[0] if args else kwargs.get("product_id")
    ids = validate_ids(value if isinstance(value, list) else [value], limit=MAX_IDS_PER_UPLOAD)
    if not ids:
        raise InvalidMessage("an upload message must name at least one product id")
    return ids


def validate_run_id(run_id) -> int | None:
    if run_id is None or (isinstance(run_id, int) and not isinstance(run_id, bool) and 0 < run_id < 2**63):
        return run_id
    raise InvalidMessage(f"run_id must be a positive integer or null, got {_shown(run_id, 60)}")


# --- 1. the broker's envelope ----------------------------------------------------------------------------


def check_envelope(payload) -> None:
    """The fields kombu's virtual transport and its Redis QoS read from an item, with the types they need
    (``Message.__init__``, ``QoS.append``, the priority lookup, Celery's ``headers['task']``)."""
    if not isinstance(payload, dict):
        raise MalformedEnvelope("not_an_envelope", f"a JSON {type(payload).__name__}, not an object")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise MalformedEnvelope("not_an_envelope", "no 'properties' object")
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise MalformedEnvelope("not_an_envelope", "no delivery_tag string")
    info = props.get("delivery_info")
    if not (isinstance(info, dict) and isinstance(info.get("exchange"), str)
            and isinstance(info.get("routing_key"), str)):
        raise MalformedEnvelope("not_an_envelope", "no delivery_info with exchange and routing_key")
    if "priority" in props and not (isinstance(props["priority"], int) and not isinstance(props["priority"], bool)):
        raise MalformedEnvelope("not_an_envelope", "priority is not an integer")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise MalformedEnvelope("not_an_envelope", "headers is not an object")
    if isinstance(headers, dict) and "task" in headers and not isinstance(headers["task"], str):
        raise MalformedEnvelope("not_an_envelope", "headers.task is not a string")
    for key in ("body", "content-type", "content-encoding"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise MalformedEnvelope("not_an_envelope", f"{key} is not a string")
    encoding = props.get("body_encoding")
    if encoding is not None and not isinstance(encoding, str):
        raise MalformedEnvelope("not_an_envelope", "body_encoding is not a string")


def decode_envelope(raw, channel=None) -> dict:
    """The envelope in ``raw`` (bytes off the list), checked; :class:`MalformedEnvelope` otherwise. With a
    ``channel``, the body is decoded once as the consumer will (base64), so that a bad body fails here."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else bytes_to_str(raw)
    except UnicodeDecodeError as exc:
        raise MalformedEnvelope("not_utf8", str(exc)) from None
    try:
        payload = loads(text)
    except Exception as exc:  # noqa: BLE001 - json's errors and the object hook's
        raise MalformedEnvelope("not_json", f"{exc.__class__.__name__}: {exc}") from None
    check_envelope(payload)
    if channel is not None:
        try:
            channel.Message(payload, channel=channel)
        except Exception as exc:  # noqa: BLE001 - base64 errors, unknown body encodings
            raise MalformedEnvelope("bad_body", f"{exc.__class__.__name__}: {exc}") from None
    return payload


def dead_letter(client, queue: str, raw, reason: str, detail: str) -> None:
    """Keep a malformed item for the operator (bounded list) and count it, through redis-py ``client``."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
    entry = json.dumps({"queue": queue, "reason": reason, "detail": detail[:300], "at": round(time.time(), 3),
                        "chars": len(text), "body": text[:DEAD_LETTER_BODY_MAX]}, ensure_ascii=False)
    with client.pipeline() as pipe:
        pipe.lpush(DEAD_LETTER_KEY, entry)
        pipe.ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1)
        pipe.hincrby(DEAD_LETTER_COUNTS_KEY, f"{queue}:{reason}", 1)
        pipe.execute()


def dead_letter_counts(client) -> dict[tuple[str, str], int]:
    """(queue, reason) -> items dead-lettered so far (what the exporter publishes)."""
    out = {}
    for field, n in client.hgetall(DEAD_LETTER_COUNTS_KEY).items():
        queue, _, reason = bytes_to_str(field).rpartition(":")
        out[(queue, reason)] = int(n)
    return out


class GuardedChannelMixin:
    """kombu's Redis channel, with every item checked (:func:`decode_envelope`) before it is delivered.

    ``_brpop_read`` and ``_get`` are kombu's own (kombu 5.x), with the one line that decoded and
    delivered the item replaced by :meth:`_checked`; tests/worker/test_malformed_items.py pushes raw
    items into Redis under a real worker, so a kombu upgrade that changes them is noticed."""

    def _checked(self, raw, queue: str) -> dict | None:
        try:
            return decode_envelope(raw, channel=self)
        except MalformedEnvelope as exc:
            self._dead_letter(queue, raw, exc.reason, exc.detail)
            return None

    def _dead_letter(self, queue: str, raw, reason: str, detail: str) -> None:
        from worker.ops.logs import bound

        size = len(raw) if raw is not None else 0
        try:
            with self.conn_or_acquire() as client:
                dead_letter(client, queue, raw, reason, detail)
            kept = f"kept in the Redis list {DEAD_LETTER_KEY}"
        except Exception as exc:  # noqa: BLE001 - the broker went away meanwhile: still drop, still say so
            kept = f"NOT kept ({exc.__class__.__name__}: {bound(str(exc), 120)})"
        log.error("dropped a malformed item from queue %s (%s: %s); its %d bytes are %s", queue, reason,
                  bound(detail, 200), size, kept)

    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # a lost connection: disconnect so that the next iteration reconnects (as kombu does)
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._checked(item, dest)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush is not None:
                flush()

    def _get(self, queue):
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._update_expiry(client, queue)
                    payload = self._checked(item, queue)
                    if payload is None:
                        raise kombu_redis.Empty()
                    return payload
            self._update_expiry(client, queue)
            raise kombu_redis.Empty()

    def _update_expiry(self, client, queue) -> None:
        update = getattr(self, "_maybe_update_queues_expire", None)  # kombu >= 5.3
        if update is not None:
            update(client, queue)

    def _deliver_fanout_message(self, message, exchange):
        """Broadcasts (``celery inspect``, remote control) arrive decoded already: check the envelope."""
        try:
            check_envelope(message)
            self.Message(message, channel=self)
        except Exception as exc:  # noqa: BLE001 - MalformedEnvelope, or a body kombu cannot decode
            reason = exc.reason if isinstance(exc, MalformedEnvelope) else "bad_body"
            self._dead_letter(f"fanout:{exchange}", dumps(message), reason, str(exc))
            return True
        return super()._deliver_fanout_message(message, exchange)


class GuardedRedisChannel(GuardedChannelMixin, kombu_redis.Channel):
    pass


class GuardedSentinelChannel(GuardedChannelMixin, kombu_redis.SentinelChannel):
    pass


class GuardedRedisTransport(kombu_redis.Transport):
    Channel = GuardedRedisChannel


class GuardedSentinelTransport(kombu_redis.SentinelTransport):
    Channel = GuardedSentinelChannel


# --- 2. the task body -------------------------------------------------------------------------------------


def _check_body(message) -> None:
    from celery.exceptions import InvalidTaskError

    payload = message.payload  # decodes; a disallowed content type (pickle) raises ContentDisallowed here
    if not (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and (payload[2] is None or isinstance(payload[2], dict))):
        raise InvalidTaskError(f"malformed task body ({type(payload).__name__}); expected [args, kwargs, embed]")


def _dead_letter_task(message, exc: BaseException) -> None:
    """A task message Celery will reject as invalid: keep and count it like a malformed item."""
    channel = getattr(message, "channel", None)
    if not isinstance(channel, GuardedChannelMixin):
        return
    info = getattr(message, "delivery_info", None) or {}
    queue = str(info.get("routing_key") or "?")
    raw = getattr(message, "_raw", None)
    channel._dead_letter(queue, dumps(raw) if raw is not None else "", "malformed_task", str(exc))


def guard_strategy(task) -> None:
    """Wrap ``task``'s message handler (in the worker's consumer) with :func:`_check_body`."""
    from celery.exceptions import InvalidTaskError
    from kombu.exceptions import ContentDisallowed, DecodeError

    start = task.start_strategy

    def start_strategy(app, consumer, **kwargs):
        handler = start(app, consumer, **kwargs)

        def guarded(message, body, *args, **kw):
            try:
                if body is None:  # protocol 2 (the only one we send): check before Celery unpacks it
                    _check_body(message)
                return handler(message, body, *args, **kw)
            except (InvalidTaskError, ContentDisallowed, DecodeError) as exc:
                _dead_letter_task(message, exc)
                raise
            except Exception as exc:  # noqa: BLE001 - anything else here would stop the worker
                err = InvalidTaskError(f"malformed task message: {_shown(exc, 300)}")
                _dead_letter_task(message, err)
                raise err from exc

        return guarded

    task.start_strategy = start_strategy


def enqueued_at(kwargs: dict) -> float | None:
    """The producer's ``enqueued_at`` (``time.time()``) of an upload message, if it is a plausible one."""
    value = kwargs.get("enqueued_at")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e11:
        return float(value)
    return None
