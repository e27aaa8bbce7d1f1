"""Secrets never leak: passwords in every configured URL, real failures, every output channel."""

from __future__ import annotations

import io
import logging
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.otel.logs import JsonFormatter, TextFormatter, TraceContextFilter
from jobstream.otel.redact import redact_url, remember_secrets, scrub, secrets_of_url
from jobstream.schema.payloads import SendEmail
from tests.helpers import REDIS_URL, eventually, in_memory_spans, jobstream, running
from tests.servers import free_port

# Each password mixes `@`, `:` and percent-escapes; every piece of each is distinctive, so a
# leaked tail ("...@Tail9731") is caught as surely as the whole.
REDIS_PW = "Rdq7@Kx2v:Sec4821"  # written %40-escaped
PG_PW = "Pgz3@Qm5w:Sec7310"  # written %40-escaped
PG_QUERY_PW = "PgQuery5566"  # ?password=
PG_SSL_PW = "SslQuery8877"  # ?sslpassword=
SMTP_PW = "Kv9rT@Tail9731"  # written raw: the `@` stays in the userinfo
MAILBOX_PW = "Mbx4:Zy8@Word8642"  # written %40-escaped
MAILBOX_TOKEN = "TokQx4455"  # ?token=


def forbidden() -> list[str]:
    out: list[str] = []
    for secret in (REDIS_PW, PG_PW, PG_QUERY_PW, PG_SSL_PW, SMTP_PW, MAILBOX_PW, MAILBOX_TOKEN):
        out += [secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret, safe=":")]
        out += [piece for piece in re.split(r"[@:]", secret) if len(piece) >= 4]
    return sorted(set(out))


def leaks(text: str) -> list[str]:
    return [s for s in forbidden() if s in text]


def quoted(pw: str) -> str:
    return urllib.parse.quote(pw, safe=":")


def secret_urls(settings: Settings, smtp_port: int) -> dict[str, str]:
    redis = urllib.parse.urlsplit(REDIS_URL)
    pg = urllib.parse.urlsplit(settings.database_url)
    return {
        "REDIS_URL": redis._replace(netloc=f"default:{quoted(REDIS_PW)}@{redis.netloc}").geturl(),
        "DATABASE_URL": pg._replace(
            netloc=f"postgres:{quoted(PG_PW)}@{pg.hostname}:{pg.port}",
            query=f"sslpassword={PG_SSL_PW}&password={PG_QUERY_PW}",
        ).geturl(),
        "SMTP_URL": f"smtp://relayuser:{SMTP_PW}@127.0.0.1:{smtp_port}",
    }


def mailbox_url(port: int) -> str:
    return f"smtp://mbuser:{quoted(MAILBOX_PW)}@127.0.0.1:{port}?token={MAILBOX_TOKEN}"


def message(mailbox: str) -> SendEmail:
    return SendEmail(mailbox_id=mailbox, to=["rcpt@example.net"], subject="s", text="t")


def span_texts(spans: Any) -> str:
    parts = []
    for s in spans:
        parts += [s.name, repr(dict(s.attributes or {})), s.status.description or ""]
        parts += [repr(dict(e.attributes or {})) for e in s.events]
    return "\n".join(parts)


@pytest.fixture
def logs() -> Any:
    """The root logger's records in both our formats, for the duration of the test."""
    text, json_ = io.StringIO(), io.StringIO()
    handlers = []
    for out, fmt in ((text, TextFormatter()), (json_, JsonFormatter())):
        h = logging.StreamHandler(out)
        h.addFilter(TraceContextFilter())
        h.setFormatter(fmt)
        handlers.append(h)
        logging.getLogger().addHandler(h)
    old = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        yield text, json_
    finally:
        logging.getLogger().setLevel(old)
        for h in handlers:
            logging.getLogger().removeHandler(h)


