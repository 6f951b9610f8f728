"""What a message may hold, checked before any work: ids and run ids of the tasks' arguments, and the body
of every message a worker consumes.

Celery builds a request from a message's body before any task code runs, and lets an exception there
(a body that is not [args, kwargs, embed]: a string, a number, a short list) stop the whole worker,
which then meets the same message again after a restart. Every task's strategy is wrapped
(:func:`guard_strategy`) so that such a message is an invalid task instead: logged, rejected without
requeue, the worker keeps serving.
"""

from __future__ import annotations

from worker.app import MAX_IDS_PER_TASK


class InvalidMessage(ValueError):
    pass


def validate_ids(product_ids, *, limit: int = MAX_IDS_PER_TASK) -> list[int]:
    """Ids must be a list of positive ints, bounded in length; anything else is refused unexecuted."""
    if not isinstance(product_ids, list):
        raise InvalidMessage(f"product_ids must be a list, got {type(product_ids).__name__}")
    if len(product_ids) > limit:
        raise InvalidMessage(f"{len(product_ids)} ids in one message, over the limit of {limit}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in product_ids):
        raise InvalidMessage("product_ids must hold positive 64-bit integers only")
    return list(dict.fromkeys(product_ids))


def validate_run_id(run_id) -> int | None:
    if run_id is None or (isinstance(run_id, int) and not isinstance(run_id, bool) and run_id > 0):
        return run_id
    raise InvalidMessage(f"run_id must be a positive integer or null, got {repr(run_id)[:60]}")


def _check_body(message) -> None:
    from celery.exceptions import InvalidTaskError

    payload = message.payload  # decodes; a disallowed content type (pickle) raises ContentDisallowed here
    if not (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and (payload[2] is None or isinstance(payload[2], dict))):
        raise InvalidTaskError(f"malformed task body ({type(payload).__name__}); expected [args, kwargs, embed]")


def guard_strategy(task) -> None:
    """Wrap ``task``'s message handler (in the worker's consumer) with :func:`_check_body`."""
    from celery.exceptions import InvalidTaskError
    from kombu.exceptions import ContentDisallowed, DecodeError

    start = task.start_strategy

    def start_strategy(app, consumer, **kwargs):
        handler = start(app, consumer, **kwargs)

        def guarded(message, body, *args, **kw):
            if body is None:  # protocol 2 (the only one we send): check before Celery unpacks it
                _check_body(message)
            try:
                return handler(message, body, *args, **kw)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise
            except Exception as exc:  # noqa: BLE001 - anything else here would stop the worker
                raise InvalidTaskError(f"malformed task message: {exc!r}"[:300]) from exc

        return guarded

    task.start_strategy = start_strategy
