"""Upload messages: one id each for one upload, a few ids each for a burst enqueued in one call.

Publishing costs ~0.3 ms of CPU per message; 1,000 uploads enqueued in one call were 1,000 messages, a
quarter of the burst's time on the 2-core machine. Now they travel in messages of up to
``min(MAX_IDS_PER_UPLOAD, STYLETAG_UPLOAD_BATCH)`` ids (checked here on a private Redis, nothing consuming),
and the worker takes both forms and refuses anything else in one line (a real worker tags a burst of 200 in
``test_celery_worker.py::test_burst_of_uploads_is_micro_batched``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
import redis

from worker.messages import MAX_IDS_PER_UPLOAD, InvalidMessage, upload_ids


def _bodies(client: redis.Redis, queue: str) -> list:
    out = []
    for raw in client.lrange(queue, 0, -1)[::-1]:  # LPUSH: the oldest last
        env = json.loads(raw)
        assert env["headers"]["task"] == "styletag.tag_uploads"
        args, kwargs, _ = json.loads(base64.b64decode(env["body"]))
        assert isinstance(kwargs["enqueued_at"], float)
        out.append(args[0])
    return out


@pytest.fixture
def private_broker(tmp_path):
    from tests.support.redis_server import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.parametrize("batch, want", [(32, [32] * 6 + [8]), (128, [MAX_IDS_PER_UPLOAD] * 3 + [8])])
def test_a_burst_travels_in_messages_of_a_few_ids(private_broker, batch, want):
    from catalog.settings import Settings
    from worker.producers.uploads import enqueue_upload_ids

    settings = replace(Settings.from_env(), broker_url=private_broker, upload_batch=batch)
    ids = list(range(1000, 1200))
    assert enqueue_upload_ids(ids, settings) == len(want)
    client = redis.Redis.from_url(private_broker)
    bodies = _bodies(client, "uploads")
    assert [len(b) for b in bodies] == want
    assert [i for b in bodies for i in b] == ids  # every id once, in order
    client.delete("uploads")
    assert enqueue_upload_ids([77], settings) == 1
    assert _bodies(client, "uploads") == [77]  # one upload: the one-id form older workers take


@pytest.mark.parametrize("args, kwargs, want", [
    ((5,), {}, [5]),
    (([5, 6, 5],), {}, [5, 6]),
    ((), {"product_id": [7, 8]}, [7, 8]),
])
def test_the_worker_takes_one_id_or_a_list(args, kwargs, want):
    assert upload_ids(args, kwargs) == want


@pytest.mark.parametrize("args", [
    (list(range(1, MAX_IDS_PER_UPLOAD + 2)),),  # one over the limit
    ([1, "2"],),
    ([1, True],),
    ([],),
    ([0],),
    ("12",),
    ({"id": 1},),
    (),
])
def test_anything_else_is_refused(args):
    with pytest.raises(InvalidMessage) as err:
        upload_ids(args, {})
    assert "\n" not in str(err.value)
