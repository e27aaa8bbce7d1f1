"""The `webhook` queue: deliver one signed platform event to a customer endpoint.

Standard Webhooks signing; every attempt is recorded in `webhook_deliveries`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from opentelemetry import trace

from jobstream.consumers.store.webhooks import (
    ENDPOINT_SQL,
    allowed_address,
    disable_endpoint,
    parse_endpoint,
)
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.settings import Settings
from jobstream.consumers.worker.tls import certificate_problem, client_context
from jobstream.otel import span
from jobstream.otel.redact import remember_secrets, scrub, secrets_of_url
from jobstream.schema.payloads import WebhookDelivery
from jobstream.streams import Job, PermanentError, Policy, RetryableError

__all__ = ["deliver_webhook", "resolve_target", "sign"]

DELIVERED_SQL = """
SELECT status_code FROM webhook_deliveries
WHERE webhook_id = $1 AND endpoint_id = $2 AND succeeded LIMIT 1
"""
RECORD_SQL = """
INSERT INTO webhook_deliveries (endpoint_id, webhook_id, event_type, job_id, attempt,
                                status_code, latency_ms, succeeded, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""
_USER_AGENT = "jobstream-webhooks/1"
_MAX_RETRY_AFTER_S = 6 * 3600.0


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`,
    keyed with the base64-decoded part of `whsec_<base64>`."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError("endpoint secret is not whsec_<base64>") from None
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: the URL with its host replaced by the checked address."""

    url: httpx.URL
    host: str
    host_header: str
    address: str


async def resolve_target(url: str, allow_private: bool) -> Target:
    """Resolve the endpoint's host once and check every address it resolves to.

    PermanentError when the URL is invalid (see `parse_endpoint`) or an address is
    private, loopback, link-local, a cloud metadata address or an IPv6 form carrying one
    (private and loopback pass when allowed); RetryableError when the name does not
    resolve now.
    """
    try:
        parsed = parse_endpoint(url)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded: what DNS, SNI and Host carry
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RetryableError(f"cannot resolve endpoint host: {exc}") from None
    ips = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    refused = [ip for ip in ips if not allowed_address(ip, allow_private)]
    if refused or not ips:
        raise PermanentError(f"endpoint host resolves to a refused address {refused[:1]}")
    # `netloc` brackets an IPv6 literal and keeps only a non-default port: `[::1]:8080`.
    header = parsed.netloc.decode("ascii")
    return Target(parsed.copy_with(host=str(ips[0])), host, header, str(ips[0]))


@dataclass(slots=True)
class Attempt:
    """What one POST came to."""

    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = None
    retry_after_s: float | None = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


async def _post(
    settings: Settings, target: Target, headers: dict[str, str], body: bytes
) -> Attempt:
    """POST once to the pinned address; read at most the configured bytes of the answer."""
    timeout = httpx.Timeout(settings.webhook_timeout_s, connect=settings.webhook_connect_timeout_s)
    started = time.perf_counter()
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    out = Attempt()
    tls = client_context(settings, "https")
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False, verify=tls
    ) as c:
        try:
            async with asyncio.timeout(settings.webhook_timeout_s):
                req = c.build_request(
                    "POST", target.url, content=body, headers=headers, extensions=extensions
                )
                resp = await c.send(req, stream=True)
                try:
                    out.status_code = resp.status_code
                    out.retry_after_s = _retry_after(resp.headers.get("retry-after"))
                    seen = 0
                    async for chunk in resp.aiter_raw():
                        seen += len(chunk)
                        if seen >= settings.webhook_max_response_bytes:
                            break
                finally:
                    await resp.aclose()
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            problem = certificate_problem(exc)
            out.error = scrub(
                f"{type(exc).__name__}: {str(exc)[:200]}"
                if problem is None
                else f"TLS certificate of the endpoint refused: {problem[:200]}"
            )
    out.latency_ms = round((time.perf_counter() - started) * 1000)
    return out


def _body(msg: WebhookDelivery) -> bytes:
    return msgspec.json.encode(
        {"type": msg.event_type, "timestamp": msg.timestamp, "data": msg.data}
    )


@handler(
    "webhook",
    WebhookDelivery,
    Policy(max_attempts=10, backoff_base_s=5, backoff_cap_s=3600, timeout_s=60, concurrency=32),
)
async def deliver_webhook(msg: WebhookDelivery, job: Job, deps: Deps) -> dict[str, Any]:
    """POST the event, signed, to its endpoint; record the attempt; say what comes next.

    2xx: delivered. 429 and 5xx (after `Retry-After`) and network errors: retried. 410:
    the endpoint is disabled. Other answers: failed. A `webhook-id` already delivered to
    this endpoint is not sent again.
    """
    ep = await deps.pool.fetchrow(ENDPOINT_SQL, msg.endpoint_id)
    if ep is None:
        raise PermanentError(f"no webhook endpoint {msg.endpoint_id}")
    if not ep["active"]:
        return {"status": "skipped", "reason": "endpoint disabled"}
    if await deps.pool.fetchrow(DELIVERED_SQL, msg.message_id, msg.endpoint_id) is not None:
        return {"status": "delivered", "duplicate": True}
    body = _body(msg)
    remember_secrets(secrets_of_url(ep["url"]))
    try:
        target = await resolve_target(ep["url"], deps.settings.webhook_allow_private)
    except (PermanentError, RetryableError) as exc:
        await _record(deps, msg, job, Attempt(error=str(exc)))
        raise
    now = int(time.time())
    headers = {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": _USER_AGENT,
        "webhook-id": msg.message_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(ep["secret"], msg.message_id, now, body),
    }
    attrs = {"server.address": target.host, "network.peer.address": target.address}
    with span("webhook POST", attrs, kind=trace.SpanKind.CLIENT, endpoint_id=msg.endpoint_id) as s:
        attempt = await _post(deps.settings, target, headers, body)
        if attempt.status_code is not None:
            s.set_attribute("http.response.status_code", attempt.status_code)
    await _record(deps, msg, job, attempt)
    return await _outcome(deps, msg, attempt)


async def _record(deps: Deps, msg: WebhookDelivery, job: Job, a: Attempt) -> None:
    ok = a.status_code is not None and 200 <= a.status_code < 300
    await deps.pool.execute(
        RECORD_SQL,
        msg.endpoint_id,
        msg.message_id,
        msg.event_type,
        job.id,
        job.attempt,
        a.status_code,
        a.latency_ms,
        ok,
        a.error,
    )


async def _outcome(deps: Deps, msg: WebhookDelivery, a: Attempt) -> dict[str, Any]:
    ep = msg.endpoint_id
    code = a.status_code
    if code is None:
        raise RetryableError(f"endpoint {ep} unreachable: {a.error}")
    if 200 <= code < 300:
        return {"status": "delivered", "status_code": code, "latency_ms": a.latency_ms}
    if code == 410:
        await disable_endpoint(deps.pool, ep, "the endpoint answered 410 Gone")
        raise PermanentError(f"endpoint {ep} answered 410 Gone: disabled")
    if code == 429 or code >= 500:
        raise RetryableError(f"endpoint {ep} answered {code}", retry_after_s=a.retry_after_s)
    raise PermanentError(f"endpoint {ep} answered {code}")
