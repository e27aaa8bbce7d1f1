"""The JSON Schemas of the wire format: the committed files are the generated ones, they are
shipped with the package, `jobstream schema` prints them, and whatever they accept the
worker decodes (property-based, over values near every constraint).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstream.schema import wire
from jobstream.schema.envelope import EnvelopeError, decode_envelope
from jobstream.schema.payloads import PAYLOADS
from tests.helpers import event, jobstream

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "schema" / "jsonschema"
FORMATS = jsonschema.FormatChecker()
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    """RFC 3339 `date-time`, as JSON Schema means it (an offset is required)."""
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=FORMATS)


def test_committed_files_are_the_generated_ones():
    committed = {p.name: p.read_text() for p in COMMITTED.glob("*.json")}
    expected = wire.generated()
    fix = "regenerate them: jobstream schema --write schema/jsonschema"
    assert sorted(committed) == sorted(expected), fix
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale; {fix}"


def test_the_files_are_package_data_and_installed():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["jobstream.schema"]
    shipped = {p.name for g in globs for p in (ROOT / "schema").glob(g)}
    assert shipped == set(wire.generated())
    for name, text in wire.generated().items():
        assert wire.shipped(name) == text
    assert wire.shipped("no-such.json") is None


@pytest.mark.parametrize("queue", sorted(PAYLOADS))
def test_each_payload_schema_is_valid_and_documents_every_field(queue: str):
    schema = wire.payload_schema(queue)
    validator(schema)
    assert schema["$schema"] == wire.DIALECT
    assert schema["x-jobstream-queue"] == queue
    for name, definition in schema["$defs"].items():
        assert definition["description"], name
        for field, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"


def test_examples_from_the_readme_are_valid_and_broken_ones_are_not():
    analytics = validator(wire.payload_schema("analytics"))
    good = msgspec.to_builtins(event("evt-42"))
    assert analytics.is_valid(good)
    assert not analytics.is_valid({**good, "occurred_at": "2026-11-30T10:00:00"})  # no offset
    assert not analytics.is_valid({**good, "type": "opened"})
    sending = validator(wire.payload_schema("email-sending"))
    mail = {"mailbox_id": "mb-1", "to": ["a@example.com"], "subject": "hi"}
    assert not sending.is_valid(mail)  # neither text nor html
    assert not sending.is_valid({**mail, "text": None})
    assert sending.is_valid({**mail, "html": "<p>hi</p>"})
    bounce = validator(wire.payload_schema("bounce"))
    assert not bounce.is_valid({"recipients": []})
    assert bounce.is_valid({"recipients": [{"address": "a@example.com"}]})
    envelope = validator(wire.envelope_schema())
    assert envelope.is_valid({"payload": "{}", "id": "evt-42", "x-tenant": "t1"})
    assert not envelope.is_valid({"id": "evt-42"})
    assert not envelope.is_valid({"payload": "{}", "attempt": 1})  # every value a string
    assert not envelope.is_valid({"payload": "{}", "attempt": "0"})
    assert not envelope.is_valid({"payload": "{}", "traceparent": "00-abc-def-01"})


# Values near every constraint of a schema node: valid ones and the ones just past it.
_SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3)
_OFFSETS = st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))])
_DATE_TIMES = (
    st.datetimes(timezones=_OFFSETS).map(dt.datetime.isoformat)
    | st.datetimes(timezones=_OFFSETS).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ"))
    | st.datetimes().map(dt.datetime.isoformat)  # no offset
    | st.sampled_from(["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-30 10:00:00+00:00"])
)
_DATES = st.dates().map(dt.date.isoformat) | st.sampled_from(["2026-02-30", "30/11/2026"])


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` five times out of six (a plain union would weigh each branch of `bad` alike)."""
    return st.integers(0, 5).flatmap(lambda i: bad if i == 0 else good)