async def test_no_channel_shows_a_password(
    deps: Deps, settings: Settings, env_for: Callable[..., dict[str, str]], logs: Any
):
    # The default relay accepts relayuser, then refuses the message quoting the credentials;
    # the mailbox's own relay login is refused.
    echo = f"554 5.7.1 refused for relayuser:{SMTP_PW} ({quoted(SMTP_PW)})"
    async with smtp_sink(users={"relayuser": SMTP_PW}, data_replies=[echo] * 20) as sink:
        urls = secret_urls(settings, sink.port)
        secret = msgspec.structs.replace(
            settings,
            redis_url=urls["REDIS_URL"],
            database_url=urls["DATABASE_URL"],
            smtp_url=urls["SMTP_URL"],
        )
        env = env_for(**urls)
        await add_mailbox(deps.pool, "own@example.com", mailbox_id="mb-own",
                          smtp_url=mailbox_url(sink.port))  # fmt: skip
        await add_mailbox(deps.pool, "default@example.com", mailbox_id="mb-default")
        jobs = {f"{w}-{mb}": mb for w in ("inproc", "text", "json") for mb in ("own", "default")}

        async def publish(prefix: str) -> None:
            for job_id, mb in jobs.items():
                if job_id.startswith(prefix):
                    await deps.publisher.publish("email-sending", message(f"mb-{mb}"), job_id)

        async def failed(prefix: str) -> bool:
            ids = [j for j in jobs if j.startswith(prefix)]
            n = await deps.pool.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'failed'", ids
            )
            return bool(n == len(ids))

        # In process: spans in memory, logs through both formatters.
        with in_memory_spans() as exporter:
            async with connect(secret) as sdeps:
                await publish("inproc")
                async with running(make_engine(sdeps, ["email-sending"])):
                    await eventually(lambda: failed("inproc"))
            spans = span_texts(exporter.get_finished_spans())
        assert "smtp send" in spans
        assert "refused AUTH (535)" in spans
        assert leaks(spans) == []
        text_log, json_log = logs[0].getvalue(), logs[1].getvalue()
        assert "job failed job=inproc-own" in text_log
        assert leaks(text_log) == []
        assert leaks(json_log) == []

        # A worker as an operator runs it, in both log formats.
        for fmt in ("text", "json"):
            await publish(fmt)
            out = await jobstream(env, "--log-level", "DEBUG", "worker", "--burst",
                                  "--queues", "email-sending", "--log-format", fmt)  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert await failed(fmt)
            assert "worker " in out.stderr
            assert "password=***" in out.stderr
            assert leaks(out.stdout + out.stderr) == []

    # What the stores hold.
    rows = await deps.pool.fetch("SELECT id, error FROM jobs")
    assert len(rows) == 6
    assert all("refused AUTH (535)" in r["error"] or "554" in r["error"] for r in rows)
    assert "mbuser:***@127.0.0.1" in "".join(r["error"] for r in rows)
    stored = [repr(list(map(dict, rows)))]
    for sql in (
        "SELECT error FROM job_executions",
        "SELECT smtp_reply FROM outbound_messages",
    ):
        stored.append(repr([dict(r) for r in await deps.pool.fetch(sql)]))
    dead: Any = await deps.redis.xrange(deps.keys.dead("email-sending"))
    assert len(dead) == 6
    stored.append(repr(dead))
    for job_id in jobs:
        stored.append(repr(await deps.redis.hgetall(deps.keys.job(job_id))))
    assert leaks("\n".join(stored)) == []

    # What the commands print.
    dead_id = dead[0][0].decode()
    outputs = []
    for args in (
        ["mailbox", "list"],
        ["job", "inproc-default"],
        ["job", "text-own", "--json"],
        ["dlq", "list", "email-sending"],
        ["dlq", "show", dead_id],
        ["status"],
    ):
        out = await jobstream(env, *args)
        assert out.returncode == 0, (args, out.stderr)
        outputs.append(out.stdout + out.stderr)
    assert "smtp://mbuser:***@127.0.0.1" in outputs[0]
    assert "token=***" in outputs[0]
    assert "554" in outputs[1]
    assert leaks("\n".join(outputs)) == []

    # Errors of the commands themselves: nothing listens on the port, a port is malformed.
    pg_port = urllib.parse.urlsplit(settings.database_url).port
    down = dict(env, DATABASE_URL=urls["DATABASE_URL"].replace(f":{pg_port}/", f":{free_port()}/"))
    refused = await jobstream(down, "status")
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1
    bad_port = await jobstream(env, "mailbox", "add", "x@example.com", "--smtp-url",
                               mailbox_url(99999))  # fmt: skip
    assert bad_port.returncode == 2
    assert leaks(refused.stderr + bad_port.stderr) == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("smtp://u:Kv9rT@Tail9731@relay:25", "smtp://u:***@relay:25"),
        ("smtp://u:a:b%40c@relay?starttls", "smtp://u:***@relay?starttls"),
        ("postgresql://app@db/app?password=x&sslmode=require", "postgresql://app@db/app?password=***&sslmode=require"),
        ("postgresql://db/app?sslpassword=x;PASSWORD=y#f", "postgresql://db/app?sslpassword=***;PASSWORD=***#f"),
        ("https://h/hook?access_token=t&email=a@b.example", "https://h/hook?access_token=***&email=a@b.example"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user@h", "redis://user@h"),
        ("http://[::1", "http://[::1"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str):
    assert redact_url(url) == shown


def test_scrub_hides_remembered_values_in_any_text():
    remember_secrets(secrets_of_url("smtp://u:Qv5z%40Hidden:0917@relay"))
    text = "535 bad login Qv5z@Hidden:0917 (Qv5z%40Hidden%3A0917) via smtp://u:x@relay/"
    assert scrub(text) == "535 bad login *** (***) via smtp://u:***@relay/"
    remember_secrets(["abc"])  # too short to search for in free text
    assert scrub("abcdef") == "abcdef"


passwords = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40
)


@given(passwords, st.sampled_from(["smtp", "redis", "postgresql", "https"]))
def test_a_password_never_survives_redaction(password: str, scheme: str):
    for written in (urllib.parse.quote(password, safe=""), urllib.parse.quote(password, safe="@:")):
        if any(c in written for c in "/?#"):
            continue  # such a password would end the authority: not in userinfo
        url = f"{scheme}://user:{written}@host.example:25/path?password={written}"
        shown = redact_url(url)
        assert shown == f"{scheme}://user:***@host.example:25/path?password=***"
        assert urllib.parse.urlsplit(url).password == written
