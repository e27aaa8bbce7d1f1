"""`jobstream dashboard`: check the address and the token, then serve until stopped."""

from __future__ import annotations

import logging
import os
import socket
import sys

import uvicorn

from jobstream.consumers.dashboard.app import build_app
from jobstream.consumers.dashboard.auth import Auth, is_loopback, load_token
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError

__all__ = ["run_dashboard"]

logger = logging.getLogger(__name__)


def dashboard_auth(settings: Settings, host: str) -> tuple[Auth, bool]:
    """The token to require, and whether it was made up for this run.

    Without a configured token the dashboard serves only the loopback address, with a
    random token printed once; on any other address it refuses to start.
    """
    token = load_token(settings)
    if token is not None:
        return Auth(token), False
    if not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without a token: set "
            "JOBSTREAM_DASHBOARD_TOKEN or JOBSTREAM_DASHBOARD_TOKEN_FILE (or use 127.0.0.1)"
        )
    return Auth.random(), True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def run_dashboard(settings: Settings, host: str, port: int) -> int:
    """Serve the dashboard on host:port until SIGTERM or SIGINT; return the exit code."""
    auth, made_up = dashboard_auth(settings, host)
    shown = f"[{host}]" if ":" in host else host
    if made_up:  # the operator needs it once, to log in
        print(f"jobstream dashboard: http://{shown}:{port}/  token (this run only): "
              f"{auth.token}", file=sys.stderr, flush=True)  # fmt: skip
    async with connect(settings, wait=False, client_name="jobstream-dashboard") as deps:
        return await _serve(settings, auth, deps, host, port)


async def _serve(settings: Settings, auth: Auth, deps: Deps, host: str, port: int) -> int:
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        build_app(settings, auth, deps),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )
    try:  # bound here, so that a taken port is one line of ours
        sock = socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        raise ConfigError(
            f"the dashboard cannot listen on {shown}:{port}: {os.strerror(exc.errno or 0)}"
        ) from None
    server = uvicorn.Server(config)
    with sock:
        await server.serve(sockets=[sock])
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise ConfigError(f"the dashboard could not listen on {shown}:{port}")
    return 0
