"""The dashboard's web application: routes, authentication on every request, the login
form, security headers; Redis and PostgreSQL opened for the application's lifetime."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from jobstream.consumers.dashboard import api, pages
from jobstream.consumers.dashboard.auth import COOKIE, Auth, same_origin
from jobstream.consumers.dashboard.queries import ListError, Unknown
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings

__all__ = ["build_app"]

_OPEN = ("/login", "/static/", "/api/openapi.json")
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request], Awaitable[Response]]


def _local(path: str | None) -> str:
    """A path on this site to go back to after logging in (never another site)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


async def _guard(request: Request, call_next: Handler) -> Response:
    """Every request but the login form, static files and the API's description needs the
    token; every action also proves it is not cross-site (`Auth.csrf_ok`)."""
    auth: Auth = request.app.state.auth
    path = request.url.path
    is_api = path.startswith("/api/")
    if not path.startswith(_OPEN) and not auth.allows(request):
        if is_api:
            return api.error("authentication required: Authorization: Bearer <token>", 401)
        target = urllib.parse.quote(
            _local(path + (f"?{request.url.query}" if request.url.query else ""))
        )
        return RedirectResponse(f"/login?next={target}", status_code=303)
    if request.method not in ("GET", "HEAD") and path != "/login":
        given = request.headers.get("x-csrf-token")
        if given is None and not is_api:  # the body is read again by the page (cached)
            form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
            given = form.get("csrf", [""])[0] or None
        if not auth.csrf_ok(request, given):
            text = "refused: a cross-site request (reload the page and try again)"
            if is_api:
                return api.error(text, 403)
            return pages.render(request, "error.html", 403, message=text)
    response = await call_next(request)
    response.headers.update(_HEADERS)
    return response


async def _refused(request: Request, exc: Exception) -> Response:
    """A request answered as refused: JSON under /api/, a page elsewhere."""
    code, text, headers = 404 if isinstance(exc, Unknown) else 400, str(exc), {}
    if isinstance(exc, HTTPException):  # 404, 405 (with its Allow header)
        code, text, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
    if request.url.path.startswith("/api/"):
        response = api.error(text, code)
    else:
        response = pages.render(request, "error.html", code, message=text)
    response.headers.update(headers)
    return response


async def _login_form(request: Request) -> Response:
    return pages.render(
        request, "login.html", next=_local(request.query_params.get("next")), failed=False
    )


async def _login(request: Request) -> Response:
    auth: Auth = request.app.state.auth
    form = await request.form()
    target = _local(str(form.get("next", "/")))
    if not same_origin(request) or not auth.token_matches(str(form.get("token", ""))):
        return pages.render(request, "login.html", 401, next=target, failed=True)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        auth.session,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def _logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


def build_app(settings: Settings, auth: Auth, deps: Deps | None = None) -> Starlette:
    """The application on `deps`; without them it opens Redis and PostgreSQL when it starts
    and closes them after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if deps is not None:
            app.state.deps = deps
            yield
            return
        async with connect(settings, wait=False, client_name="jobstream-dashboard") as opened:
            app.state.deps = opened
            yield

    static = StaticFiles(
        directory=str(resources.files("jobstream.consumers.dashboard").joinpath("static"))
    )
    routes = [
        Route("/login", _login_form, methods=["GET"]),
        Route("/login", _login, methods=["POST"]),
        Route("/logout", _logout, methods=["POST"]),
        Mount("/static", static, name="static"),
        *api.ROUTES,
        *pages.ROUTES,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_guard)],
        exception_handlers={404: _refused, 405: _refused, ListError: _refused},
    )
    app.state.auth = auth
    return app
