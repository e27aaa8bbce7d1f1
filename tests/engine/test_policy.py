"""Per-queue policy: registration, overridden by configuration, overridden by the CLI
(DESIGN.md, Retries and dead letters)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError, Policy, backoff_s
from tests import handlers


def test_backoff_is_exponential_with_full_jitter_and_capped():
    p = Policy(backoff_base_s=1, backoff_cap_s=10)
    rand = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (12, 10)]:
        waits = [backoff_s(p, attempt, rand) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # full jitter reaches the ceiling
        assert min(waits) < ceiling * 0.2  # ... and close to zero


def test_invalid_policies_are_refused():
    with pytest.raises(ConfigError, match="max_attempts"):
        Policy(max_attempts=0)
    with pytest.raises(ConfigError, match="timeout_s"):
        Policy(timeout_s=0)
    with pytest.raises(ConfigError, match="backoff"):
        Policy(backoff_base_s=5, backoff_cap_s=1)


async def test_configuration_overrides_registration_and_cli_overrides_both(deps: Deps):
    s = Settings.from_env(
        {"JOBSTREAM_POLICIES": '{"test-work": {"max_attempts": 9, "timeout_s": 2.5}}'}
    )
    d = dataclasses.replace(deps, settings=s)
    route = make_engine(d, None, None, handlers=handlers.SPECS).lanes[handlers.QUEUE].route
    registered = handlers.work.policy
    assert route.policy.max_attempts == 9
    assert route.policy.timeout_s == 2.5
    assert route.policy.concurrency == registered.concurrency
    assert route.policy.backoff_base_s == registered.backoff_base_s
    route = make_engine(d, None, 3, handlers=handlers.SPECS).lanes[handlers.QUEUE].route
    assert route.policy.concurrency == 3
    assert route.policy.max_attempts == 9


async def test_bad_policy_configuration_is_one_clear_line(deps: Deps):
    with pytest.raises(ConfigError, match="JOBSTREAM_POLICIES"):
        Settings.from_env({"JOBSTREAM_POLICIES": "{not json"})
    with pytest.raises(ConfigError, match="JOBSTREAM_POLICIES"):
        Settings.from_env({"JOBSTREAM_POLICIES": '{"webhook": {"max_tries": 3}}'})
    s = Settings.from_env({"JOBSTREAM_POLICIES": '{"test-work": {"max_attempts": 0}}'})
    with pytest.raises(ConfigError, match="max_attempts"):
        make_engine(dataclasses.replace(deps, settings=s), None, None, handlers=handlers.SPECS)
    s = Settings.from_env({"JOBSTREAM_POLICIES": '{"nope": {"max_attempts": 2}}'})
    with pytest.raises(ConfigError, match="queues not served: nope"):
        make_engine(dataclasses.replace(deps, settings=s), None, None, handlers=handlers.SPECS)
