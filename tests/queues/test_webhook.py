"""The `webhook` queue against a real HTTP server on loopback; signatures checked by hand."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import time

import httpx
import msgspec
import pytest

from jobstream.consumers.demo.http_sink import Answer, http_sink, verify_signature
from jobstream.consumers.queues.webhook import deliver_webhook, resolve_target
from jobstream.consumers.store.webhooks import add_endpoint
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.events import emit
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams import ConfigError, PermanentError, Policy, RetryableError
from tests.helpers import delivery, eventually, job, jobstream, running, served


def allow(deps: Deps, **kw) -> Deps:
    s = msgspec.structs.replace(deps.settings, webhook_allow_private=True, **kw)
    return dataclasses.replace(deps, settings=s)


async def rows(deps: Deps):
    return await deps.pool.fetch("SELECT * FROM webhook_deliveries ORDER BY id")


async def test_delivers_signed_standard_webhook_once(deps: Deps):
    deps = allow(deps)
    async with http_sink() as sink:
        ep, secret = await add_endpoint(deps.pool, sink.url(), ["email.sent"])
        result = await deliver_webhook.fn(delivery(ep), job(), deps)
        assert result["status"] == "delivered"
        assert result["status_code"] == 200
        (req,) = sink.requests
        assert req.method == "POST"
        assert req.path == "/hooks"
        assert req.headers["content-type"] == "application/json"
        assert req.headers["webhook-id"] == "msg_1"
        assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 30
        assert verify_signature(secret, req.headers, req.body)
        assert not verify_signature(secret, req.headers, req.body + b" ")
        body = json.loads(req.body)
        assert body == {
            "type": "email.sent",
            "timestamp": "2026-11-30T10:00:00Z",
            "data": {"message_id": "m-1@example.com", "recipients": ["r@example.net"]},
        }
        # The same webhook-id again (a retry after the commit was lost): not sent twice.
        again = await deliver_webhook.fn(delivery(ep), job(attempt=2), deps)
        assert again == {"status": "delivered", "duplicate": True}
        assert len(sink.requests) == 1
    (row,) = await rows(deps)
    assert (row["endpoint_id"], row["webhook_id"], row["job_id"]) == (ep, "msg_1", "wh-job")
    assert (row["status_code"], row["succeeded"], row["attempt"]) == (200, True, 1)
    assert row["latency_ms"] >= 0
    assert row["error"] is None


async def test_429_and_5xx_retry_with_retry_after_then_succeed_with_the_same_id(deps: Deps):
    deps = allow(deps)
    answers = [Answer(429, {"Retry-After": "7"}), Answer(503), Answer(200)]
    async with http_sink(answers=answers) as sink:
        ep, secret = await add_endpoint(deps.pool, sink.url())
        with pytest.raises(RetryableError, match="429") as first:
            await deliver_webhook.fn(delivery(ep), job(attempt=1), deps)
        assert first.value.retry_after_s == 7
        with pytest.raises(RetryableError, match="503"):
            await deliver_webhook.fn(delivery(ep), job(attempt=2), deps)
        await deliver_webhook.fn(delivery(ep), job(attempt=3), deps)
        assert [r.headers["webhook-id"] for r in sink.requests] == ["msg_1"] * 3
        assert len({r.body for r in sink.requests}) == 1
        assert all(verify_signature(secret, r.headers, r.body) for r in sink.requests)
    got = [(r["attempt"], r["status_code"], r["succeeded"]) for r in await rows(deps)]
    assert got == [(1, 429, False), (2, 503, False), (3, 200, True)]


async def test_through_the_engine_a_500_is_retried_and_delivered(deps: Deps):
    deps = allow(deps)
    spec = dataclasses.replace(
        deliver_webhook, policy=Policy(max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1)
    )
    async with http_sink(answers=[Answer(500)]) as sink:
        _, secret = await add_endpoint(deps.pool, sink.url(), ["email.sent"])
        other, _ = await add_endpoint(deps.pool, sink.url("/other"), ["email.bounced"])
        ids = await emit(deps, "email.sent", {"message_id": "m-9"}, key="k-9", mailbox_id="mb")
        (wh_id,) = [i for i in ids if i.startswith("webhook:")]
        async with running(make_engine(deps, ["webhook"], handlers=served(spec))):

            async def done():
                return await deps.pool.fetchval(
                    "SELECT status FROM jobs WHERE id = $1 AND status = 'completed'", wh_id
                )

            await eventually(done)
        assert [r.path for r in sink.requests] == ["/hooks", "/hooks"]
        assert all(verify_signature(secret, r.headers, r.body) for r in sink.requests)
        body = json.loads(sink.requests[1].body)
        assert body["type"] == "email.sent"
        assert body["data"]["message_id"] == "m-9"
    assert [r["status_code"] for r in await rows(deps)] == [500, 200]
    assert other not in {r["endpoint_id"] for r in await rows(deps)}


async def test_410_disables_the_endpoint_and_other_4xx_are_permanent(deps: Deps):
    deps = allow(deps)
    async with http_sink(answers=[Answer(400), Answer(410)]) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url())
        with pytest.raises(PermanentError, match="400"):
            await deliver_webhook.fn(delivery(ep, "m-a"), job(), deps)
        with pytest.raises(PermanentError, match="410"):
            await deliver_webhook.fn(delivery(ep, "m-b"), job(), deps)
        row = await deps.pool.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", ep)
        assert row["active"] is False
        assert "410" in row["disabled_reason"]
        skipped = await deliver_webhook.fn(delivery(ep, "m-c"), job(), deps)
        assert skipped["status"] == "skipped"
        assert len(sink.requests) == 2


async def test_redirects_are_not_followed(deps: Deps):
    deps = allow(deps)
    async with http_sink(answers=[Answer(302, {"Location": "http://127.0.0.1:1/x"})]) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url())
        with pytest.raises(PermanentError, match="302"):
            await deliver_webhook.fn(delivery(ep), job(), deps)
        assert len(sink.requests) == 1


async def test_slow_endpoint_and_network_errors_are_retryable(deps: Deps):
    deps = allow(deps, webhook_timeout_s=0.3, webhook_connect_timeout_s=0.3)
    async with http_sink(answers=[Answer(200, delay_s=1.0)]) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url())
        with pytest.raises(RetryableError, match="unreachable"):
            await deliver_webhook.fn(delivery(ep, "slow"), job(), deps)
        closed = sink.url()
    down, _ = await add_endpoint(deps.pool, closed)
    with pytest.raises(RetryableError, match="unreachable"):
        await deliver_webhook.fn(delivery(down, "down"), job(), deps)
    got = [(r["status_code"], r["succeeded"], bool(r["error"])) for r in await rows(deps)]
    assert got == [(None, False, True), (None, False, True)]


async def test_big_response_bodies_are_not_read_past_the_cap(deps: Deps):
    deps = allow(deps, webhook_max_response_bytes=1024)
    async with http_sink(answers=[Answer(200, body=b"x" * 2_000_000)]) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url())
        result = await deliver_webhook.fn(delivery(ep), job(), deps)
        assert result["status"] == "delivered"


async def test_private_addresses_are_refused_unless_allowed(deps: Deps):
    assert deps.settings.webhook_allow_private is False
    async with http_sink() as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url())
        with pytest.raises(PermanentError, match="refused address"):
            await deliver_webhook.fn(delivery(ep), job(), deps)
        by_name, _ = await add_endpoint(deps.pool, sink.url(host="localhost"))
        with pytest.raises(PermanentError, match="refused address"):
            await deliver_webhook.fn(delivery(by_name, "m-2"), job(), deps)
        assert sink.requests == []
    (row, _) = await rows(deps)
    assert row["status_code"] is None
    assert "refused" in row["error"]


@pytest.mark.parametrize(
    ("url", "allowed_private", "ok"),
    [
        ("http://127.0.0.1/", False, False),
        ("http://10.1.2.3/", False, False),
        ("http://192.168.1.1/", False, False),
        ("http://[::1]/", False, False),
        ("http://[::ffff:127.0.0.1]/", False, False),
        ("http://100.64.0.1/", False, False),
        ("http://169.254.169.254/latest/meta-data", True, False),
        ("http://169.254.10.1/", True, False),
        ("http://[fd00:ec2::254]/", True, False),
        ("http://0.0.0.0/", True, False),
        ("http://127.0.0.1/", True, True),
        ("http://10.1.2.3/", True, True),
        ("https://93.184.215.14/hook", False, True),
        ("ftp://93.184.215.14/", True, False),
        # IPv6 forms that carry (and route to) an IPv4 address are judged by it too.
        ("http://[64:ff9b::7f00:1]/", False, False),  # NAT64 of 127.0.0.1
        ("http://[64:ff9b::10.0.0.1]/", False, False),
        ("http://[64:ff9b::169.254.169.254]/", True, False),
        ("http://[64:ff9b:1::a00:1]/", False, False),  # local-use NAT64
        ("http://[2002:7f00:1::]/", False, False),  # 6to4 of 127.0.0.1
        ("http://[2002:a9fe:a9fe::1]/", True, False),  # 6to4 of the metadata address
        ("http://[::127.0.0.1]/", False, False),  # IPv4-compatible
        ("http://[::169.254.169.254]/", True, False),
        ("http://[::ffff:0:127.0.0.1]/", False, False),  # IPv4-translated
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", True, True),  # Teredo, 127.0.0.1
        ("http://[2001:0:4136:e378:8000:63bf:5601:5601]/", True, False),  # Teredo, metadata
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", False, False),
        ("http://[64:ff9b::5db8:d70e]/", False, True),  # NAT64 of a public address
        ("http://[2002:5db8:d70e::1]/", False, True),
        ("http://[64:ff9b::7f00:1]/", True, True),  # loopback, allowed by configuration
    ],
)
async def test_address_policy(url: str, allowed_private: bool, ok: bool):
    if ok:
        target = await resolve_target(url, allowed_private)
        assert ipaddress.ip_address(target.address) == ipaddress.ip_address(httpx.URL(url).host)
    else:
        with pytest.raises(PermanentError):
            await resolve_target(url, allowed_private)


async def test_the_resolved_address_is_the_one_connected_to(deps: Deps):
    """A name is resolved once; the connection goes to that address with the name as Host."""
    deps = allow(deps)
    async with http_sink() as sink:
        target = await resolve_target(sink.url(host="localhost"), True)
        assert target.url.host == "127.0.0.1"
        assert target.host_header == f"localhost:{sink.port}"
        ep, secret = await add_endpoint(deps.pool, sink.url(host="localhost"))
        await deliver_webhook.fn(delivery(ep), job(), deps)
        (req,) = sink.requests
        assert req.headers["host"] == f"localhost:{sink.port}"
        assert req.peer == "127.0.0.1"
        assert verify_signature(secret, req.headers, req.body)


async def test_an_ipv6_literal_gets_a_valid_host_header(deps: Deps):
    deps = allow(deps)
    async with http_sink(host="::1") as sink:
        url = sink.url(host="[::1]")
        target = await resolve_target(url, True)
        assert target.host_header == f"[::1]:{sink.port}"
        assert (await resolve_target("http://[::1]/", True)).host_header == "[::1]"
        ep, secret = await add_endpoint(deps.pool, url)
        await deliver_webhook.fn(delivery(ep), job(), deps)
        (req,) = sink.requests
        assert req.headers["host"] == f"[::1]:{sink.port}"
        assert req.peer == "::1"
        assert verify_signature(secret, req.headers, req.body)


INVALID_URLS = [
    "http://0177.0.0.1/",  # octal: resolvers read it as 127.0.0.1
    "http://0x7f.1/",
    "http://2130706433/",
    "http://example.com:99999/",
    "http://example.com:0/",
    "http://example.com:port/",
    "http://[::1/",
    "http://exa mple.com/",
    "http:///no-host",
]


@pytest.mark.parametrize("url", INVALID_URLS)
async def test_an_invalid_endpoint_url_fails_for_good_with_a_delivery_row(deps: Deps, url: str):
    ep = "ep_invalid"
    await deps.pool.execute(
        "INSERT INTO webhook_endpoints (id, url, secret, event_types) VALUES ($1, $2, $3, $4)",
        ep, url, "whsec_" + base64.b64encode(b"k" * 24).decode(), ["email.sent"],
    )  # fmt: skip
    with pytest.raises(PermanentError, match="endpoint URL"):
        await deliver_webhook.fn(delivery(ep), job(), deps)
    (row,) = await rows(deps)
    assert row["succeeded"] is False
    assert row["status_code"] is None
    assert "invalid endpoint URL" in row["error"] or "name a host" in row["error"]


async def test_webhook_add_refuses_invalid_and_disguised_urls_in_one_line(deps: Deps, env_for):
    disguised = ["http://[64:ff9b::a9fe:a9fe]/", "http://[::169.254.169.254]/"]
    for url in [*INVALID_URLS, *disguised]:
        with pytest.raises(ConfigError) as refused:
            await add_endpoint(deps.pool, url)
        assert "\n" not in str(refused.value)
    env = env_for()
    for url in ["http://0177.0.0.1/", "http://example.com:99999/", disguised[0]]:
        out = await jobstream(env, "webhook", "add", url)
        assert out.returncode == 2, (url, out.stderr)
        assert len(out.stderr.splitlines()) == 1, (url, out.stderr)
        assert "Traceback" not in out.stderr
    assert await deps.pool.fetchval("SELECT count(*) FROM webhook_endpoints") == 0
