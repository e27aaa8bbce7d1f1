"""The seam between the application and the engine: which handlers a worker serves, and
the queues its handlers may publish to (README, "Adding a queue")."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import msgspec
import pytest

from jobstream.consumers import HANDLERS, Deps, Job, handler, make_engine
from jobstream.streams import ConfigError, PublishError
from tests import handlers

BUILT_IN = sorted(spec.queue for spec in HANDLERS)
PROBE_Q = "test-probe"


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    publish_to: str | None = None


@handler(PROBE_Q, Probe)
async def probe(p: Probe, job: Job, deps: Deps) -> list[str]:
    """Say which queues the handler's publisher knows; publish to one if asked."""
    if p.publish_to is not None:
        await deps.publisher.publish(p.publish_to, "{}")
    return deps.publisher.queues


def _job() -> Job:
    return Job("j-1", PROBE_Q, 1, "1-0", 1)


def test_a_queue_added_to_the_handlers_is_served_with_the_built_in_ones(deps: Deps):
    # Before: `extra=[spec]` without `queues` served the extra queue alone.
    eng = make_engine(deps, handlers=(*HANDLERS, probe))
    assert sorted(eng.lanes) == sorted([*BUILT_IN, PROBE_Q])


def test_the_built_in_queues_are_served_by_default(deps: Deps):
    assert sorted(make_engine(deps).lanes) == BUILT_IN


def test_an_added_queue_can_be_selected_by_name(deps: Deps):
    # Before: a queue passed in `extra` could not be named in `queues`.
    eng = make_engine(deps, ["analytics", PROBE_Q], handlers=(*HANDLERS, probe))
    assert sorted(eng.lanes) == ["analytics", PROBE_Q]


def test_an_unknown_queue_is_refused_naming_it_and_the_handled_ones(deps: Deps):
    with pytest.raises(ConfigError) as caught:
        make_engine(deps, ["analytics", "nope"])
    assert str(caught.value) == f"no handler for queue nope (handled: {', '.join(BUILT_IN)})"


def test_a_queue_handled_twice_is_refused(deps: Deps):
    with pytest.raises(ConfigError, match="queue analytics is handled twice"):
        make_engine(deps, handlers=(*HANDLERS, HANDLERS[0]))


def test_the_old_extra_keyword_no_longer_exists(deps: Deps):
    kwargs: dict[str, Any] = {"extra": [probe]}
    with pytest.raises(TypeError, match="extra"):
        make_engine(deps, **kwargs)


async def test_the_handlers_publisher_knows_the_queues_of_the_handlers_served(deps: Deps):
    eng = make_engine(deps, [PROBE_Q], handlers=(*HANDLERS, probe))
    # The selection splits a deployment: the other queues are still the application's.
    assert await eng.lanes[PROBE_Q].route.handle(Probe(), _job()) == sorted([*BUILT_IN, PROBE_Q])
    own = make_engine(deps, handlers=(probe, *handlers.SPECS))
    assert await own.lanes[PROBE_Q].route.handle(Probe(), _job()) == sorted(
        [PROBE_Q, handlers.QUEUE]
    )
    with pytest.raises(PublishError, match="unknown queue 'analytics'"):
        await own.lanes[PROBE_Q].route.handle(Probe(publish_to="analytics"), _job())


def test_importing_one_room_does_not_load_the_worker_runtime():
    code = (
        "import sys, jobstream.consumers.mail.dsn, jobstream.consumers.queues.analytics; "
        "print('jobstream.consumers.worker.runtime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
