"""The producer's `Client`: typed publishing with the queue inferred, get and wait
(DESIGN.md, Wire format: the producer contract)."""

from __future__ import annotations

import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams import PublishError, Status
from jobstream.streams.client import Client
from tests import handlers
from tests.helpers import event, running, work_publisher


def client(deps: Deps, **kw) -> Client:
    from jobstream.schema.payloads import AnalyticsEvent

    payloads = {**handlers.PAYLOADS, "analytics": AnalyticsEvent, **kw}
    return Client(deps.redis, payloads, deps.keys, pool=deps.pool)


async def test_publish_infers_the_queue_and_wait_returns_the_result(deps: Deps):
    c = client(deps)
    ok = await c.publish(handlers.Work(result_text="hello"))
    bad = await c.publish(handlers.Work(permanent=True))
    evt = await c.publish(event("evt-client"))
    queued = await c.get(ok)
    assert queued is not None
    assert (queued.status, queued.queue, queued.done) == (Status.QUEUED, handlers.QUEUE, False)
    async with running(
        make_engine(
            deps, ["analytics", handlers.QUEUE], None, handlers=(*HANDLERS, *handlers.SPECS)
        )
    ):
        done = await c.wait(ok, timeout_s=20)
        failed = await c.wait(bad, timeout_s=20)
        recorded = await c.wait(evt, timeout_s=20)
    assert (done.status, done.result) == (Status.COMPLETED, {"attempt": 1, "text": "hello"})
    assert failed.status == Status.FAILED
    assert failed.error is not None
    assert "refused for good" in failed.error
    assert recorded.result == {"recorded": True}
    # The hash expired or was never written: PostgreSQL still knows.
    await deps.redis.delete(deps.keys.job(ok))
    again = await c.get(ok)
    assert again is not None
    assert (again.status, again.result, again.attempt) == (Status.COMPLETED, done.result, 1)
    assert await c.get("never-published") is None


async def test_wait_times_out_with_where_the_job_stands(deps: Deps):
    c = client(deps)
    job_id = await c.publish(handlers.Work(), job_id="slow-1")
    with pytest.raises(TimeoutError, match=r"job slow-1 not over after 0\.2s \(queued\)"):
        await c.wait(job_id, timeout_s=0.2)


async def test_a_payload_for_several_queues_or_none_must_name_its_queue(deps: Deps):
    c = client(deps, **{"other-work": handlers.Work})
    with pytest.raises(PublishError, match="go to several queues"):
        await c.publish(handlers.Work())
    assert await c.publish(handlers.Work(), queue="other-work")
    only = Client(deps.redis, {"analytics": type(event("x"))}, deps.keys)
    with pytest.raises(PublishError, match="no queue takes Work payloads"):
        await only.publish(handlers.Work())
    assert await only.publish_many([]) == []


async def test_publish_refuses_impossible_delays(deps: Deps):
    for delay in (float("nan"), float("inf"), -1.0):
        with pytest.raises(PublishError, match="delay of"):
            await work_publisher(deps).publish(handlers.QUEUE, handlers.Work(), delay_s=delay)
