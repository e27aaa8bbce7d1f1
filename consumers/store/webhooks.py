"""Webhook endpoints: the table of customer endpoints and the rules an endpoint URL obeys
(which hosts and addresses a delivery may reach), shared by the `webhook` queue and the CLI.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
from typing import Any

import asyncpg
import httpx

from jobstream.consumers.worker.events import EVENT_TYPES
from jobstream.streams import ConfigError

__all__ = [
    "ENDPOINT_SQL",
    "add_endpoint",
    "allowed_address",
    "disable_endpoint",
    "list_endpoints",
    "parse_endpoint",
]

ENDPOINT_SQL = "SELECT id, url, secret, active FROM webhook_endpoints WHERE id = $1"
DISABLE_SQL = """
UPDATE webhook_endpoints SET active = false, disabled_reason = $2 WHERE id = $1 AND active
"""
ADD_ENDPOINT_SQL = """
INSERT INTO webhook_endpoints (id, url, secret, event_types) VALUES ($1, $2, $3, $4)
"""
LIST_ENDPOINTS_SQL = """
SELECT id, url, event_types, active, disabled_reason, created_at FROM webhook_endpoints
ORDER BY created_at, id
"""

_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local use, never global
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 SIIT
_HOST_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and reaches: mapped, NAT64, 6to4, Teredo
    (server and client), IPv4-compatible and IPv4-translated forms."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        out += ip.teredo
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        out.append(low32)
    return out


def allowed_address(ip: IP, allow_private: bool) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if not all(allowed_address(v4, allow_private) for v4 in _embedded_ipv4(ip)):
            return False
        if ip.ipv4_mapped is not None:
            return True  # judged by its IPv4 address alone
        if ip in _NAT64_LOCAL:
            return allow_private
    if ip in _METADATA or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return False  # never, whatever the configuration
    return ip.is_global or allow_private


def parse_endpoint(url: str) -> httpx.URL:
    """The endpoint URL, checked: http(s), a host that is an IP literal or a DNS name (not
    a numeric form such as `0x7f.1` or `2130706433` that resolvers read as an address),
    a port from 1 to 65535. ValueError saying what is wrong, in one line."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid endpoint URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ValueError("an endpoint URL must be http:// or https:// and name a host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ValueError(f"invalid endpoint URL: port {parsed.port} is not 1 to 65535")
    host = parsed.raw_host.decode("ascii", errors="replace").lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        last = host.rstrip(".").rpartition(".")[2]
        if len(host) > 253 or not _HOST_NAME.fullmatch(host) or _NUMERIC_LABEL.fullmatch(last):
            raise ValueError(f"invalid endpoint URL: {host!r} is not a host name") from None
    return parsed


async def add_endpoint(
    pool: asyncpg.Pool, url: str, event_types: list[str] | None = None
) -> tuple[str, str]:
    """Register an endpoint; return its id and its secret (shown to the customer once)."""
    try:
        host = parse_endpoint(url).raw_host.decode("ascii")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None  # a name: checked when it is resolved, at each delivery
    if literal is not None and not allowed_address(literal, allow_private=True):
        raise ConfigError(f"a webhook may never target {host} (metadata, link-local or similar)")
    types = sorted(set(event_types or EVENT_TYPES))
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ConfigError(f"unknown event types {', '.join(unknown)}")
    endpoint_id = f"ep_{secrets.token_hex(8)}"
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    await pool.execute(ADD_ENDPOINT_SQL, endpoint_id, url, secret, types)
    return endpoint_id, secret


async def list_endpoints(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every endpoint, without its secret."""
    return [dict(r.items()) for r in await pool.fetch(LIST_ENDPOINTS_SQL)]


async def disable_endpoint(pool: asyncpg.Pool, endpoint_id: str, reason: str) -> bool:
    """Stop deliveries to an endpoint; False when there is no active one by that id."""
    return str(await pool.execute(DISABLE_SQL, endpoint_id, reason)) == "UPDATE 1"
