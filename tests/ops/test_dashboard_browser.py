"""The dashboard in a real browser (Debian's headless Chromium through Selenium and the
system chromedriver): an operator logs in, finds a failed job, opens it, replays its dead
letter and sees it complete under a running worker; and every page stays usable with
10,000 jobs and 1,000 dead letters. Each page's screenshot is written under tmp_path."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.server
import json
import pathlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from jobstream.consumers.worker.deps import Deps
from jobstream.streams.dead_letters import dead_fields
from tests.helpers import eventually
from tests.ops.dashboard_helpers import TOKEN, dashboard

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACE_URL = "http://localhost:16686/trace/{trace_id}"


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "no Chromium: install Debian's `chromium` and `chromium-driver` packages "
            "(scripts/test does when it may)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    b = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    b.set_page_load_timeout(60)
    try:
        yield b
    finally:
        b.quit()


class _Sink(http.server.BaseHTTPRequestHandler):
    """A webhook endpoint that accepts everything and counts what it got. In a thread, not
    the demo's asyncio sink: the browser calls block this test's event loop."""

    received: list[bytes] = []  # noqa: RUF012 (one per test process)

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers.get("content-length", "0"))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test asserts on `received`


@pytest.fixture
def sink() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()


def _shot(b: WebDriver, folder: pathlib.Path, name: str) -> None:
    path = folder / f"{name}.png"
    assert b.save_screenshot(str(path)), name
    assert path.stat().st_size > 1000


def _wait(b: WebDriver, what: Any, timeout_s: float = 30) -> Any:
    return WebDriverWait(b, timeout_s, poll_frequency=0.2).until(what)


def _login(b: WebDriver, base: str, shots: pathlib.Path | None = None) -> None:
    b.get(f"{base}/")
    _wait(b, lambda d: "/login" in d.current_url)
    if shots is not None:
        _shot(b, shots, "login")
    b.find_element(By.ID, "token").send_keys(TOKEN)
    b.find_element(By.ID, "login-submit").click()
    _wait(b, lambda d: d.find_elements(By.CSS_SELECTOR, "main#queues"))


def _webhook(job_id: str, endpoint: str) -> dict[Any, Any]:
    payload = {"endpoint_id": endpoint, "message_id": f"msg_{job_id}", "event_type": "email.sent",
               "timestamp": "2026-12-01T10:00:00Z", "data": {"n": 1}}  # fmt: skip
    return {"id": job_id, "payload": json.dumps(payload),
            "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}  # fmt: skip


async def _status(deps: Deps, job_id: str) -> str | None:
    status: str | None = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    return status


async def test_an_operator_replays_a_failed_job_and_sees_it_complete(
    browser: WebDriver, deps: Deps, env_for: Any, sink: str, tmp_path: pathlib.Path
):
    b, shots = browser, tmp_path / "screens"
    shots.mkdir()
    await deps.redis.xadd(deps.keys.stream("webhook"), _webhook("hook-1", "ep-dash"))
    # One process, whose liveness a loaded machine cannot outlast (1.5 s in tests): the
    # replayed job must be delivered exactly once, never taken over while it runs.
    env = env_for(
        JOBSTREAM_WEBHOOK_ALLOW_PRIVATE="true",
        JOBSTREAM_TRACE_URL=TRACE_URL,
        JOBSTREAM_ALIVE_TTL_MS="15000",
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobstream.consumers.cli", "worker", "--processes", "1",
        "--queues", "webhook", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await eventually(lambda: _failed(deps, "hook-1"), timeout_s=60)
        with dashboard(env) as base:
            _login(b, base, shots)
            _shot(b, shots, "queues")
            row = b.find_element(By.CSS_SELECTOR, 'tr[data-queue="webhook"]')
            assert row.find_elements(By.CSS_SELECTOR, "a.bad")[0].text == "1"  # one dead letter

            # Find the failed job.
            b.find_element(By.LINK_TEXT, "Jobs").click()
            Select(b.find_element(By.ID, "filter-status")).select_by_value("failed")
            b.find_element(By.ID, "apply").click()
            _wait(b, lambda d: "status=failed" in d.current_url)
            rows = b.find_elements(By.CSS_SELECTOR, "tr.job")
            assert [r.get_attribute("data-status") for r in rows] == ["failed"]
            _shot(b, shots, "jobs")

            # Its page: row, execution, hash, payload, trace.
            rows[0].find_element(By.CSS_SELECTOR, "a.job-link").click()
            _wait(b, lambda d: d.find_elements(By.ID, "job-status"))
            assert b.find_element(By.ID, "job-status").text == "failed"
            assert "no webhook endpoint ep-dash" in b.find_element(By.ID, "executions").text
            assert json.loads(b.find_element(By.ID, "payload").text)["endpoint_id"] == "ep-dash"
            assert "failed" in b.find_element(By.ID, "hash").text
            link = b.find_element(By.ID, "trace-link")
            assert link.get_attribute("href") == TRACE_URL.format(trace_id=TRACE)
            _shot(b, shots, "job-failed")

            # Fix the cause (the endpoint now exists), then replay the dead letter.
            secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
            await deps.pool.execute(
                "INSERT INTO webhook_endpoints (id, url, secret, event_types) "
                "VALUES ('ep-dash', $1, $2, ARRAY['email.sent'])",
                sink,
                secret,
            )
            b.find_element(By.ID, "to-dead").click()
            letter = _wait(b, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-job="hook-1"]'))
            _shot(b, shots, "dead")
            letter[0].find_element(By.CSS_SELECTOR, "button.replay-one").click()
            done = _wait(b, lambda d: d.find_elements(By.ID, "done"))
            assert done[0].text.startswith("Replayed 1")
            assert not b.find_elements(By.CSS_SELECTOR, 'tr[data-job="hook-1"]')

            # It completes under the running worker.
            b.get(f"{base}/jobs/hook-1")

            def completed(d: WebDriver) -> bool:
                d.refresh()
                return bool(d.find_element(By.ID, "job-status").text == "completed")

            _wait(b, completed, 60)
            assert "completed" in b.find_element(By.ID, "executions").text
            _shot(b, shots, "job-completed")
            assert len(_Sink.received) == 1

            b.get(f"{base}/workers")
            _wait(b, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.worker.alive"))
            _shot(b, shots, "workers")
            b.get(f"{base}/dead/purge?queue=webhook")
            assert "0 dead letters" in b.find_element(By.ID, "purge-count").text
            _shot(b, shots, "purge")
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
    names = sorted(p.stem for p in shots.glob("*.png"))
    assert names == ["dead", "job-completed", "job-failed", "jobs", "login", "purge", "queues",
                     "workers"]  # fmt: skip


async def _failed(deps: Deps, job_id: str) -> bool:
    return await _status(deps, job_id) == "failed"


async def _seed(deps: Deps, jobs: int, letters: int) -> None:
    """`jobs` rows (a tenth failed) with an execution each over the last hour, and
    `letters` dead letters of `webhook`."""
    await deps.pool.execute(
        """
        INSERT INTO jobs (id, queue, status, error, attempts, payload, created_at, updated_at)
        SELECT 'load-' || i, (ARRAY['analytics', 'webhook', 'email-sending'])[1 + i % 3],
               CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'completed' END,
               CASE WHEN i % 10 = 0 THEN 'endpoint answered 500' END, 1, '{"n": 1}',
               now() - (i * interval '300 milliseconds'), now()
        FROM generate_series(1, $1) AS i
        """,
        jobs,
    )
    await deps.pool.execute(
        """
        INSERT INTO job_executions (job_id, attempt, outcome, error, duration_ms, worker_id,
                                    started_at, finished_at, job_created_at)
        SELECT id, 1, status, NULL, 5, 'w1', created_at, created_at, created_at
        FROM jobs WHERE id LIKE 'load-%'
        """
    )
    await deps.pool.execute("ANALYZE jobs")
    now = dt.datetime.now(dt.UTC).timestamp()
    async with deps.redis.pipeline(transaction=False) as pipe:
        for i in range(letters):
            fields = dead_fields(
                {b"id": f"dl-{i}".encode(), b"payload": b'{"n": 1}'},
                queue="webhook", job_id=f"dl-{i}", entry_id=f"{i + 1}-0", reason="exhausted",
                error="endpoint answered 500", attempts=10, failed_at=now,
            )  # fmt: skip
            pipe.xadd(deps.keys.dead("webhook"), fields)
        await pipe.execute()


def _timed(b: WebDriver, url: str) -> float:
    """Load `url`; how long the browser took from the request to a loaded page, in ms."""
    started = time.monotonic()
    b.get(url)
    return round((time.monotonic() - started) * 1000, 1)


async def test_pages_stay_usable_with_10000_jobs_and_1000_dead_letters(
    browser: WebDriver, deps: Deps, env_for: Any, tmp_path: pathlib.Path
):
    b, shots = browser, tmp_path / "screens"
    shots.mkdir()
    await _seed(deps, 10_000, 1_000)
    timings: dict[str, float] = {}
    with dashboard(env_for()) as base:
        _login(b, base)
        timings["/"] = _timed(b, f"{base}/")
        counts = b.find_element(By.CSS_SELECTOR, 'tr[data-queue="webhook"]').text
        assert "failed 334" in counts  # i % 30 == 10 for i up to 10,000
        _shot(b, shots, "queues-loaded")

        timings["/jobs"] = _timed(b, f"{base}/jobs")
        assert len(b.find_elements(By.CSS_SELECTOR, "tr.job")) == 50  # a page, not 10,000
        first = b.find_element(By.CSS_SELECTOR, "a.job-link").text
        assert first == "load-1"  # newest first
        b.find_element(By.ID, "older").click()
        _wait(b, lambda d: "before=" in d.current_url)
        assert b.find_element(By.CSS_SELECTOR, "a.job-link").text == "load-51"
        _shot(b, shots, "jobs-loaded")

        timings["/jobs?status=failed"] = _timed(b, f"{base}/jobs?status=failed")
        rows = b.find_elements(By.CSS_SELECTOR, "tr.job")
        assert len(rows) == 50
        assert {r.get_attribute("data-status") for r in rows} == {"failed"}

        timings["/jobs/load-10"] = _timed(b, f"{base}/jobs/load-10")
        assert b.find_element(By.ID, "job-status").text == "failed"

        timings["/dead"] = _timed(b, f"{base}/dead?queue=webhook")
        letters = b.find_elements(By.CSS_SELECTOR, "tr.letter")
        assert len(letters) == 50
        assert letters[0].get_attribute("data-job") == "dl-999"
        b.find_element(By.ID, "select-all").click()
        assert b.find_element(By.ID, "replay-selected").text == "Replay 50 selected"
        assert "1000" in b.find_element(By.CSS_SELECTOR, ".tabs a[aria-current]").text
        _shot(b, shots, "dead-loaded")
        b.find_element(By.ID, "replay-selected").click()  # the 50 ticked: replayed, not purged
        done = _wait(b, lambda d: d.find_elements(By.ID, "done"))
        assert done[0].text.startswith("Replayed 50")
        assert "950" in b.find_element(By.CSS_SELECTOR, ".tabs a[aria-current]").text
        assert await deps.redis.xlen(deps.keys.stream("webhook")) == 50

        b.find_element(By.ID, "purge").click()  # purging asks twice: a page, then a dialog
        assert "deletes 950 dead letters" in b.find_element(By.ID, "purge-count").text
        _shot(b, shots, "purge-loaded")
        b.find_element(By.ID, "confirm-purge").click()
        _wait(b, EC.alert_is_present()).dismiss()  # "no": nothing goes
        assert await deps.redis.xlen(deps.keys.dead("webhook")) == 950
        b.find_element(By.ID, "confirm-purge").click()
        _wait(b, EC.alert_is_present()).accept()
        done = _wait(b, lambda d: d.find_elements(By.ID, "done"))
        assert done[0].text.startswith("Purged 950")
        assert await deps.redis.xlen(deps.keys.dead("webhook")) == 0

        timings["/workers"] = _timed(b, f"{base}/workers")
        _shot(b, shots, "workers-loaded")
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"page load times with 10,000 jobs and 1,000 dead letters (ms): {timings}")  # noqa: T201
