"""Who may use the dashboard: one operator token, and protection of actions against
cross-site requests.

The token comes as `Authorization: Bearer <token>` or is entered once into the login form,
which sets an HttpOnly, SameSite=Strict cookie holding a value derived from the token (never
the token itself). Every comparison is constant-time. An action made with the cookie must
also carry the CSRF token of the page (derived from the token too) and come from the
dashboard's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import pathlib
import secrets
from dataclasses import dataclass

from starlette.requests import Request

from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError

__all__ = ["COOKIE", "MIN_TOKEN_LENGTH", "Auth", "is_loopback", "load_token"]

COOKIE = "jobstream_session"
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(settings: Settings) -> str | None:
    """The configured token (`JOBSTREAM_DASHBOARD_TOKEN` or the first line of
    `JOBSTREAM_DASHBOARD_TOKEN_FILE`), or None; ConfigError when unusable."""
    if settings.dashboard_token is not None and settings.dashboard_token_file is not None:
        raise ConfigError(
            "set JOBSTREAM_DASHBOARD_TOKEN or JOBSTREAM_DASHBOARD_TOKEN_FILE, not both"
        )
    token, where = settings.dashboard_token, "JOBSTREAM_DASHBOARD_TOKEN"
    if settings.dashboard_token_file is not None:
        where = "JOBSTREAM_DASHBOARD_TOKEN_FILE"
        try:
            text = pathlib.Path(settings.dashboard_token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the token file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: the token file is not UTF-8 text") from None
        token = text.strip().partition("\n")[0].strip()
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise ConfigError(
            f"{where}: the token must be at least {MIN_TOKEN_LENGTH} printable ASCII "
            "characters (e.g. from `openssl rand -hex 32`)"
        )
    return token


def _derive(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Auth:
    """Checks requests against one token."""

    token: str

    @classmethod
    def random(cls) -> Auth:
        return cls(secrets.token_urlsafe(24))

    @property
    def session(self) -> str:
        """The cookie's value: proves the token was entered, without holding it."""
        return _derive(self.token, "jobstream-dashboard-session")

    @property
    def csrf(self) -> str:
        """The token every form and script action must carry with the cookie."""
        return _derive(self.token, "jobstream-dashboard-csrf")

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def by_bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(given.strip())

    def by_cookie(self, request: Request) -> bool:
        given = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), self.session.encode())

    def allows(self, request: Request) -> bool:
        return self.by_bearer(request) or self.by_cookie(request)

    def csrf_ok(self, request: Request, given: str | None) -> bool:
        """An action is ours: sent with a bearer token (no browser adds one by itself), or
        from our own origin carrying the page's CSRF token."""
        if self.by_bearer(request):
            return True
        if given is None or not hmac.compare_digest(given.encode(), self.csrf.encode()):
            return False
        return same_origin(request)


def same_origin(request: Request) -> bool:
    """The request's Origin (or, without one, Referer) is this dashboard's own origin."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return hmac.compare_digest(origin.encode(), own.encode())
    referer = request.headers.get("referer")
    return referer is not None and (referer == own or referer.startswith(own + "/"))
