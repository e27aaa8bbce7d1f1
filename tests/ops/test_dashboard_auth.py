"""The dashboard lets in only the token's holder and refuses cross-site actions; the
command refuses bad addresses, ports and tokens in one line."""

from __future__ import annotations

import pathlib
import socket
import urllib.parse
from collections.abc import AsyncIterator

import httpx
import pytest
import yaml

from jobstream.consumers.cli.main import build_parser
from jobstream.consumers.dashboard import build_app
from jobstream.consumers.dashboard.auth import COOKIE, Auth
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError
from tests.helpers import jobstream
from tests.ops.dashboard_helpers import TOKEN, free_port

ORIGIN = "http://testserver"


@pytest.fixture
async def client(deps: Deps) -> AsyncIterator[httpx.AsyncClient]:
    """The application in process, on this test's Redis prefix and database."""
    app = build_app(deps.settings, Auth(TOKEN), deps)
    app.state.deps = deps  # what its lifespan does
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as c:
        yield c


async def _login(client: httpx.AsyncClient) -> None:
    answer = await client.post("/login", data={"token": TOKEN, "next": "/dead"},
                         headers={"Origin": ORIGIN})  # fmt: skip
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dead"


async def test_every_page_and_api_needs_the_token(client: httpx.AsyncClient):
    for path in ("/", "/jobs", "/jobs/x", "/dead", "/workers"):
        answer = await client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=")
    for path in ("/api/queues", "/api/jobs", "/api/jobs/x", "/api/dead", "/api/workers"):
        answer = await client.get(path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "error" in answer.json()
        wrong = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401
        right = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code in (200, 404)
    assert (await client.get("/api/openapi.json")).status_code == 200  # the description is public
    assert (await client.get("/login")).status_code == 200


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(
    client: httpx.AsyncClient,
):
    bad = await client.post("/login", data={"token": "nope"}, headers={"Origin": ORIGIN})
    assert bad.status_code == 401
    assert COOKIE not in bad.cookies
    answer = await client.post("/login", data={"token": TOKEN, "next": "/workers"},
                         headers={"Origin": ORIGIN})  # fmt: skip
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie
    assert (await client.get("/workers")).status_code == 200  # the cookie lets the browser in
    assert (await client.get("/api/workers")).status_code == 200
    await client.post("/logout", data={"csrf": Auth(TOKEN).csrf}, headers={"Origin": ORIGIN})
    assert (await client.get("/workers")).status_code == 303


async def test_login_from_another_site_and_open_redirects_are_refused(client: httpx.AsyncClient):
    foreign = await client.post(
        "/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 401
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example"):
        answer = await client.post("/login", data={"token": TOKEN, "next": target},
                             headers={"Origin": ORIGIN})  # fmt: skip
        assert answer.headers["location"] == "/"


async def test_actions_with_the_cookie_need_the_csrf_token_and_our_origin(
    client: httpx.AsyncClient,
):
    await _login(client)
    csrf = Auth(TOKEN).csrf
    form = {"queue": "webhook", "ids": "1-1"}
    missing = await client.post("/dead/replay", data=form, headers={"Origin": ORIGIN})
    assert missing.status_code == 403
    forged = await client.post(
        "/dead/replay", data={**form, "csrf": "0" * 64}, headers={"Origin": ORIGIN}
    )
    assert forged.status_code == 403
    cross = await client.post("/dead/replay", data={**form, "csrf": csrf},
                        headers={"Origin": "https://evil.example"})  # fmt: skip
    assert cross.status_code == 403
    no_origin = await client.post("/dead/replay", data={**form, "csrf": csrf})
    assert no_origin.status_code == 403
    ok = await client.post("/dead/replay", data={**form, "csrf": csrf}, headers={"Origin": ORIGIN})
    assert ok.status_code == 303
    assert ok.headers["location"] == "/dead?queue=webhook&replayed=0&gone=1&refused=0"
    body = {"confirm": True}
    api = await client.post("/api/dead/webhook/purge", json=body, headers={"Origin": ORIGIN})
    assert api.status_code == 403
    api = await client.post("/api/dead/webhook/purge", json=body,
                      headers={"Origin": ORIGIN, "X-CSRF-Token": csrf})  # fmt: skip
    assert api.json() == {"purged": 0}


async def test_bearer_actions_need_no_csrf_token_but_purge_needs_confirmation(
    client: httpx.AsyncClient,
):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    unconfirmed = await client.post(
        "/api/dead/webhook/purge", json={"confirm": False}, headers=headers
    )
    assert unconfirmed.status_code == 400
    assert "$.confirm" in unconfirmed.json()["error"]
    done = await client.post("/api/dead/webhook/purge", json={"confirm": True}, headers=headers)
    assert done.json() == {"purged": 0}
    page = await client.post("/dead/purge", data={"queue": "webhook"}, headers=headers)
    assert page.status_code == 400  # the form's confirm=yes is missing


async def test_pages_carry_security_headers(client: httpx.AsyncClient):
    answer = await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_settings_hide_the_token():
    s = Settings.from_env({"JOBSTREAM_DASHBOARD_TOKEN": TOKEN})
    assert TOKEN not in repr(s)
    assert TOKEN in s.secrets()  # scrubbed from every error line
    with pytest.raises(ConfigError, match="JOBSTREAM_TRACE_URL"):
        Settings.from_env({"JOBSTREAM_TRACE_URL": "http://jaeger/trace/"})


async def test_the_command_refuses_bad_addresses_ports_and_tokens(env_for, tmp_path):
    env = {k: v for k, v in env_for().items() if not k.startswith("JOBSTREAM_DASHBOARD")}
    cases = [
        (["--host", "0.0.0.0"], {}, "without a token"),
        (["--port", "0"], {}, "must be a port number from 1 to 65535"),
        (["--port", "http"], {}, "must be a port number from 1 to 65535"),
        ([], {"JOBSTREAM_DASHBOARD_TOKEN": "short"}, "at least 16 printable ASCII"),
        ([], {"JOBSTREAM_DASHBOARD_TOKEN_FILE": str(tmp_path / "missing")}, "cannot read"),
        (
            [],
            {"JOBSTREAM_DASHBOARD_TOKEN": TOKEN, "JOBSTREAM_DASHBOARD_TOKEN_FILE": "/x"},
            "not both",
        ),
    ]
    for args, extra, expected in cases:
        out = await jobstream({**env, **extra}, "dashboard", *args, "--port", str(free_port()))
        if "--port" in args:  # the bad port comes after: argparse takes the last one
            out = await jobstream({**env, **extra}, "dashboard", *args)
        assert out.returncode != 0, args
        assert expected in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
    with socket.socket() as busy:  # a port another process holds
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        out = await jobstream(
            {**env, "JOBSTREAM_DASHBOARD_TOKEN": TOKEN}, "dashboard", "--port", port
        )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"jobstream: the dashboard cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_the_token_file_is_read(tmp_path):
    from jobstream.consumers.dashboard.auth import load_token

    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert load_token(Settings(dashboard_token_file=str(path))) == TOKEN
    assert load_token(Settings()) is None


def test_compose_serves_the_dashboard_with_the_token_from_an_uncommitted_env_file():
    root = pathlib.Path(__file__).resolve().parents[2]
    service = yaml.safe_load((root / "compose.yaml").read_text())["services"]["dashboard"]
    assert service["env_file"] == [{"path": "dashboard.env", "required": True}]
    assert not any("TOKEN" in name for name in service["environment"])  # never inline
    args = build_parser().parse_args(service["command"][1:])
    assert (args.command, args.host, args.port) == ("dashboard", "0.0.0.0", 8080)
    assert "{trace_id}" in service["environment"]["JOBSTREAM_TRACE_URL"]
    example = (root / "dashboard.env.example").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in example if line and not line.startswith("#")}
    assert names == {"JOBSTREAM_DASHBOARD_TOKEN"}
    assert names <= set(Settings.__struct_encode_fields__)
    assert "dashboard.env" in (root / ".gitignore").read_text().splitlines()


async def test_what_jobs_carry_is_shown_escaped(client: httpx.AsyncClient, deps: Deps):
    hostile = '<img src=x onerror="alert(1)">'
    await deps.pool.execute(
        "INSERT INTO jobs (id, queue, status, error, payload) VALUES ($1, 'webhook', 'failed', $1, "
        "jsonb_build_object('x', $1::text))",
        hostile,
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/jobs", "/jobs?status=failed", f"/jobs/{urllib.parse.quote(hostile, safe='')}"):
        page = await client.get(path, headers=headers)
        assert page.status_code == 200, path
        assert hostile not in page.text, path
        assert "&lt;img src=x onerror=" in page.text, path