def _strings(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    fmt = node.get("format")
    if fmt == "date-time":
        return _DATE_TIMES
    if fmt == "date":
        return _DATES
    low, high = node.get("minLength", 0), node.get("maxLength", 10**9)
    if "pattern" in node:
        fitting = st.from_regex(node["pattern"], fullmatch=True)
    else:
        fitting = st.text(min_size=low, max_size=min(high, low + 8))
    edges = [n for n in (low - 1, low, high, high + 1) if 0 <= n <= 1000]
    return mostly(fitting, st.sampled_from(edges).map(lambda n: "a" * n) | st.text(max_size=3))


def _drop_one(value: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    if not value:
        return st.just(value)
    return st.sampled_from(sorted(value)).map(lambda k: {n: v for n, v in value.items() if n != k})


def values(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Hypothesis values for a schema node (what msgspec generates), valid or nearly."""
    if "$ref" in node:
        name = node["$ref"].rpartition("/")[2]
        return st.deferred(lambda: values(defs[name], defs))
    if "anyOf" in node and "type" not in node:  # T | None: mostly T
        *some, last = [values(n, defs) for n in node["anyOf"]]
        return mostly(st.one_of(some), last) if some else last
    if "enum" in node:
        return st.sampled_from(node["enum"]) | st.text(max_size=3)
    kind = node.get("type")
    if kind == "null":
        return st.none() | st.just("")
    if kind == "string":
        return _strings(node)
    if kind == "array":
        items = values(node["items"], defs)
        low = node.get("minItems", 0)
        return mostly(st.lists(items, min_size=low, max_size=low + 2), _SCALARS | st.just([]))
    if kind == "object" and "properties" in node:
        props = {k: values(v, defs) for k, v in node["properties"].items()}
        required = {k: props.pop(k) for k in node.get("required", [])}
        whole = st.fixed_dictionaries(required, optional=props)
        return mostly(whole, whole.flatmap(_drop_one) | _SCALARS)
    if kind == "object":
        extra = node.get("additionalProperties")
        items = values(extra, defs) if isinstance(extra, dict) else _SCALARS
        return mostly(st.dictionaries(st.text(max_size=3), items, max_size=4), _SCALARS)
    return _SCALARS


PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("queue", sorted(PAYLOADS))
def test_what_a_payload_schema_accepts_the_worker_decodes(queue: str):
    schema = wire.payload_schema(queue)
    check = validator(schema)
    decoder = msgspec.json.Decoder(PAYLOADS[queue])
    accepted = 0

    @PROFILE
    @given(values(schema, schema["$defs"]))
    def agree(value: Any) -> None:
        nonlocal accepted
        if check.is_valid(value):
            accepted += 1
            decoder.decode(json.dumps(value))  # raises if the worker would refuse it

    agree()
    assert accepted > 0  # the generator reached valid payloads, not only broken ones


_FIELD_VALUES = st.text(max_size=5) | st.sampled_from(
    ["0", "1", "01", "+2", " 3", "1000000", "1000001", "a" * 200, "a" * 201, "x\x00y"]
)


@PROFILE
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "payload": st.just("{}"),
            "id": _FIELD_VALUES,
            "attempt": _FIELD_VALUES,
            "traceparent": _FIELD_VALUES
            | st.from_regex(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True),
            "tracestate": _FIELD_VALUES,
            "reason": _FIELD_VALUES,
        },
    )
)
def test_what_the_envelope_schema_accepts_the_worker_decodes(fields: dict[str, str]):
    if not validator(wire.envelope_schema()).is_valid(fields):
        return
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    try:
        decoded = decode_envelope("1764496800000-0", raw)
    except EnvelopeError as exc:
        pytest.fail(f"the schema accepts {fields!r} but the worker refuses it: {exc}")
    assert decoded.job_id == fields.get("id", "1764496800000-0")
    assert decoded.attempt == int(fields.get("attempt", "1"))
    assert decoded.extra == ({"reason": fields["reason"]} if "reason" in fields else {})


async def test_jobstream_schema_lists_prints_writes_and_refuses(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "JOBSTREAM_MAX_DELIVERIES": "broken"}  # needs no config
    listing = await jobstream(env, "schema")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == ["envelope", *sorted(PAYLOADS)]
    assert "email_processing.json" in listing.stdout

    for name in ("email:processing", "envelope"):
        shown = await jobstream(env, "schema", name)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == (COMMITTED / wire.file_name(name)).read_text()

    unknown = await jobstream(env, "schema", "nope")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr.strip().splitlines() == [
        "jobstream: unknown queue 'nope' (known: envelope, analytics, bounce, email-sending, "
        "email:processing, warmup, webhook)"
    ]

    written = await jobstream(env, "schema", "--write", str(tmp_path / "out"))
    assert written.returncode == 0, written.stderr
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == wire.generated()
    (tmp_path / "file").write_text("")
    blocked = await jobstream(env, "schema", "--write", str(tmp_path / "file" / "out"))
    assert blocked.returncode == 1
    assert len(blocked.stderr.strip().splitlines()) == 1
