"""Settings: one home per default, and errors that name the variable at fault."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from jobstream.consumers import Settings
from jobstream.streams import ConfigError, EngineConfig, Keys

ROOT = pathlib.Path(__file__).resolve().parents[2]
RENAMED = {"grace_s": "shutdown_grace_s", "dead_max_age_s": "dead_letter_max_age_s",
           "dead_max_bytes": "dead_letter_max_bytes", "wait_replicas": "publish_wait_replicas",
           "wait_timeout_ms": "publish_wait_timeout_ms"}  # fmt: skip
# Not a setting of its own: the caller's, or built from several settings (`partitions`).
NOT_CONFIGURED = {"consumer", "keys", "burst", "read_count", "promote_interval_s", "partitions"}


@pytest.mark.parametrize(
    ("variable", "value", "bound"),
    [
        ("JOBSTREAM_WARMUP_START_PER_DAY", "-1", ">= 0"),  # was reported as ..._MAX_PER_DAY
        ("JOBSTREAM_WARMUP_MAX_PER_DAY", "-1", ">= 0"),
        ("JOBSTREAM_BLOCK_MS", "60001", "<= 60000"),
        ("JOBSTREAM_WEBHOOK_CONNECT_TIMEOUT_S", "0", "> 0.0"),
        ("JOBSTREAM_WARMUP_MAX_BOUNCE_RATE", "1.5", "<= 1"),
        ("JOBSTREAM_CONCURRENCY", "0", ">= 1"),
    ],
)
def test_a_value_out_of_its_bounds_is_reported_under_its_own_name(variable, value, bound):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert f"$.{variable}`" in message
    assert bound in message
    assert value not in message.replace(bound, "")  # never echoes the value
    others = set(re.findall(r"JOBSTREAM_[A-Z_]+", message)) - {variable}
    assert others == set()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"JOBSTREAM_WARMUP_START_PER_DAY": "50", "JOBSTREAM_WARMUP_MAX_PER_DAY": "40"},
            "JOBSTREAM_WARMUP_START_PER_DAY (at most JOBSTREAM_WARMUP_MAX_PER_DAY)",
        ),
        (
            {"JOBSTREAM_WEBHOOK_CONNECT_TIMEOUT_S": "20", "JOBSTREAM_WEBHOOK_TIMEOUT_S": "15"},
            "JOBSTREAM_WEBHOOK_CONNECT_TIMEOUT_S (at most JOBSTREAM_WEBHOOK_TIMEOUT_S)",
        ),
    ],
)
def test_a_pair_out_of_order_names_the_variable_first_and_its_limit(env, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        Settings.from_env(env)


def test_settings_default_to_the_engine_defaults():
    engine = EngineConfig(consumer="")
    configured = Settings()
    for f in dataclasses.fields(EngineConfig):
        if f.name not in NOT_CONFIGURED:
            assert getattr(configured, RENAMED.get(f.name, f.name)) == getattr(engine, f.name)


def test_settings_build_every_engine_field_they_hold():
    names = [f.name for f in dataclasses.fields(EngineConfig) if f.name not in NOT_CONFIGURED]
    env = {}
    for n, name in enumerate(names, start=2):  # distinct values, all inside their bounds
        setting = RENAMED.get(name, name)
        env[f"JOBSTREAM_{setting.upper()}"] = f"g{n}" if name == "group" else str(1000 + n)
    config = Settings.from_env(env).engine_config(consumer="c", keys=Keys("p:"), burst=True)
    for name in names:
        setting = RENAMED.get(name, name)
        expected = env[f"JOBSTREAM_{setting.upper()}"]
        assert str(getattr(config, name)).removesuffix(".0") == expected, name
    assert (config.consumer, config.keys.prefix, config.burst) == ("c", "p:", True)


@pytest.mark.parametrize("name", ["reclaim_ceiling_ms", "hash_ttl_s", "dead_maxlen"])
def test_an_engine_default_is_written_once(name):
    # `name: int = 7 * 24 * 3600` or `name=100_000`: a number, not a reference to it
    pattern = re.compile(rf"\b{name}\b[^=\n]*[^\w=!<>]=\s*[\d_ *]+,?\s*(#.*)?$", re.MULTILINE)
    found = [
        str(path.relative_to(ROOT))
        for folder in ("streams", "consumers")
        for path in (ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert found == ["streams/worker.py"]
