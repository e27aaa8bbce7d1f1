"""Client-side TLS: one trust policy for Redis, PostgreSQL, SMTP relays and webhook endpoints.

Certificates are always verified, host names included; `JOBSTREAM_TLS_CA_FILE` adds a CA.
"""

from __future__ import annotations

import functools
import ssl
import urllib.parse
from typing import Any, Literal

from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError

__all__ = ["certificate_problem", "client_context", "database_dsn", "redis_tls_options"]


def client_context(settings: Settings, use: Literal["smtp", "https"]) -> ssl.SSLContext:
    """The context for SMTP or HTTPS: the system's CAs (which honour `SSL_CERT_FILE` and
    `SSL_CERT_DIR`) plus `JOBSTREAM_TLS_CA_FILE`; host names checked.

    Built once per CA file and use: the HTTP client sets ALPN on its context, which must
    not reach SMTP servers.
    """
    return _context(settings.tls_ca_file, use)


@functools.cache
def _context(ca_file: str | None, use: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"invalid configuration: JOBSTREAM_TLS_CA_FILE {ca_file!r}: {exc}"
            ) from None
    return context


def redis_tls_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for a `rediss://` client: verify the server and its host name,
    trusting `JOBSTREAM_TLS_CA_FILE` too. Options in the URL's query still win."""
    if not settings.redis_url.startswith("rediss://"):
        return {}
    # redis-py before 6 did not check host names unless told to.
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = settings.tls_ca_file
    return options


def database_dsn(settings: Settings) -> str:
    """`DATABASE_URL`, with `sslrootcert` set to `JOBSTREAM_TLS_CA_FILE` unless it names one.

    The URL's `sslmode` decides: `verify-full` checks the certificate and host name,
    `verify-ca` and `require` (given a root certificate, as libpq does) the certificate.
    """
    url = settings.database_url
    if settings.tls_ca_file is None:
        return url
    head, sep, fragment = url.partition("#")
    query = urllib.parse.urlsplit(head).query
    if "sslrootcert" in urllib.parse.parse_qs(query):
        return url
    joint = "" if head.endswith(("?", "&")) else "&" if query else "?"
    extra = "sslrootcert=" + urllib.parse.quote(settings.tls_ca_file, safe="/")
    return f"{head}{joint}{extra}{sep}{fragment}"


def certificate_problem(exc: BaseException) -> str | None:
    """Why the peer's certificate was refused, when that is what `exc` (or what it wraps)
    says: e.g. "Hostname mismatch, certificate is not valid for 'x'."; None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or current).rstrip(".")
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
