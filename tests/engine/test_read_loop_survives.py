"""A read that fails with an error the client should never raise does not end the read loop.

Seen in a Redis Cluster failover: the cluster client closed a connection under a command in
flight and the command failed with `AttributeError` on the connection's writer. Ending the
read loop there left the worker alive (heartbeat and all), holding the entries it had
taken, starting none of them, and reading nothing new.
"""

from __future__ import annotations

from typing import Any

import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams import Publisher
from tests import handlers
from tests.helpers import all_terminal, eventually, running, statuses

Q = handlers.QUEUE
pytestmark = pytest.mark.cluster_too


async def test_read_loop_survives_an_unforeseen_client_error(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = deps.redis.xreadgroup
    failed = 0

    async def xreadgroup(*args: Any, **kwargs: Any) -> Any:
        """The real read, after failing three times as the cluster client did."""
        nonlocal failed
        if failed < 3:
            failed += 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await real(*args, **kwargs)

    monkeypatch.setattr(deps.redis, "xreadgroup", xreadgroup)
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    ids = [await pub.publish(Q, handlers.Work()) for _ in range(5)]
    engine = make_engine(deps, handlers=handlers.SPECS)
    async with running(engine):
        await eventually(lambda: all_terminal(deps, ids))
        assert engine.health() is None  # every loop still runs
    assert failed == 3
    assert await statuses(deps, ids) == dict.fromkeys(ids, "completed")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed: 'NoneType' object" in m for m in messages) == 1  # once, not per try
    assert any(m.endswith("reads again") for m in messages)
